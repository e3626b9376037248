//! The FastBFT replica state machine.
//!
//! Split by concern: this module (start, dispatch, the certified stream every
//! replica's enclave follows in counter order, execution), `rounds` (opening a
//! secret over the tree: shares up, checks, timers, SUSPECT), `primary`
//! (preprocessing, batching, PREPARE / COMMIT / REPLY, NEW-TREE, FETCH answers),
//! `log` (the positions a VIEW-CHANGE lists), `checkpoints` (stable checkpoints
//! and state transfer) and `view_change` (REQ-VIEW-CHANGE to entering a view).
//!
//! **The stream.** Every certificate of the primary's enclave takes one position
//! `(epoch, counter)`: a PREPARE, a COMMIT, or the NEW-TREE that ends an epoch;
//! a view's NEW-VIEW takes counter value 0 of its first epoch. Each replica's
//! enclave takes the positions in order (`c_latest + 1`), so a replica holds back
//! what arrives early and fetches what is missing. An active replica releases its
//! share with `verify_counter`; a passive one, or any replica that cannot, steps
//! over the position with `update_counter` (the secret opened, from an UPDATE) or
//! `follow_counter` (the certificate alone). A position whose content does not
//! match its certificate is never taken: only a faulty primary sends one, so the
//! replica asks for a view change instead.
//!
//! **Execution** is separate: a batch runs at its sequence number once it is
//! proven committed (its PREPARE's secret opened) and every earlier one ran.

mod checkpoints;
mod durable;
mod log;
mod primary;
mod rejoin;
mod rounds;
mod view_change;

use crate::checkpoint::{CheckpointProof, primary_key, primary_of, seq_of};
use crate::merkle;
use crate::message::{
    Cert, ClientReply, Commit, Message, NewTree, Opened, Position, Prepare, SharedBatch,
    TreeConfig, Update, batch_root, commit_digest, new_tree_digest, position, result_leaf,
};
use crate::options::{FastBftOptions, Mutant};
use crate::view_log::{CommitEntry, LogEntry, NewTreeEntry, Rules, StreamState};
use diffuse_core::app::Application;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_core::protocol::{Actions, Input, Observation};
use diffuse_core::service::{Execution, ReplicatedService, StateSnapshot};
use diffuse_core::suite::ReplicaSetup;
use diffuse_minbft::tee_host::EnclaveHandle;
use diffuse_pbft::message::Batch;
use diffuse_tee::{FastBftComponent, Package, SlotRules, Tree, view_of_epoch};
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
    /// A client's request waits at a backup: without progress, suspect the primary.
    Request,
    /// A view change takes too long: ask for the next view.
    ViewChange,
    /// The primary may send its NEW-VIEW again to replicas that missed it.
    Served,
    /// REJOIN reports may be sent again.
    RejoinServed,
    /// The fallback started at this epoch has lasted `fallback_duration`.
    FallbackEnd(u64),
}

pub(crate) type Out = Actions<Message, Timer>;

/// Held-back stream messages, at most.
const MAX_HELD: usize = 4096;
/// Committed batches waiting for an earlier one, at most.
const MAX_WAITING_COMMITS: u64 = 1024;
/// Executed batches kept (with their results) above the stable checkpoint, at
/// most: what a new primary re-commits, and what late COMMITs are checked against.
const RECENT_KEPT: usize = 2 * crate::view_log::MAX_CHECKPOINT_INTERVAL as usize + 64;
/// Stall checks an active replica waits for a missing package before it steps
/// over the position without releasing its share.
const PACKAGE_PATIENCE: u32 = 2;

/// Something that takes a stream position.
#[derive(Debug, Clone)]
enum Item {
    Prepare(Box<Prepare>),
    Commit(Box<Commit>),
    NewTree(Box<NewTree>),
    /// The PREPARE position of a batch an UPDATE proves replied.
    UpdatePrepare(Arc<Update>),
    /// The COMMIT position of that batch, with its batch root (computed once, when
    /// the UPDATE was checked).
    UpdateCommit(Arc<Update>, Digest),
    /// A restarted replica rejoins the view here.
    Rejoined(Box<crate::view_log::RejoinEntry>),
}

impl Item {
    fn position(&self) -> Position {
        match self {
            Item::Prepare(p) => position(&p.cert),
            Item::Commit(c) => position(&c.cert),
            Item::NewTree(t) => position(&t.cert),
            Item::UpdatePrepare(u) => position(&u.prepare_cert),
            Item::UpdateCommit(u, _) => position(&u.commit_cert),
            Item::Rejoined(r) => position(&r.cert),
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
pub(crate) struct Committed {
    pub(crate) batch: SharedBatch,
    /// `batch_root(batch)`, checked by whoever recorded the batch.
    pub(crate) batch_root: Digest,
    pub(crate) results_root: Digest,
    pub(crate) state: Option<Digest>,
    /// Read back from this replica's own disk: its results are not known ahead.
    pub(crate) recovered: bool,
}

/// The outcome of one batch's execution.
pub(crate) struct Executed {
    /// `(client, timestamp, result)`; `None` for a stale duplicate.
    pub(crate) results: Vec<(ClientId, u64, Option<Vec<u8>>)>,
    /// At a checkpoint: the digest of the state after this batch.
    pub(crate) state: Option<Digest>,
    /// The results' Merkle tree, hashed when first asked for: the
    /// primary and the active replicas need them for every batch, a passive
    /// replica only if it becomes the primary while the batch is recent.
    /// Hashing every result (1 KB each in the `n = 103` benchmark) was about a
    /// sixth of a passive replica's CPU.
    hashed: std::sync::OnceLock<merkle::Tree>,
}

impl Executed {
    fn new(results: Vec<(ClientId, u64, Option<Vec<u8>>)>, state: Option<Digest>) -> Executed {
        Executed {
            results,
            state,
            hashed: std::sync::OnceLock::new(),
        }
    }

    /// The Merkle tree over the batch's results, in batch order.
    fn results_tree(&self) -> &merkle::Tree {
        self.hashed.get_or_init(|| {
            let leaves: Vec<Digest> = self
                .results
                .iter()
                .map(|(client, timestamp, result)| {
                    result_leaf(*client, *timestamp, result.as_deref())
                })
                .collect();
            merkle::Tree::new(&leaves)
        })
    }

    /// The Merkle root over the batch's results.
    pub(crate) fn results_root(&self) -> Digest {
        self.results_tree().root()
    }
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
    /// The protocol view: its primary is `view mod n`.
    view: u64,
    epoch: Option<Epoch>,
    held: BTreeMap<Position, Item>,
    packages: BTreeMap<Position, Package>,
    rounds: BTreeMap<Position, Round>,
    /// Aggregates that arrived before this replica opened the round they are for.
    early_shares: BTreeMap<(Position, ReplicaId), diffuse_tee::Share>,
    commits: BTreeMap<Seq, Committed>,
    /// Batches seen in PREPAREs, by sequence number, until they run.
    batches: BTreeMap<Seq, SharedBatch>,
    executed: Seq,
    /// Executed batches above the stable checkpoint, with their results.
    recent: BTreeMap<Seq, Arc<Executed>>,
    /// The view's stream as the PREPARE rule sees it.
    stream: StreamState,
    /// The positions of the view taken since the log's start.
    log: log::PositionLog,
    /// The highest stable checkpoint this replica has a proof of.
    stable: Option<CheckpointProof>,
    /// This replica's own snapshots at checkpoints (to serve state transfer).
    snapshots: BTreeMap<Seq, StateSnapshot>,
    transfer: Option<checkpoints::Transfer>,
    vc: view_change::ViewChangeState,
    rejoin: rejoin::RejoinState,
    stall_armed: bool,
    /// The position last fetched from, so that a gap is fetched once per position
    /// and then on the stall timer.
    fetched_at: Option<Position>,
    package_waits: u32,
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
            view: 0,
            epoch: None,
            held: BTreeMap::new(),
            packages: BTreeMap::new(),
            rounds: BTreeMap::new(),
            early_shares: BTreeMap::new(),
            commits: BTreeMap::new(),
            batches: BTreeMap::new(),
            executed: Seq(0),
            recent: BTreeMap::new(),
            stream: StreamState::default(),
            log: log::PositionLog::genesis(),
            stable: None,
            snapshots: BTreeMap::new(),
            transfer: None,
            vc: view_change::ViewChangeState::default(),
            rejoin: rejoin::RejoinState::default(),
            stall_armed: false,
            fetched_at: None,
            package_waits: 0,
            primary: None,
            halted: false,
        }
    }

    /// The primary of the current view.
    pub fn primary_id(&self) -> ReplicaId {
        primary_of(self.view, self.n)
    }

    fn is_primary(&self) -> bool {
        self.id == self.primary_id()
    }

    fn primary_key(&self) -> Option<PublicKey> {
        primary_key(&self.enclave_keys, self.view)
    }

    /// The checkpoint interval, which is also the window.
    fn interval(&self) -> u64 {
        self.options.base.checkpoint_interval.max(1)
    }

    fn rules(&self) -> Rules<'_> {
        Rules {
            enclave_keys: &self.enclave_keys,
            interval: self.interval(),
            drop_last_decided: self.options.is(Mutant::DecideDropsAnEntry),
        }
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

    /// Whether this replica follows its view's stream: in a view, not leaving it.
    fn in_view(&self) -> bool {
        self.vc.target.is_none() && !self.rejoin.locked
    }

    /// Stops taking part, for a reason written to the trace as a fault of itself.
    fn halt(&mut self, why: &'static str, out: &mut Out) {
        self.halted = true;
        out.fault(self.id, why);
    }

    fn on_start(&mut self, recovered: &diffuse_core::protocol::Recovered, out: &mut Out) {
        let rules = SlotRules {
            checkpoint_interval: self.options.base.checkpoint_interval,
            window: self.options.base.window,
        };
        let clients = diffuse_minbft::tee_host::client_keys(&self.keys);
        let booted = match self
            .options
            .tee
            .boot(self.id, self.n, self.f + 1, rules, &clients)
        {
            Ok(booted) => booted,
            Err(_) => return self.halt("enclave-unavailable", out),
        };
        self.enclave_keys = booted.enclave_keys;
        self.enclave = Some(booted.enclave);
        if self.enclave_keys.len() != self.n {
            return self.halt("enclave-keys-do-not-match-the-cluster", out);
        }
        self.after_boot(recovered, out);
    }

    fn on_message(&mut self, from: NodeId, message: Message, out: &mut Out) {
        match message {
            Message::Request(request) => self.on_request(from, request, out),
            Message::Prepare(prepare) => {
                if self.is_stream_primary(from, prepare.cert.view, out) {
                    self.offer(Item::Prepare(Box::new(prepare)), out);
                }
            }
            Message::Commit(commit) => {
                if self.is_stream_primary(from, commit.cert.view, out) {
                    self.offer(Item::Commit(Box::new(commit)), out);
                }
            }
            Message::NewTree(new_tree) => {
                if self.is_stream_primary(from, new_tree.cert.view, out) {
                    self.offer(Item::NewTree(Box::new(new_tree)), out);
                }
            }
            Message::Update(update) => self.on_update(from, update, out),
            Message::Share(share) => self.on_share(from, share, out),
            Message::Suspect(suspect) => self.on_suspect(from, suspect, out),
            Message::Packages(packages) => {
                if self.is_stream_primary(from, packages.epoch, out) {
                    self.on_packages(packages, out);
                }
            }
            Message::Fetch(fetch) => {
                if self.primary.is_some() && self.in_view() {
                    self.on_fetch(from, fetch, out);
                }
            }
            Message::Reply(reply) => match from {
                NodeId::Replica(_) => self.on_reply_proof(reply, out),
                _ => out.fault(from, "reply-to-a-replica"),
            },
            Message::ReqViewChange(req) => {
                if let NodeId::Replica(r) = from {
                    self.on_req_view_change(r, req, out);
                }
            }
            Message::ViewChange(vc) => {
                if let NodeId::Replica(r) = from {
                    self.on_view_change(r, *vc, out);
                }
            }
            Message::NewView(nv) => {
                if let NodeId::Replica(r) = from {
                    self.on_new_view(r, *nv, out);
                }
            }
            Message::Accept(accept) => {
                if let NodeId::Replica(_) = from {
                    self.on_accept(accept, out);
                }
            }
            Message::FetchState(fetch) => {
                if let NodeId::Replica(r) = from {
                    self.on_fetch_state(r, fetch, out);
                }
            }
            Message::StateChunk(chunk) => {
                if let NodeId::Replica(r) = from {
                    self.on_state_chunk(r, chunk, out);
                }
            }
            Message::Rejoin(challenge) => {
                if let NodeId::Replica(r) = from {
                    self.on_rejoin(r, challenge, out);
                }
            }
            Message::RejoinReport(report) => {
                if let NodeId::Replica(r) = from {
                    self.on_rejoin_report(r, *report, out);
                }
            }
            Message::RejoinRequest(nonce) => {
                if let NodeId::Replica(r) = from
                    && self.primary.is_some()
                    && self.in_view()
                {
                    self.on_rejoin_request(r, nonce, out);
                }
            }
            Message::Rejoined(entry) => {
                if self.is_stream_primary(from, entry.cert.view, out) {
                    self.offer(Item::Rejoined(Box::new(entry)), out);
                }
            }
            Message::RejoinState(state) => {
                if let NodeId::Replica(r) = from {
                    self.on_rejoin_state(r, *state, out);
                }
            }
        }
    }

    /// Whether a stream message of `epoch` from `from` is one to keep: from the
    /// primary of that epoch's view, this view or a later one, and not this
    /// replica's own.
    fn is_stream_primary(&self, from: NodeId, epoch: u64, out: &mut Out) -> bool {
        let view = view_of_epoch(epoch);
        let NodeId::Replica(sender) = from else {
            out.fault(from, "stream-message-from-a-client");
            return false;
        };
        view >= self.view && sender == primary_of(view, self.n) && sender != self.id
    }

    fn on_packages(&mut self, packages: crate::message::Packages, out: &mut Out) {
        let (epoch, next) = self.next_position();
        if packages.epoch < epoch {
            return;
        }
        if packages.epoch > epoch
            && view_of_epoch(packages.epoch) == self.view
            && self.in_view()
            && self.fetched_at != Some((epoch, next))
        {
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
        if at < self.next_position() || view_of_epoch(at.0) < self.view {
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
        if !self.in_view() {
            // Waiting for a NEW-VIEW: what is held may be of that view.
            if !self.held.is_empty() && !self.stall_armed {
                self.stall_armed = true;
                out.set_timer(Timer::Stall, self.options.base.status_interval);
            }
            return;
        }
        loop {
            let next = self.next_position();
            self.held = self.held.split_off(&next);
            let Some(item) = self.held.remove(&next) else {
                break;
            };
            if self.log.is_full() {
                // A correct primary never certifies this much between checkpoints.
                self.held.insert(next, item);
                self.suspect_primary("log-full", out);
                break;
            }
            match self.step(item, out) {
                Step::Done => self.package_waits = 0,
                Step::Wait(item) => {
                    self.held.insert(next, item);
                    break;
                }
            }
            if !self.in_view() {
                return;
            }
        }
        if !self.held.is_empty() {
            let next = self.next_position();
            if self.fetched_at != Some(next) && !self.held.contains_key(&next) {
                // A gap: ask at once (and again on the stall timer if it stays).
                self.fetch(false, out);
                self.fetch_new_view(out);
            }
            if !self.stall_armed {
                self.stall_armed = true;
                out.set_timer(Timer::Stall, self.options.base.status_interval);
            }
        }
    }

    /// Stream messages of a later view wait here: this replica missed that
    /// view's NEW-VIEW, and asks its primary (who answers a FETCH from an earlier
    /// view with it).
    fn fetch_new_view(&mut self, out: &mut Out) {
        let Some((at, _)) = self.held.last_key_value() else {
            return;
        };
        let view = view_of_epoch(at.0);
        if view <= self.view || self.vc.target.is_some_and(|t| t > view) {
            return;
        }
        let (epoch, counter) = self.next_position();
        out.send(
            primary_of(view, self.n),
            Message::Fetch(crate::message::Fetch {
                epoch,
                counter,
                packages: false,
            }),
        );
    }

    fn fetch(&mut self, packages: bool, out: &mut Out) {
        let (epoch, counter) = self.next_position();
        self.fetched_at = Some((epoch, counter));
        if self.is_primary() {
            return;
        }
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
        if self.rejoin.locked {
            return self.ask_to_rejoin(out);
        }
        self.ask_for_rejoin_position(out);
        self.continue_transfer(out);
        self.repeat_vote(out);
        if self.held.is_empty() {
            return;
        }
        self.fetch_new_view(out);
        if !self.in_view() {
            if !self.stall_armed {
                self.stall_armed = true;
                out.set_timer(Timer::Stall, self.options.base.status_interval);
            }
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

    /// Whether the primary has moved past `epoch`: a later epoch's message is held
    /// here. Then no round of `epoch` waits for this replica's share any more, and
    /// the primary keeps no packages of it: a replica catching up through old
    /// epochs follows their positions without waiting for packages (waiting two
    /// stall periods at each, it fell further behind a primary that kept starting
    /// fallback epochs: sweep seed 9307 at n = 3).
    fn epoch_ended(&self, epoch: u64) -> bool {
        self.held
            .last_key_value()
            .is_some_and(|((later, _), _)| *later > epoch)
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
            Item::UpdatePrepare(update) => {
                self.step_update_prepare(&update, out);
                Step::Done
            }
            Item::UpdateCommit(update, batch_root) => {
                self.step_update_commit(&update, batch_root, out);
                Step::Done
            }
            Item::Rejoined(entry) => {
                self.step_rejoined(*entry, out);
                Step::Done
            }
        }
    }

    /// Steps over a position without releasing anything.
    fn follow(&mut self, cert: &Cert) -> bool {
        self.enclave_call(|e| e.follow_counter(cert)).is_ok()
    }

    /// The primary sent what only a faulty primary sends: blame it and ask for
    /// the next view (Fig. 4, lines 10, 39, 46).
    fn primary_misbehaved(&mut self, kind: &'static str, out: &mut Out) {
        out.fault(self.primary_id(), kind);
        self.suspect_primary(kind, out);
    }

    fn enter_epoch(&mut self, new_tree: NewTree, out: &mut Out) {
        let Some(primary) = self.primary_key() else {
            return;
        };
        let config = &new_tree.config;
        let tree = match self.check_config(config) {
            Some(tree) => tree,
            None => return self.primary_misbehaved("bad-new-tree", out),
        };
        if new_tree.cert.message != new_tree_digest(config)
            || config.epoch != new_tree.cert.view.saturating_add(1)
            || new_tree.keys.len() != config.actives.len()
        {
            return self.primary_misbehaved("bad-new-tree", out);
        }
        let my_key = config
            .actives
            .iter()
            .position(|r| *r == self.id)
            .map(|i| new_tree.keys[i].clone());
        let entered =
            self.enclave_call(|e| e.update_view(&primary, &new_tree.cert, my_key.as_ref()));
        if entered.is_err() {
            return self.primary_misbehaved("bad-new-tree", out);
        }
        self.log.record(LogEntry::NewTree(NewTreeEntry {
            config: new_tree.config.clone(),
            cert: new_tree.cert.clone(),
        }));
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

    /// The tree of `config`, if it is one a correct primary of this view sends.
    /// In the fallback every backup is active and the tree is not used (every
    /// backup answers the primary directly).
    fn check_config(&self, config: &TreeConfig) -> Option<Tree> {
        let mut seen = std::collections::BTreeSet::new();
        let expected = if config.fallback { self.n - 1 } else { self.f };
        let valid = config.actives.len() == expected
            && config
                .actives
                .iter()
                .all(|r| r.index() < self.n && *r != self.primary_id() && seen.insert(*r));
        if !valid {
            return None;
        }
        let fan_out = if config.fallback {
            1
        } else {
            usize::from(config.fan_out)
        };
        Tree::balanced(config.actives.len(), fan_out).ok()
    }

    fn step_prepare(&mut self, mut prepare: Prepare, out: &mut Out) -> Step {
        let at = position(&prepare.cert);
        prepare.batch = crate::authentic::without_authenticators(&prepare.batch);
        let rules = self.rules();
        let mut stream = self.stream.clone();
        let verdict = stream.accept_prepare(&prepare, &rules);
        if verdict == Err(crate::view_log::Invalid(crate::view_log::MISMATCH)) {
            // The content is not what the certificate binds: never taken.
            self.primary_misbehaved("bad-prepare", out);
            return Step::Done;
        }
        let counts = verdict.is_ok();
        let mut released = None;
        if counts && self.is_active() {
            match self.packages.get(&at).cloned() {
                Some(package) => {
                    released = self
                        .enclave_call(|e| e.verify_counter(&prepare.cert, &package))
                        .ok();
                }
                None if self.package_waits < PACKAGE_PATIENCE && !self.epoch_ended(at.0) => {
                    return Step::Wait(Item::Prepare(Box::new(prepare)));
                }
                None => {}
            }
        }
        self.take_prepare(prepare, released, stream, counts, out);
        if !counts {
            // Bound by its certificate, but not a PREPARE a correct primary sends.
            self.primary_misbehaved("bad-prepare", out);
        }
        Step::Done
    }

    /// Takes the position of `prepare`: with the share `released` (already taken by
    /// `verify_counter`), or by following. Records it in the log, and the stream's
    /// new state if the PREPARE counts.
    fn take_prepare(
        &mut self,
        prepare: Prepare,
        released: Option<diffuse_tee::OpenedShare>,
        stream: StreamState,
        counts: bool,
        out: &mut Out,
    ) {
        let at = position(&prepare.cert);
        if released.is_none() && !self.follow(&prepare.cert) {
            // The enclave refused the certificate itself (not the primary's):
            // nothing a correct primary sends.
            return self.primary_misbehaved("bad-prepare", out);
        }
        self.packages.remove(&at);
        if counts {
            self.stream = stream;
            self.remember_batch(prepare.seq, prepare.batch.clone());
        }
        let carried = prepare.checkpoint.as_deref().cloned();
        self.log.record(LogEntry::Prepare(prepare));
        if counts && let Some(proof) = carried {
            self.adopt_stable(proof, out);
        }
        if let Some(opened) = released {
            self.start_round(at, rounds::Phase::Prepare, opened, out);
        }
    }

    fn remember_batch(&mut self, seq: Seq, batch: SharedBatch) {
        let base = self.execution_base();
        if seq > base && seq.0 - base.0 <= MAX_WAITING_COMMITS {
            self.batches.insert(seq, batch);
        }
    }

    /// Where execution goes on from: the last batch run, or the checkpoint being
    /// transferred.
    fn execution_base(&self) -> Seq {
        self.transfer
            .as_ref()
            .map_or(self.executed, |t| t.target().max(self.executed))
    }

    /// Whether `commit` proves its batch committed in this view: the certificates
    /// bind it, its PREPARE is of this view, and the PREPARE's secret is open.
    fn commit_proves(&self, commit: &Commit) -> bool {
        let Some(primary) = self.primary_key() else {
            return false;
        };
        if view_of_epoch(commit.prepare_cert.view) != self.view
            || !crate::message::certifies_prepare(
                &commit.prepare_cert,
                commit.seq,
                &commit.batch_root,
                commit.prepare_checkpoint.as_ref(),
            )
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
        if commit.cert.message
            != commit_digest(
                commit.seq,
                &commit.batch_root,
                &commit.results_root,
                commit.state.as_ref(),
            )
        {
            self.primary_misbehaved("bad-commit", out);
            return Step::Done;
        }
        let batch = match &commit.batch {
            Some(batch) if batch_root(batch) == commit.batch_root => Some(batch.clone()),
            Some(_) => None,
            None => self
                .batches
                .get(&commit.seq)
                .or_else(|| self.commits.get(&commit.seq).map(|c| &c.batch))
                .filter(|b| batch_root(b) == commit.batch_root)
                .cloned(),
        };
        let checkpoint_seq = commit.seq.0 % self.interval() == 0;
        let acceptable = self.commit_proves(&commit)
            && commit.seq > self.stream.checkpoint
            && self.stream.fixed.get(&commit.seq) == Some(&commit.batch_root)
            && commit.state.is_some() == checkpoint_seq
            && (batch.is_some() || commit.seq <= self.executed);
        if !acceptable {
            self.take_commit(&commit, None, out);
            if commit.seq <= stable_seq(self.stable.as_ref()) && batch.is_none() {
                // A batch below this replica's stable checkpoint, whose state it
                // took by transfer: nothing to check it against, nothing wrong.
                return Step::Done;
            }
            self.primary_misbehaved("bad-commit", out);
            return Step::Done;
        }
        if let Some(batch) = batch {
            self.add_commit(
                commit.seq,
                batch,
                commit.batch_root,
                commit.results_root,
                commit.state,
                out,
            );
        }
        if commit.seq > self.executed {
            // An earlier batch has not run here yet: wait for its UPDATE, COMMIT or
            // state transfer.
            return Step::Wait(Item::Commit(Box::new(commit)));
        }
        let ours = self.recent.get(&commit.seq).cloned();
        let agrees = ours
            .as_ref()
            .is_some_and(|e| e.results_root() == commit.results_root && e.state == commit.state);
        if !agrees {
            if ours.is_some() {
                out.fault(self.primary_id(), "wrong-results");
            }
            self.take_commit(&commit, None, out);
            return Step::Done;
        }
        let released = if self.is_active() {
            match self.packages.get(&at).cloned() {
                Some(package) => self
                    .enclave_call(|e| e.verify_counter(&commit.cert, &package))
                    .ok(),
                None if self.package_waits < PACKAGE_PATIENCE && !self.epoch_ended(at.0) => {
                    return Step::Wait(Item::Commit(Box::new(commit)));
                }
                None => None,
            }
        } else {
            None
        };
        self.take_commit(&commit, released, out);
        Step::Done
    }

    /// Takes the position of `commit` (with the share `released`, or following)
    /// and logs it.
    fn take_commit(
        &mut self,
        commit: &Commit,
        released: Option<diffuse_tee::OpenedShare>,
        out: &mut Out,
    ) {
        let at = position(&commit.cert);
        if released.is_none() && !self.follow(&commit.cert) {
            return self.primary_misbehaved("bad-commit", out);
        }
        self.packages.remove(&at);
        self.log.record(LogEntry::Commit(CommitEntry {
            seq: commit.seq,
            batch_root: commit.batch_root,
            results_root: commit.results_root,
            state: commit.state,
            cert: commit.cert.clone(),
        }));
        if let Some(opened) = released {
            self.start_round(at, rounds::Phase::Reply, opened, out);
        }
    }

    /// Whether `update` is what the primary sends: both certificates bind the
    /// batch and results, both are of this view, and both secrets are open.
    fn update_is_valid(&self, update: &Update, root: &Digest) -> bool {
        let Some(primary) = self.primary_key() else {
            return false;
        };
        let checkpoint = update.checkpoint.as_ref().map(|p| p.digest());
        crate::message::certifies_prepare(
            &update.prepare_cert,
            update.seq,
            root,
            checkpoint.as_ref(),
        ) && update.commit_cert.message
            == commit_digest(
                update.seq,
                root,
                &update.results_root,
                update.state.as_ref(),
            )
            && view_of_epoch(update.prepare_cert.view) == self.view
            && view_of_epoch(update.commit_cert.view) == self.view
            && update.prepared.matches(&update.prepare_cert)
            && update.replied.matches(&update.commit_cert)
            && enclave_signed(update, &primary)
    }

    fn on_update(&mut self, from: NodeId, update: Update, out: &mut Out) {
        if self.is_primary() || !self.in_view() {
            return;
        }
        let root = batch_root(&update.batch);
        if !self.options.is(Mutant::ReplicaTrustsUpdates) {
            if from != NodeId::Replica(self.primary_id()) {
                if matches!(from, NodeId::Client(_)) {
                    out.fault(from, "update-from-a-client");
                }
                return;
            }
            if !self.update_is_valid(&update, &root) {
                return out.fault(from, "bad-update");
            }
        }
        self.add_commit(
            update.seq,
            update.batch.clone(),
            root,
            update.results_root,
            update.state,
            out,
        );
        let update = Arc::new(update);
        self.offer(Item::UpdatePrepare(update.clone()), out);
        self.offer(Item::UpdateCommit(update, root), out);
    }

    /// The PREPARE position of a batch whose secrets opened: step over it with the
    /// opened secret (the PREPARE counted at every active replica, so it counts
    /// here).
    fn step_update_prepare(&mut self, update: &Update, out: &mut Out) {
        let prepare = Prepare {
            seq: update.seq,
            batch: crate::authentic::without_authenticators(&update.batch),
            checkpoint: update.checkpoint.clone(),
            cert: update.prepare_cert.clone(),
        };
        let rules = self.rules();
        let mut stream = self.stream.clone();
        let counts = stream.accept_prepare(&prepare, &rules).is_ok();
        let stepped = self.enclave_call(|e| {
            e.update_counter(&update.prepared.secret, &update.prepared.commitment)
        });
        if stepped.is_err() && !self.follow(&update.prepare_cert) {
            return;
        }
        if counts {
            self.stream = stream;
            self.remember_batch(prepare.seq, prepare.batch.clone());
        }
        let carried = prepare.checkpoint.as_deref().cloned();
        self.log.record(LogEntry::Prepare(prepare));
        if counts && let Some(proof) = carried {
            self.adopt_stable(proof, out);
        }
    }

    /// The COMMIT position of a replied batch; at a checkpoint the UPDATE is the
    /// checkpoint's proof.
    fn step_update_commit(&mut self, update: &Update, root: Digest, out: &mut Out) {
        let stepped = self
            .enclave_call(|e| e.update_counter(&update.replied.secret, &update.replied.commitment));
        if stepped.is_err() && !self.follow(&update.commit_cert) {
            return;
        }
        self.log.record(LogEntry::Commit(CommitEntry {
            seq: update.seq,
            batch_root: root,
            results_root: update.results_root,
            state: update.state,
            cert: update.commit_cert.clone(),
        }));
        if let Some(state) = update.state {
            let proof = CheckpointProof {
                seq: update.seq,
                state,
                batch_root: root,
                results_root: update.results_root,
                commit_cert: update.commit_cert.clone(),
                replied: update.replied.clone(),
            };
            if proof.is_valid(&self.enclave_keys, self.interval()) {
                self.adopt_stable(proof, out);
            }
        }
    }

    /// Records a batch proven committed and runs whatever can run.
    fn add_commit(
        &mut self,
        seq: Seq,
        batch: SharedBatch,
        batch_root: Digest,
        results_root: Digest,
        state: Option<Digest>,
        out: &mut Out,
    ) {
        // During a state transfer the batches above its checkpoint wait for it.
        let base = self.execution_base();
        if seq <= base || seq.0 - base.0 > MAX_WAITING_COMMITS {
            return;
        }
        self.commits.entry(seq).or_insert(Committed {
            batch,
            batch_root,
            results_root,
            state,
            recovered: false,
        });
        self.run_committed(out);
    }

    /// Runs the committed batches that are next, in order.
    fn run_committed(&mut self, out: &mut Out) {
        if self.transfer.is_some() {
            return;
        }
        // A passive replica does not hash the results to compare their root: the
        // root is certified and its reply secret open, so every active replica,
        // a correct one among them, compared it with its own before releasing its
        // share (step 4 of the normal case).
        let check_results = self.is_active();
        while let Some(committed) = self.commits.remove(&self.executed.next()) {
            let seq = self.executed.next();
            let executed = self.execute(seq, &committed.batch, committed.batch_root, out);
            if !committed.recovered
                && ((check_results && executed.results_root() != committed.results_root)
                    || executed.state != committed.state)
            {
                out.fault(self.primary_id(), "wrong-results");
            }
        }
        self.drain(out);
    }

    /// Runs the batch at `seq` (the next one). A request already executed at its
    /// client's latest timestamp gets the cached result again (so that a REPLY can
    /// prove it after a view change); older duplicates get none.
    /// `batch_root` is `batch_root(batch)`, which every caller has checked already.
    pub(crate) fn execute(
        &mut self,
        seq: Seq,
        batch: &Batch,
        batch_root: Digest,
        out: &mut Out,
    ) -> Arc<Executed> {
        debug_assert_eq!(seq, self.executed.next());
        let mut results = Vec::with_capacity(batch.requests.len());
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
                    Execution::Stale => self
                        .service
                        .cached_reply(request.client)
                        .filter(|(t, _)| *t == request.timestamp)
                        .map(|(_, r)| r.to_vec()),
                };
            results.push((request.client, request.timestamp, result));
        }
        self.executed = seq;
        self.batches = self.batches.split_off(&seq.next());
        out.observe(Observation::Executed {
            seq,
            batch: batch_root,
            requests: ran,
        });
        let state = (seq.0 % self.interval() == 0).then(|| self.take_snapshot(seq, out));
        let executed = Arc::new(Executed::new(results, state));
        self.recent.insert(seq, executed.clone());
        while self.recent.len() > RECENT_KEPT {
            self.recent.pop_first();
        }
        self.unblock_requests(out);
        executed
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
            Input::Start(recovered) => self.on_start(&recovered, &mut out),
            Input::Message { .. } | Input::Timer(_) if self.enclave.is_none() => {}
            Input::Message { from, message } => self.on_message(from, message, &mut out),
            Input::Timer(Timer::Batch) => self.on_batch_timer(&mut out),
            Input::Timer(Timer::Stall) => self.on_stall(&mut out),
            Input::Timer(Timer::Round(epoch, counter)) => {
                self.on_round_timeout((epoch, counter), &mut out)
            }
            Input::Timer(Timer::Rebuild(epoch)) => self.on_rebuild_timer(epoch, &mut out),
            Input::Timer(Timer::Request) => self.on_request_timer(&mut out),
            Input::Timer(Timer::ViewChange) => self.on_view_change_timer(&mut out),
            Input::Timer(Timer::Served) => self.on_served_timer(),
            Input::Timer(Timer::RejoinServed) => self.on_rejoin_served_timer(),
            Input::Timer(Timer::FallbackEnd(epoch)) => self.on_fallback_end(epoch, &mut out),
        }
        out
    }

    fn view(&self) -> View {
        View(self.view)
    }

    /// Seals the enclave (a scheduled shutdown): the next start resumes it
    /// unlocked, out of its view, and the replica takes part again from the next.
    fn shutdown_writes(&mut self) -> Vec<diffuse_core::protocol::WriteOp> {
        self.durable_records()
    }

    fn shutdown(&mut self) -> Result<(), diffuse_core::protocol::ShutdownError> {
        self.halted = true;
        let Some(enclave) = self.enclave.take() else {
            return Ok(());
        };
        self.options
            .tee
            .shutdown(self.id, enclave)
            .map_err(|e| diffuse_core::protocol::ShutdownError(e.to_string()))
    }
}

/// Whether the four signatures of an UPDATE (both certificates, both
/// commitments) are the primary's enclave's, in one batch verification (ZIP 215),
/// as the client checks a REPLY: about half the cost of four strict checks, on
/// every passive replica for every batch. The looser rule admits nothing an
/// attested enclave key did not sign, and the enclave checks both commitments
/// again, strictly, when the replica steps over the batch (`update_counter`).
fn enclave_signed(update: &Update, primary: &PublicKey) -> bool {
    let mut batch = diffuse_core::crypto::SignatureBatch::new();
    update.prepare_cert.push_to(primary, &mut batch);
    update.commit_cert.push_to(primary, &mut batch);
    update.prepared.commitment.push_to(primary, &mut batch);
    update.replied.commitment.push_to(primary, &mut batch);
    batch.verify().into_iter().all(|valid| valid)
}

/// The Merkle trees of an executed batch's requests and results, built once for
/// all its replies.
pub(crate) struct ReplyTrees<'a> {
    requests: merkle::Tree,
    results: &'a merkle::Tree,
}

impl<'a> ReplyTrees<'a> {
    pub(crate) fn new(request_leaves: &[Digest], executed: &'a Executed) -> ReplyTrees<'a> {
        ReplyTrees {
            requests: merkle::Tree::new(request_leaves),
            results: executed.results_tree(),
        }
    }
}

/// Builds the REPLY of request `index` of an executed batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn client_reply(
    seq: Seq,
    batch: &Batch,
    executed: &Executed,
    index: usize,
    checkpoint: Option<Digest>,
    prepare: (&Cert, &Opened),
    commit: (&Cert, &Opened),
    trees: &ReplyTrees<'_>,
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
        request_path: trees.requests.path(index),
        result_path: trees.results.path(index),
        batch_root: trees.requests.root(),
        results_root: executed.results_root(),
        checkpoint,
        state: executed.state,
        prepare_cert: prepare.0.clone(),
        prepared: prepare.1.clone(),
        commit_cert: commit.0.clone(),
        replied: commit.1.clone(),
    })
}

/// The sequence number of the stable checkpoint `proof` (genesis: 0).
pub(crate) fn stable_seq(proof: Option<&CheckpointProof>) -> Seq {
    seq_of(proof)
}
