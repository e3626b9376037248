//! The PBFT replica state machine.
//!
//! The replica is split by concern: `normal` (requests, batching, the three-phase
//! commit, execution), `checkpoint` (checkpoints and log truncation),
//! `view_change` (VIEW-CHANGE and NEW-VIEW), `transfer` (state transfer and
//! fetching missing batches), `status` (retransmission to replicas that are behind)
//! and `storage` (what is persisted and how a restart reads it back).

mod checkpoint;
mod normal;
mod read;

mod slot;
mod status;
mod storage;
mod transfer;
mod view_change;

use crate::auth::MacVerifier;
use crate::message::{Batch, CheckpointCert, Message, NewView};
use crate::options::PbftOptions;
use crate::pending::Pending;
use diffuse_core::app::Application;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{Digest, PublicKey, SecretKey};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_core::protocol::{Actions, Input, WriteOp};
use diffuse_core::quorum::QuorumSystem;
use diffuse_core::service::{ReplicatedService, StateSnapshot};
use diffuse_core::suite::ReplicaSetup;
use slot::Slot;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// The replica's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The primary's batching delay.
    Batch,
    /// A backup's wait for its oldest pending request to execute.
    Request,
    /// The wait for a NEW-VIEW once a quorum has moved to the new view.
    NewView,
    /// Periodic progress check that triggers STATUS.
    Status,
    /// Retry of the current state-transfer request.
    StateTransfer,
    /// Retry of requests for missing batch bodies.
    FetchBatch,
    /// End of the grace period before catching up to a certified checkpoint by
    /// state transfer.
    CatchUp,
}

pub(crate) type Out = Actions<Message, Timer>;

/// What to do with a normal-case message right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Its view is current and its sequence number inside the window.
    Now,
    /// A view not reached yet, or a sequence number just above the window: buffer it.
    Later,
    /// Stale, or too far ahead: drop it.
    Never,
}

/// A PBFT replica. Drive it through [`diffuse_core::protocol::Replica::handle`].
pub struct PbftReplica {
    id: ReplicaId,
    quorum: QuorumSystem,
    keys: Arc<ClusterKeys>,
    secret: SecretKey,
    options: PbftOptions,
    service: ReplicatedService,
    /// Digest of the initial state: the genesis checkpoint, sequence 0.
    genesis: Digest,
    /// Digest of the empty batch (the null request).
    null_digest: Digest,
    /// Set when persisted state could not be read: the replica then takes no part,
    /// rather than vote again without remembering its earlier votes.
    halted: bool,

    /// The current view, or the view being changed to.
    view: View,
    /// False while changing view.
    view_active: bool,
    /// The persisted bound on the votes (PRE-PREPAREs and PREPAREs) this replica
    /// sends ahead of their slots' writes: in this view, up to this sequence
    /// number (`storage`).
    ahead_bound: Option<(View, Seq)>,
    /// The bound read back at the last start: a crash may have lost votes this
    /// replica cast in that view up to that sequence number, so it casts no new
    /// vote there, and as that view's primary proposes nothing more in it.
    lost_votes_bound: Option<(View, Seq)>,
    /// Slots for sequence numbers in `(low, low + window]`.
    log: BTreeMap<Seq, Slot>,
    /// The stable checkpoint; its sequence number is the low watermark.
    stable: CheckpointCert,
    /// The state at the stable checkpoint, served to replicas that transfer state.
    stable_snapshot: Option<StateSnapshot>,
    /// Whether the state of the stable checkpoint must be fetched before executing.
    needs_state: bool,
    /// A certified checkpoint this replica has not executed to yet, waiting for the
    /// catch-up grace period.
    deferred_stable: Option<CheckpointCert>,
    last_executed: Seq,
    /// Checkpoints taken here and not yet stable.
    own_checkpoints: BTreeMap<Seq, StateSnapshot>,
    /// Checkpoint votes above the low watermark, per sender (bounded per sender).
    checkpoint_votes: BTreeMap<
        ReplicaId,
        BTreeMap<Seq, diffuse_core::crypto::Signed<crate::message::CheckpointVote>>,
    >,

    /// As primary: the next sequence number to assign.
    next_seq: Seq,
    pending: Pending,
    /// This replica's keys shared with clients, for request authenticators.
    macs: MacVerifier,
    /// Client request signatures verified so far (a cost counter for tests).
    request_signature_checks: u64,
    /// As the active primary: requests waiting for their signatures to be checked
    /// in one batch, per (sender, client), with their arrival number.
    staged: BTreeMap<(NodeId, ClientId), (u64, crate::message::Request)>,
    /// The next arrival number for `staged`.
    staged_arrivals: u64,
    /// Senders caught with a bad request signature in a batch: their requests are
    /// checked alone from then on (at most the members of the cluster).
    suspects: BTreeSet<NodeId>,
    /// The pending request the backup's request timer waits for.
    request_timer_for: Option<(diffuse_core::ids::ClientId, u64)>,
    batch_timer_running: bool,

    view_change: view_change::ViewChangeState,
    /// The NEW-VIEW that started the current view, relayed to replicas left behind.
    current_new_view: Option<Arc<NewView>>,
    /// Normal-case messages for views not reached yet, per sender.
    future: BTreeMap<ReplicaId, VecDeque<Message>>,

    transfer: Option<transfer::Transfer>,
    /// Batch bodies being fetched: sequence number to digest.
    fetching: BTreeMap<Seq, Digest>,
    status: status::StatusState,
}

impl PbftReplica {
    /// Builds a replica that has not started yet; feed it [`Input::Start`] first.
    ///
    /// Invalid options are replaced by the defaults (the runtime validates options
    /// when it loads a config, so this only protects against programming errors).
    pub fn new(setup: ReplicaSetup<PbftOptions>, app: Box<dyn Application>) -> Self {
        let quorum = QuorumSystem::byzantine(setup.keys.n())
            .expect("ClusterKeys guarantees 1..=MAX_REPLICAS replicas");
        let options = if setup.options.validate().is_ok() {
            setup.options
        } else {
            PbftOptions {
                mutant: setup.options.mutant,
                ..PbftOptions::default()
            }
        };
        let service = ReplicatedService::new(app);
        let genesis_snapshot = service.snapshot();
        let genesis = genesis_snapshot.digest;
        let macs = MacVerifier::new(setup.id, &setup.secret);
        Self {
            id: setup.id,
            quorum,
            keys: setup.keys,
            secret: setup.secret,
            service,
            genesis,
            null_digest: Batch::default().digest(),
            halted: false,
            view: View(0),
            view_active: true,
            ahead_bound: None,
            lost_votes_bound: None,
            log: BTreeMap::new(),
            stable: CheckpointCert {
                seq: Seq(0),
                state: genesis,
                votes: Default::default(),
            },
            stable_snapshot: Some(genesis_snapshot),
            needs_state: false,
            deferred_stable: None,
            last_executed: Seq(0),
            own_checkpoints: BTreeMap::new(),
            checkpoint_votes: BTreeMap::new(),
            next_seq: Seq(1),
            pending: Pending::default(),
            macs,
            request_signature_checks: 0,
            staged: BTreeMap::new(),
            staged_arrivals: 0,
            suspects: BTreeSet::new(),
            request_timer_for: None,
            batch_timer_running: false,
            view_change: Default::default(),
            current_new_view: None,
            future: BTreeMap::new(),
            transfer: None,
            fetching: BTreeMap::new(),
            status: Default::default(),
            options,
        }
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// The last executed sequence number.
    pub fn last_executed(&self) -> Seq {
        self.last_executed
    }

    /// The stable checkpoint's sequence number (the low watermark).
    pub fn low_watermark(&self) -> Seq {
        self.stable.seq
    }

    /// Whether the replica operates normally in its view (false: changing view).
    pub fn view_active(&self) -> bool {
        self.view_active
    }

    /// Number of slots held in the log (bounded by the window).
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// The digest this replica sent (or would send again) a COMMIT for at `seq` in
    /// the current view, if any.
    pub fn own_commit(&self, seq: Seq) -> Option<Digest> {
        self.log.get(&seq)?.commits.get(&self.id).copied()
    }

    /// How many client request signatures this replica has verified, alone or in a
    /// batch: in the normal case only the primary verifies them (backups check their
    /// MAC entry).
    pub fn request_signature_checks(&self) -> u64 {
        self.request_signature_checks
    }

    fn n(&self) -> usize {
        self.quorum.n()
    }

    fn primary(&self) -> ReplicaId {
        self.view.primary(self.n())
    }

    fn is_primary(&self) -> bool {
        self.primary() == self.id
    }

    fn low(&self) -> Seq {
        self.stable.seq
    }

    fn high(&self) -> Seq {
        self.low().plus(self.options.window)
    }

    fn in_window(&self, seq: Seq) -> bool {
        seq > self.low() && seq <= self.high()
    }

    fn replica_key(&self, id: ReplicaId) -> Option<&PublicKey> {
        self.keys.replica(id)
    }

    fn on_input(&mut self, input: Input<Message, Timer>, out: &mut Out) {
        if self.halted {
            return;
        }
        match input {
            Input::Start(recovered) => self.on_start(recovered, out),
            Input::Message { from, message } => self.on_message(from, message, out),
            Input::Timer(timer) => self.on_timer(timer, out),
        }
    }

    fn on_message(&mut self, from: NodeId, message: Message, out: &mut Out) {
        let replica = match (from, &message) {
            (NodeId::Client(_), Message::Request(_) | Message::Read(_)) => None,
            (NodeId::Client(_), _) => {
                out.fault(from, "client-sent-replica-message");
                return;
            }
            (NodeId::Replica(r), _) if !self.quorum.is_member(r) => return,
            (NodeId::Replica(r), _) => Some(r),
        };
        let Some(from_replica) = replica else {
            match message {
                Message::Request(request) => self.on_request(from, request, out),
                Message::Read(read) => self.on_read(from, read, out),
                _ => {}
            }
            return;
        };
        match message {
            Message::Request(request) => self.on_request(from, request, out),
            Message::Reply(_) => out.fault(from, "replica-sent-reply-to-replica"),
            Message::Read(_) => out.fault(from, "replica-sent-read"),
            Message::PrePrepare(pp) => self.on_pre_prepare(from_replica, pp, out),
            Message::Prepare(prepare) => self.on_prepare(from_replica, prepare, out),
            Message::Commit(commit) => self.on_commit(from_replica, commit, out),
            Message::Checkpoint(vote) => self.on_checkpoint(from_replica, vote, out),
            Message::CheckpointCert(cert) => self.on_checkpoint_cert(from_replica, cert, out),
            Message::ViewChange(vc) => self.on_view_change(from_replica, vc, out),
            Message::NewView(nv) => self.on_new_view(from_replica, nv, out),
            Message::Status(status) => self.on_status(from_replica, status, out),
            Message::FetchBatch(fetch) => self.on_fetch_batch(from_replica, fetch, out),
            Message::BatchData(data) => self.on_batch_data(from_replica, data, out),
            Message::FetchState(fetch) => self.on_fetch_state(from_replica, fetch, out),
            Message::StateChunk(chunk) => self.on_state_chunk(from_replica, chunk, out),
        }
    }

    fn on_timer(&mut self, timer: Timer, out: &mut Out) {
        match timer {
            Timer::Batch => {
                self.batch_timer_running = false;
                self.propose_batches(true, out);
            }
            Timer::Request => {
                self.request_timer_for = None;
                if self.needs_state {
                    // A replica fetching a checkpoint that a quorum certified is
                    // behind, not blocked by the primary: it waits for the state
                    // rather than start a view change alone, which would shut it out
                    // of the view the others stay in. It still joins one that `f + 1`
                    // others start.
                    self.ensure_request_timer(out);
                } else if self.view_active && !self.pending.is_empty() {
                    self.start_view_change(self.view.next(), out);
                }
            }
            Timer::NewView => self.on_new_view_timeout(out),
            Timer::Status => self.on_status_tick(out),
            Timer::StateTransfer => self.on_transfer_timeout(out),
            Timer::FetchBatch => self.on_fetch_timeout(out),
            Timer::CatchUp => self.on_catch_up_timeout(out),
        }
    }

    /// Whether a normal-case message for `(view, seq)` can be taken now, later (a
    /// view not reached yet, or just above the window), or never (stale, or too far).
    fn admit(&self, view: View, seq: Seq) -> Admission {
        if view > self.view || (view == self.view && !self.view_active) {
            return Admission::Later;
        }
        if view < self.view || seq <= self.low() {
            return Admission::Never;
        }
        if seq > self.high() {
            return if seq <= self.high().plus(self.options.window) {
                Admission::Later
            } else {
                Admission::Never
            };
        }
        Admission::Now
    }

    /// Buffers a normal-case message this replica cannot take yet, keeping at most
    /// `future_messages_per_sender` per sender (the oldest are dropped).
    fn buffer_future(&mut self, from: ReplicaId, message: Message) {
        let cap = self.options.future_messages_per_sender;
        let queue = self.future.entry(from).or_default();
        if queue.len() >= cap {
            queue.pop_front();
        }
        if cap > 0 {
            queue.push_back(message);
        }
    }

    /// Hands buffered messages that became acceptable (a new view was installed, or
    /// the window moved) back to the replica, and drops those that became stale.
    fn replay_future(&mut self, out: &mut Out) {
        let mut ready = Vec::new();
        let mut future = std::mem::take(&mut self.future);
        for (from, queue) in future.iter_mut() {
            queue.retain(|m| {
                let Some((view, seq)) = m.normal_case_slot() else {
                    return false;
                };
                match self.admit(view, seq) {
                    Admission::Now => {
                        ready.push((*from, m.clone()));
                        false
                    }
                    Admission::Later => true,
                    Admission::Never => false,
                }
            });
        }
        future.retain(|_, q| !q.is_empty());
        self.future = future;
        for (from, message) in ready {
            self.on_message(NodeId::Replica(from), message, out);
        }
    }

    /// Internal consistency, checked by the simulator after every input.
    fn assert_invariants(&self) {
        assert!(self.last_executed >= self.low() || self.needs_state);
        if let Some((first, _)) = self.log.first_key_value() {
            assert!(
                *first > self.low(),
                "slot {first} at or below the low watermark"
            );
        }
        if let Some((last, _)) = self.log.last_key_value() {
            assert!(*last <= self.high(), "slot {last} above the high watermark");
        }
        assert!(self.view_active || self.view_change.own.is_some() || self.halted);
        for (seq, slot) in &self.log {
            if let Some(p) = &slot.proposal {
                assert_eq!(p.seq, *seq);
                assert_eq!(p.view, self.view, "proposal of another view kept");
            }
            if let Some(cert) = &slot.prepared {
                assert!(cert.proposal.view <= self.view);
            }
        }
        assert!(
            self.future
                .values()
                .all(|q| q.len() <= self.options.future_messages_per_sender)
        );
        assert!(self.view_change.received.len() <= self.n());
        // Staged requests wait for the batch timer of an active primary (every view
        // change checks them first).
        assert!(
            self.staged.is_empty()
                || (self.view_active && self.is_primary() && self.batch_timer_running)
        );
        assert!(self.staged.len() <= self.options.batch_max_requests);
        if self.view_active && self.is_primary() {
            // A primary proposes only requests whose signature it checked.
            assert!(
                self.pending.iter().all(|p| p.proven),
                "an active primary holds a request whose signature it did not check"
            );
        }
    }
}

impl diffuse_core::protocol::Replica for PbftReplica {
    type Message = Message;
    type Timer = Timer;

    fn handle(&mut self, input: Input<Message, Timer>) -> Actions<Message, Timer> {
        let mut out = Out::new();
        self.on_input(input, &mut out);
        out
    }

    fn view(&self) -> View {
        self.view
    }

    fn check_invariants(&self) {
        self.assert_invariants();
    }

    fn shutdown_writes(&mut self) -> Vec<WriteOp> {
        self.clean_shutdown_writes()
    }
}
