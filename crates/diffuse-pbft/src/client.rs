//! The PBFT client: sign and authenticate (one MAC per replica), send to the
//! primary, retransmit to all, accept `f + 1` matching replies.
//!
//! A read-only operation (one the caller marks so, with
//! [`diffuse_core::protocol::Client::invoke_read_only`]) goes, unsigned, to every
//! replica at once, if the protocol has a read-only path ([`ClientWire::read`]),
//! and completes with `2f + 1` matching replies (Castro and Liskov, §5.1.3): any
//! two such quorums share a correct replica, so a read sees every write that
//! completed before it began, and every read that did. Without that quorum in time
//! (a concurrent write splits the answers, or replicas are down), the client
//! orders the operation as a regular request, under a new timestamp, so that no
//! reply to the read can count for it.
//!
//! It is generic over the wire enum ([`ClientWire`]) so that every ordering
//! protocol whose clients work this way (MinBFT too) shares it.

use crate::auth::RequestAuthenticator;
use crate::message::{Message, ReadRequest, Reply, Request, RequestBody};
use crate::options::{Mutant, PbftOptions};
use crate::retransmit::RetransmitTimeout;
use diffuse_core::codec::Blob;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{SecretKey, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, View};
use diffuse_core::protocol::{Actions, Input, InvokeError};
use diffuse_core::quorum::{FailureModel, QuorumSystem, ReplicaSet};
use diffuse_core::suite::ClientSetup;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The client's one timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientTimer {
    /// No reply quorum yet: send the request to every replica.
    Retransmit,
}

/// A protocol's wire enum, as far as the client needs it.
pub trait ClientWire: diffuse_core::codec::WireMessage {
    /// Wraps a request.
    fn request(request: Request) -> Self;
    /// The reply inside, if this is one.
    fn into_reply(self) -> Option<Reply>;
    /// Whether the protocol's replicas use request authenticators: if not, the
    /// client sends none (MinBFT checks every request's signature).
    const AUTHENTICATORS: bool = true;
    /// Wraps a read-only request, if the protocol's replicas answer those
    /// (otherwise the client orders read-only operations like any other).
    fn read(read: ReadRequest) -> Option<Self> {
        let _ = read;
        None
    }
}

impl ClientWire for Message {
    fn request(request: Request) -> Self {
        Message::Request(request)
    }

    fn into_reply(self) -> Option<Reply> {
        match self {
            Message::Reply(reply) => Some(reply),
            _ => None,
        }
    }

    fn read(read: ReadRequest) -> Option<Self> {
        Some(Message::Read(read))
    }
}

type Out<M> = Actions<M, ClientTimer>;

struct Outstanding {
    /// The ordered request, or `None` while the operation is tried as a read.
    request: Option<Request>,
    /// The operation, kept to order it if the read does not complete.
    operation: Blob<{ crate::message::MAX_OPERATION_BYTES }>,
    /// The timestamp replies must carry: the read's, then the ordered request's.
    timestamp: u64,
    /// The first reply of each replica for this request.
    replies: BTreeMap<ReplicaId, Reply>,
    retransmissions: u32,
}

/// A PBFT client (or, with another wire enum `M` and quorum system, a client of
/// any protocol that accepts `f + 1` matching replies) with at most one
/// outstanding request.
pub struct PbftClient<M = Message> {
    id: ClientId,
    secret: SecretKey,
    quorum: QuorumSystem,
    options: PbftOptions,
    /// The view the client believes current, learned from replies.
    view: View,
    next_timestamp: u64,
    outstanding: Option<Outstanding>,
    /// When to retransmit, adapted to how fast requests complete.
    timeout: RetransmitTimeout,
    /// The keys shared with each replica, if the protocol uses authenticators.
    authenticator: Option<RequestAuthenticator>,
    _keys: Arc<ClusterKeys>,
    _wire: std::marker::PhantomData<fn() -> M>,
}

impl PbftClient<Message> {
    /// Builds a PBFT client.
    pub fn new(setup: ClientSetup<PbftOptions>) -> Self {
        let quorum = QuorumSystem::byzantine(setup.keys.n())
            .expect("ClusterKeys guarantees 1..=MAX_REPLICAS replicas");
        Self::with_quorum(setup, quorum)
    }
}

impl<M: ClientWire> PbftClient<M> {
    /// Builds a client for a protocol with the quorum system `quorum` (its
    /// `contains_correct` decides how many matching replies are enough).
    pub fn with_quorum(setup: ClientSetup<PbftOptions>, quorum: QuorumSystem) -> Self {
        let authenticator =
            M::AUTHENTICATORS.then(|| RequestAuthenticator::new(&setup.secret, &setup.keys));
        Self {
            id: setup.id,
            secret: setup.secret,
            quorum,
            timeout: RetransmitTimeout::new(&setup.options),
            options: setup.options,
            view: View(0),
            next_timestamp: setup.first_timestamp.max(1),
            outstanding: None,
            authenticator,
            _keys: setup.keys,
            _wire: std::marker::PhantomData,
        }
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The timestamp of the outstanding request, if any.
    pub fn outstanding_timestamp(&self) -> Option<u64> {
        self.outstanding.as_ref().map(|o| o.timestamp)
    }

    fn retransmit_delay(&self, retransmissions: u32) -> Duration {
        self.timeout.delay(retransmissions)
    }

    fn on_reply(&mut self, from: NodeId, reply: Reply, out: &mut Out<M>) {
        let NodeId::Replica(replica) = from else {
            return;
        };
        if reply.replica != replica || reply.client != self.id {
            out.fault(from, "forged-reply");
            return;
        }
        let Some(outstanding) = &mut self.outstanding else {
            return;
        };
        if reply.timestamp != outstanding.timestamp {
            return;
        }
        outstanding.replies.entry(replica).or_insert(reply);
        let read = outstanding.request.is_none();
        let silent = self.quorum.n().saturating_sub(outstanding.replies.len());
        let mut groups: BTreeMap<&[u8], Vec<&Reply>> = BTreeMap::new();
        for r in outstanding.replies.values() {
            groups.entry(&r.result).or_default().push(r);
        }
        let largest = groups.values().map(Vec::len).max().unwrap_or(0);
        let trusts_first = self.options.is(Mutant::ClientTrustsFirstReply);
        let quorum_read = read && !self.options.is(Mutant::ReadWithoutQuorum);
        let accepted = groups.into_values().find(|group| {
            let senders: ReplicaSet = group.iter().map(|r| r.replica).collect();
            // `f + 1` matching replies for an ordered request, a quorum for a read.
            trusts_first
                || if quorum_read {
                    self.quorum.is_quorum(&senders)
                } else {
                    self.quorum.contains_correct(&senders)
                }
        });
        let Some(group) = accepted else {
            if read && largest + silent < self.quorum.quorum_size() {
                // The answers disagree (a write ran between them): no quorum can
                // match any more, so order the operation now.
                self.order(out);
            }
            return;
        };
        // Learn the view from the matching replies, ignoring the f highest claims so
        // that a Byzantine replica cannot point the client at a view nobody is in.
        let mut views: Vec<View> = group.iter().map(|r| r.view).collect();
        views.sort_unstable_by(|a, b| b.cmp(a));
        let view = views[self.quorum.f().min(views.len() - 1)];
        let result = group[0].result.to_vec();
        let timestamp = outstanding.timestamp;
        self.timeout.completed(outstanding.retransmissions);
        self.view = self.view.max(view);
        self.outstanding = None;
        out.cancel_timer(ClientTimer::Retransmit);
        out.0
            .push(diffuse_core::protocol::Action::Complete { timestamp, result });
    }

    fn on_retransmit(&mut self, out: &mut Out<M>) {
        let Some(outstanding) = &mut self.outstanding else {
            return;
        };
        let Some(request) = &outstanding.request else {
            // A read without a quorum in time: order it.
            return self.order(out);
        };
        outstanding.retransmissions += 1;
        let retransmissions = outstanding.retransmissions;
        let request = M::request(request.clone());
        if RetransmitTimeout::to_every_replica(retransmissions) {
            out.broadcast(request);
        } else {
            out.send(self.view.primary(self.quorum.n()), request);
        }
        out.set_timer(
            ClientTimer::Retransmit,
            self.retransmit_delay(retransmissions),
        );
    }

    /// Checks an operation against the size limits.
    fn operation_blob(
        &self,
        operation: Vec<u8>,
    ) -> Result<Blob<{ crate::message::MAX_OPERATION_BYTES }>, InvokeError> {
        if self.outstanding.is_some() {
            return Err(InvokeError::Busy);
        }
        let limit = self.options.max_operation_bytes;
        if operation.len() > limit {
            return Err(InvokeError::TooLarge {
                size: operation.len(),
                limit,
            });
        }
        Blob::try_from_vec(operation).map_err(|op| InvokeError::TooLarge {
            size: op.len(),
            limit: crate::message::MAX_OPERATION_BYTES,
        })
    }

    fn next_body(
        &mut self,
        operation: Blob<{ crate::message::MAX_OPERATION_BYTES }>,
    ) -> RequestBody {
        let timestamp = self.next_timestamp;
        self.next_timestamp += 1;
        RequestBody {
            client: self.id,
            timestamp,
            operation,
        }
    }

    /// Sends the outstanding operation as a signed request to the primary, under a
    /// new timestamp (a read that did not complete is ordered this way).
    fn order(&mut self, out: &mut Out<M>) {
        let Some(operation) = self.outstanding.as_ref().map(|o| o.operation.clone()) else {
            return;
        };
        let body = self.next_body(operation);
        let authenticator = self
            .authenticator
            .as_ref()
            .map(|a| a.authenticate(&body))
            .unwrap_or_default();
        let request = Request {
            signed: Signed::sign(body, &self.secret),
            authenticator,
        };
        out.send(
            self.view.primary(self.quorum.n()),
            M::request(request.clone()),
        );
        out.set_timer(ClientTimer::Retransmit, self.retransmit_delay(0));
        if let Some(outstanding) = &mut self.outstanding {
            outstanding.timestamp = request.timestamp;
            outstanding.request = Some(request);
            outstanding.replies.clear();
        }
    }

    fn start(&mut self, operation: Vec<u8>, read: bool) -> Result<Out<M>, InvokeError> {
        let operation = self.operation_blob(operation)?;
        self.outstanding = Some(Outstanding {
            request: None,
            operation: operation.clone(),
            timestamp: 0,
            replies: BTreeMap::new(),
            retransmissions: 0,
        });
        let mut out = Out::new();
        // A read quorum must share a correct replica with every write's quorum.
        // With trusted components a quorum is `f + 1` of `2f + 1`, and the one
        // replica two quorums may share can be faulty and lie about a read (no
        // trusted counter vouches for it): such clients order their reads.
        let byzantine = self.quorum.model() == FailureModel::Byzantine;
        if read && byzantine && self.options.read_only_path && self.authenticator.is_some() {
            let body = self.next_body(operation);
            let mut read = ReadRequest {
                body,
                authenticator: Default::default(),
            };
            if let Some(authenticator) = &self.authenticator {
                read.authenticator = authenticator.authenticate_read(&read);
            }
            let timestamp = read.body.timestamp;
            if let Some(message) = M::read(read) {
                if let Some(outstanding) = &mut self.outstanding {
                    outstanding.timestamp = timestamp;
                }
                out.broadcast(message);
                out.set_timer(ClientTimer::Retransmit, self.retransmit_delay(0));
                return Ok(out);
            }
        }
        self.order(&mut out);
        Ok(out)
    }
}

impl<M: ClientWire> diffuse_core::protocol::Client for PbftClient<M> {
    type Message = M;
    type Timer = ClientTimer;

    fn invoke(&mut self, operation: Vec<u8>) -> Result<Out<M>, InvokeError> {
        self.start(operation, false)
    }

    fn invoke_read_only(&mut self, operation: Vec<u8>) -> Result<Out<M>, InvokeError> {
        self.start(operation, true)
    }

    fn handle(&mut self, input: Input<M, ClientTimer>) -> Out<M> {
        let mut out = Out::new();
        match input {
            Input::Start(_) => {}
            Input::Message { from, message } => match message.into_reply() {
                Some(reply) => self.on_reply(from, reply, &mut out),
                None => out.fault(from, "unexpected-message-to-client"),
            },
            Input::Timer(ClientTimer::Retransmit) => self.on_retransmit(&mut out),
        }
        out
    }

    fn is_busy(&self) -> bool {
        self.outstanding.is_some()
    }
}
