//! Connections between members: who dials whom, bounded queues, reconnection.
//!
//! * Every replica listens. A replica sends to another replica over a connection it
//!   dials itself, so each ordered pair has its own connection and no tie-breaking
//!   is needed. A client dials every replica and gets its replies back on the
//!   connection it dialed.
//! * Every channel is authenticated (see [`crate::noise`]); the sender of a message
//!   is the authenticated peer of the connection it came on, never a field in it
//!   alone. (Clients that share a key share a connection, which speaks for each of
//!   them: a message names its client, and only a client of the connection's key
//!   counts; see `ClientRoute`.)
//! * Each peer has a bounded send queue. When it is full the frame is dropped and
//!   counted: the protocols retransmit, and a slow or hostile peer must not stall the
//!   replica or grow its memory. Incoming messages go through a bounded inbox of
//!   two lanes ([`crate::inbox`]); when the protocol falls behind, readers stop
//!   reading and TCP pushes back on the senders (requests relayed by replicas are
//!   shed instead, see `deliver`).
//! * A dialer reconnects with exponential back-off (50 ms to 2 s, with jitter).

use crate::config::Cluster;
use crate::inbox::{self, Inbox, Lane, LaneSenders};
use crate::metrics::{KindLabel, NodeMetrics};
use crate::noise::{self, ChannelError, FrameReader, FrameWriter};
use diffuse_core::codec::{self, WireMessage};
use diffuse_core::crypto::SecretKey;
use diffuse_core::ids::{ClientId, NodeId, ReplicaId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

/// Sizes that bound the transport's memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest frame accepted or sent.
    pub max_frame: usize,
    /// Frames queued per peer before new ones are dropped.
    pub send_queue: usize,
    /// Decoded messages waiting in the protocol lane: what replicas send each
    /// other but clients' requests (see [`crate::inbox`]).
    pub inbox: usize,
    /// Decoded messages waiting in the request lane: what clients send, and the
    /// clients' requests replicas relay.
    pub request_inbox: usize,
    /// Simultaneous incoming connections (handshaking or open).
    pub max_connections: usize,
    /// Simultaneous open connections from one authenticated peer.
    pub connections_per_peer: usize,
    /// The largest frame a client may send (requests are small; replicas need
    /// `max_frame` for batches and state-transfer chunks).
    pub max_client_frame: usize,
    /// Bytes of frames waiting in the inbox: readers wait (and TCP pushes back)
    /// beyond it, so memory is bounded in bytes, not only in messages.
    pub inbox_bytes: usize,
    /// Handshakes in progress at once (strangers included).
    pub max_handshakes: usize,
    /// Messages from one peer waiting in the inbox: a flooding peer waits at this
    /// share, and the others' messages still get in.
    pub inbox_per_peer: usize,
    /// Connect to a replica only once a frame is queued for it (a client that talks
    /// to one replica need not hold a connection to every one).
    pub dial_on_demand: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: codec::MAX_FRAME_BYTES,
            send_queue: 4096,
            inbox: 16_384,
            request_inbox: 4096,
            max_connections: 4096,
            connections_per_peer: 4,
            max_client_frame: 1 << 20,
            inbox_bytes: 256 << 20,
            max_handshakes: 256,
            inbox_per_peer: 1024,
            dial_on_demand: false,
        }
    }
}

impl Limits {
    /// Limits for a client: replies are small, and a Byzantine replica must not be
    /// able to fill the client's memory.
    pub fn client() -> Limits {
        Limits {
            max_frame: 4 << 20,
            inbox: 1024,
            inbox_bytes: 32 << 20,
            ..Limits::default()
        }
    }
}

/// Who a queued message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// One member.
    One(NodeId),
    /// Each of these members, in this order.
    These(Vec<NodeId>),
    /// Every replica but this one.
    Replicas,
}

/// A connection that carries no frame for this long is closed (writers send an
/// empty keepalive frame after a third of it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an accepted connection may take to prove, with a first authenticated
/// frame, that the peer holds its key (a replayed handshake message cannot).
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A writer takes queued frames up to this many bytes into one write (more wait for
/// the next): one encryption pass and one flush for a burst of small frames, without
/// copying a queue of large ones at once.
const WRITE_BURST_BYTES: usize = 256 << 10;

/// A message from an authenticated peer.
#[derive(Debug)]
pub struct Inbound<M> {
    /// The authenticated sender.
    pub from: NodeId,
    /// The decoded message.
    pub message: M,
    /// The frame's share of the inbox byte budget, returned when this is dropped.
    _budget: tokio::sync::OwnedSemaphorePermit,
    /// Its place in the sender's share of the inbox, returned when this is dropped.
    _share: tokio::sync::OwnedSemaphorePermit,
}

impl<M> Inbound<M> {
    /// The frame's size, as counted against the inbox's byte budget.
    pub(crate) fn bytes(&self) -> usize {
        self._budget.num_permits()
    }

    /// A message holding its places in the inbox's budgets.
    pub(crate) fn new(
        from: NodeId,
        message: M,
        budget: tokio::sync::OwnedSemaphorePermit,
        share: tokio::sync::OwnedSemaphorePermit,
    ) -> Inbound<M> {
        Inbound {
            from,
            message,
            _budget: budget,
            _share: share,
        }
    }
}

type Frame = Arc<[u8]>;

/// Aborts a task when dropped, so a connection's reader dies with its writer.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who may connect, by X25519 static key. Clients that share a key (one process
/// hosting them) connect as the lowest of their ids, and the connection speaks for
/// them all (see [`ClientRoute`]).
fn directory(cluster: &Cluster) -> HashMap<[u8; 32], NodeId> {
    let mut directory = HashMap::new();
    for i in 0..cluster.n() {
        let id = ReplicaId(i as u16);
        if let Some(key) = cluster.keys.replica(id) {
            directory.insert(key.to_x25519(), NodeId::Replica(id));
        }
    }
    let mut clients: Vec<ClientId> = cluster.keys.clients().collect();
    clients.sort_unstable();
    for client in clients {
        if let Some(key) = cluster.keys.client(client) {
            directory
                .entry(key.to_x25519())
                .or_insert(NodeId::Client(client));
        }
    }
    directory
}

/// A client connection's way back: the replies to every client it speaks for go
/// to its send queue. A connection authenticated as client `c` speaks for every
/// client whose key is `c`'s (they are one principal: whoever holds the key can
/// sign as any of them), so a process hosting many clients needs one connection
/// per replica, and the replies of one batch to its clients leave as one burst.
struct ClientRoute {
    clients: Arc<Mutex<HashMap<ClientId, mpsc::Sender<Frame>>>>,
    queue: mpsc::Sender<Frame>,
    /// Set by `close`, under the map's lock: a reader still running on another
    /// thread must not register a route to a connection that is gone.
    closed: std::sync::atomic::AtomicBool,
    /// Whether other clients share the connection's key: only then can its
    /// messages be anyone's but the connection's own client's.
    shared_key: bool,
}

impl ClientRoute {
    /// Sends `client`'s replies over this connection from now on (a message of
    /// `client` came on it).
    fn register(&self, client: ClientId) {
        self.add(client, true);
    }

    /// Sends `client`'s replies over this connection unless another connection
    /// already carries them: at a new connection of a key, for every client of
    /// the key, so that replicas a hosted client has not written to yet (PBFT's
    /// backups, for an ordered request sent to the primary) can still answer it.
    fn offer(&self, client: ClientId) {
        self.add(client, false);
    }

    fn add(&self, client: ClientId, replace: bool) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        match clients.get(&client) {
            Some(queue) if queue.same_channel(&self.queue) => {}
            Some(queue) if !replace && !queue.is_closed() => {}
            _ => {
                clients.insert(client, self.queue.clone());
            }
        }
    }

    /// Forgets this connection: its clients' replies wait for their next message.
    fn close(&self) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        clients.retain(|_, queue| !queue.same_channel(&self.queue));
    }
}

struct Shared<M> {
    me: NodeId,
    secret: SecretKey,
    cluster: Cluster,
    prologue: Vec<u8>,
    limits: Limits,
    metrics: Arc<NodeMetrics>,
    inbox: LaneSenders<M>,
    inbox_bytes: Arc<Semaphore>,
    /// Each peer's share of the inbox (created on its first message; at most one per
    /// member of the cluster).
    shares: Mutex<HashMap<NodeId, Arc<Semaphore>>>,
}

/// The network endpoint of one member.
pub struct Transport<M> {
    shared: Arc<Shared<M>>,
    replicas: Vec<Option<mpsc::Sender<Frame>>>,
    clients: Arc<Mutex<HashMap<ClientId, mpsc::Sender<Frame>>>>,
    _tasks: JoinSet<()>,
}

impl<M: WireMessage> Transport<M> {
    /// Starts a replica's endpoint: listens on `listen` and dials every other replica.
    pub async fn replica(
        id: ReplicaId,
        secret: SecretKey,
        cluster: Cluster,
        listen: SocketAddr,
        limits: Limits,
        metrics: Arc<NodeMetrics>,
    ) -> std::io::Result<(Transport<M>, Inbox<M>)> {
        let listener = TcpListener::bind(listen).await?;
        let (mut transport, inbox) =
            Transport::new(NodeId::Replica(id), secret, cluster, limits, metrics);
        let clients = transport.clients.clone();
        transport
            ._tasks
            .spawn(accept_loop(listener, transport.shared.clone(), clients));
        Ok((transport, inbox))
    }

    /// Starts a client's endpoint: dials every replica.
    pub fn client(
        id: ClientId,
        secret: SecretKey,
        cluster: Cluster,
        limits: Limits,
        metrics: Arc<NodeMetrics>,
    ) -> (Transport<M>, Inbox<M>) {
        Transport::new(NodeId::Client(id), secret, cluster, limits, metrics)
    }

    fn new(
        me: NodeId,
        secret: SecretKey,
        cluster: Cluster,
        limits: Limits,
        metrics: Arc<NodeMetrics>,
    ) -> (Transport<M>, Inbox<M>) {
        let (inbox_tx, inbox_rx) = inbox::inbox(limits.inbox, limits.request_inbox);
        let prologue = noise::prologue(&cluster.digest.0);
        let n = cluster.n();
        let shared = Arc::new(Shared {
            me,
            secret,
            cluster,
            prologue,
            limits,
            metrics,
            inbox: inbox_tx,
            inbox_bytes: Arc::new(Semaphore::new(limits.inbox_bytes)),
            shares: Mutex::new(HashMap::new()),
        });
        let mut tasks = JoinSet::new();
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let peer = ReplicaId(i as u16);
            if me == NodeId::Replica(peer) {
                replicas.push(None);
                continue;
            }
            let (tx, rx) = mpsc::channel(limits.send_queue);
            tasks.spawn(dial_loop(shared.clone(), peer, rx));
            replicas.push(Some(tx));
        }
        let transport = Transport {
            shared,
            replicas,
            clients: Arc::new(Mutex::new(HashMap::new())),
            _tasks: tasks,
        };
        (transport, inbox_rx)
    }

    /// Queues `message` for `to`. Returns false if it was dropped (full queue, or a
    /// client that is not connected).
    pub fn send(&self, to: NodeId, message: &M) -> bool {
        let frame: Frame = codec::encode(message).into();
        self.send_frame(to, message.kind(), frame)
    }

    /// Queues `message` for every replica but this one.
    pub fn broadcast(&self, message: &M) {
        let frame: Frame = codec::encode(message).into();
        for i in 0..self.replicas.len() {
            let to = NodeId::Replica(ReplicaId(i as u16));
            if to != self.shared.me {
                self.send_frame(to, message.kind(), frame.clone());
            }
        }
    }

    /// Queues `messages`, each encoded once whatever its number of recipients,
    /// grouped by recipient: each peer's frames are queued back to back, in the
    /// order given, so that its writer takes them in one burst (one encryption
    /// pass, one write) instead of waking for each.
    pub fn send_all<'a>(&self, messages: impl IntoIterator<Item = (&'a Recipients, &'a M)>)
    where
        M: 'a,
    {
        let mut frames: Vec<(NodeId, &'static str, Frame)> = Vec::new();
        for (to, message) in messages {
            let frame: Frame = codec::encode(message).into();
            match to {
                Recipients::One(to) => frames.push((*to, message.kind(), frame)),
                Recipients::These(list) => {
                    frames.extend(list.iter().map(|to| (*to, message.kind(), frame.clone())));
                }
                Recipients::Replicas => {
                    for i in 0..self.replicas.len() {
                        let to = NodeId::Replica(ReplicaId(i as u16));
                        if to != self.shared.me {
                            frames.push((to, message.kind(), frame.clone()));
                        }
                    }
                }
            }
        }
        // Stable: each recipient's frames keep their order.
        frames.sort_by_key(|(to, _, _)| *to);
        for (to, kind, frame) in frames {
            self.send_frame(to, kind, frame);
        }
    }

    /// Queues raw bytes (already a frame) for `to`.
    pub fn send_frame(&self, to: NodeId, kind: &'static str, frame: Frame) -> bool {
        let len = frame.len() as u64;
        let queue = match to {
            NodeId::Replica(id) => self.replicas.get(id.index()).cloned().flatten(),
            NodeId::Client(id) => self
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned(),
        };
        let Some(queue) = queue else {
            return false;
        };
        let metrics = &self.shared.metrics;
        match queue.try_send(frame) {
            Ok(()) => {
                metrics
                    .messages_out
                    .get_or_create(&KindLabel { kind })
                    .inc();
                metrics.bytes_out.inc_by(len);
                true
            }
            Err(_) => {
                metrics.send_queue_drops.inc();
                false
            }
        }
    }

    /// Frames waiting in all send queues.
    pub fn queued(&self) -> usize {
        let replica_queues: usize = self
            .replicas
            .iter()
            .flatten()
            .map(|q| q.max_capacity() - q.capacity())
            .sum();
        let client_queues: usize = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|q| q.max_capacity() - q.capacity())
            .sum();
        replica_queues + client_queues
    }
}

/// Dials `peer` for as long as the transport lives, sending its queue.
async fn dial_loop<M: WireMessage>(
    shared: Arc<Shared<M>>,
    peer: ReplicaId,
    mut queue: mpsc::Receiver<Frame>,
) {
    let address = shared.cluster.addresses[peer.index()];
    let Some(key) = shared.cluster.keys.replica(peer).copied() else {
        return;
    };
    let mut backoff = Duration::from_millis(50);
    let mut first = None;
    if shared.limits.dial_on_demand {
        match queue.recv().await {
            Some(frame) => first = Some(frame),
            None => return,
        }
    }
    loop {
        let connected =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(address)).await;
        if let Ok(Ok(stream)) = connected {
            let _ = stream.set_nodelay(true);
            match noise::initiate(
                stream,
                &shared.secret,
                &key,
                &shared.prologue,
                shared.limits.max_frame,
            )
            .await
            {
                Ok((reader, mut writer)) => {
                    // Hello: an empty authenticated frame proves at once that this
                    // side holds its key (the responder waits for one).
                    let hello =
                        writer.write_frame(&[]).await.is_ok() && writer.flush().await.is_ok();
                    if hello {
                        tracing::debug!(?peer, "connected");
                        backoff = Duration::from_millis(50);
                        let peer_id = NodeId::Replica(peer);
                        let first = first.take();
                        if !run_connection(
                            &shared, peer_id, reader, writer, first, &mut queue, None,
                        )
                        .await
                        {
                            return;
                        }
                        tracing::debug!(?peer, "disconnected");
                    }
                }
                Err(error) => tracing::debug!(?peer, %error, "handshake failed"),
            }
        }
        // Jitter by process and peer, so that restarted nodes do not redial in step.
        let jitter = (u64::from(std::process::id()) ^ (peer.index() as u64 * 7919)) % 50;
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Runs one connection: writes `first` (a frame taken off the queue before the
/// connection existed), then reads into the inbox and writes the queue, until
/// either side fails. Returns false if the queue is closed (the transport is gone).
async fn run_connection<M: WireMessage, R, W>(
    shared: &Arc<Shared<M>>,
    peer: NodeId,
    reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    first: Option<Frame>,
    queue: &mut mpsc::Receiver<Frame>,
    route: Option<Arc<ClientRoute>>,
) -> bool
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let mut reading = AbortOnDrop(tokio::spawn(read_loop(shared.clone(), peer, reader, route)));
    if let Some(frame) = first
        && (writer.write_frames(&[frame]).await.is_err() || writer.flush().await.is_err())
    {
        return true;
    }
    // One timer for the connection's life, not one per write: a keepalive goes
    // when a whole period passed without a write, so the peer hears something at
    // least every two periods, well within its idle timeout.
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + IDLE_TIMEOUT / 3,
        IDLE_TIMEOUT / 3,
    );
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wrote = false;
    loop {
        tokio::select! {
            _ = &mut reading.0 => return true,
            _ = keepalive.tick() => {
                if std::mem::take(&mut wrote) {
                    continue;
                }
                // Keepalive: an empty frame, skipped by the reader.
                if writer.write_frame(&[]).await.is_err() || writer.flush().await.is_err() {
                    return true;
                }
            }
            frame = queue.recv() => {
                wrote = true;
                let Some(frame) = frame else { return false };
                // Whatever else is queued goes with it: encrypted together, one flush.
                let mut frames = vec![frame];
                let mut bytes = frames[0].len();
                while bytes < WRITE_BURST_BYTES {
                    match queue.try_recv() {
                        Ok(frame) => {
                            bytes += frame.len();
                            frames.push(frame);
                        }
                        Err(_) => break,
                    }
                }
                if writer.write_frames(&frames).await.is_err() || writer.flush().await.is_err() {
                    return true;
                }
            }
        }
    }
}

/// Decodes frames from `peer` into the inbox until the connection fails or stays
/// silent for [`IDLE_TIMEOUT`]. `route` is a client connection's way back.
async fn read_loop<M: WireMessage, R: AsyncRead + Unpin>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    mut reader: FrameReader<R>,
    route: Option<Arc<ClientRoute>>,
) {
    let share = share_of(&shared, peer);
    loop {
        let frame = match next_frame(&mut reader, peer, IDLE_TIMEOUT).await {
            Some(frame) => frame,
            None => return,
        };
        if !deliver(&shared, peer, &share, frame, route.as_deref()).await {
            return;
        }
    }
}

/// The next frame, or `None` (logged) if the connection failed or timed out.
async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    peer: NodeId,
    timeout: Duration,
) -> Option<Vec<u8>> {
    match tokio::time::timeout(timeout, reader.read_frame()).await {
        Ok(Ok(frame)) => Some(frame),
        Ok(Err(error @ (ChannelError::FrameTooLarge { .. } | ChannelError::Noise(_)))) => {
            tracing::info!(?peer, %error, "connection closed: invalid input");
            None
        }
        Ok(Err(error)) => {
            tracing::debug!(?peer, %error, "connection closed");
            None
        }
        Err(_) => {
            tracing::debug!(?peer, "connection closed: idle");
            None
        }
    }
}

/// `peer`'s share of the inbox, looked up once per connection.
fn share_of<M>(shared: &Shared<M>, peer: NodeId) -> Arc<Semaphore> {
    shared
        .shares
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(peer)
        .or_insert_with(|| Arc::new(Semaphore::new(shared.limits.inbox_per_peer)))
        .clone()
}

/// Decodes one frame into the inbox (an empty frame is a keepalive), within the
/// sender's `share`. Returns false if the inbox is gone.
///
/// What clients send, and the clients' requests replicas relay, go to the
/// request lane; the rest to the protocol lane (see [`crate::inbox`]). A request
/// a replica relays is shed, not waited for, when the request lane or the byte
/// budget is full or when it would take the second half of the sender's share:
/// its reader waiting there would hold up the agreement messages behind it on the
/// same connection, and those must always find room in the share; the request
/// is sent again (by its client's retransmission or the relaying replica's next
/// period). A client's messages wait (its connection carries nothing else), so
/// TCP pushes back on it.
///
/// A message that names another client of the connection's key (see
/// [`ClientRoute`]) is that client's, and its replies take this connection; one
/// that names a client of another key stays the connection's own, which the
/// protocol refuses as a message for another client.
async fn deliver<M: WireMessage>(
    shared: &Arc<Shared<M>>,
    peer: NodeId,
    share: &Arc<Semaphore>,
    frame: Vec<u8>,
    route: Option<&ClientRoute>,
) -> bool {
    if frame.is_empty() {
        return true;
    }
    shared.metrics.bytes_in.inc_by(frame.len() as u64);
    let message = match codec::decode::<M>(&frame) {
        Ok(message) => message,
        Err(error) => {
            shared.metrics.decode_errors.inc();
            tracing::info!(?peer, %error, "undecodable frame dropped");
            return true;
        }
    };
    shared
        .metrics
        .messages_in
        .get_or_create(&KindLabel {
            kind: message.kind(),
        })
        .inc();
    // Frames are at most `max_frame`, far below u32::MAX and the budget.
    let cost = u32::try_from(frame.len().min(shared.limits.inbox_bytes))
        .unwrap_or(u32::MAX)
        .max(1);
    drop(frame);
    let from = match (peer, message.client(), route) {
        (NodeId::Client(connected), Some(named), Some(route))
            if route.shared_key
                && (named == connected || shares_key(&shared.cluster, connected, named)) =>
        {
            route.register(named);
            NodeId::Client(named)
        }
        _ => peer,
    };
    let lane = match peer {
        NodeId::Client(_) => Lane::Requests,
        NodeId::Replica(_) if message.is_client_request() => Lane::Requests,
        NodeId::Replica(_) => Lane::Protocol,
    };
    if lane == Lane::Requests && matches!(peer, NodeId::Replica(_)) {
        // Half of the sender's share stays free for its agreement messages.
        let reserved = shared.limits.inbox_per_peer / 2;
        let permits = (share.available_permits() > reserved)
            .then(|| share.clone().try_acquire_owned().ok())
            .flatten()
            .and_then(|share| {
                let budget = shared.inbox_bytes.clone().try_acquire_many_owned(cost);
                Some((share, budget.ok()?))
            });
        let Some((share, budget)) = permits else {
            shared.metrics.requests_shed.inc();
            return true;
        };
        return match shared
            .inbox
            .try_send(lane, Inbound::new(from, message, budget, share))
        {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                shared.metrics.requests_shed.inc();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
    }
    let Ok(share) = share.clone().acquire_owned().await else {
        return false;
    };
    let Ok(budget) = shared.inbox_bytes.clone().acquire_many_owned(cost).await else {
        return false;
    };
    shared
        .inbox
        .send(lane, Inbound::new(from, message, budget, share))
        .await
}

/// The clients registered with `client`'s key (`client` included).
fn key_group(cluster: &Cluster, client: ClientId) -> Vec<ClientId> {
    let Some(key) = cluster.keys.client(client) else {
        return Vec::new();
    };
    cluster
        .keys
        .clients()
        .filter(|other| cluster.keys.client(*other) == Some(key))
        .collect()
}

/// Whether clients `a` and `b` are registered with the same key.
fn shares_key(cluster: &Cluster, a: ClientId, b: ClientId) -> bool {
    match (cluster.keys.client(a), cluster.keys.client(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Accepts connections; each is authenticated before anything else is read.
async fn accept_loop<M: WireMessage>(
    listener: TcpListener,
    shared: Arc<Shared<M>>,
    clients: Arc<Mutex<HashMap<ClientId, mpsc::Sender<Frame>>>>,
) {
    let directory = Arc::new(directory(&shared.cluster));
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(shared.limits.max_handshakes));
    let open: Arc<Mutex<HashMap<NodeId, usize>>> = Arc::new(Mutex::new(HashMap::new()));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let directory = directory.clone();
        let clients = clients.clone();
        let open = open.clone();
        let handshakes = handshakes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Strangers can occupy at most the handshake slots, never all connections.
            let Ok(handshaking) = handshakes.try_acquire_owned() else {
                shared.metrics.refused_connections.inc();
                tracing::info!(%address, "connection refused: too many handshakes in progress");
                return;
            };
            let accepted = noise::respond(
                stream,
                &shared.secret,
                &shared.prologue,
                shared.limits.max_frame,
                |key| directory.get(key).copied(),
            )
            .await;
            let (peer, mut reader, writer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    shared.metrics.refused_connections.inc();
                    tracing::info!(%address, %error, "connection refused");
                    return;
                }
            };
            if matches!(peer, NodeId::Client(_)) {
                reader.set_max_frame(shared.limits.max_client_frame);
            }
            // A replayed first handshake message completes the handshake but cannot
            // produce an authenticated frame: only a peer that sends one counts.
            let Some(first) = next_frame(&mut reader, peer, FIRST_FRAME_TIMEOUT).await else {
                shared.metrics.refused_connections.inc();
                tracing::info!(%address, ?peer, "connection refused: no authenticated frame");
                return;
            };
            drop(handshaking);
            // Memory per peer is bounded: a few connections, each buffering at
            // most one frame.
            let Some(_slot) = PeerSlot::take(&open, peer, shared.limits.connections_per_peer)
            else {
                shared.metrics.refused_connections.inc();
                tracing::info!(%address, ?peer, "connection refused: too many connections from this peer");
                return;
            };
            match peer {
                NodeId::Replica(_) => {
                    if deliver(&shared, peer, &share_of(&shared, peer), first, None).await {
                        read_loop(shared, peer, reader, None).await;
                    }
                }
                NodeId::Client(client) => {
                    let (queue, mut rx) = mpsc::channel(shared.limits.send_queue);
                    let group = key_group(&shared.cluster, client);
                    let route = Arc::new(ClientRoute {
                        clients,
                        queue,
                        closed: false.into(),
                        shared_key: group.len() > 1,
                    });
                    // A client with a key of its own: its newest connection is
                    // its way back. Clients sharing a key: each keeps the route
                    // its own messages set, and gets this one only if it has none.
                    if !route.shared_key {
                        route.register(client);
                    } else {
                        for member in group {
                            route.offer(member);
                        }
                    }
                    let share = share_of(&shared, peer);
                    if deliver(&shared, peer, &share, first, Some(&route)).await {
                        let reading = Some(route.clone());
                        run_connection(&shared, peer, reader, writer, None, &mut rx, reading).await;
                    }
                    route.close();
                }
            }
        });
    }
}

/// One open connection counted against its peer's allowance; released on drop.
struct PeerSlot {
    open: Arc<Mutex<HashMap<NodeId, usize>>>,
    peer: NodeId,
}

impl PeerSlot {
    fn take(
        open: &Arc<Mutex<HashMap<NodeId, usize>>>,
        peer: NodeId,
        allowed: usize,
    ) -> Option<PeerSlot> {
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(peer).or_insert(0);
        if *count >= allowed {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            open: open.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cluster;
    use diffuse_core::config::{ClusterFile, MemberEntry};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Note(u32);

    /// Notes from 1,000 up stand for client requests.
    const REQUEST_NOTES: u32 = 1000;

    impl WireMessage for Note {
        fn kind(&self) -> &'static str {
            "note"
        }

        fn is_client_request(&self) -> bool {
            self.0 >= REQUEST_NOTES
        }
    }

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed([i; 32])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flooding_peer_cannot_crowd_out_the_others() {
        let (cluster, address) = one_replica_cluster(&[2, 3]);
        let limits = Limits {
            inbox: 64,
            inbox_per_peer: 8,
            ..Limits::default()
        };
        let prologue = noise::prologue(&cluster.digest.0);
        let (_transport, mut inbox) = Transport::<Note>::replica(
            ReplicaId(0),
            key(1),
            cluster,
            address,
            limits,
            Arc::new(NodeMetrics::default()),
        )
        .await
        .unwrap();
        let connect = |k: u8| {
            let prologue = prologue.clone();
            async move {
                let stream = TcpStream::connect(address).await.unwrap();
                let (reader, mut writer) =
                    noise::initiate(stream, &key(k), &key(1).public(), &prologue, 1 << 20)
                        .await
                        .unwrap();
                writer.write_frame(&[]).await.unwrap();
                (reader, writer)
            }
        };
        let (_flood_reader, mut flooder) = connect(2).await;
        for i in 0..200 {
            flooder.write_frame(&codec::encode(&Note(i))).await.unwrap();
        }
        flooder.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_honest_reader, mut honest) = connect(3).await;
        honest
            .write_frame(&codec::encode(&Note(999)))
            .await
            .unwrap();
        honest.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut first = Vec::new();
        for _ in 0..9 {
            let inbound = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
                .await
                .unwrap()
                .unwrap();
            first.push(inbound.from);
        }
        assert!(
            first.contains(&NodeId::Client(ClientId(1))),
            "the honest client's message waits behind the flood: {first:?}"
        );
    }

    /// A message between a client and a replica that names its client, as
    /// requests and replies do: `(client, value)`.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct ForClient(u32, u32);

    impl WireMessage for ForClient {
        fn kind(&self) -> &'static str {
            "for-client"
        }

        fn client(&self) -> Option<ClientId> {
            Some(ClientId(self.0))
        }
    }

    #[tokio::test]
    async fn clients_sharing_a_key_share_one_connection_and_get_their_own_replies() {
        // Clients 0 and 1 share key 2 (one process hosts them); client 2 has its own.
        let (cluster, metrics, replica, mut replica_inbox) = one_replica(&[2, 2, 3]).await;
        // The host connects with the shared key, as client 1 (any of the group).
        let (host, mut host_inbox) = Transport::<ForClient>::client(
            ClientId(1),
            key(2),
            cluster.clone(),
            Limits::client(),
            metrics.clone(),
        );
        let replica_0 = NodeId::Replica(ReplicaId(0));
        // Each client of the key speaks for itself over the one connection; a
        // message naming a client of another key stays the connection's own.
        assert!(host.send(replica_0, &ForClient(1, 10)));
        assert!(host.send(replica_0, &ForClient(0, 11)));
        assert!(host.send(replica_0, &ForClient(2, 12)));
        let connection = NodeId::Client(ClientId(0)); // the lowest id of the key
        assert_eq!(
            receive(&mut replica_inbox).await,
            (NodeId::Client(ClientId(1)), 1, 10)
        );
        assert_eq!(
            receive(&mut replica_inbox).await,
            (NodeId::Client(ClientId(0)), 0, 11)
        );
        assert_eq!(receive(&mut replica_inbox).await, (connection, 2, 12));
        // Replies to either client of the key take the host's connection; a client
        // of another key that never connected has no way back.
        assert!(replica.send(NodeId::Client(ClientId(1)), &ForClient(1, 20)));
        assert!(replica.send(NodeId::Client(ClientId(0)), &ForClient(0, 21)));
        assert!(!replica.send(NodeId::Client(ClientId(2)), &ForClient(2, 22)));
        assert_eq!(receive(&mut host_inbox).await, (replica_0, 1, 20));
        assert_eq!(receive(&mut host_inbox).await, (replica_0, 0, 21));
        // A second connection of the key takes the replies of the clients whose
        // messages it carries, and only theirs.
        let (other, mut other_inbox) =
            Transport::<ForClient>::client(ClientId(0), key(2), cluster, Limits::client(), metrics);
        assert!(other.send(replica_0, &ForClient(0, 13)));
        assert_eq!(
            receive(&mut replica_inbox).await,
            (NodeId::Client(ClientId(0)), 0, 13)
        );
        assert!(replica.send(NodeId::Client(ClientId(0)), &ForClient(0, 24)));
        assert!(replica.send(NodeId::Client(ClientId(1)), &ForClient(1, 25)));
        assert_eq!(receive(&mut other_inbox).await, (replica_0, 0, 24));
        assert_eq!(receive(&mut host_inbox).await, (replica_0, 1, 25));
        // When a connection closes, its clients' routes go with it.
        drop(host);
        drop(host_inbox);
        for _ in 0..100 {
            if !replica.send(NodeId::Client(ClientId(1)), &ForClient(1, 26)) {
                assert!(replica.send(NodeId::Client(ClientId(0)), &ForClient(0, 27)));
                assert_eq!(receive(&mut other_inbox).await, (replica_0, 0, 27));
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the closed connection still routes client 1's replies");
    }

    #[tokio::test]
    async fn a_new_connection_of_a_key_can_answer_its_clients_at_once() {
        let (cluster, metrics, replica, mut replica_inbox) = one_replica(&[2, 2, 2]).await;
        let (host, mut host_inbox) =
            Transport::<ForClient>::client(ClientId(1), key(2), cluster, Limits::client(), metrics);
        // Client 1 speaks; clients 0 and 2 have not spoken to this replica yet (a
        // PBFT backup, say, that a hosted client's write did not go to), and can
        // still get its reply.
        assert!(host.send(NodeId::Replica(ReplicaId(0)), &ForClient(1, 1)));
        assert_eq!(
            receive(&mut replica_inbox).await,
            (NodeId::Client(ClientId(1)), 1, 1)
        );
        for client in [0, 2] {
            assert!(replica.send(NodeId::Client(ClientId(client)), &ForClient(client, 2)));
            assert_eq!(
                receive(&mut host_inbox).await,
                (NodeId::Replica(ReplicaId(0)), client, 2)
            );
        }
    }

    /// A cluster of one replica (key 1) on a free loopback port, and clients
    /// `0, 1, ...` with the keys `client_keys`.
    fn one_replica_cluster(client_keys: &[u8]) -> (Cluster, SocketAddr) {
        let port = crate::testnet::free_ports([127, 0, 0, 1].into(), 1).unwrap()[0];
        let address: SocketAddr = ([127, 0, 0, 1], port).into();
        let member = |id: u32, k: u8, address: Option<String>| MemberEntry {
            id,
            public_key: key(k).public().to_hex(),
            address,
        };
        let cluster = Cluster::from_file(ClusterFile {
            replicas: vec![member(0, 1, Some(address.to_string()))],
            clients: (0..)
                .zip(client_keys)
                .map(|(j, k)| member(j, *k, None))
                .collect(),
        })
        .unwrap();
        (cluster, address)
    }

    /// One replica (key 1) on loopback, in a cluster whose client `j` has key
    /// `client_keys[j]`; the cluster, the metrics and the replica's endpoint.
    async fn one_replica(
        client_keys: &[u8],
    ) -> (
        Cluster,
        Arc<NodeMetrics>,
        Transport<ForClient>,
        Inbox<ForClient>,
    ) {
        let (cluster, address) = one_replica_cluster(client_keys);
        let metrics = Arc::new(NodeMetrics::default());
        let (replica, inbox) = Transport::<ForClient>::replica(
            ReplicaId(0),
            key(1),
            cluster.clone(),
            address,
            Limits::default(),
            metrics.clone(),
        )
        .await
        .unwrap();
        (cluster, metrics, replica, inbox)
    }

    /// The next message in `inbox`: its sender, client and value.
    async fn receive(inbox: &mut Inbox<ForClient>) -> (NodeId, u32, u32) {
        let inbound = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
            .await
            .expect("a message in time")
            .expect("the transport is up");
        (inbound.from, inbound.message.0, inbound.message.1)
    }

    /// `n` replica transports on loopback (replica `i` with key `i + 1`) in a
    /// cluster that also lists `clients` clients (client `j` with key `n + 1 + j`).
    async fn replicas(n: u8, clients: u8) -> (Cluster, Vec<Transport<Note>>, Vec<Inbox<Note>>) {
        let (cluster, transports, inboxes, _) = replicas_with(n, clients, Limits::default()).await;
        (cluster, transports, inboxes)
    }

    /// [`replicas`] with these limits, and each replica's metrics.
    async fn replicas_with(
        n: u8,
        clients: u8,
        limits: Limits,
    ) -> (
        Cluster,
        Vec<Transport<Note>>,
        Vec<Inbox<Note>>,
        Vec<Arc<NodeMetrics>>,
    ) {
        let ports = crate::testnet::free_ports([127, 0, 0, 1].into(), n.into()).unwrap();
        let addresses: Vec<SocketAddr> =
            ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
        let member = |id: u32, k: u8, address: Option<String>| MemberEntry {
            id,
            public_key: key(k).public().to_hex(),
            address,
        };
        let cluster = Cluster::from_file(ClusterFile {
            replicas: (0..n)
                .map(|i| member(i.into(), i + 1, Some(addresses[usize::from(i)].to_string())))
                .collect(),
            clients: (0..clients)
                .map(|j| member(j.into(), n + 1 + j, None))
                .collect(),
        })
        .unwrap();
        let (mut transports, mut inboxes, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let metered = Arc::new(NodeMetrics::default());
            let (transport, inbox) = Transport::<Note>::replica(
                ReplicaId(i.into()),
                key(i + 1),
                cluster.clone(),
                addresses[usize::from(i)],
                limits,
                metered.clone(),
            )
            .await
            .unwrap();
            transports.push(transport);
            inboxes.push(inbox);
            metrics.push(metered);
        }
        (cluster, transports, inboxes, metrics)
    }

    /// A client that dials on demand connects only to the replica it sends to, and
    /// that replica's answer comes back over the same connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_dialing_on_demand_connects_only_where_it_sends() {
        let (cluster, transports, mut inboxes) = replicas(2, 1).await;
        let limits = Limits {
            dial_on_demand: true,
            ..Limits::client()
        };
        let (client, mut client_inbox) = Transport::<Note>::client(
            ClientId(0),
            key(3),
            cluster,
            limits,
            Arc::new(NodeMetrics::default()),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let connected = |r: usize| transports[r].clients.lock().unwrap().len();
        assert_eq!(
            (connected(0), connected(1)),
            (0, 0),
            "nothing sent, nothing dialled"
        );
        assert!(client.send(NodeId::Replica(ReplicaId(0)), &Note(7)));
        let inbound = tokio::time::timeout(Duration::from_secs(5), inboxes[0].recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inbound.from, NodeId::Client(ClientId(0)));
        assert!(transports[0].send(NodeId::Client(ClientId(0)), &Note(8)));
        let answer = tokio::time::timeout(Duration::from_secs(5), client_inbox.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.from, NodeId::Replica(ReplicaId(0)));
        assert_eq!((connected(0), connected(1)), (1, 0));
    }

    /// A multicast reaches each of its recipients, and each recipient gets its
    /// frames in the order given.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multicast_reaches_each_recipient_in_order() {
        let (_, transports, mut inboxes) = replicas(3, 0).await;
        let (r1, r2) = (NodeId::Replica(ReplicaId(1)), NodeId::Replica(ReplicaId(2)));
        let both = Recipients::These(vec![r1, r2]);
        let only_r2 = Recipients::One(r2);
        transports[0].send_all([(&both, &Note(5)), (&only_r2, &Note(6))]);
        assert_eq!(next_note(&mut inboxes[1]).await, 5);
        assert_eq!(next_note(&mut inboxes[2]).await, 5);
        assert_eq!(next_note(&mut inboxes[2]).await, 6);
    }

    /// Requests a replica relays into a full request lane are shed, and its
    /// agreement messages behind them on the same connection still get through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_requests_are_shed_on_a_full_lane_and_agreement_passes() {
        let limits = Limits {
            request_inbox: 4,
            ..Limits::default()
        };
        relay_twenty_requests_then_agree(limits, 4).await;
    }

    /// Relayed requests take at most half of their sender's share of the inbox:
    /// the rest is shed, and the sender's agreement messages find room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_requests_leave_half_the_senders_share_to_agreement() {
        let limits = Limits {
            inbox_per_peer: 8,
            ..Limits::default()
        };
        relay_twenty_requests_then_agree(limits, 4).await;
    }

    /// Replica 0 relays 20 requests, then an agreement message, to replica 1:
    /// the first `kept` requests are queued, the rest shed, the agreement
    /// message delivered first.
    async fn relay_twenty_requests_then_agree(limits: Limits, kept: u32) {
        let (_, transports, mut inboxes, metrics) = replicas_with(2, 0, limits).await;
        let to_r1 = Recipients::One(NodeId::Replica(ReplicaId(1)));
        let requests: Vec<Note> = (0..20).map(|i| Note(REQUEST_NOTES + i)).collect();
        let agreement = Note(7);
        transports[0].send_all(
            requests
                .iter()
                .chain([&agreement])
                .map(|note| (&to_r1, note)),
        );
        // Nothing is taken out of the inbox before all 21 were queued or shed.
        let queued = kept as usize + 1;
        tokio::time::timeout(Duration::from_secs(10), async {
            while inboxes[1].len() < queued || metrics[1].requests_shed.get() < u64::from(20 - kept)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every note is queued or shed");
        assert_eq!(next_note(&mut inboxes[1]).await, 7, "agreement first");
        let requests_kept: Vec<u32> = std::iter::from_fn(|| inboxes[1].try_recv())
            .map(|inbound| inbound.message.0)
            .collect();
        assert_eq!(
            requests_kept,
            (REQUEST_NOTES..REQUEST_NOTES + kept).collect::<Vec<_>>()
        );
        assert_eq!(metrics[1].requests_shed.get(), u64::from(20 - kept));
    }

    /// The next message in `inbox`, which must come from replica 0.
    async fn next_note(inbox: &mut Inbox<Note>) -> u32 {
        let inbound = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("delivered in time")
            .expect("inbox open");
        assert_eq!(inbound.from, NodeId::Replica(ReplicaId(0)));
        inbound.message.0
    }
}
