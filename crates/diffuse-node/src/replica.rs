//! Runs one replica of any protocol: the same loop for every [`ProtocolSuite`].
//!
//! The loop owns the protocol instance and feeds it one input at a time: a message
//! from the inbox, or a timer whose deadline passed.
//!
//! **Group commit, pipelined.** When it wakes, the loop also takes whatever else is
//! already waiting in the inbox (up to [`MAX_INPUTS_PER_COMMIT`] inputs), handles each
//! in turn, and gathers the writes and the outgoing messages of all of them into one
//! group. It hands the group to the storage thread and goes on with the next inputs.
//! The storage thread commits the writes of every group waiting for it in one durable
//! transaction, and only then sends their messages, in the order the protocol produced
//! them. Each message thus leaves after every write that preceded it, which is what
//! [`diffuse_core::protocol`] requires, under load one fsync covers many inputs
//! instead of one each, and the protocol keeps working while the disk syncs. (A crash
//! loses the inputs handled since the last durable commit together with everything
//! that depended on them: no message of theirs has left.) Timers and observations
//! take effect at once: they never depend on the disk.
//!
//! **Unawaited writes.** Writes a protocol persists with
//! [`Action::PersistUnawaited`] hold back no message: when a group has no other
//! writes and no earlier group still holds messages or awaited writes in the
//! storage thread's queue, its messages leave at once, from the loop, and its
//! writes follow them to the disk. Messages therefore never overtake one another,
//! and each still leaves after every awaited write before it. (PBFT sends its
//! votes this way, ahead of their slots' writes, under a persisted bound.)
//!
//! **Deferred writes.** A protocol whose messages never depend on its writes
//! surviving a crash ([`ProtocolSuite::MESSAGES_WAIT_FOR_WRITES`] false: FastBFT)
//! sends each group's messages at once, and the storage thread commits the writes
//! of every group of the last few milliseconds together, without an fsync, with a
//! durable commit at least every [`DEFERRED_SYNC`] (redb reclaims space only then)
//! and always before the replica shuts down.

use crate::alarm::Alarm;
use crate::config::NodeSettings;
use crate::metrics::{self, NodeMetrics};
use crate::storage::{StorageError, Store};
use crate::timers::Timers;
use crate::transport::{Inbound, Limits, Recipients, Transport};
use diffuse_core::app::Application;
use diffuse_core::ids::{ClientId, NodeId};
use diffuse_core::protocol::{Action, Actions, Input, Observation, Replica, WriteOp};
use diffuse_core::suite::{ProtocolSuite, ReplicaSetup};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Why a node stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Storage failed; the replica stops rather than forget a vote.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The listening address cannot be bound.
    #[error("cannot listen on {address}: {error}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The `[options]` of the configuration are invalid.
    #[error("invalid options: {0}")]
    Options(String),
    /// The protocol named in the configuration is not built in.
    #[error("unknown protocol `{0}` (available: pbft, minbft, fastbft)")]
    UnknownProtocol(String),
    /// The thread that wakes the replica at its timers' deadlines cannot start.
    #[error("cannot start the timer thread: {0}")]
    Alarm(std::io::Error),
}

/// Runs the replica described by `settings` with the protocol and application it
/// names, until `shutdown` completes.
pub async fn run_node(
    settings: NodeSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    match settings.protocol.as_str() {
        "pbft" => {
            use diffuse_pbft::Pbft;
            let options =
                Pbft::configured_options(&settings.options).map_err(NodeError::Options)?;
            let app = Box::new(diffuse_apps::KvStore::default());
            run_replica::<Pbft>(settings, options, app, shutdown).await
        }
        "minbft" => {
            use diffuse_minbft::MinBft;
            let mut options =
                MinBft::configured_options(&settings.options).map_err(NodeError::Options)?;
            options.tee = disk_enclave(&settings)?;
            let app = Box::new(diffuse_apps::KvStore::default());
            run_replica::<MinBft>(settings, options, app, shutdown).await
        }
        "fastbft" => {
            use diffuse_fastbft::FastBft;
            let mut options =
                FastBft::configured_options(&settings.options).map_err(NodeError::Options)?;
            options.tee = disk_enclave(&settings)?;
            let app = Box::new(diffuse_apps::KvStore::default());
            run_replica::<FastBft>(settings, options, app, shutdown).await
        }
        other => Err(NodeError::UnknownProtocol(other.to_string())),
    }
}

/// A hybrid protocol's enclave: this replica's counter store and sealed state,
/// and every replica's enclave key from the attested enclave list.
fn disk_enclave(settings: &NodeSettings) -> Result<diffuse_minbft::TeeHost, NodeError> {
    let (Some(enclaves_file), Some(tee_dir)) = (&settings.enclaves_file, &settings.tee_dir) else {
        return Err(NodeError::Options(format!(
            "{} needs `enclaves_file` and `tee_dir` (see `diffuse testnet --protocol {}`)",
            settings.protocol, settings.protocol
        )));
    };
    let keys = crate::enclaves::EnclavesFile::load_keys(enclaves_file, settings.cluster.n())
        .map_err(|e| NodeError::Options(e.to_string()))?;
    let enclave = crate::enclaves::DiskEnclave::new(settings.id, tee_dir.clone(), keys);
    Ok(diffuse_minbft::TeeHost::provided(Arc::new(enclave)))
}

/// Runs a replica of protocol `S` until `shutdown` completes.
pub async fn run_replica<S: ProtocolSuite>(
    settings: NodeSettings,
    options: S::Options,
    app: Box<dyn Application>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let metrics = Arc::new(NodeMetrics::default());
    let _endpoint = match settings.metrics {
        Some(address) => Some(
            metrics::spawn_endpoint(address, metrics.clone())
                .await
                .map_err(|error| NodeError::Listen { address, error })?,
        ),
        None => None,
    };
    let owner = format!(
        "{} replica {} of cluster {}",
        S::NAME,
        settings.id.0,
        settings.cluster.digest.short()
    );
    let mut store = Store::open(&settings.data_dir, owner.as_bytes())?;
    store.set_quick_repair(settings.quick_repair);
    let recovered = store.load()?;
    tracing::info!(
        replica = settings.id.0,
        protocol = S::NAME,
        entries = recovered.entries.len(),
        "starting from the data directory"
    );
    let (transport, mut inbox) = Transport::<S::Message>::replica(
        settings.id,
        settings.secret.clone(),
        settings.cluster.clone(),
        settings.listen,
        Limits::default(),
        metrics.clone(),
    )
    .await
    .map_err(|error| NodeError::Listen {
        address: settings.listen,
        error,
    })?;
    let setup = ReplicaSetup {
        id: settings.id,
        keys: settings.cluster.keys.clone(),
        secret: settings.secret.clone(),
        options,
    };
    let transport = Arc::new(transport);
    let (failure_tx, mut failure) = oneshot::channel();
    let alarm = Alarm::start().map_err(NodeError::Alarm)?;
    let holding = Arc::new(AtomicUsize::new(0));
    let (groups, storage) = StorageThread::start(
        store,
        transport.clone(),
        metrics.clone(),
        failure_tx,
        S::MESSAGES_WAIT_FOR_WRITES,
        holding.clone(),
    );
    let mut driver = Driver::<S> {
        id: NodeId::Replica(settings.id),
        replica: S::replica(setup, app),
        groups,
        transport,
        timers: Timers::default(),
        metrics,
        arrivals: HashMap::new(),
        writes: Vec::new(),
        outbox: Vec::new(),
        awaited: false,
        holding,
    };
    let start = driver.replica.handle(Input::Start(recovered));
    driver.absorb(start);
    let mut stopped = driver.hand_over().await;
    tracing::info!(replica = settings.id.0, address = %settings.listen, "listening");
    tokio::pin!(shutdown);
    let mut last_sample = Instant::now();
    while stopped.is_ok() {
        alarm.set(driver.timers.next_deadline().map(Instant::into_std));
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = &mut failure => break,
            () = alarm.rung() => {
                for timer in driver.timers.expired(Instant::now()) {
                    let actions = driver.replica.handle(Input::Timer(timer));
                    driver.absorb(actions);
                }
            }
            inbound = inbox.recv() => {
                let Some(inbound) = inbound else { break };
                driver.on_message(inbound);
            }
        }
        // Whatever else already waits joins this group.
        for _ in 1..MAX_INPUTS_PER_COMMIT {
            match inbox.try_recv() {
                Some(inbound) => driver.on_message(inbound),
                None => break,
            }
        }
        stopped = driver.hand_over().await;
        // Queue depths are sampled, not computed per input: summing every peer's
        // queue on each message would put a lock and a scan on the hot path.
        if last_sample.elapsed() >= QUEUE_SAMPLE_INTERVAL {
            last_sample = Instant::now();
            driver.metrics.inbox_depth.set(inbox.len() as i64);
            driver
                .metrics
                .send_queue_depth
                .set(driver.transport.queued() as i64);
        }
    }
    // The writes the replica keeps for its shutdown go after all the others.
    // (A storage error stops the thread: `finish` below reports it.)
    if stopped.is_ok() {
        let writes = driver.replica.shutdown_writes();
        if !writes.is_empty() {
            driver.writes.extend(writes);
            let _ = driver.hand_over().await;
        }
    }
    // The storage thread commits (and sends) every group handed over before it stops,
    // so what the replica seals now follows everything it persisted.
    let Driver {
        mut replica,
        groups,
        ..
    } = driver;
    drop(groups);
    let finished = storage.finish();
    if let Err(error) = finished {
        return Err(error.into());
    }
    match replica.shutdown() {
        Ok(()) => tracing::info!(replica = settings.id.0, "shut down"),
        Err(error) => tracing::warn!(
            replica = settings.id.0,
            %error,
            "shut down without sealing: the next start recovers as after a crash"
        ),
    }
    Ok(())
}

/// With deferred writes, the longest a write waits for a durable commit.
pub const DEFERRED_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// With deferred writes, the least time between two commits: a commit costs
/// about the same for one group as for hundreds, and nothing waits for it. (At
/// `n = 103` on two cores, 200 ms against 20 ms: 5–8 % more operations per second,
/// the storage threads' share of the replicas' CPU from about a third to a sixth.)
const DEFERRED_COMMIT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// With deferred writes, the groups waiting for the storage thread (and the most
/// in one commit) before the loop waits for it.
const MAX_DEFERRED_GROUPS: usize = 8192;

/// How often the queue-depth gauges are refreshed.
const QUEUE_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The most inputs whose writes share one group handed to the storage thread.
pub const MAX_INPUTS_PER_COMMIT: usize = 256;

/// Groups waiting for the storage thread before the loop waits for it: under
/// overload the loop slows down to the disk's pace instead of queueing without bound.
const MAX_GROUPS_WAITING: usize = 64;

/// The most groups the storage thread commits in one transaction.
const MAX_GROUPS_PER_COMMIT: usize = 64;

/// The storage thread takes no further group into a commit once this many
/// messages wait to go out with it: after a slow fsync, a commit of 64 full groups
/// could otherwise hand one peer more frames at once than its send queue holds
/// (4,096 by default), and the excess would be dropped.
const MAX_MESSAGES_PER_COMMIT: usize = 1024;

/// A message waiting for the commit of the writes that precede it.
struct Outgoing<M> {
    to: Recipients,
    message: M,
    /// For a reply: when its client's oldest unanswered request arrived.
    arrived: Option<Instant>,
}

/// The writes and messages of consecutive inputs, committed and sent together.
struct Group<M> {
    writes: Vec<WriteOp>,
    outbox: Vec<Outgoing<M>>,
    /// Whether later messages must wait for this group (it has messages or
    /// awaited writes): counted in [`Driver::holding`] until it is committed.
    holds: bool,
}

/// The thread that owns the store: commits groups in order, then sends their
/// messages. Stops at the first storage error, reporting it, and sends nothing more.
struct StorageThread {
    handle: std::thread::JoinHandle<Result<(), StorageError>>,
}

impl StorageThread {
    fn start<M: diffuse_core::codec::WireMessage + Send + 'static>(
        store: Store,
        transport: Arc<Transport<M>>,
        metrics: Arc<NodeMetrics>,
        failure: oneshot::Sender<()>,
        messages_wait_for_writes: bool,
        holding: Arc<AtomicUsize>,
    ) -> (mpsc::Sender<Group<M>>, StorageThread) {
        let (tx, rx) = mpsc::channel(if messages_wait_for_writes {
            MAX_GROUPS_WAITING
        } else {
            MAX_DEFERRED_GROUPS
        });
        let handle = std::thread::Builder::new()
            .name("diffuse-storage".into())
            .spawn(move || {
                let result = if messages_wait_for_writes {
                    storage_loop(&store, &transport, &metrics, &holding, rx)
                } else {
                    deferred_storage_loop(&store, &metrics, rx)
                };
                if result.is_err() {
                    let _ = failure.send(());
                }
                result
            })
            .expect("the storage thread starts");
        (tx, StorageThread { handle })
    }

    /// Waits until every group handed over is committed and sent (the sender must be
    /// dropped first). Returns the storage error that stopped the thread, if any.
    fn finish(self) -> Result<(), StorageError> {
        let join = || self.handle.join();
        let joined = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(join)
        } else {
            join()
        };
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

fn storage_loop<M: diffuse_core::codec::WireMessage>(
    store: &Store,
    transport: &Transport<M>,
    metrics: &NodeMetrics,
    holding: &AtomicUsize,
    mut groups: mpsc::Receiver<Group<M>>,
) -> Result<(), StorageError> {
    let mut waiting: Vec<Group<M>> = Vec::new();
    while let Some(first) = groups.blocking_recv() {
        waiting.push(first);
        gather(
            &mut groups,
            &mut waiting,
            MAX_GROUPS_PER_COMMIT,
            MAX_MESSAGES_PER_COMMIT,
        );
        if waiting.iter().any(|g| !g.writes.is_empty()) {
            let started = std::time::Instant::now();
            store.apply(waiting.iter().flat_map(|g| g.writes.iter()))?;
            metrics
                .persist_latency
                .observe(started.elapsed().as_secs_f64());
        }
        let outgoing = waiting.iter().flat_map(|g| g.outbox.iter());
        for arrived in outgoing.clone().filter_map(|o| o.arrived) {
            metrics
                .request_latency
                .observe(arrived.elapsed().as_secs_f64());
        }
        transport.send_all(outgoing.map(|o| (&o.to, &o.message)));
        // Only now, with their messages queued: the loop's next messages may go
        // directly once no group holds them back, and must not overtake these.
        let released = waiting.iter().filter(|g| g.holds).count();
        holding.fetch_sub(released, Ordering::Release);
        waiting.clear();
    }
    Ok(())
}

/// Adds the groups already waiting in `groups` to `waiting`, up to `max_groups`
/// groups and about `max_messages` messages in all: what one commit takes.
fn gather<M>(
    groups: &mut mpsc::Receiver<Group<M>>,
    waiting: &mut Vec<Group<M>>,
    max_groups: usize,
    max_messages: usize,
) {
    let mut messages: usize = waiting.iter().map(|g| g.outbox.len()).sum();
    while waiting.len() < max_groups && messages < max_messages {
        match groups.try_recv() {
            Ok(group) => {
                messages = messages.saturating_add(group.outbox.len());
                waiting.push(group);
            }
            Err(_) => break,
        }
    }
}

/// The storage thread with deferred writes: the messages already left; commits
/// without an fsync, durably at least every [`DEFERRED_SYNC`] and once more when
/// the replica stops.
fn deferred_storage_loop<M>(
    store: &Store,
    metrics: &NodeMetrics,
    mut groups: mpsc::Receiver<Group<M>>,
) -> Result<(), StorageError> {
    let mut last_sync = std::time::Instant::now();
    let mut last_commit = last_sync;
    let mut unsynced = false;
    let mut waiting: Vec<Group<M>> = Vec::new();
    while let Some(first) = groups.blocking_recv() {
        waiting.push(first);
        // Let the groups of the next few milliseconds join this commit.
        let gathered = last_commit + DEFERRED_COMMIT_EVERY;
        let now = std::time::Instant::now();
        if now < gathered {
            std::thread::sleep(gathered - now);
        }
        gather(&mut groups, &mut waiting, MAX_DEFERRED_GROUPS, usize::MAX);
        let durable = last_sync.elapsed() >= DEFERRED_SYNC;
        let started = std::time::Instant::now();
        store.commit(waiting.iter().flat_map(|g| g.writes.iter()), durable)?;
        if durable {
            metrics
                .persist_latency
                .observe(started.elapsed().as_secs_f64());
            last_sync = std::time::Instant::now();
        }
        unsynced = !durable;
        last_commit = std::time::Instant::now();
        waiting.clear();
    }
    if unsynced {
        store.commit(std::iter::empty(), true)?;
    }
    Ok(())
}

struct Driver<S: ProtocolSuite> {
    id: NodeId,
    replica: S::Replica,
    /// Groups for the storage thread.
    groups: mpsc::Sender<Group<S::Message>>,
    transport: Arc<Transport<S::Message>>,
    timers: Timers<S::Timer>,
    metrics: Arc<NodeMetrics>,
    /// When each client's oldest unanswered request arrived (bounded by the
    /// registered clients: no one else can connect).
    arrivals: HashMap<ClientId, Instant>,
    /// Writes gathered since the last group was handed over.
    writes: Vec<WriteOp>,
    /// Messages gathered since the last group was handed over.
    outbox: Vec<Outgoing<S::Message>>,
    /// Whether the gathered writes include awaited ones ([`Action::Persist`]).
    awaited: bool,
    /// Groups handed over and not yet committed that hold back later messages.
    holding: Arc<AtomicUsize>,
}

impl<S: ProtocolSuite> Driver<S> {
    fn on_message(&mut self, inbound: Inbound<S::Message>) {
        if let NodeId::Client(client) = inbound.from {
            self.arrivals.entry(client).or_insert_with(Instant::now);
        }
        let actions = self.replica.handle(Input::Message {
            from: inbound.from,
            message: inbound.message,
        });
        self.absorb(actions);
    }

    /// Takes in the actions of one input: timers and observations at once, writes
    /// and messages for the next group.
    fn absorb(&mut self, actions: Actions<S::Message, S::Timer>) {
        for action in actions.into_vec() {
            match action {
                Action::Persist(more) => {
                    self.awaited = true;
                    self.writes.extend(more);
                }
                Action::PersistUnawaited(more) => self.writes.extend(more),
                Action::Send { to, message } => {
                    let arrived = match to {
                        NodeId::Client(client) => self.arrivals.remove(&client),
                        NodeId::Replica(_) => None,
                    };
                    self.outbox.push(Outgoing {
                        to: Recipients::One(to),
                        message,
                        arrived,
                    });
                }
                Action::Multicast { to, message } => self.outbox.push(Outgoing {
                    to: Recipients::These(to),
                    message,
                    arrived: None,
                }),
                Action::Broadcast { message } => self.outbox.push(Outgoing {
                    to: Recipients::Replicas,
                    message,
                    arrived: None,
                }),
                Action::SetTimer { timer, after } => self.timers.set(timer, after, Instant::now()),
                Action::CancelTimer { timer } => self.timers.cancel(timer),
                Action::Complete { .. } => {}
                Action::Observe(observation) => self.observe(observation),
            }
        }
    }

    /// Hands the gathered writes and messages to the storage thread, which commits
    /// them in one transaction and then sends the messages in order. Fails if the
    /// storage thread stopped (a storage error).
    async fn hand_over(&mut self) -> Result<(), ()> {
        let awaited = std::mem::take(&mut self.awaited);
        let free =
            !S::MESSAGES_WAIT_FOR_WRITES || (!awaited && self.holding.load(Ordering::Acquire) == 0);
        if free && !self.outbox.is_empty() {
            let outbox = std::mem::take(&mut self.outbox);
            for arrived in outbox.iter().filter_map(|o| o.arrived) {
                self.metrics
                    .request_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
            self.transport
                .send_all(outbox.iter().map(|o| (&o.to, &o.message)));
        }
        if self.writes.is_empty() && self.outbox.is_empty() {
            return Ok(());
        }
        let holds = S::MESSAGES_WAIT_FOR_WRITES && (awaited || !self.outbox.is_empty());
        if holds {
            self.holding.fetch_add(1, Ordering::AcqRel);
        }
        let group = Group {
            writes: std::mem::take(&mut self.writes),
            outbox: std::mem::take(&mut self.outbox),
            holds,
        };
        self.groups.send(group).await.map_err(|_| ())
    }

    fn observe(&mut self, observation: Observation) {
        let metrics = &self.metrics;
        match observation {
            Observation::Executed { seq, requests, .. } => {
                tracing::debug!(seq = seq.0, requests, "executed");
                metrics.committed_batches.inc();
                metrics.committed_requests.inc_by(requests as u64);
            }
            Observation::Checkpoint { .. } => {}
            Observation::StableCheckpoint { seq } => {
                tracing::debug!(seq = seq.0, "checkpoint stable");
                metrics.stable_checkpoint.set(seq.0 as i64);
            }
            Observation::StateTransferred { seq, .. } => {
                metrics.state_transfers.inc();
                tracing::info!(checkpoint = seq.0, "state transfer completed");
            }
            Observation::ViewChangeStarted { view } => {
                metrics.view_changes.inc();
                tracing::warn!(view = view.0, "view change started");
            }
            Observation::ViewInstalled { view } => {
                metrics.view.set(view.0 as i64);
                tracing::info!(view = view.0, "view installed");
            }
            Observation::ModeChanged { mode } => {
                tracing::warn!(mode, "mode changed");
            }
            Observation::Fault { culprit, kind } if culprit == self.id => {
                tracing::error!(kind, "this replica stopped taking part");
            }
            Observation::Fault { culprit, kind } => {
                metrics.peer_faults.inc();
                tracing::warn!(%culprit, kind, "peer misbehaved");
            }
        }
    }
}
