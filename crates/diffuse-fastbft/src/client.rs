//! The FastBFT client: sign a request, send it to the primary, and accept the one
//! REPLY whose certificates and opened secrets prove it (§4.2, "Reply"):
//!
//! 1. the request is leaf `index` of the batch root, and the result is leaf
//!    `index` of the results root (Merkle paths);
//! 2. the primary's enclave bound the batch root to `(c, e)` (PREPARE certificate)
//!    and the secret of `(c, e)` is open: every active replica agreed to execute it;
//! 3. the enclave bound the batch and results roots to `(c', e')` (COMMIT
//!    certificate) and that secret is open too: every active replica executed the
//!    batch and got these results.
//!
//! The certificates are checked against the enclave key of the primary of the view
//! they are of (the high bits of their epoch), so a faulty replica's own enclave
//! cannot vouch for anything, and a REPLY proves its result whoever relays it.
//!
//! The client sends a request to the primary of the last view it heard of, its
//! first retransmission to that primary again, and the later ones also to 1, 2,
//! 4, … backups, which relay it to the others: the backups watch it, and ask for
//! a view change if the primary does not order it (§4.4). Widening step by step
//! rather than sending to all `n` replicas at once keeps a slow cluster from
//! paying a client connection to every replica (at `n = 103`, 26,000 handshakes
//! for 256 clients). When it retransmits adapts to how fast requests complete
//! (`diffuse_pbft::retransmit`).

use crate::checkpoint::{primary_key, primary_of};
use crate::merkle;
use crate::message::{
    ClientReply, Message, certifies_prepare, commit_digest, request_leaf, result_leaf,
};
use crate::options::{FastBftOptions, Mutant};
use diffuse_core::codec::Blob;
use diffuse_core::crypto::{PublicKey, SecretKey, SignatureBatch, SignatureCache, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId};
use diffuse_core::protocol::{Action, Actions, Input, InvokeError};
use diffuse_core::suite::ClientSetup;
use diffuse_pbft::ClientTimer;
use diffuse_pbft::message::{Authenticator, Request, RequestBody};
use diffuse_pbft::retransmit::RetransmitTimeout;
use diffuse_tee::view_of_epoch;
use std::time::Duration;

type Out = Actions<Message, ClientTimer>;

/// A FastBFT client with at most one outstanding request.
pub struct FastBftClient {
    id: ClientId,
    secret: SecretKey,
    options: FastBftOptions,
    next_timestamp: u64,
    outstanding: Option<(Request, u32)>,
    /// The highest view a REPLY came from.
    view: u64,
    n: usize,
    /// The replicas' enclave keys, read once from the attested list.
    enclave_keys: Vec<diffuse_core::crypto::PublicKey>,
    /// When to retransmit, adapted to how fast requests complete.
    timeout: RetransmitTimeout,
}

impl FastBftClient {
    /// Builds a client.
    pub fn new(setup: ClientSetup<FastBftOptions>) -> Self {
        Self {
            view: 0,
            n: setup.keys.n(),
            enclave_keys: Vec::new(),
            id: setup.id,
            secret: setup.secret,
            timeout: RetransmitTimeout::new(&setup.options.base),
            options: setup.options,
            next_timestamp: setup.first_timestamp.max(1),
            outstanding: None,
        }
    }

    /// The primary of the last view heard of.
    fn primary(&self) -> ReplicaId {
        primary_of(self.view, self.n)
    }

    /// The backups this client's `retransmissions`-th retransmission goes to
    /// ([`retransmission_backups`]).
    fn backups_for(&self, retransmissions: u32) -> impl Iterator<Item = ReplicaId> + use<> {
        retransmission_backups(self.primary(), self.n, self.id, retransmissions)
    }

    fn retransmit_delay(&self, retransmissions: u32) -> Duration {
        self.timeout.delay(retransmissions)
    }

    /// Whether `reply` proves the result of `request`.
    fn proves(&mut self, reply: &ClientReply, request: &Request) -> bool {
        if self.options.is(Mutant::ClientTrustsReplies) {
            return true;
        }
        if self.enclave_keys.is_empty() {
            self.enclave_keys = self.options.tee.enclave_keys().unwrap_or_default();
        }
        reply_proves(reply, request, &self.enclave_keys)
    }

    fn on_reply(&mut self, from: NodeId, reply: ClientReply, out: &mut Out) {
        let Some((request, retransmissions)) = self.outstanding.clone() else {
            return;
        };
        if reply.client != self.id || reply.timestamp != request.timestamp {
            return;
        }
        if !matches!(from, NodeId::Replica(_)) {
            return;
        }
        if !self.proves(&reply, &request) {
            return out.fault(from, "unproven-reply");
        }
        self.view = self.view.max(view_of_epoch(reply.commit_cert.view));
        self.timeout.completed(retransmissions);
        let timestamp = request.timestamp;
        self.outstanding = None;
        out.cancel_timer(ClientTimer::Retransmit);
        out.0.push(Action::Complete {
            timestamp,
            result: reply.result.into_inner(),
        });
    }
}

/// Whether `reply` proves the result of `request`: the paths, the certificates of
/// the primary of their view (its key among `enclave_keys`) and both opened
/// secrets. A client checks this before it accepts a REPLY; a backup, before a
/// REPLY relayed to it ends its watch over an executed request.
pub fn reply_proves(reply: &ClientReply, request: &Request, enclave_keys: &[PublicKey]) -> bool {
    let view = view_of_epoch(reply.prepare_cert.view);
    let Some(primary) = primary_key(enclave_keys, view) else {
        return false;
    };
    let (index, len) = (reply.index as usize, reply.len as usize);
    merkle::verify(
        &reply.batch_root,
        &request_leaf(&request.signed),
        index,
        len,
        &reply.request_path,
    ) && merkle::verify(
        &reply.results_root,
        &result_leaf(request.client, request.timestamp, Some(&reply.result)),
        index,
        len,
        &reply.result_path,
    ) && view_of_epoch(reply.commit_cert.view) == view
        && certifies_prepare(
            &reply.prepare_cert,
            reply.seq,
            &reply.batch_root,
            reply.checkpoint.as_ref(),
        )
        && reply.commit_cert.message
            == commit_digest(
                reply.seq,
                &reply.batch_root,
                &reply.results_root,
                reply.state.as_ref(),
            )
        && reply.prepared.matches(&reply.prepare_cert)
        && reply.replied.matches(&reply.commit_cert)
        && enclave_signed(reply, &primary)
}

/// Whether the four signatures of `reply` (both certificates, both commitments)
/// are the enclave `primary`'s, in one batch verification (ZIP 215) rather than
/// four strict checks. The looser rule costs nothing here: these are signatures of
/// an attested enclave key, and no agreement rests on the answer (a client accepts
/// a result, a backup stops watching a request).
///
/// The four signatures are the same in every REPLY of a batch, so the clients of
/// one process (a gateway serving many users, the benchmark's load generator)
/// share one [`SignatureCache`]: each batch's signatures are checked once per
/// process, not once per client.
fn enclave_signed(reply: &ClientReply, primary: &PublicKey) -> bool {
    let mut batch = SignatureBatch::new();
    reply.prepare_cert.push_to(primary, &mut batch);
    reply.commit_cert.push_to(primary, &mut batch);
    reply.prepared.commitment.push_to(primary, &mut batch);
    reply.replied.commitment.push_to(primary, &mut batch);
    batch
        .verify_cached(&REPLY_SIGNATURES)
        .into_iter()
        .all(|valid| valid)
}

/// The enclave signatures of REPLYs checked in this process: four per batch, so
/// the last 1,024 batches.
static REPLY_SIGNATURES: std::sync::LazyLock<SignatureCache> =
    std::sync::LazyLock::new(|| SignatureCache::new(4096));

impl diffuse_core::protocol::Client for FastBftClient {
    type Message = Message;
    type Timer = ClientTimer;

    fn invoke(&mut self, operation: Vec<u8>) -> Result<Out, InvokeError> {
        if self.outstanding.is_some() {
            return Err(InvokeError::Busy);
        }
        let limit = self.options.base.max_operation_bytes;
        if operation.len() > limit {
            return Err(InvokeError::TooLarge {
                size: operation.len(),
                limit,
            });
        }
        let operation = Blob::try_from_vec(operation).map_err(|op| InvokeError::TooLarge {
            size: op.len(),
            limit,
        })?;
        let timestamp = self.next_timestamp;
        self.next_timestamp += 1;
        let body = RequestBody {
            client: self.id,
            timestamp,
            operation,
        };
        let request = Request {
            authenticator: Authenticator::new(),
            signed: Signed::sign(body, &self.secret),
        };
        let mut out = Out::new();
        out.send(self.primary(), Message::Request(request.clone()));
        out.set_timer(ClientTimer::Retransmit, self.retransmit_delay(0));
        self.outstanding = Some((request, 0));
        Ok(out)
    }

    fn handle(&mut self, input: Input<Message, ClientTimer>) -> Out {
        let mut out = Out::new();
        match input {
            Input::Start(_) => {}
            Input::Message {
                from,
                message: Message::Reply(reply),
            } => self.on_reply(from, reply, &mut out),
            Input::Message { from, .. } => out.fault(from, "unexpected-message-to-client"),
            Input::Timer(ClientTimer::Retransmit) => {
                if let Some((request, retransmissions)) = &mut self.outstanding {
                    *retransmissions += 1;
                    let (request, retransmissions) = (request.clone(), *retransmissions);
                    for backup in self.backups_for(retransmissions) {
                        out.send(backup, Message::Request(request.clone()));
                    }
                    out.send(self.primary(), Message::Request(request));
                    out.set_timer(
                        ClientTimer::Retransmit,
                        self.retransmit_delay(retransmissions),
                    );
                }
            }
        }
        out
    }

    fn is_busy(&self) -> bool {
        self.outstanding.is_some()
    }
}

/// The backups the `retransmissions`-th retransmission (from 1) of `client`'s
/// request goes to besides the primary: none for the first, then 1, 2, 4, … of
/// them, from a place in the ring that depends on the client (so that clients
/// spread over the backups), up to all. A backup relays a request it gets from
/// its client, if it still waits two request-timer periods later, to the other
/// backups, so one correct backup is enough for all of them to watch it, and any
/// `f + 1` backups include a correct one.
pub fn retransmission_backups(
    primary: ReplicaId,
    n: usize,
    client: ClientId,
    retransmissions: u32,
) -> impl Iterator<Item = ReplicaId> + use<> {
    let others = n.saturating_sub(1).max(1);
    let count = match retransmissions {
        0 | 1 => 0,
        r => (1usize << (r - 2).min(16)).min(n.saturating_sub(1)),
    };
    let (primary, n) = (primary.0 as usize, n.max(1));
    let start = client.0 as usize % others;
    (0..count).map(move |i| ReplicaId(((primary + 1 + (start + i) % others) % n) as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backups(primary: u16, n: usize, client: u32, r: u32) -> Vec<u16> {
        retransmission_backups(ReplicaId(primary), n, ClientId(client), r)
            .map(|b| b.0)
            .collect()
    }

    #[test]
    fn retransmissions_widen_from_the_primary_alone_to_every_backup() {
        assert!(backups(0, 103, 7, 0).is_empty());
        assert!(
            backups(0, 103, 7, 1).is_empty(),
            "the first: the primary alone"
        );
        let counts: Vec<usize> = (2..12).map(|r| backups(5, 103, 7, r).len()).collect();
        assert_eq!(counts, [1, 2, 4, 8, 16, 32, 64, 102, 102, 102]);
        let all = backups(5, 103, 7, 40);
        let distinct: std::collections::BTreeSet<u16> = all.iter().copied().collect();
        assert_eq!(distinct.len(), 102, "every backup once");
        assert!(!distinct.contains(&5), "never the primary");
        assert!(distinct.iter().all(|b| (*b as usize) < 103));
    }

    #[test]
    fn clients_start_at_different_backups() {
        assert_eq!(backups(0, 3, 0, 2), [1]);
        assert_eq!(backups(0, 3, 1, 2), [2]);
        assert_eq!(backups(2, 3, 1, 2), [1]);
        assert_eq!(backups(2, 3, 1, 3), [1, 0]);
        assert_eq!(backups(0, 1, 9, 5), Vec::<u16>::new(), "a cluster of one");
    }
}
