//! Runs one replica of any protocol: the same loop for every [`ProtocolSuite`].
//!
//! The loop owns the protocol instance and feeds it one input at a time: a message
//! from the inbox, or a timer whose deadline passed.
//!
//! **Group commit.** When it wakes, the loop also takes whatever else is already
//! waiting in the inbox (up to [`MAX_INPUTS_PER_COMMIT`] inputs), handles each in turn,
//! and gathers the writes and the outgoing messages of all of them. It then commits
//! every write in one durable transaction, and only then sends the messages, in the
//! order the protocol produced them. Each message thus leaves after every write that
//! preceded it, which is what [`diffuse_core::protocol`] requires, and under load one
//! fsync covers many inputs instead of one each. Timers and observations take effect
//! at once: they never depend on the disk.

use crate::config::NodeSettings;
use crate::metrics::{self, NodeMetrics};
use crate::storage::{StorageError, Store};
use crate::timers::Timers;
use crate::transport::{Inbound, Limits, Transport};
use diffuse_core::app::Application;
use diffuse_core::ids::{ClientId, NodeId};
use diffuse_core::protocol::{Action, Actions, Input, Observation, Replica, WriteOp};
use diffuse_core::suite::{ProtocolSuite, ReplicaSetup};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
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
    let store = Store::open(&settings.data_dir, owner.as_bytes())?;
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
    let mut driver = Driver::<S> {
        id: NodeId::Replica(settings.id),
        replica: S::replica(setup, app),
        store,
        transport,
        timers: Timers::default(),
        metrics,
        arrivals: HashMap::new(),
        writes: Vec::new(),
        outbox: Vec::new(),
    };
    let start = driver.replica.handle(Input::Start(recovered));
    driver.absorb(start);
    driver.commit()?;
    tracing::info!(replica = settings.id.0, address = %settings.listen, "listening");
    tokio::pin!(shutdown);
    let mut last_sample = Instant::now();
    loop {
        let deadline = driver.timers.next_deadline();
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = sleep_until(deadline), if deadline.is_some() => {
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
        // Whatever else already waits joins this commit.
        for _ in 1..MAX_INPUTS_PER_COMMIT {
            match inbox.try_recv() {
                Ok(inbound) => driver.on_message(inbound),
                Err(_) => break,
            }
        }
        driver.commit()?;
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
    // Every input's writes were committed at the end of its loop iteration, so
    // what the replica seals now follows everything it persisted.
    match driver.replica.shutdown() {
        Ok(()) => tracing::info!(replica = settings.id.0, "shut down"),
        Err(error) => tracing::warn!(
            replica = settings.id.0,
            %error,
            "shut down without sealing: the next start recovers as after a crash"
        ),
    }
    Ok(())
}

/// How often the queue-depth gauges are refreshed.
const QUEUE_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The most inputs whose writes share one durable commit.
pub const MAX_INPUTS_PER_COMMIT: usize = 256;

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct Driver<S: ProtocolSuite> {
    id: NodeId,
    replica: S::Replica,
    store: Store,
    transport: Transport<S::Message>,
    timers: Timers<S::Timer>,
    metrics: Arc<NodeMetrics>,
    /// When each client's oldest unanswered request arrived (bounded by the
    /// registered clients: no one else can connect).
    arrivals: HashMap<ClientId, Instant>,
    /// Writes gathered since the last commit.
    writes: Vec<WriteOp>,
    /// Messages waiting for the next commit: a recipient, or `None` for a broadcast.
    outbox: Vec<(Option<NodeId>, S::Message)>,
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
    /// and messages for the next [`Driver::commit`].
    fn absorb(&mut self, actions: Actions<S::Message, S::Timer>) {
        for action in actions.into_vec() {
            match action {
                Action::Persist(more) => self.writes.extend(more),
                Action::Send { to, message } => self.outbox.push((Some(to), message)),
                Action::Broadcast { message } => self.outbox.push((None, message)),
                Action::SetTimer { timer, after } => self.timers.set(timer, after, Instant::now()),
                Action::CancelTimer { timer } => self.timers.cancel(timer),
                Action::Complete { .. } => {}
                Action::Observe(observation) => self.observe(observation),
            }
        }
    }

    /// Makes the gathered writes durable in one transaction, then sends the
    /// gathered messages in order.
    fn commit(&mut self) -> Result<(), NodeError> {
        if !self.writes.is_empty() {
            let started = std::time::Instant::now();
            // The commit fsyncs: let the runtime move other tasks off this thread.
            let writes = &self.writes;
            let store = &self.store;
            let flavor = tokio::runtime::Handle::current().runtime_flavor();
            if flavor == tokio::runtime::RuntimeFlavor::MultiThread {
                tokio::task::block_in_place(|| store.apply(writes.iter()))?;
            } else {
                // block_in_place needs the multi-threaded runtime; on another one
                // the commit simply blocks this thread.
                store.apply(writes.iter())?;
            }
            self.metrics
                .persist_latency
                .observe(started.elapsed().as_secs_f64());
            self.writes.clear();
        }
        for (to, message) in std::mem::take(&mut self.outbox) {
            match to {
                Some(to) => {
                    if let NodeId::Client(client) = to
                        && let Some(arrived) = self.arrivals.remove(&client)
                    {
                        self.metrics
                            .request_latency
                            .observe(arrived.elapsed().as_secs_f64());
                    }
                    self.transport.send(to, &message);
                }
                None => self.transport.broadcast(&message),
            }
        }
        Ok(())
    }

    fn observe(&mut self, observation: Observation) {
        let metrics = &self.metrics;
        match observation {
            Observation::Executed { requests, .. } => {
                metrics.committed_batches.inc();
                metrics.committed_requests.inc_by(requests as u64);
            }
            Observation::Checkpoint { .. } => {}
            Observation::StableCheckpoint { seq } => {
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
