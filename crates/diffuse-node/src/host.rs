//! Client hosts: one connection per replica for many clients of one process.
//!
//! Clients registered with the same key are one principal; a replica takes the
//! messages of all of them from one connection authenticated with that key (see
//! `docs/runtime.md`, "Client hosts"). A [`ClientHost`] holds those connections and
//! hands each reply to the hosted client it names ([`crate::client::Client::hosted`]).
//!
//! Memory stays bounded whatever the replicas send: the transport's inbox is
//! bounded as for any client, a hosted client takes replies only while it has an
//! operation outstanding (and drops what is left when it ends), and the replies
//! handed over but not yet read hold a share of one byte budget per host; beyond
//! it a reply is dropped, which the client's retransmission recovers.

use crate::config::ClientSettings;
use crate::metrics::NodeMetrics;
use crate::transport::{Limits, Transport};
use diffuse_core::codec::WireMessage;
use diffuse_core::crypto::PublicKey;
use diffuse_core::ids::{ClientId, NodeId};
use diffuse_core::suite::ProtocolSuite;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Replies one hosted client may have waiting: it has one operation outstanding,
/// so a reply from each replica and a few late ones fit; more are dropped.
const HOSTED_INBOX: usize = 16;

/// A reply handed to a hosted client, holding its bytes of the host's budget.
type Handed<M> = (NodeId, M, OwnedSemaphorePermit);

/// What the dispatcher knows of a hosted client.
struct Route<M> {
    queue: mpsc::Sender<Handed<M>>,
    /// True while the client has an operation outstanding.
    listening: Arc<AtomicBool>,
}

type Routes<M> = Arc<Mutex<HashMap<ClientId, Route<M>>>>;

/// Aborts the dispatcher when the host and every client on it are gone.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connections to every replica shared by the clients of one key.
pub struct ClientHost<S: ProtocolSuite> {
    transport: Arc<Transport<S::Message>>,
    key: PublicKey,
    routes: Routes<S::Message>,
    dispatch: Arc<AbortOnDrop>,
}

impl<S: ProtocolSuite> ClientHost<S> {
    /// Starts connecting to every replica as the client of `settings`; the clients
    /// it can host are those registered with the same key.
    pub fn connect(settings: &ClientSettings) -> Self {
        let limits = Limits {
            dial_on_demand: !S::CLIENT_HEARS_FROM_EVERY_REPLICA,
            ..Limits::client()
        };
        let (transport, mut inbox) = Transport::<S::Message>::client(
            settings.id,
            settings.secret.clone(),
            settings.cluster.clone(),
            limits,
            Arc::new(NodeMetrics::default()),
        );
        let routes: Routes<S::Message> = Arc::default();
        let table = routes.clone();
        let budget = Arc::new(Semaphore::new(limits.inbox_bytes));
        let dispatch = tokio::spawn(async move {
            while let Some(inbound) = inbox.recv().await {
                let Some(client) = inbound.message.client() else {
                    continue;
                };
                let queue = table
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&client)
                    .filter(|route| route.listening.load(Ordering::Acquire))
                    .map(|route| route.queue.clone());
                let cost = u32::try_from(inbound.bytes().max(1)).unwrap_or(u32::MAX);
                let (Some(queue), Ok(permit)) =
                    (queue, budget.clone().try_acquire_many_owned(cost))
                else {
                    continue;
                };
                let _ = queue.try_send((inbound.from, inbound.message, permit));
            }
        });
        ClientHost {
            transport: Arc::new(transport),
            key: settings.secret.public(),
            routes,
            dispatch: Arc::new(AbortOnDrop(dispatch)),
        }
    }

    /// The connections, to send on.
    pub(crate) fn transport(&self) -> Arc<Transport<S::Message>> {
        self.transport.clone()
    }

    /// The key every hosted client must have.
    pub(crate) fn key(&self) -> &PublicKey {
        &self.key
    }

    /// Takes `client`'s replies from now on (a client already hosted under this id
    /// loses them).
    pub(crate) fn attach(&self, client: ClientId) -> Hosted<S::Message> {
        let (queue, inbox) = mpsc::channel(HOSTED_INBOX);
        let listening = Arc::new(AtomicBool::new(false));
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                client,
                Route {
                    queue: queue.clone(),
                    listening: listening.clone(),
                },
            );
        Hosted {
            id: client,
            queue,
            inbox,
            listening,
            routes: self.routes.clone(),
            _dispatch: self.dispatch.clone(),
        }
    }
}

/// A hosted client's end: the replies the host hands it.
pub(crate) struct Hosted<M> {
    id: ClientId,
    /// The sending side of `inbox`, to tell this route from a newer one.
    queue: mpsc::Sender<Handed<M>>,
    inbox: mpsc::Receiver<Handed<M>>,
    listening: Arc<AtomicBool>,
    routes: Routes<M>,
    /// The dispatcher lives as long as any client on the host.
    _dispatch: Arc<AbortOnDrop>,
}

impl<M> Hosted<M> {
    /// The next reply; `None` if the host is gone.
    pub(crate) async fn recv(&mut self) -> Option<(NodeId, M)> {
        self.inbox
            .recv()
            .await
            .map(|(from, message, _permit)| (from, message))
    }

    /// Takes replies while the guard lives; drops what is left when it ends.
    pub(crate) fn listen(&mut self) -> Listening {
        self.drain();
        self.listening.store(true, Ordering::Release);
        Listening {
            listening: self.listening.clone(),
        }
    }

    /// Drops the replies waiting.
    pub(crate) fn drain(&mut self) {
        while self.inbox.try_recv().is_ok() {}
    }
}

impl<M> Drop for Hosted<M> {
    fn drop(&mut self) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if routes
            .get(&self.id)
            .is_some_and(|route| route.queue.same_channel(&self.queue))
        {
            routes.remove(&self.id);
        }
    }
}

/// While it lives, the hosted client takes replies.
pub(crate) struct Listening {
    listening: Arc<AtomicBool>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.listening.store(false, Ordering::Release);
    }
}

/// A [`ClientHost`] of whichever protocol the configuration names.
pub enum AnyClientHost {
    /// PBFT.
    Pbft(ClientHost<diffuse_pbft::Pbft>),
    /// MinBFT.
    MinBft(ClientHost<diffuse_minbft::MinBft>),
    /// FastBFT.
    FastBft(ClientHost<diffuse_fastbft::FastBft>),
}

impl AnyClientHost {
    /// Starts connecting as the client of `settings` (see [`ClientHost::connect`]).
    pub fn connect(settings: &ClientSettings) -> Result<AnyClientHost, crate::client::ClientError> {
        match settings.protocol.as_str() {
            "pbft" => Ok(AnyClientHost::Pbft(ClientHost::connect(settings))),
            "minbft" => Ok(AnyClientHost::MinBft(ClientHost::connect(settings))),
            "fastbft" => Ok(AnyClientHost::FastBft(ClientHost::connect(settings))),
            other => Err(crate::client::ClientError::UnknownProtocol(
                other.to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cluster;
    use diffuse_core::config::{ClusterFile, MemberEntry};
    use diffuse_core::crypto::SecretKey;

    fn settings() -> ClientSettings {
        let member = |id: u32, seed: u8, address: Option<String>| MemberEntry {
            id,
            public_key: SecretKey::from_seed([seed; 32]).public().to_hex(),
            address,
        };
        // Nobody listens at the replica's address: the host dials in vain, which
        // these tests do not need.
        let cluster = Cluster::from_file(ClusterFile {
            replicas: vec![member(0, 1, Some("127.0.0.1:9".into()))],
            clients: vec![member(0, 2, None), member(1, 2, None)],
        })
        .unwrap();
        ClientSettings {
            protocol: "pbft".into(),
            id: ClientId(0),
            secret: SecretKey::from_seed([2; 32]),
            cluster,
            timeout: std::time::Duration::from_secs(1),
            enclaves_file: None,
            options: toml::Table::new(),
        }
    }

    #[tokio::test]
    async fn a_replaced_hosted_client_does_not_take_its_successors_replies_with_it() {
        let host = ClientHost::<diffuse_pbft::Pbft>::connect(&settings());
        let first = host.attach(ClientId(1));
        let second = host.attach(ClientId(1));
        drop(first);
        let routes = host.routes.lock().unwrap();
        let route = routes
            .get(&ClientId(1))
            .expect("the newer client keeps its route");
        assert!(route.queue.same_channel(&second.queue));
        drop(routes);
        drop(second);
        assert!(host.routes.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_hosted_client_takes_replies_only_during_an_operation() {
        let host = ClientHost::<diffuse_pbft::Pbft>::connect(&settings());
        let mut hosted = host.attach(ClientId(1));
        assert!(!hosted.listening.load(Ordering::Acquire));
        let budget = Arc::new(Semaphore::new(10));
        let hand = || {
            let permit = budget.clone().try_acquire_many_owned(5).unwrap();
            let reply = diffuse_pbft::message::Reply {
                view: diffuse_core::ids::View(0),
                client: ClientId(1),
                timestamp: 1,
                replica: diffuse_core::ids::ReplicaId(0),
                result: Default::default(),
            };
            let message = diffuse_pbft::message::Message::Reply(reply);
            let handed = hosted
                .queue
                .try_send((NodeId::Client(ClientId(1)), message, permit));
            assert!(handed.is_ok());
        };
        // What was handed over and is still waiting at the next operation is
        // dropped, and its bytes go back to the host's budget.
        hand();
        hand();
        assert_eq!(budget.available_permits(), 0);
        let listening = hosted.listen();
        assert!(hosted.listening.load(Ordering::Acquire));
        assert_eq!(budget.available_permits(), 10);
        drop(listening);
        assert!(!hosted.listening.load(Ordering::Acquire));
    }
}
