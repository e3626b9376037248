//! The FastBFT replica state machine.
//!
//! Split by concern: this module (start, dispatch, the certified stream every
//! replica's enclave follows in counter order, execution), `rounds` (opening a
//! secret over the tree: shares up, checks, timers, SUSPECT) and `primary`
//! (preprocessing, batching, PREPARE / COMMIT / REPLY, NEW-TREE, FETCH answers).
//!
//! **The stream.** Every certificate of the primary's enclave takes one position
//! `(epoch, counter)`: a PREPARE, a COMMIT, or the NEW-TREE that ends an epoch.
//! Each replica's enclave takes the positions in order (`c_latest + 1`), so a
//! replica holds back what arrives early and fetches what is missing. An active
//! replica releases its share with `verify_counter`; a passive one, or any
//! replica that cannot, steps over the position with `update_counter` (the secret
//! opened, from an UPDATE) or `follow_counter` (the certificate alone).
//!
//! **Execution** is separate: a batch runs at its sequence number once it is
//! proven committed (its PREPARE's secret opened) and every earlier one ran.

mod primary;
mod rounds;

use crate::merkle;
use crate::message::{
    Cert, ClientReply, Commit, Message, NewTree, Opened, Position, Prepare, TreeConfig, Update,
    batch_root, commit_digest, new_tree_digest, position, prepare_digest, result_leaf,
};
use crate::options::{FastBftOptions, Mutant};
use diffuse_core::app::Application;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_core::protocol::{Actions, Input, Observation};
use diffuse_core::service::{Execution, ReplicatedService};
use diffuse_core::suite::ReplicaSetup;
use diffuse_minbft::tee_host::EnclaveHandle;
use diffuse_pbft::message::Batch;
use diffuse_tee::{FastBftComponent, Package, SlotRules, Tree, TrustedComponent};
use primary::PrimaryState;
use rounds::Round;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The replica's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The primary's batching delay.
    Batch,
    /// The stream is stuck (a gap, or a missing package): fetch from the primary.
    Stall,
    /// The children of the round at `(epoch, counter)` are late.
    Round(u64, u64),
    /// The primary rebuilds the tree of this epoch (after a back-off).
    Rebuild(u64),
}

pub(crate) type Out = Actions<Message, Timer>;

/// Held-back stream messages, at most.
const MAX_HELD: usize = 4096;
/// Committed batches waiting for an earlier one, at most.
const MAX_WAITING_COMMITS: u64 = 1024;
/// Results roots of executed batches kept to check late COMMITs against.
const RESULTS_KEPT: usize = 256;
/// Stall checks an active replica waits for a missing package before it steps
/// over the position without releasing its share.
const PACKAGE_PATIENCE: u32 = 2;

/// Something that takes a stream position.
#[derive(Debug, Clone)]
enum Item {
    Prepare(Box<Prepare>),
    Commit(Box<Commit>),
    NewTree(Box<NewTree>),
    /// A position whose secret an UPDATE opened.
    Opened(Box<(Cert, Opened)>),
}

impl Item {
    fn position(&self) -> Position {
        match self {
            Item::Prepare(p) => position(&p.cert),
            Item::Commit(c) => position(&c.cert),
            Item::NewTree(t) => position(&t.cert),
            Item::Opened(opened) => position(&opened.0),
        }
    }
}

/// What became of a stream item.
enum Step {
    Done,
    /// Not yet: keep it at its position.
    Wait(Item),
}

/// The current epoch's tree.
#[derive(Debug, Clone)]
pub(crate) struct Epoch {
    pub(crate) config: TreeConfig,
    pub(crate) tree: Tree,
}

impl Epoch {
    fn number(&self) -> u64 {
        self.config.epoch
    }

    /// The tree position of `replica`, if active.
    pub(crate) fn index_of(&self, replica: ReplicaId) -> Option<usize> {
        self.config.actives.iter().position(|r| *r == replica)
    }
}

/// A batch proven committed, waiting for its turn.
#[derive(Debug, Clone)]
struct Committed {
    batch: Batch,
    results_root: Digest,
}

/// The outcome of one batch's execution.
pub(crate) struct Executed {
    pub(crate) results_root: Digest,
    /// `(client, timestamp, result)`; `None` for a stale duplicate.
    pub(crate) results: Vec<(ClientId, u64, Option<Vec<u8>>)>,
    pub(crate) leaves: Vec<Digest>,
}

/// A FastBFT replica. Drive it through [`diffuse_core::protocol::Replica::handle`].
pub struct FastBftReplica {
    id: ReplicaId,
    n: usize,
    f: usize,
    keys: Arc<ClusterKeys>,
    options: FastBftOptions,
    enclave: Option<EnclaveHandle>,
    enclave_keys: Vec<PublicKey>,
    service: ReplicatedService,
    epoch: Option<Epoch>,
    held: BTreeMap<Position, Item>,
    packages: BTreeMap<Position, Package>,
    rounds: BTreeMap<Position, Round>,
    /// Aggregates that arrived before this replica opened the round they are for.
    early_shares: BTreeMap<(Position, ReplicaId), diffuse_tee::Share>,
    commits: BTreeMap<Seq, Committed>,
    /// Batches seen in PREPAREs, by sequence number, until they run.
    batches: BTreeMap<Seq, Batch>,
    executed: Seq,
    results: BTreeMap<Seq, Digest>,
    stall_armed: bool,
    /// The position last fetched from, so that a gap is fetched once per position
    /// and then on the stall timer.
    fetched_at: Option<Position>,
    package_waits: u32,
    /// Authenticates the requests of PREPAREs (MAC entry, else signature).
    requests: crate::authentic::RequestCheck,
    primary: Option<PrimaryState>,
    halted: bool,
}

impl FastBftReplica {
    /// Builds a replica that has not started yet; feed it [`Input::Start`] first.
    /// Invalid options are replaced by the defaults.
    pub fn new(mut setup: ReplicaSetup<FastBftOptions>, app: Box<dyn Application>) -> Self {
        if setup.options.validate().is_err() {
            setup.options = FastBftOptions {
                tee: setup.options.tee.clone(),
                ..<crate::FastBft as diffuse_core::suite::ProtocolSuite>::default_options()
            };
        }
        let n = setup.keys.n();
        Self {
            id: setup.id,
            n,
            f: (n - 1) / 2,
            keys: setup.keys,
            options: setup.options,
            enclave: None,
            enclave_keys: Vec::new(),
            service: ReplicatedService::new(app),
            epoch: None,
            held: BTreeMap::new(),
            packages: BTreeMap::new(),
            rounds: BTreeMap::new(),
            early_shares: BTreeMap::new(),
            commits: BTreeMap::new(),
            batches: BTreeMap::new(),
            executed: Seq(0),
            results: BTreeMap::new(),
            stall_armed: false,
            fetched_at: None,
            package_waits: 0,
            requests: crate::authentic::RequestCheck::new(setup.id, &setup.secret),
            primary: None,
            halted: false,
        }
    }

    /// The primary. View changes are not built yet (`docs/protocols/fastbft.md`),
    /// so it is replica 0 for the whole run.
    pub fn primary_id(&self) -> ReplicaId {
        ReplicaId(0)
    }

    fn is_primary(&self) -> bool {
        self.id == self.primary_id()
    }

    fn primary_key(&self) -> Option<PublicKey> {
        self.enclave_keys.get(self.primary_id().index()).copied()
    }

    /// Tree rebuilds this replica (as primary) made after detecting a failure.
    pub fn detected_failures(&self) -> u64 {
        self.primary.as_ref().map_or(0, |p| p.failures)
    }

    /// The sequence number of the last batch executed.
    pub fn executed(&self) -> Seq {
        self.executed
    }

    /// The current epoch's active replicas, in tree order.
    pub fn actives(&self) -> Vec<ReplicaId> {
        self.epoch
            .as_ref()
            .map(|e| e.config.actives.to_vec())
            .unwrap_or_default()
    }

    fn enclave_call<R>(&self, call: impl FnOnce(&mut diffuse_tee::SoftwareEnclave) -> R) -> R {
        self.enclave
            .as_ref()
            .expect("the enclave is booted before any message is handled")
            .call(call)
    }

    /// The next position this replica's enclave takes.
    fn next_position(&self) -> Position {
        let (counter, view) = self.enclave_call(|e| e.fastbft_counter());
        (view, counter.saturating_add(1))
    }

    /// Stops taking part, for a reason written to the trace as a fault of itself.
    fn halt(&mut self, why: &'static str, out: &mut Out) {
        self.halted = true;
        out.fault(self.id, why);
    }

    fn on_start(&mut self, out: &mut Out) {
        let rules = SlotRules {
            checkpoint_interval: self.options.base.checkpoint_interval,
            window: self.options.base.window,
        };
        let booted = match self.options.tee.boot(self.id, self.n, self.f + 1, rules) {
            Ok(booted) => booted,
            Err(_) => return self.halt("enclave-unavailable", out),
        };
        self.enclave_keys = booted.enclave_keys;
        self.enclave = Some(booted.enclave);
        // A locked enclave (an unscheduled reboot) needs REJOIN, which is not built
        // yet; FastBFT's enclave state is not sealed either, so a restarted replica
        // stays out (see docs/protocols/fastbft.md, "Not built yet").
        if self.enclave_call(|e| e.is_locked() || e.fastbft_counter() != (0, 0)) {
            return self.halt("restarted-without-rejoin", out);
        }
        if self.enclave_keys.len() != self.n {
            return self.halt("enclave-keys-do-not-match-the-cluster", out);
        }
        if self.is_primary() {
            self.start_as_primary(out);
        }
    }

    fn on_message(&mut self, from: NodeId, message: Message, out: &mut Out) {
        let from_primary = from == NodeId::Replica(self.primary_id());
        match message {
            Message::Request(request) => {
                if self.primary.is_some() {
                    self.on_request(from, request, out);
                }
            }
            Message::Prepare(_) | Message::Commit(_) | Message::NewTree(_)
                if !from_primary || self.is_primary() =>
            {
                out.fault(from, "stream-message-from-non-primary");
            }
            Message::Prepare(prepare) => self.offer(Item::Prepare(Box::new(prepare)), out),
            Message::Commit(commit) => self.offer(Item::Commit(Box::new(commit)), out),
            Message::NewTree(new_tree) => self.offer(Item::NewTree(Box::new(new_tree)), out),
            Message::Update(update) => self.on_update(from, update, out),
            Message::Share(share) => self.on_share(from, share, out),
            Message::Suspect(suspect) => self.on_suspect(from, suspect, out),
            Message::Packages(packages) => {
                if from_primary && !self.is_primary() {
                    self.on_packages(packages, out);
                }
            }
            Message::Fetch(fetch) => {
                if self.primary.is_some() {
                    self.on_fetch(from, fetch, out);
                }
            }
            Message::Reply(_) => out.fault(from, "reply-to-a-replica"),
        }
    }

    fn on_packages(&mut self, packages: crate::message::Packages, out: &mut Out) {
        let (epoch, next) = self.next_position();
        if packages.epoch < epoch {
            return;
        }
        if packages.epoch > epoch && self.fetched_at != Some((epoch, next)) {
            // Packages of a later epoch: this replica missed the NEW-TREE.
            self.fetch(false, out);
        }
        let Some(me) = self.enclave_keys.get(self.id.index()).copied() else {
            return;
        };
        for package in packages.packages.into_inner() {
            let at = (package.view, package.counter);
            let ahead = package.counter.saturating_sub(next);
            if package.view != packages.epoch
                || package.recipient != me
                || at < (epoch, next)
                || ahead > diffuse_tee::fastbft::MAX_PREPROCESSING as u64
                || self.packages.len() >= 2 * diffuse_tee::fastbft::MAX_PREPROCESSING
            {
                continue;
            }
            self.packages.insert(at, package);
        }
        self.drain(out);
    }

    /// Takes a stream item: now if it is next, later if it is ahead.
    fn offer(&mut self, item: Item, out: &mut Out) {
        let at = item.position();
        if at < self.next_position() {
            return;
        }
        if self.held.len() >= MAX_HELD && !self.held.contains_key(&at) {
            // Keep the earliest positions: they are the ones the replica needs first.
            match self.held.last_key_value() {
                Some((last, _)) if *last > at => {
                    self.held.pop_last();
                }
                _ => return,
            }
        }
        self.held.entry(at).or_insert(item);
        self.drain(out);
    }

    /// Takes every held item that is next, in order.
    fn drain(&mut self, out: &mut Out) {
        loop {
            let next = self.next_position();
            self.held = self.held.split_off(&next);
            let Some(item) = self.held.remove(&next) else {
                break;
            };
            match self.step(item, out) {
                Step::Done => self.package_waits = 0,
                Step::Wait(item) => {
                    self.held.insert(next, item);
                    break;
                }
            }
        }
        if !self.held.is_empty() {
            let next = self.next_position();
            if self.fetched_at != Some(next) && !self.held.contains_key(&next) {
                // A gap: ask at once (and again on the stall timer if it stays).
                self.fetch(false, out);
            }
            if !self.stall_armed {
                self.stall_armed = true;
                out.set_timer(Timer::Stall, self.options.base.status_interval);
            }
        }
    }

    fn fetch(&mut self, packages: bool, out: &mut Out) {
        let (epoch, counter) = self.next_position();
        self.fetched_at = Some((epoch, counter));
        out.send(
            self.primary_id(),
            Message::Fetch(crate::message::Fetch {
                epoch,
                counter,
                packages,
            }),
        );
    }

    fn on_stall(&mut self, out: &mut Out) {
        self.stall_armed = false;
        if self.held.is_empty() {
            return;
        }
        let next = self.next_position();
        let waiting_for_package = self.held.contains_key(&next) && self.is_active();
        if waiting_for_package {
            self.package_waits += 1;
        }
        self.fetch(waiting_for_package, out);
        self.drain(out);
        if !self.stall_armed {
            self.stall_armed = true;
            out.set_timer(Timer::Stall, self.options.base.status_interval);
        }
    }

    fn is_active(&self) -> bool {
        self.epoch
            .as_ref()
            .is_some_and(|e| e.index_of(self.id).is_some())
    }

    fn step(&mut self, item: Item, out: &mut Out) -> Step {
        match item {
            Item::NewTree(new_tree) => {
                self.enter_epoch(*new_tree, out);
                Step::Done
            }
            Item::Prepare(prepare) => self.step_prepare(*prepare, out),
            Item::Commit(commit) => self.step_commit(*commit, out),
            Item::Opened(opened) => {
                let (cert, opened) = *opened;
                let stepped =
                    self.enclave_call(|e| e.update_counter(&opened.secret, &opened.commitment));
                if stepped.is_err() {
                    // A forged or mismatched opening (an UPDATE trusted by the
                    // mutant): step over with the certificate if it is genuine.
                    self.follow(&cert);
                }
                Step::Done
            }
        }
    }

    /// Steps over a position without releasing anything.
    fn follow(&mut self, cert: &Cert) -> bool {
        self.enclave_call(|e| e.follow_counter(cert)).is_ok()
    }

    fn enter_epoch(&mut self, new_tree: NewTree, out: &mut Out) {
        let Some(primary) = self.primary_key() else {
            return;
        };
        let config = &new_tree.config;
        let tree = match self.check_config(config) {
            Some(tree) => tree,
            None => return out.fault(self.primary_id(), "bad-new-tree"),
        };
        if new_tree.cert.message != new_tree_digest(config)
            || config.epoch != new_tree.cert.view.saturating_add(1)
            || new_tree.keys.len() != config.actives.len()
        {
            return out.fault(self.primary_id(), "bad-new-tree");
        }
        let my_key = config
            .actives
            .iter()
            .position(|r| *r == self.id)
            .map(|i| new_tree.keys[i].clone());
        let entered =
            self.enclave_call(|e| e.update_view(&primary, &new_tree.cert, my_key.as_ref()));
        if entered.is_err() {
            return out.fault(self.primary_id(), "bad-new-tree");
        }
        for (at, _) in std::mem::take(&mut self.rounds) {
            out.cancel_timer(Timer::Round(at.0, at.1));
        }
        let epoch = config.epoch;
        self.packages = self.packages.split_off(&(epoch, 0));
        self.epoch = Some(Epoch {
            config: new_tree.config,
            tree,
        });
    }

    /// The tree of `config`, if it is one a correct primary sends.
    fn check_config(&self, config: &TreeConfig) -> Option<Tree> {
        let mut seen = std::collections::BTreeSet::new();
        let valid = config.actives.len() == self.f
            && config
                .actives
                .iter()
                .all(|r| r.index() < self.n && *r != self.primary_id() && seen.insert(*r));
        if !valid {
            return None;
        }
        Tree::balanced(config.actives.len(), usize::from(config.fan_out)).ok()
    }

    /// Checks a PREPARE's contents: the certificate binds this batch, and every
    /// request is from its client (`crate::authentic`).
    fn prepare_is_valid(&mut self, prepare: &Prepare) -> bool {
        prepare.cert.message == prepare_digest(prepare.seq, &batch_root(&prepare.batch))
            && self.requests.all_authentic(&prepare.batch, &self.keys)
    }

    fn step_prepare(&mut self, prepare: Prepare, out: &mut Out) -> Step {
        let at = position(&prepare.cert);
        if !self.prepare_is_valid(&prepare) {
            out.fault(self.primary_id(), "bad-prepare");
            self.follow(&prepare.cert);
            return Step::Done;
        }
        if self.is_active() {
            let Some(package) = self.packages.remove(&at) else {
                if self.package_waits < PACKAGE_PATIENCE {
                    return Step::Wait(Item::Prepare(Box::new(prepare)));
                }
                self.follow(&prepare.cert);
                self.remember_batch(prepare.seq, prepare.batch);
                return Step::Done;
            };
            match self.enclave_call(|e| e.verify_counter(&prepare.cert, &package)) {
                Ok(opened) => {
                    self.remember_batch(prepare.seq, prepare.batch);
                    self.start_round(at, rounds::Phase::Prepare, opened, out);
                }
                Err(_) => {
                    self.follow(&prepare.cert);
                }
            }
        } else {
            self.follow(&prepare.cert);
            self.remember_batch(prepare.seq, prepare.batch);
        }
        Step::Done
    }

    fn remember_batch(&mut self, seq: Seq, batch: Batch) {
        if seq > self.executed && seq.0 - self.executed.0 <= MAX_WAITING_COMMITS {
            self.batches.insert(seq, batch);
        }
    }

    /// Whether `commit` proves its batch committed: the certificates bind it and
    /// the PREPARE's secret is open.
    fn commit_proves(&self, commit: &Commit) -> bool {
        let Some(primary) = self.primary_key() else {
            return false;
        };
        if commit.cert.message
            != commit_digest(commit.seq, &commit.batch_root, &commit.results_root)
            || commit.prepare_cert.message != prepare_digest(commit.seq, &commit.batch_root)
        {
            return false;
        }
        let at = position(&commit.prepare_cert);
        match self.rounds.get(&at) {
            // This replica's enclave released a share for that PREPARE: it knows h_c.
            Some(round) => {
                diffuse_tee::secret_hash(&commit.prepared.secret, at.1, at.0) == round.secret_hash
            }
            None => {
                commit.prepare_cert.verify(&primary)
                    && commit.prepared.opens(&commit.prepare_cert, &primary)
            }
        }
    }

    fn step_commit(&mut self, commit: Commit, out: &mut Out) -> Step {
        let at = position(&commit.cert);
        let batch = match &commit.batch {
            Some(batch) if batch_root(batch) == commit.batch_root => Some(batch.clone()),
            Some(_) => None,
            None => self
                .batches
                .get(&commit.seq)
                .filter(|b| batch_root(b) == commit.batch_root)
                .cloned(),
        };
        if !self.commit_proves(&commit) || (batch.is_none() && commit.seq > self.executed) {
            out.fault(self.primary_id(), "bad-commit");
            self.follow(&commit.cert);
            return Step::Done;
        }
        if let Some(batch) = batch {
            self.add_commit(commit.seq, batch, commit.results_root, out);
        }
        if commit.seq > self.executed {
            // An earlier batch has not run here yet: wait for its UPDATE or COMMIT.
            return Step::Wait(Item::Commit(Box::new(commit)));
        }
        if self.results.get(&commit.seq) != Some(&commit.results_root) {
            if self.results.contains_key(&commit.seq) {
                out.fault(self.primary_id(), "wrong-results");
            }
            self.follow(&commit.cert);
            return Step::Done;
        }
        if self.is_active() {
            let Some(package) = self.packages.remove(&at) else {
                if self.package_waits < PACKAGE_PATIENCE {
                    return Step::Wait(Item::Commit(Box::new(commit)));
                }
                self.follow(&commit.cert);
                return Step::Done;
            };
            match self.enclave_call(|e| e.verify_counter(&commit.cert, &package)) {
                Ok(opened) => self.start_round(at, rounds::Phase::Reply, opened, out),
                Err(_) => {
                    self.follow(&commit.cert);
                }
            }
        } else {
            self.follow(&commit.cert);
        }
        Step::Done
    }

    /// Whether `update` is what the primary sends: both certificates bind the
    /// batch and results, and both secrets are open.
    fn update_is_valid(&self, update: &Update) -> bool {
        let Some(primary) = self.primary_key() else {
            return false;
        };
        let root = batch_root(&update.batch);
        update.prepare_cert.message == prepare_digest(update.seq, &root)
            && update.commit_cert.message == commit_digest(update.seq, &root, &update.results_root)
            && update.prepare_cert.verify(&primary)
            && update.commit_cert.verify(&primary)
            && update.prepared.opens(&update.prepare_cert, &primary)
            && update.replied.opens(&update.commit_cert, &primary)
    }

    fn on_update(&mut self, from: NodeId, update: Update, out: &mut Out) {
        if self.is_primary() {
            return;
        }
        if !self.options.is(Mutant::ReplicaTrustsUpdates) {
            if from != NodeId::Replica(self.primary_id()) {
                return out.fault(from, "update-from-non-primary");
            }
            if !self.update_is_valid(&update) {
                return out.fault(from, "bad-update");
            }
        }
        self.add_commit(update.seq, update.batch, update.results_root, out);
        self.offer(
            Item::Opened(Box::new((update.prepare_cert, update.prepared))),
            out,
        );
        self.offer(
            Item::Opened(Box::new((update.commit_cert, update.replied))),
            out,
        );
    }

    /// Records a batch proven committed and runs whatever can run.
    fn add_commit(&mut self, seq: Seq, batch: Batch, results_root: Digest, out: &mut Out) {
        if seq <= self.executed || seq.0 - self.executed.0 > MAX_WAITING_COMMITS {
            return;
        }
        self.commits.entry(seq).or_insert(Committed {
            batch,
            results_root,
        });
        while let Some(committed) = self.commits.remove(&self.executed.next()) {
            let seq = self.executed.next();
            let executed = self.execute(seq, &committed.batch, out);
            if executed.results_root != committed.results_root {
                out.fault(self.primary_id(), "wrong-results");
            }
        }
        self.drain(out);
    }

    /// Runs the batch at `seq` (the next one).
    pub(crate) fn execute(&mut self, seq: Seq, batch: &Batch, out: &mut Out) -> Executed {
        debug_assert_eq!(seq, self.executed.next());
        let mut results = Vec::with_capacity(batch.requests.len());
        let mut leaves = Vec::with_capacity(batch.requests.len());
        let mut ran = 0;
        for request in batch.requests.iter() {
            let result =
                match self
                    .service
                    .execute(request.client, request.timestamp, &request.operation)
                {
                    Execution::Executed(result) => {
                        ran += 1;
                        Some(result)
                    }
                    Execution::Stale => None,
                };
            leaves.push(result_leaf(
                request.client,
                request.timestamp,
                result.as_deref(),
            ));
            results.push((request.client, request.timestamp, result));
        }
        let results_root = merkle::root(&leaves);
        self.executed = seq;
        self.batches = self.batches.split_off(&seq.next());
        self.results.insert(seq, results_root);
        while self.results.len() > RESULTS_KEPT {
            self.results.pop_first();
        }
        out.observe(Observation::Executed {
            seq,
            // The root over the request bodies: replicas get the batch with
            // different authenticators (`crate::authentic`).
            batch: batch_root(batch),
            requests: ran,
        });
        Executed {
            results_root,
            results,
            leaves,
        }
    }
}

impl diffuse_core::protocol::Replica for FastBftReplica {
    type Message = Message;
    type Timer = Timer;

    fn handle(&mut self, input: Input<Message, Timer>) -> Out {
        let mut out = Out::new();
        if self.halted {
            return out;
        }
        match input {
            Input::Start(_) => self.on_start(&mut out),
            Input::Message { .. } | Input::Timer(_) if self.enclave.is_none() => {}
            Input::Message { from, message } => self.on_message(from, message, &mut out),
            Input::Timer(Timer::Batch) => self.on_batch_timer(&mut out),
            Input::Timer(Timer::Stall) => self.on_stall(&mut out),
            Input::Timer(Timer::Round(epoch, counter)) => {
                self.on_round_timeout((epoch, counter), &mut out)
            }
            Input::Timer(Timer::Rebuild(epoch)) => self.on_rebuild_timer(epoch, &mut out),
        }
        out
    }

    fn view(&self) -> View {
        View(0)
    }
}

/// Builds the REPLY of request `index` of an executed batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn client_reply(
    seq: Seq,
    batch: &Batch,
    executed: &Executed,
    index: usize,
    prepare: (&Cert, &Opened),
    commit: (&Cert, &Opened),
    request_leaves: &[Digest],
) -> Option<ClientReply> {
    let (client, timestamp, result) = executed.results.get(index)?;
    let result = result.as_ref()?;
    Some(ClientReply {
        client: *client,
        timestamp: *timestamp,
        result: diffuse_core::codec::Blob::try_from_vec(result.clone()).ok()?,
        seq,
        index: index as u32,
        len: batch.requests.len() as u32,
        request_path: merkle::path(request_leaves, index),
        result_path: merkle::path(&executed.leaves, index),
        batch_root: merkle::root(request_leaves),
        results_root: executed.results_root,
        prepare_cert: prepare.0.clone(),
        prepared: prepare.1.clone(),
        commit_cert: commit.0.clone(),
        replied: commit.1.clone(),
    })
}
