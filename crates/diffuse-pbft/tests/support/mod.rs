//! A tiny deterministic cluster for scenario tests: instant, ordered delivery,
//! timers fired by hand, and a filter to cut links.

#![allow(dead_code)]

use diffuse_apps::{KvOp, KvResult, KvStore};
use diffuse_core::codec;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{Digest, SecretKey};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_core::protocol::{Action, Client, Input, Observation, Recovered, Replica, WriteOp};
use diffuse_core::suite::{ClientSetup, ReplicaSetup};
use diffuse_pbft::{ClientTimer, Message, PbftClient, PbftOptions, PbftReplica, Timer};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

type Filter = Box<dyn Fn(NodeId, NodeId, &Message) -> bool>;

pub struct Cluster {
    pub n: usize,
    pub options: PbftOptions,
    pub keys: Arc<ClusterKeys>,
    secrets: Vec<SecretKey>,
    pub replicas: Vec<Option<PbftReplica>>,
    pub disks: Vec<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Unawaited writes not yet on the disk, per replica: the next awaited write
    /// or a [`Cluster::crash`] commits them, [`Cluster::crash_losing_unawaited`]
    /// drops them.
    pub unawaited: Vec<Vec<WriteOp>>,
    pub timers: Vec<BTreeSet<Timer>>,
    pub clients: Vec<PbftClient>,
    pub client_timers: Vec<BTreeSet<ClientTimer>>,
    pub network: VecDeque<(NodeId, NodeId, Message)>,
    /// Completed operations per client: (timestamp, result).
    pub completed: Vec<Vec<(u64, KvResult)>>,
    /// Batches executed per replica.
    pub executed: Vec<Vec<(Seq, Digest)>>,
    /// (accuser, culprit, kind).
    pub faults: Vec<(ReplicaId, NodeId, &'static str)>,
    pub views_installed: Vec<Vec<View>>,
    pub state_transfers: Vec<usize>,
    /// Messages dropped by the filter.
    pub dropped: usize,
    /// Messages delivered, by kind.
    pub delivered: BTreeMap<&'static str, usize>,
    filter: Option<Filter>,
}

pub fn test_options() -> PbftOptions {
    PbftOptions {
        checkpoint_interval: 4,
        window: 8,
        batch_max_requests: 4,
        batch_delay: Duration::ZERO,
        max_in_flight: 4,
        ..PbftOptions::default()
    }
}

/// The signing key of client `i` in every test cluster.
pub fn client_secret(i: usize) -> SecretKey {
    SecretKey::from_seed([200 - i as u8; 32])
}

impl Cluster {
    pub fn new(n: usize, clients: usize, options: PbftOptions) -> Self {
        let secrets: Vec<SecretKey> = (0..n)
            .map(|i| SecretKey::from_seed([i as u8 + 1; 32]))
            .collect();
        let client_secrets: Vec<SecretKey> = (0..clients).map(client_secret).collect();
        let keys = Arc::new(
            ClusterKeys::new(
                secrets.iter().map(SecretKey::public).collect(),
                client_secrets
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (ClientId(i as u32), k.public()))
                    .collect(),
            )
            .unwrap(),
        );
        let clients = client_secrets
            .into_iter()
            .enumerate()
            .map(|(i, secret)| {
                PbftClient::new(ClientSetup {
                    id: ClientId(i as u32),
                    keys: keys.clone(),
                    secret,
                    options: options.clone(),
                    first_timestamp: 1,
                })
            })
            .collect::<Vec<_>>();
        let mut cluster = Cluster {
            n,
            options,
            keys,
            secrets,
            replicas: Vec::new(),
            disks: vec![BTreeMap::new(); n],
            unawaited: vec![Vec::new(); n],
            timers: vec![BTreeSet::new(); n],
            client_timers: vec![BTreeSet::new(); clients.len()],
            completed: vec![Vec::new(); clients.len()],
            clients,
            network: VecDeque::new(),
            executed: vec![Vec::new(); n],
            faults: Vec::new(),
            views_installed: vec![Vec::new(); n],
            state_transfers: vec![0; n],
            dropped: 0,
            delivered: BTreeMap::new(),
            filter: None,
        };
        for i in 0..n {
            cluster.replicas.push(Some(cluster.build(i)));
            cluster.step(i, Input::Start(Recovered::default()));
        }
        cluster
    }

    fn build(&self, i: usize) -> PbftReplica {
        PbftReplica::new(
            ReplicaSetup {
                id: ReplicaId(i as u16),
                keys: self.keys.clone(),
                secret: self.secrets[i].clone(),
                options: self.options.clone(),
            },
            Box::new(KvStore::default()),
        )
    }

    pub fn secret(&self, i: usize) -> &SecretKey {
        &self.secrets[i]
    }

    pub fn replica(&self, i: usize) -> &PbftReplica {
        self.replicas[i].as_ref().expect("replica is up")
    }

    /// Drops every message for which `cut` returns true.
    pub fn cut(&mut self, cut: impl Fn(NodeId, NodeId, &Message) -> bool + 'static) {
        self.filter = Some(Box::new(cut));
    }

    pub fn heal(&mut self) {
        self.filter = None;
    }

    /// Cuts replica `r` off from the other replicas (clients still reach it).
    pub fn isolate_from_replicas(&mut self, r: usize) {
        let id = NodeId::Replica(ReplicaId(r as u16));
        self.cut(move |from, to, _| {
            matches!((from, to), (NodeId::Replica(_), NodeId::Replica(_)))
                && (from == id || to == id)
        });
    }

    /// Isolates replica `r` completely.
    pub fn isolate(&mut self, r: usize) {
        let id = NodeId::Replica(ReplicaId(r as u16));
        self.cut(move |from, to, _| from == id || to == id);
    }

    pub fn step(&mut self, i: usize, input: Input<Message, Timer>) {
        let Some(replica) = self.replicas[i].as_mut() else {
            return;
        };
        let actions = replica.handle(input);
        replica.check_invariants();
        let from = NodeId::Replica(ReplicaId(i as u16));
        for action in actions.into_vec() {
            match action {
                Action::Send { to, message } => self.network.push_back((from, to, message)),
                Action::Multicast { to, message } => {
                    for to in to {
                        self.network.push_back((from, to, message.clone()));
                    }
                }
                Action::Broadcast { message } => {
                    for r in (0..self.n).filter(|r| *r != i) {
                        self.network.push_back((
                            from,
                            NodeId::Replica(ReplicaId(r as u16)),
                            message.clone(),
                        ));
                    }
                }
                Action::SetTimer { timer, .. } => {
                    self.timers[i].insert(timer);
                }
                Action::CancelTimer { timer } => {
                    self.timers[i].remove(&timer);
                }
                Action::Persist(writes) => {
                    let before = std::mem::take(&mut self.unawaited[i]);
                    apply(&mut self.disks[i], before);
                    apply(&mut self.disks[i], writes);
                }
                Action::PersistUnawaited(writes) => self.unawaited[i].extend(writes),
                Action::Complete { .. } => unreachable!("replicas do not complete operations"),
                Action::Observe(observation) => self.observe(i, observation),
            }
        }
    }

    fn observe(&mut self, i: usize, observation: Observation) {
        match observation {
            Observation::Executed { seq, batch, .. } => self.executed[i].push((seq, batch)),
            Observation::Fault { culprit, kind } => {
                self.faults.push((ReplicaId(i as u16), culprit, kind))
            }
            Observation::ViewInstalled { view } => self.views_installed[i].push(view),
            Observation::StateTransferred { .. } => self.state_transfers[i] += 1,
            _ => {}
        }
    }

    fn client_actions(&mut self, c: usize, actions: Vec<Action<Message, ClientTimer>>) {
        let from = NodeId::Client(ClientId(c as u32));
        for action in actions {
            match action {
                Action::Send { to, message } => self.network.push_back((from, to, message)),
                Action::Multicast { to, message } => {
                    for to in to {
                        self.network.push_back((from, to, message.clone()));
                    }
                }
                Action::Broadcast { message } => {
                    for r in 0..self.n {
                        self.network.push_back((
                            from,
                            NodeId::Replica(ReplicaId(r as u16)),
                            message.clone(),
                        ));
                    }
                }
                Action::SetTimer { timer, .. } => {
                    self.client_timers[c].insert(timer);
                }
                Action::CancelTimer { timer } => {
                    self.client_timers[c].remove(&timer);
                }
                Action::Complete { timestamp, result } => self.completed[c].push((
                    timestamp,
                    KvResult::decode(&result).expect("results decode"),
                )),
                Action::Persist(_) | Action::PersistUnawaited(_) | Action::Observe(_) => {}
            }
        }
    }

    pub fn invoke(&mut self, c: usize, op: KvOp) {
        let actions = self.clients[c].invoke(op.encode()).expect("client is idle");
        self.client_actions(c, actions.into_vec());
    }

    /// Starts a read-only operation at client `c` (the read-only path).
    pub fn invoke_read(&mut self, c: usize, op: KvOp) {
        let actions = self.clients[c]
            .invoke_read_only(op.encode())
            .expect("client is idle");
        self.client_actions(c, actions.into_vec());
    }

    /// Delivers messages until none are left (or a step limit is hit).
    pub fn run(&mut self) {
        for _ in 0..200_000 {
            let Some((from, to, message)) = self.network.pop_front() else {
                return;
            };
            if self
                .filter
                .as_ref()
                .is_some_and(|cut| cut(from, to, &message))
            {
                self.dropped += 1;
                continue;
            }
            // Every message crosses the real codec.
            let message: Message = codec::decode(&codec::encode(&message)).expect("round trip");
            *self
                .delivered
                .entry(diffuse_core::codec::WireMessage::kind(&message))
                .or_default() += 1;
            self.deliver(from, to, message);
        }
        panic!("message storm: the network never drained");
    }

    pub fn deliver(&mut self, from: NodeId, to: NodeId, message: Message) {
        match to {
            NodeId::Replica(r) => self.step(r.index(), Input::Message { from, message }),
            NodeId::Client(c) => {
                let actions = self.clients[c.0 as usize].handle(Input::Message { from, message });
                self.client_actions(c.0 as usize, actions.into_vec());
            }
        }
    }

    /// Fires `timer` at replica `i` if it is armed; returns whether it was.
    pub fn fire(&mut self, i: usize, timer: Timer) -> bool {
        if self.replicas[i].is_some() && self.timers[i].remove(&timer) {
            self.step(i, Input::Timer(timer));
            true
        } else {
            false
        }
    }

    /// Fires every armed timer of `kind` once, at every live replica.
    pub fn fire_all(&mut self, kind: Timer) {
        for i in 0..self.n {
            self.fire(i, kind);
        }
    }

    /// Fires client `c`'s retransmission timer once, if armed.
    pub fn fire_client(&mut self, c: usize) {
        if self.client_timers[c].remove(&ClientTimer::Retransmit) {
            let actions = self.clients[c].handle(Input::Timer(ClientTimer::Retransmit));
            self.client_actions(c, actions.into_vec());
        }
    }

    /// Client `c` times out until its request reaches every replica: its first
    /// retransmission goes to the primary alone, the second to all
    /// (`diffuse_pbft::retransmit`).
    pub fn client_retransmits_to_all(&mut self, c: usize) {
        for _ in 0..2 {
            self.fire_client(c);
            self.run();
        }
    }

    /// Crashes replica `i` after its storage committed everything it was given.
    pub fn crash(&mut self, i: usize) {
        let pending = std::mem::take(&mut self.unawaited[i]);
        apply(&mut self.disks[i], pending);
        self.replicas[i] = None;
        self.timers[i].clear();
    }

    /// Stops replica `i` cleanly: its storage commits everything, then the
    /// writes it keeps for a scheduled shutdown.
    pub fn shut_down(&mut self, i: usize) {
        let last = self.replicas[i].as_mut().map(|r| r.shutdown_writes());
        self.crash(i);
        apply(&mut self.disks[i], last.unwrap_or_default());
    }

    /// Crashes replica `i` before its unawaited writes reached the disk.
    pub fn crash_losing_unawaited(&mut self, i: usize) {
        self.unawaited[i].clear();
        self.crash(i);
    }

    pub fn restart(&mut self, i: usize) {
        self.replicas[i] = Some(self.build(i));
        let entries = self.disks[i]
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.step(i, Input::Start(Recovered { entries }));
    }

    /// Runs `count` puts from client 0, one after the other.
    pub fn puts(&mut self, count: usize) {
        for k in 0..count {
            let before = self.completed[0].len();
            self.invoke(0, KvOp::put(format!("k{k}").as_bytes(), b"v"));
            self.run();
            assert_eq!(
                self.completed[0].len(),
                before + 1,
                "put {k} did not complete"
            );
        }
    }

    /// Asserts that no two replicas executed different batches at one sequence number.
    pub fn assert_agreement(&self) {
        let mut by_seq: BTreeMap<Seq, Digest> = BTreeMap::new();
        for executed in &self.executed {
            for (seq, digest) in executed {
                let first = by_seq.entry(*seq).or_insert(*digest);
                assert_eq!(first, digest, "disagreement at {seq}");
            }
        }
    }

    pub fn faults_of(&self, kind: &str) -> usize {
        self.faults.iter().filter(|(_, _, k)| *k == kind).count()
    }
}

fn apply(disk: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: Vec<WriteOp>) {
    for write in writes {
        match write {
            WriteOp::Put { key, value } => {
                disk.insert(key, value);
            }
            WriteOp::Delete { key } => {
                disk.remove(&key);
            }
            WriteOp::DeleteRange { start, end } => disk.retain(|k, _| *k < start || *k >= end),
        }
    }
}
