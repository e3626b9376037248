//! The simulated world: replicas, clients, a hostile network and virtual time.
//!
//! Everything happens in one thread, one event at a time, in virtual time, with one
//! seeded random stream, so the same configuration and seed replay the same run
//! exactly. Messages travel as encoded frames: every delivery decodes bytes with the
//! same codec and limits as the runtime, so garbage sent by a Byzantine replica is
//! handled by the real decoder.

use crate::behaviours;
use crate::checkers::{OnlineChecks, Violation};
use crate::history::{Operation, Outcome};
use crate::metrics::Metrics;
use crate::rng::SimRng;
use crate::scenario::{FaultMix, Scenario};
use crate::workload::Workload;
use diffuse_apps::{KvResult, KvStore};
use diffuse_core::codec::{self, WireMessage};
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::SecretKey;
use diffuse_core::ids::{ClientId, NodeId, ReplicaId};
use diffuse_core::protocol::{Action, Client, Input, Observation, Recovered, Replica, WriteOp};
use diffuse_core::suite::{
    Behaviour, ClientSetup, Coalition, Outgoing, Payload, ProtocolSuite, ReplicaSetup,
};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

const MS: u64 = 1_000_000;

/// The client that a scenario with a Byzantine client makes faulty.
const BYZANTINE_CLIENT: ClientId = ClientId(0);

/// The largest frame the simulated network carries (smaller than the runtime's, so
/// that oversized garbage stays cheap to simulate).
pub const SIM_MAX_FRAME: usize = 1 << 20;

/// The most events one run may process before it is declared runaway.
const EVENT_BUDGET: u64 = 4_000_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Number of replicas.
    pub n: usize,
    /// The seed: the whole run follows from it.
    pub seed: u64,
    /// Which faults to inject.
    pub mix: FaultMix,
    /// A mutant of the protocol to run instead of the real thing.
    pub mutant: Option<String>,
    /// Whether to record a readable event trace.
    pub trace: bool,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// The fault mix's name.
    pub mix: String,
    /// Every checker violation (empty: the run passed).
    pub violations: Vec<Violation>,
    /// Counts and latencies.
    pub metrics: Metrics,
    /// The event trace, if requested.
    pub trace: Vec<String>,
    /// A one-line summary of the scenario (faulty replicas, crashes, GST).
    pub scenario: String,
}

/// Why a run could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SetupError {}

/// The liveness bound: after GST, every operation completes within this much
/// virtual time. It covers one view change per faulty primary with the timer at its
/// largest back-off, plus client back-off and state transfer.
pub fn liveness_bound_ns(f: usize) -> u64 {
    (20_000 + 5_000 * f as u64) * MS
}

enum Event<P: ProtocolSuite> {
    Deliver {
        from: NodeId,
        to: NodeId,
        bytes: Arc<Vec<u8>>,
    },
    ReplicaTimer {
        replica: usize,
        timer: P::Timer,
        generation: u64,
    },
    ClientTimer {
        client: usize,
        timer: P::ClientTimer,
        generation: u64,
    },
    Invoke {
        client: usize,
    },
    Crash {
        replica: usize,
        scheduled: bool,
    },
    Restart {
        replica: usize,
    },
    /// A replica's storage commits what waits for it (see [`Unflushed`]).
    Flush {
        replica: usize,
        generation: u64,
    },
}

/// Writes, and the messages that wait for them, not yet on a replica's disk: as in
/// the runtime's storage thread, they exist once a replica has persisted writes
/// with [`Action::PersistUnawaited`], and until a flush event (a short random delay
/// later) commits them in order. A crash loses them all.
struct Unflushed<M> {
    writes: Vec<WriteOp>,
    messages: Vec<(Vec<NodeId>, M)>,
    /// Holds back later messages (it has messages or awaited writes).
    holds: bool,
}

/// The longest a replica's storage takes to commit unawaited writes, in ns.
const FLUSH_MAX_NS: u64 = 2 * MS;

struct Scheduled<P: ProtocolSuite> {
    at: u64,
    id: u64,
    event: Event<P>,
}

impl<P: ProtocolSuite> PartialEq for Scheduled<P> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}
impl<P: ProtocolSuite> Eq for Scheduled<P> {}
impl<P: ProtocolSuite> PartialOrd for Scheduled<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<P: ProtocolSuite> Ord for Scheduled<P> {
    // Reversed: BinaryHeap is a max-heap and the earliest event must come first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.id).cmp(&(self.at, self.id))
    }
}

struct ReplicaNode<P: ProtocolSuite> {
    machine: Option<P::Replica>,
    setup: ReplicaSetup<P::Options>,
    disk: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The disk when the replica last started: what a crash leaves of a protocol
    /// whose messages do not wait for its writes (`MESSAGES_WAIT_FOR_WRITES`).
    disk_at_start: BTreeMap<Vec<u8>, Vec<u8>>,
    timers: BTreeMap<P::Timer, u64>,
    behaviour: Option<Box<dyn Behaviour<P::Message>>>,
    /// Groups not yet committed, oldest first.
    unflushed: Vec<Unflushed<P::Message>>,
    /// The pending flush event's generation (a crash makes it stale).
    flush: Option<u64>,
    /// A crash waits for this replica's next unawaited write, to strike while it
    /// is on its way to the disk (called off if the restart comes first).
    crash_at_next_write: bool,
}

struct ClientNode<P: ProtocolSuite> {
    id: ClientId,
    machine: P::Client,
    timers: BTreeMap<P::ClientTimer, u64>,
    workload: Workload,
    current: Option<usize>,
    /// The Byzantine client's behaviour, through which everything it sends goes.
    behaviour: Option<Box<dyn Behaviour<P::Message>>>,
}

/// One simulated run.
pub struct Simulation<P: ProtocolSuite> {
    now: u64,
    next_id: u64,
    rng: SimRng,
    queue: BinaryHeap<Scheduled<P>>,
    replicas: Vec<ReplicaNode<P>>,
    clients: Vec<ClientNode<P>>,
    scenario: Scenario,
    checks: OnlineChecks,
    history: Vec<Operation>,
    metrics: Metrics,
    trace: Option<Vec<String>>,
    events: u64,
    /// Whether a replica has persisted unawaited writes in this run: crashes may
    /// then wait for one to strike while it is not yet on the disk.
    unawaited_writes: bool,
}

impl<P: ProtocolSuite> Simulation<P> {
    /// Builds the world for `config`: keys, options, scenario, replicas and clients.
    pub fn new(config: &RunConfig) -> Result<Self, SetupError> {
        let quorum = P::quorum(config.n).map_err(|e| SetupError(e.to_string()))?;
        let mut rng = SimRng::new(config.seed);
        let mut options = P::simulation_options(&mut rng);
        if let Some(mutant) = &config.mutant {
            if !P::apply_mutant(&mut options, mutant) {
                return Err(SetupError(format!(
                    "unknown mutant {mutant:?} for {}",
                    P::NAME
                )));
            }
        }
        let replica_behaviours = replica_behaviour_names::<P>();
        let client_behaviours: Vec<&str> = P::client_behaviours().iter().map(|b| b.name).collect();
        let scenario = Scenario::draw(
            &config.mix,
            config.n,
            quorum.f(),
            &replica_behaviours,
            &client_behaviours,
            crate::scenario::Tolerance::of::<P>(),
            &mut rng,
        );
        let replica_secrets: Vec<SecretKey> = (0..config.n)
            .map(|_| SecretKey::from_seed(rng.bytes32()))
            .collect();
        let client_secrets: Vec<SecretKey> = (0..scenario.workload.clients)
            .map(|_| SecretKey::from_seed(rng.bytes32()))
            .collect();
        let keys = Arc::new(
            ClusterKeys::new(
                replica_secrets.iter().map(SecretKey::public).collect(),
                client_secrets
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (ClientId(i as u32), k.public()))
                    .collect(),
            )
            .map_err(|e| SetupError(e.to_string()))?,
        );
        let coalition = Coalition::new(scenario.byzantine.keys().copied().collect());
        let mut replicas = Vec::with_capacity(config.n);
        for (i, secret) in replica_secrets.into_iter().enumerate() {
            let id = ReplicaId(i as u16);
            let setup = ReplicaSetup {
                id,
                keys: keys.clone(),
                secret,
                options: options.clone(),
            };
            let behaviour = match scenario.byzantine.get(&id) {
                Some(name) => Some(
                    behaviours::build::<P::Message>(name, config.n, SIM_MAX_FRAME, &mut rng)
                        .or_else(|| P::behaviour(name, &setup, &coalition))
                        .ok_or_else(|| SetupError(format!("unknown behaviour {name:?}")))?,
                ),
                None => None,
            };
            replicas.push(ReplicaNode {
                machine: Some(P::replica(setup.clone(), Box::new(KvStore::default()))),
                setup,
                disk: BTreeMap::new(),
                disk_at_start: BTreeMap::new(),
                timers: BTreeMap::new(),
                behaviour,
                unflushed: Vec::new(),
                flush: None,
                crash_at_next_write: false,
            });
        }
        let mut clients = Vec::with_capacity(client_secrets.len());
        for (i, secret) in client_secrets.into_iter().enumerate() {
            let id = ClientId(i as u32);
            let setup = ClientSetup {
                id,
                keys: keys.clone(),
                secret,
                options: options.clone(),
                first_timestamp: 1,
            };
            let behaviour = match &scenario.byzantine_client {
                Some(name) if id == BYZANTINE_CLIENT => Some(
                    P::client_behaviour(name, &setup)
                        .ok_or_else(|| SetupError(format!("unknown client behaviour {name:?}")))?,
                ),
                _ => None,
            };
            clients.push(ClientNode {
                id,
                machine: P::client(setup),
                timers: BTreeMap::new(),
                workload: Workload::new(
                    id,
                    scenario.workload.ops_per_client,
                    scenario.workload.keys,
                ),
                current: None,
                behaviour,
            });
        }
        Ok(Self {
            now: 0,
            next_id: 0,
            rng,
            queue: BinaryHeap::new(),
            replicas,
            clients,
            scenario,
            checks: OnlineChecks::default(),
            history: Vec::new(),
            metrics: Metrics::default(),
            trace: config.trace.then(Vec::new),
            events: 0,
            unawaited_writes: false,
        })
    }

    /// Runs to the end and judges the run.
    pub fn run(mut self, config: &RunConfig) -> RunReport {
        let f = P::quorum(config.n).map(|q| q.f()).unwrap_or(0);
        let bound = liveness_bound_ns(f);
        let deadline = self.scenario.gst_ns + bound + 2_000 * MS;
        self.start();
        while let Some(next) = self.queue.pop() {
            if next.at > deadline {
                break;
            }
            self.now = next.at;
            self.events += 1;
            if self.events > EVENT_BUDGET {
                self.checks.budget_exhausted(EVENT_BUDGET);
                break;
            }
            self.dispatch(next.event);
            if self.clients_done() {
                break;
            }
        }
        let scenario = self.describe();
        self.metrics.end_ns = self.now;
        self.metrics.events = self.events;
        let violations = self
            .checks
            .finish(&self.history, self.scenario.gst_ns, self.now, bound);
        RunReport {
            seed: config.seed,
            mix: self.scenario.mix.name().to_string(),
            violations,
            metrics: self.metrics,
            trace: self.trace.unwrap_or_default(),
            scenario,
        }
    }

    fn describe(&self) -> String {
        let byzantine: Vec<String> = self
            .scenario
            .byzantine
            .iter()
            .map(|(r, b)| format!("{r}={b}"))
            .collect();
        let crashes: Vec<String> = self
            .scenario
            .crashes
            .iter()
            .map(|c| {
                let kind = if c.scheduled { "shutdown" } else { "crash" };
                format!(
                    "{}@{}-{}ms({kind})",
                    c.replica,
                    c.crash_ns / MS,
                    c.restart_ns / MS
                )
            })
            .collect();
        let byzantine_client = self
            .scenario
            .byzantine_client
            .as_ref()
            .map(|b| format!(" byzantine-client={BYZANTINE_CLIENT}={b}"))
            .unwrap_or_default();
        format!(
            "gst={}ms byzantine=[{}]{byzantine_client} crashes=[{}] partitions={} loss={}ppm clients={}x{} keys={}",
            self.scenario.gst_ns / MS,
            byzantine.join(","),
            crashes.join(","),
            self.scenario.partitions.len(),
            self.scenario.network.loss_ppm,
            self.scenario.workload.clients,
            self.scenario.workload.ops_per_client,
            self.scenario.workload.keys,
        )
    }

    fn start(&mut self) {
        if self.trace.is_some() {
            let line = format!("scenario: {}", self.describe());
            self.log(line);
        }
        for crash in self.scenario.crashes.clone() {
            let replica = crash.replica.index();
            let scheduled = crash.scheduled;
            self.schedule(crash.crash_ns, Event::Crash { replica, scheduled });
            self.schedule(crash.restart_ns, Event::Restart { replica });
        }
        for client in 0..self.clients.len() {
            let at = self.rng.between(0, 200 * MS);
            self.schedule(at, Event::Invoke { client });
        }
        for replica in 0..self.replicas.len() {
            self.boot(replica, Recovered::default());
        }
    }

    fn clients_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.workload.remaining() == 0 && !c.machine.is_busy())
    }

    fn schedule(&mut self, at: u64, event: Event<P>) {
        self.next_id += 1;
        self.queue.push(Scheduled {
            at,
            id: self.next_id,
            event,
        });
    }

    /// Schedules a timer event `after` from now; returns its generation, which the
    /// node records so that a cancelled or replaced timer's event is ignored.
    fn arm(&mut self, after: std::time::Duration, event: impl FnOnce(u64) -> Event<P>) -> u64 {
        self.next_id += 1;
        let generation = self.next_id;
        self.schedule(self.now + after.as_nanos() as u64, event(generation));
        generation
    }

    fn log(&mut self, line: String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>10.3}ms  {line}", self.now as f64 / MS as f64));
        }
    }

    fn is_correct(&self, node: NodeId) -> bool {
        match node {
            NodeId::Replica(r) => !self.scenario.byzantine.contains_key(&r),
            NodeId::Client(c) => c != BYZANTINE_CLIENT || self.scenario.byzantine_client.is_none(),
        }
    }

    fn dispatch(&mut self, event: Event<P>) {
        match event {
            Event::Deliver { from, to, bytes } => self.deliver(from, to, &bytes),
            Event::ReplicaTimer {
                replica,
                timer,
                generation,
            } => {
                let node = &mut self.replicas[replica];
                if node.machine.is_none() || node.timers.get(&timer) != Some(&generation) {
                    return;
                }
                node.timers.remove(&timer);
                self.log(format!("r{replica} timer {timer:?}"));
                self.step_replica(replica, Input::Timer(timer));
            }
            Event::ClientTimer {
                client,
                timer,
                generation,
            } => {
                let node = &mut self.clients[client];
                if node.timers.get(&timer) != Some(&generation) {
                    return;
                }
                node.timers.remove(&timer);
                self.log(format!("c{client} timer {timer:?}"));
                let actions = self.clients[client].machine.handle(Input::Timer(timer));
                self.apply_client(client, actions.into_vec());
            }
            Event::Invoke { client } => self.invoke(client),
            Event::Crash { replica, scheduled } => {
                let node = &self.replicas[replica];
                if !scheduled
                    && self.unawaited_writes
                    && node.machine.is_some()
                    && node.unflushed.is_empty()
                    && !node.crash_at_next_write
                    && self.rng.ppm(500_000)
                {
                    self.replicas[replica].crash_at_next_write = true;
                    return self.log(format!("r{replica} will crash at its next unawaited write"));
                }
                let node = &mut self.replicas[replica];
                node.crash_at_next_write = false;
                let Some(mut machine) = node.machine.take() else {
                    return;
                };
                node.timers.clear();
                if !scheduled {
                    let lost = std::mem::take(&mut node.unflushed);
                    node.flush = None;
                    if !lost.is_empty() {
                        self.log(format!("r{replica} loses {} unflushed groups", lost.len()));
                    }
                    let node = &mut self.replicas[replica];
                    if !P::MESSAGES_WAIT_FOR_WRITES {
                        // No write since the start need have reached the disk.
                        node.disk = node.disk_at_start.clone();
                    }
                    return self.log(format!("r{replica} CRASH"));
                }
                // A clean stop drains the storage first.
                self.flush(replica);
                let node = &mut self.replicas[replica];
                let writes = machine.shutdown_writes();
                apply_writes(&mut node.disk, writes);
                match machine.shutdown() {
                    Ok(()) => self.log(format!("r{replica} SHUTDOWN")),
                    Err(error) => self.log(format!("r{replica} SHUTDOWN failed: {error}")),
                }
            }
            Event::Restart { replica } => {
                self.replicas[replica].crash_at_next_write = false;
                if self.replicas[replica].machine.is_none() {
                    self.log(format!(
                        "r{replica} RESTART from {} persisted keys",
                        self.replicas[replica].disk.len()
                    ));
                    let node = &mut self.replicas[replica];
                    node.machine =
                        Some(P::replica(node.setup.clone(), Box::new(KvStore::default())));
                    node.disk_at_start = node.disk.clone();
                    let recovered = Recovered {
                        entries: node
                            .disk
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    };
                    self.boot(replica, recovered);
                }
            }
            Event::Flush {
                replica,
                generation,
            } => {
                if self.replicas[replica].flush == Some(generation) {
                    self.flush(replica);
                }
            }
        }
    }

    fn boot(&mut self, replica: usize, recovered: Recovered) {
        self.step_replica(replica, Input::Start(recovered));
    }

    fn step_replica(&mut self, replica: usize, input: Input<P::Message, P::Timer>) {
        let Some(machine) = self.replicas[replica].machine.as_mut() else {
            return;
        };
        let actions = machine.handle(input);
        machine.check_invariants();
        self.apply_replica(replica, actions.into_vec());
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, bytes: &[u8]) {
        let message = match codec::decode_with_limit::<P::Message>(bytes, SIM_MAX_FRAME) {
            Ok(message) => message,
            Err(error) => {
                self.metrics.rejected_frames += 1;
                self.log(format!(
                    "{from} -> {to} REJECTED frame of {} bytes: {error}",
                    bytes.len()
                ));
                if self.is_correct(from) {
                    self.checks.undecodable(from, to, &error.to_string());
                }
                return;
            }
        };
        match to {
            NodeId::Replica(r) => {
                let replica = r.index();
                if self.replicas[replica].machine.is_none() {
                    return;
                }
                if self.trace.is_some() {
                    self.log(format!("{from} -> {to} {}", abbreviate(&message)));
                }
                if let Some(mut behaviour) = self.replicas[replica].behaviour.take() {
                    let mut extra = Vec::new();
                    let keep = behaviour.incoming(from, &message, &mut self.rng, &mut extra);
                    self.replicas[replica].behaviour = Some(behaviour);
                    for outgoing in extra {
                        self.transmit_outgoing(NodeId::Replica(r), outgoing);
                    }
                    if !keep {
                        return;
                    }
                }
                self.step_replica(replica, Input::Message { from, message });
            }
            NodeId::Client(c) => {
                let client = c.0 as usize;
                if self.trace.is_some() {
                    self.log(format!("{from} -> {to} {}", abbreviate(&message)));
                }
                let actions = self.clients[client]
                    .machine
                    .handle(Input::Message { from, message });
                self.apply_client(client, actions.into_vec());
            }
        }
    }

    /// Carries out one step's actions. Timers and observations take effect at
    /// once. Writes and messages too, unless the replica's storage holds writes
    /// not yet on the disk (it persisted unawaited writes, now or before): then
    /// they go the way of the runtime's storage thread ([`Unflushed`]), as one
    /// group that is committed later, whose messages leave at once only if nothing
    /// holds them back (no awaited write in it, no earlier group holding).
    fn apply_replica(&mut self, replica: usize, actions: Vec<Action<P::Message, P::Timer>>) {
        let from = NodeId::Replica(ReplicaId(replica as u16));
        let mut writes = Vec::new();
        let mut messages = Vec::new();
        let (mut awaited, mut unawaited) = (false, false);
        for action in actions {
            match action {
                Action::Send { to, message } => messages.push((vec![to], message)),
                Action::Multicast { to, message } => messages.push((to, message)),
                Action::Broadcast { message } => {
                    messages.push((self.other_replicas(replica), message))
                }
                Action::SetTimer { timer, after } => {
                    let generation = self.arm(after, |generation| Event::ReplicaTimer {
                        replica,
                        timer,
                        generation,
                    });
                    self.replicas[replica].timers.insert(timer, generation);
                }
                Action::CancelTimer { timer } => {
                    self.replicas[replica].timers.remove(&timer);
                }
                Action::Persist(more) => {
                    awaited = true;
                    writes.extend(more);
                }
                Action::PersistUnawaited(more) => {
                    unawaited = true;
                    writes.extend(more);
                }
                Action::Complete { .. } => {}
                Action::Observe(observation) => self.observe(from, observation),
            }
        }
        let deferred = P::MESSAGES_WAIT_FOR_WRITES
            && (unawaited || !self.replicas[replica].unflushed.is_empty());
        if !deferred {
            apply_writes(&mut self.replicas[replica].disk, writes);
            for (targets, message) in messages {
                self.replica_send(replica, &targets, message);
            }
            return;
        }
        self.unawaited_writes = true;
        let held = self.replicas[replica].unflushed.iter().any(|g| g.holds);
        if !awaited && !held {
            for (targets, message) in std::mem::take(&mut messages) {
                self.replica_send(replica, &targets, message);
            }
        }
        if writes.is_empty() && messages.is_empty() {
            return;
        }
        let holds = awaited || !messages.is_empty();
        self.replicas[replica].unflushed.push(Unflushed {
            writes,
            messages,
            holds,
        });
        if self.replicas[replica].crash_at_next_write {
            self.replicas[replica].crash_at_next_write = false;
            self.schedule(
                self.now,
                Event::Crash {
                    replica,
                    scheduled: false,
                },
            );
        }
        if self.replicas[replica].flush.is_none() {
            // Never at once: a crash scheduled now comes first.
            let after = self.rng.between(1, FLUSH_MAX_NS);
            self.next_id += 1;
            let generation = self.next_id;
            self.replicas[replica].flush = Some(generation);
            self.schedule(
                self.now + after,
                Event::Flush {
                    replica,
                    generation,
                },
            );
        }
    }

    fn other_replicas(&self, replica: usize) -> Vec<NodeId> {
        (0..self.replicas.len())
            .filter(|r| *r != replica)
            .map(|r| NodeId::Replica(ReplicaId(r as u16)))
            .collect()
    }

    /// Commits a replica's unflushed groups in order and sends their messages.
    fn flush(&mut self, replica: usize) {
        self.replicas[replica].flush = None;
        for group in std::mem::take(&mut self.replicas[replica].unflushed) {
            apply_writes(&mut self.replicas[replica].disk, group.writes);
            for (targets, message) in group.messages {
                self.replica_send(replica, &targets, message);
            }
        }
    }

    fn observe(&mut self, from: NodeId, observation: Observation) {
        if self.trace.is_some() {
            self.log(format!("{from} observes {observation:?}"));
        }
        let NodeId::Replica(replica) = from else {
            return;
        };
        if !self.is_correct(from) {
            return;
        }
        match observation {
            Observation::Executed {
                seq,
                batch,
                requests,
            } => {
                self.metrics.executed_requests += requests as u64;
                self.checks.executed(replica, seq, batch);
            }
            Observation::Checkpoint { seq, state, app } => {
                self.checks.checkpoint(replica, seq, state, app)
            }
            Observation::StateTransferred { seq, state, app } => {
                self.metrics.state_transfers += 1;
                self.checks.checkpoint(replica, seq, state, app);
            }
            Observation::ViewInstalled { view } => {
                self.metrics.views_installed += 1;
                self.metrics.max_view = self.metrics.max_view.max(view.0);
            }
            Observation::Fault { culprit, kind } => {
                self.metrics.faults_detected += 1;
                if self.is_correct(culprit) {
                    self.checks.false_accusation(replica, culprit, kind);
                }
            }
            Observation::ViewChangeStarted { .. }
            | Observation::StableCheckpoint { .. }
            | Observation::ModeChanged { .. } => {}
        }
    }

    fn replica_send(&mut self, replica: usize, targets: &[NodeId], message: P::Message) {
        let from = NodeId::Replica(ReplicaId(replica as u16));
        let behaviour = self.replicas[replica].behaviour.take();
        self.replicas[replica].behaviour = self.send_through(from, behaviour, targets, message);
    }

    /// Sends `message` from `from` to `targets`, through `behaviour` if the sender
    /// is Byzantine, and hands the behaviour back.
    fn send_through(
        &mut self,
        from: NodeId,
        behaviour: Option<Box<dyn Behaviour<P::Message>>>,
        targets: &[NodeId],
        message: P::Message,
    ) -> Option<Box<dyn Behaviour<P::Message>>> {
        let Some(mut behaviour) = behaviour else {
            let kind = message.kind();
            let bytes = Arc::new(codec::encode(&message));
            for to in targets {
                self.transmit(from, *to, bytes.clone(), kind, 0);
            }
            return None;
        };
        let mut outgoing = Vec::new();
        for to in targets {
            behaviour.outgoing(*to, message.clone(), &mut self.rng, &mut outgoing);
        }
        for out in outgoing {
            self.transmit_outgoing(from, out);
        }
        Some(behaviour)
    }

    fn transmit_outgoing(&mut self, from: NodeId, out: Outgoing<P::Message>) {
        let delay = out.delay.as_nanos() as u64;
        match out.payload {
            Payload::Message(message) => {
                let kind = message.kind();
                self.transmit(from, out.to, Arc::new(codec::encode(&message)), kind, delay);
            }
            Payload::Raw(bytes) => self.transmit(from, out.to, Arc::new(bytes), "raw", delay),
        }
    }

    /// Puts a frame on the network: counted, then lost, duplicated or delayed
    /// according to the scenario.
    fn transmit(
        &mut self,
        from: NodeId,
        to: NodeId,
        bytes: Arc<Vec<u8>>,
        kind: &'static str,
        extra_ns: u64,
    ) {
        self.metrics.record_send(kind, bytes.len());
        let net = &self.scenario.network;
        if self.now < self.scenario.gst_ns {
            if self.partitioned(from, to) {
                return;
            }
            if self.rng.ppm(net.loss_ppm) {
                return;
            }
            if self.rng.ppm(net.duplicate_ppm) {
                let delay = self.latency();
                self.schedule(
                    self.now + delay + extra_ns,
                    Event::Deliver {
                        from,
                        to,
                        bytes: bytes.clone(),
                    },
                );
            }
        }
        let delay = self.latency();
        self.schedule(
            self.now + delay + extra_ns,
            Event::Deliver { from, to, bytes },
        );
    }

    fn latency(&mut self) -> u64 {
        let net = self.scenario.network.clone();
        if self.now >= self.scenario.gst_ns {
            return self
                .rng
                .between(net.latency_min_ns, net.stable_latency_max_ns);
        }
        let mut delay = self.rng.between(net.latency_min_ns, net.latency_max_ns);
        if self.rng.ppm(net.spike_ppm) {
            delay += self.rng.between(0, net.spike_max_ns);
        }
        delay
    }

    fn partitioned(&self, from: NodeId, to: NodeId) -> bool {
        let side = |node: NodeId, isolated: &[ReplicaId]| {
            node.replica().is_some_and(|r| isolated.contains(&r))
        };
        self.scenario.partitions.iter().any(|p| {
            if self.now < p.start_ns || self.now >= p.end_ns {
                return false;
            }
            let (a, b) = (side(from, &p.isolated), side(to, &p.isolated));
            if p.one_way { b && !a } else { a != b }
        })
    }

    fn invoke(&mut self, client: usize) {
        let node = &mut self.clients[client];
        if node.workload.remaining() == 0 || node.machine.is_busy() {
            return;
        }
        let op = node.workload.next_op(&mut self.rng);
        let id = node.id;
        let invoked = if op.is_read_only() {
            node.machine.invoke_read_only(op.encode())
        } else {
            node.machine.invoke(op.encode())
        };
        match invoked {
            Ok(actions) => {
                self.clients[client].current = Some(self.history.len());
                self.log(format!("{id} invokes {op:?}"));
                self.history.push(Operation {
                    client: id,
                    op,
                    invoke_ns: self.now,
                    outcome: Outcome::Pending,
                });
                self.apply_client(client, actions.into_vec());
            }
            Err(error) => self.log(format!("{id} cannot invoke: {error}")),
        }
    }

    fn apply_client(&mut self, client: usize, actions: Vec<Action<P::Message, P::ClientTimer>>) {
        let from = NodeId::Client(self.clients[client].id);
        for action in actions {
            match action {
                Action::Send { to, message } => self.client_send(client, &[to], message),
                Action::Multicast { to, message } => self.client_send(client, &to, message),
                Action::Broadcast { message } => {
                    let targets: Vec<NodeId> = (0..self.replicas.len())
                        .map(|r| NodeId::Replica(ReplicaId(r as u16)))
                        .collect();
                    self.client_send(client, &targets, message);
                }
                Action::SetTimer { timer, after } => {
                    let generation = self.arm(after, |generation| Event::ClientTimer {
                        client,
                        timer,
                        generation,
                    });
                    self.clients[client].timers.insert(timer, generation);
                }
                Action::CancelTimer { timer } => {
                    self.clients[client].timers.remove(&timer);
                }
                Action::Complete { result, .. } => self.complete(client, result),
                Action::Persist(_) | Action::PersistUnawaited(_) => {}
                Action::Observe(observation) => {
                    if let Observation::Fault { culprit, kind } = observation {
                        self.log(format!("{from} observes fault {kind} by {culprit}"));
                    }
                }
            }
        }
    }

    fn client_send(&mut self, client: usize, targets: &[NodeId], message: P::Message) {
        let from = NodeId::Client(self.clients[client].id);
        let behaviour = self.clients[client].behaviour.take();
        self.clients[client].behaviour = self.send_through(from, behaviour, targets, message);
    }

    fn complete(&mut self, client: usize, result: Vec<u8>) {
        let Some(index) = self.clients[client].current.take() else {
            return;
        };
        let decoded = KvResult::decode(&result).map_err(|_| result);
        let op = &mut self.history[index];
        self.metrics.completed_ops += 1;
        self.metrics.latencies_ns.push(self.now - op.invoke_ns);
        if let Ok(result) = &decoded {
            self.clients[client].workload.observe(&op.op, result);
        }
        let line = format!("{} completes {:?} with {:?}", op.client, op.op, decoded);
        op.outcome = Outcome::Completed {
            at_ns: self.now,
            result: decoded,
        };
        self.log(line);
        if self.clients[client].workload.remaining() > 0 {
            let think = self.rng.between(0, self.scenario.workload.think_max_ns);
            self.schedule(self.now + think, Event::Invoke { client });
        }
    }
}

/// The names of every behaviour available for protocol `P`: generic replica ones
/// first, then the protocol's replica ones, then its client ones.
pub fn behaviour_names<P: ProtocolSuite>() -> Vec<&'static str> {
    let mut names = replica_behaviour_names::<P>();
    names.extend(P::client_behaviours().iter().map(|b| b.name));
    names
}

/// The names of the replica behaviours available for protocol `P`.
fn replica_behaviour_names<P: ProtocolSuite>() -> Vec<&'static str> {
    behaviours::GENERIC_BEHAVIOURS
        .iter()
        .chain(P::behaviours())
        .map(|b| b.name)
        .collect()
}

fn apply_writes(disk: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: Vec<WriteOp>) {
    for write in writes {
        match write {
            WriteOp::Put { key, value } => {
                disk.insert(key, value);
            }
            WriteOp::Delete { key } => {
                disk.remove(&key);
            }
            WriteOp::DeleteRange { start, end } if start < end => {
                let doomed: Vec<Vec<u8>> = disk.range(start..end).map(|(k, _)| k.clone()).collect();
                for key in doomed {
                    disk.remove(&key);
                }
            }
            WriteOp::DeleteRange { .. } => {}
        }
    }
}

fn abbreviate<M: WireMessage>(message: &M) -> String {
    let text = format!("{message:?}");
    if text.len() <= 160 {
        return text;
    }
    let mut cut = 160;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more chars)", &text[..cut], text.len() - cut)
}
