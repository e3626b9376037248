//! The MinBFT replica state machine.
//!
//! Split by concern: `normal` (requests, batching, PREPARE / COMMIT, execution),
//! `checkpoint` (checkpoints and log truncation) and this module (start, the
//! enclave, and feeding certified messages through the per-sender streams).

mod checkpoint;
mod normal;
mod rejoin;
mod storage;
mod transfer;
mod view_change;

use crate::message::{Certified, CheckpointCert, Message, Prepare, StreamFetch, StreamHead};
use crate::options::{MinBftOptions, Mutant};
use crate::stream::{Offered, Streams};
use crate::tee_host::EnclaveHandle;
use diffuse_core::app::Application;
use diffuse_core::codec;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{NodeId, ReplicaId, Seq, View};
use diffuse_core::protocol::{Actions, Input, Recovered, WriteOp};
use diffuse_core::quorum::{QuorumSystem, ReplicaSet};
use diffuse_core::service::{ReplicatedService, StateSnapshot};
use diffuse_core::suite::ReplicaSetup;
use diffuse_pbft::pending::Pending;
use diffuse_tee::{Scope, SlotRules, TrustedComponent, Ui};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// The replica's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The primary's batching delay.
    Batch,
    /// Periodic check for stream gaps, answered by fetching the missing messages.
    Status,
    /// No state chunk arrived in time: ask another source.
    StateTransfer,
    /// A pending request waited too long: suspect the primary.
    Request,
    /// A view change (or the wait for its acknowledgements) took too long.
    ViewChange,
}

pub(crate) type Out = Actions<Message, Timer>;

/// What to do with the next message of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Consume it now.
    Consume,
    /// Leave it at the head of its stream until the replica can use it.
    Stall,
}

/// One sequence number's agreement state.
#[derive(Debug, Default)]
struct Slot {
    /// The first PREPARE for this slot in the primary's stream.
    prepare: Option<Prepare>,
    /// Replicas whose certified vote for `prepare` was consumed (the primary's
    /// PREPARE is its vote).
    votes: ReplicaSet,
    committed: bool,
    /// COMMITs consumed before this replica consumed the slot's PREPARE, by sender:
    /// they count once the PREPARE they name is the accepted one.
    early_votes: BTreeMap<ReplicaId, crate::message::PrepareRef>,
    /// The first PREPARE for this slot in the primary's stream was invalid.
    rejected: bool,
    /// `prepare` was taken from a copy, not from the primary's stream: this
    /// replica votes for it when the stream brings it.
    copied: bool,
}

/// A MinBFT replica. Drive it through [`diffuse_core::protocol::Replica::handle`].
pub struct MinBftReplica {
    id: ReplicaId,
    quorum: QuorumSystem,
    keys: Arc<ClusterKeys>,
    options: MinBftOptions,
    service: ReplicatedService,
    /// Set when the replica cannot take part (see `halt`): it then sends nothing.
    halted: bool,
    /// Its enclave, from boot on (see [`EnclaveHandle`]).
    enclave: Option<EnclaveHandle>,
    /// The enclave issued a counter value this replica never asked for: its host
    /// called the enclave itself (a Byzantine host), so its own log has a gap.
    host_took_counters: bool,
    /// Every replica's enclave key, by index.
    enclave_keys: Vec<PublicKey>,

    view: View,
    streams: Streams,
    log: BTreeMap<Seq, Slot>,
    stable: CheckpointCert,
    stable_snapshot: Option<StateSnapshot>,
    last_executed: Seq,
    own_checkpoints: BTreeMap<Seq, StateSnapshot>,
    /// Checkpoint votes above the low watermark: sequence number to votes.
    checkpoint_votes: BTreeMap<Seq, BTreeMap<ReplicaId, crate::message::Checkpoint>>,
    /// As primary: the next sequence number to assign.
    next_seq: Seq,
    pending: Pending,
    batch_timer_running: bool,
    /// Own certified messages not yet garbage-collected, in counter order, for
    /// retransmission (and, with view changes, for VIEW-CHANGE logs).
    sent: VecDeque<Certified>,
    /// Peers whose STREAM-FETCH was answered this status interval: one answer per
    /// peer per interval, so fetches cannot make the replica send without bound.
    fetches_answered: ReplicaSet,
    /// Peers sent this replica's stable certificate this status interval.
    stables_served: ReplicaSet,
    /// Peers sent PREPARE copies this status interval.
    prepares_served: ReplicaSet,
    /// The next slot to execute when the last status tick found it without a
    /// PREPARE while a later slot had votes: PREPAREs are fetched only if it is
    /// still stuck a tick later (in the normal case the PREPARE is just in flight).
    stuck_at: Option<Seq>,
    /// State chunks served per peer this status interval.
    chunks_served: BTreeMap<ReplicaId, u32>,
    /// The state transfer under way, if any.
    transfer: Option<transfer::Transfer>,
    /// The genesis state digest (checkpoint 0).
    genesis: Digest,
    /// Whether the current view's NEW-VIEW was acknowledged by `f + 1` (always for
    /// view 0): only then does the replica vote in it.
    view_active: bool,
    request_timer_running: bool,
    vc: view_change::ViewChangeState,
    /// The bodies of the batches this replica voted for above its stable
    /// checkpoint, for its VIEW-CHANGEs.
    voted_bodies: BTreeMap<(Seq, Digest), diffuse_pbft::message::Batch>,
    rejoin: rejoin::RejoinState,
}

impl MinBftReplica {
    /// Builds a replica that has not started yet; feed it [`Input::Start`] first.
    /// Invalid base options are replaced by the defaults, as PBFT does (the runtime
    /// validates options when it loads a config, so this only protects against
    /// programming errors).
    pub fn new(mut setup: ReplicaSetup<MinBftOptions>, app: Box<dyn Application>) -> Self {
        let quorum = QuorumSystem::trusted(setup.keys.n())
            .expect("ClusterKeys guarantees 1..=MAX_REPLICAS replicas");
        if setup.options.base.validate().is_err() {
            setup.options.base = diffuse_pbft::PbftOptions {
                mutant: setup.options.base.mutant,
                ..diffuse_pbft::PbftOptions::default()
            };
        }
        let service = ReplicatedService::new(app);
        let genesis = service.snapshot();
        let genesis_digest = genesis.digest;
        let window = setup.options.base.window as usize;
        let streams = Streams::new(
            quorum.replicas().filter(|r| *r != setup.id),
            1,
            window.saturating_mul(4).saturating_add(16),
        );
        Self {
            id: setup.id,
            quorum,
            keys: setup.keys,
            service,
            halted: false,
            enclave: None,
            host_took_counters: false,
            enclave_keys: Vec::new(),
            view: View(0),
            streams,
            log: BTreeMap::new(),
            stable: CheckpointCert::genesis(genesis.digest),
            stable_snapshot: Some(genesis),
            last_executed: Seq(0),
            own_checkpoints: BTreeMap::new(),
            checkpoint_votes: BTreeMap::new(),
            next_seq: Seq(1),
            pending: Pending::default(),
            batch_timer_running: false,
            sent: VecDeque::new(),
            fetches_answered: ReplicaSet::new(),
            stables_served: ReplicaSet::new(),
            prepares_served: ReplicaSet::new(),
            stuck_at: None,
            chunks_served: BTreeMap::new(),
            transfer: None,
            genesis: genesis_digest,
            view_active: true,
            request_timer_running: false,
            vc: Default::default(),
            voted_bodies: BTreeMap::new(),
            rejoin: Default::default(),
            options: setup.options,
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
        self.low().plus(self.options.base.window)
    }

    fn slot_rules(&self) -> SlotRules {
        SlotRules {
            checkpoint_interval: self.options.base.checkpoint_interval,
            window: self.options.base.window,
        }
    }

    /// Stops taking part, for a reason written to the trace as a fault of itself.
    fn halt(&mut self, why: &'static str, out: &mut Out) {
        self.halted = true;
        out.fault(self.id, why);
    }

    fn on_start(&mut self, recovered: Recovered, out: &mut Out) {
        let booted = self.options.tee.boot(
            self.id,
            self.n(),
            self.quorum.f() + 1,
            self.slot_rules(),
            &crate::tee_host::client_keys(&self.keys),
        );
        let booted = match booted {
            Ok(booted) => booted,
            Err(_) => return self.halt("enclave-unavailable", out),
        };
        self.enclave_keys = booted.enclave_keys;
        self.enclave = Some(booted.enclave);
        out.set_timer(Timer::Status, self.options.base.status_interval);
        if !recovered.is_empty() {
            if let Err(storage::CorruptStorage(what)) = self.load(&recovered) {
                // Starting without its persisted votes could make this replica's
                // VIEW-CHANGE drop a committed batch: it stays out instead.
                let _ = what;
                return self.halt("corrupt-storage", out);
            }
            if self.last_executed < self.low() {
                self.start_transfer(out);
            }
            if !self.view_active {
                out.set_timer(Timer::ViewChange, self.view_change_timeout());
            }
        }
        if self.is_locked() {
            self.ask_to_rejoin(out);
        }
    }

    /// Whether the enclave refuses to certify (after an unscheduled reboot, until
    /// REJOIN): the replica then consumes nothing, so it loses no vote.
    fn is_locked(&self) -> bool {
        self.with_enclave(|e| e.is_locked()).unwrap_or(true)
    }

    /// Runs `call` in the enclave; `None` before boot.
    fn with_enclave<R>(
        &self,
        call: impl FnOnce(&mut diffuse_tee::SoftwareEnclave) -> R,
    ) -> Option<R> {
        self.enclave.as_ref().map(|e| e.call(call))
    }

    /// Certifies `message` (built from its UI) with this replica's enclave, persists
    /// it, and returns it; `None` if the enclave refuses (locked, or the scope rule).
    fn certify(
        &mut self,
        scope: Scope,
        digest: &Digest,
        build: impl FnOnce(Ui) -> Certified,
        out: &mut Out,
    ) -> Option<Certified> {
        let ui = self
            .with_enclave(|e| e.create_scoped_ui(scope, digest))?
            .ok()?;
        if self
            .sent
            .back()
            .is_some_and(|last| ui.counter != last.counter() + 1)
        {
            self.host_took_counters = true;
            out.fault(self.id, "enclave-counter-taken-by-host");
        }
        let message = build(ui);
        out.persist(vec![WriteOp::Put {
            key: storage::sent_key(ui.counter),
            value: codec::encode_payload(&message),
        }]);
        self.sent.push_back(message.clone());
        Some(message)
    }

    fn on_input(&mut self, input: Input<Message, Timer>, out: &mut Out) {
        if self.halted {
            return;
        }
        match input {
            Input::Start(recovered) => self.on_start(recovered, out),
            Input::Message { from, message } => self.on_message(from, message, out),
            Input::Timer(Timer::Batch) => {
                self.batch_timer_running = false;
                self.propose_batches(true, out);
            }
            Input::Timer(Timer::Status) => self.on_status_tick(out),
            Input::Timer(Timer::StateTransfer) => self.on_transfer_timeout(out),
            Input::Timer(Timer::Request) => {
                self.request_timer_running = false;
                if self.view_active && !self.pending.is_empty() {
                    self.suspect_primary(out);
                }
            }
            Input::Timer(Timer::ViewChange) => {
                if !self.view_active {
                    self.suspect_primary(out);
                }
            }
        }
    }

    fn on_message(&mut self, from: NodeId, message: Message, out: &mut Out) {
        match (from, message) {
            (_, Message::Request(request)) => self.on_request(from, request, out),
            (NodeId::Client(_), _) => out.fault(from, "client-sent-replica-message"),
            (NodeId::Replica(r), _) if !self.quorum.is_member(r) || r == self.id => {}
            (NodeId::Replica(_), Message::Reply(_)) => {
                out.fault(from, "replica-sent-reply-to-replica")
            }
            (NodeId::Replica(r), Message::Certified(certified)) => {
                self.on_certified(r, certified, out)
            }
            (NodeId::Replica(r), Message::StreamFetch(fetch)) => {
                self.on_stream_fetch(r, fetch, out)
            }
            (NodeId::Replica(r), Message::StreamHead(head)) => self.on_stream_head(r, head, out),
            (NodeId::Replica(r), Message::Stable(cert)) => self.on_stable_cert(r, cert, out),
            (NodeId::Replica(r), Message::FetchStable(low)) => self.on_fetch_stable(r, low, out),
            (NodeId::Replica(r), Message::FetchState(fetch)) => self.on_fetch_state(r, fetch, out),
            (NodeId::Replica(r), Message::StateChunk(chunk)) => self.on_state_chunk(r, chunk, out),
            (NodeId::Replica(r), Message::ReqViewChange(req)) => {
                self.on_req_view_change(r, req, out)
            }
            (NodeId::Replica(r), Message::FetchNewView(view)) => {
                self.on_fetch_new_view(r, view, out)
            }
            (NodeId::Replica(r), Message::NewViewProof(proof)) => {
                self.on_new_view_proof(r, *proof, out)
            }
            (NodeId::Replica(r), Message::FetchViewChanges(fetch)) => {
                self.on_fetch_view_changes(r, fetch, out)
            }
            (NodeId::Replica(r), Message::ViewChangeCopy(vc)) => {
                self.on_view_change_copy(r, *vc, out)
            }
            (NodeId::Replica(r), Message::Rejoin(challenge)) => self.on_rejoin(r, challenge, out),
            (NodeId::Replica(r), Message::RejoinReport(report)) => {
                self.on_rejoin_report(r, *report, out)
            }
            (NodeId::Replica(r), Message::FetchPrepares(seq)) => {
                self.on_fetch_prepares(r, seq, out)
            }
            (NodeId::Replica(r), Message::PrepareCopy(prepare)) => {
                self.on_prepare_copy(r, *prepare, out)
            }
        }
    }

    /// Verifies a certified message's UI (recording it in the enclave, which is what
    /// a REJOIN report vouches for), queues it in its sender's stream, and consumes
    /// whatever is in line.
    fn on_certified(&mut self, from: ReplicaId, message: Certified, out: &mut Out) {
        if message.sender() != from {
            return out.fault(from, "certified-message-of-another-replica");
        }
        let Some(key) = self.enclave_keys.get(from.index()).copied() else {
            return;
        };
        let (scope, digest, ui) = (message.scope(), message.certified_digest(), *message.ui());
        if self
            .streams
            .next_expected(from)
            .is_some_and(|next| ui.counter < next)
        {
            return; // a retransmission of something consumed already
        }
        if !self
            .with_enclave(|e| e.accept_ui(&key, scope, &digest, &ui))
            .unwrap_or(false)
        {
            return out.fault(from, "bad-ui");
        }
        if self.options.is(Mutant::NoContinuityCheck) {
            return self.consume(message, out);
        }
        if self.streams.offer(message) == Offered::Dropped {
            return;
        }
        self.drain_streams(out);
    }

    /// Consumes every stream's messages that are in line and usable, until none is.
    fn drain_streams(&mut self, out: &mut Out) {
        if self.is_locked() {
            return;
        }
        loop {
            let mut progressed = false;
            let senders: Vec<ReplicaId> = self.streams.senders().collect();
            for sender in senders {
                let low = self.low();
                let base = &self.options.base;
                let reach = base.window.saturating_sub(base.checkpoint_interval);
                self.streams.skip_to(sender, |m| {
                    matches!(m, Certified::Checkpoint(c) if c.seq.0.saturating_add(reach) <= low.0)
                });
                while let Some(next) = self.streams.peek(sender) {
                    if self.admit(next) == Next::Stall {
                        break;
                    }
                    let message = self.streams.pop(sender).expect("peeked above");
                    self.consume(message, out);
                    progressed = true;
                }
            }
            if !progressed || self.halted {
                return;
            }
        }
    }

    /// Whether `view` lies between the current view and the one this replica has
    /// sent a VIEW-CHANGE for: it will never enter it, so its messages are stale.
    pub(super) fn skipped_view(&self, view: View) -> bool {
        view > self.view && self.vc.target.is_some_and(|target| view < target)
    }

    /// Whether the replica can use a stream's next message now.
    fn admit(&self, message: &Certified) -> Next {
        let slot_admission = |view: View, seq: Seq| {
            // Entered but not acknowledged yet: wait. Leaving the view (a VIEW-CHANGE
            // sent): consume, so the streams reach the VIEW-CHANGEs behind.
            let entering = view == self.view && !self.view_active && self.vc.target.is_none();
            if self.skipped_view(view) {
                Next::Consume
            } else if view > self.view || entering || seq > self.high() {
                Next::Stall
            } else {
                Next::Consume
            }
        };
        match message {
            Certified::Prepare(p) => slot_admission(p.view, p.seq),
            // A COMMIT whose PREPARE has not been consumed yet is kept in its slot
            // until it is (`Slot::early_votes`): stalling here would let a primary
            // that sends its PREPARE to some replicas only block the others'
            // streams, and with them their VIEW-CHANGEs.
            Certified::Commit(c) => slot_admission(c.prepare.view, c.prepare.seq),
            Certified::Checkpoint(_) | Certified::ViewChange(_) => Next::Consume,
            Certified::NewView(nv)
                if nv.view > self.view
                    && !self.skipped_view(nv.view)
                    && self.new_view_waits(nv) =>
            {
                Next::Stall
            }
            Certified::NewView(_) => Next::Consume,
            Certified::NewViewAck(ack) if ack.view > self.view && !self.skipped_view(ack.view) => {
                Next::Stall
            }
            Certified::NewViewAck(_) => Next::Consume,
        }
    }

    fn consume(&mut self, message: Certified, out: &mut Out) {
        match message {
            Certified::Prepare(prepare) => self.on_prepare(prepare, out),
            Certified::Commit(commit) => self.on_commit(commit, out),
            Certified::Checkpoint(checkpoint) => self.on_checkpoint(checkpoint, out),
            Certified::ViewChange(vc) => self.on_view_change(*vc, out),
            Certified::NewView(nv) => self.on_new_view(nv, out),
            Certified::NewViewAck(ack) => self.on_new_view_ack(ack, out),
        }
    }

    /// Every status interval: ask each sender whose stream has a gap to resend,
    /// and tell every peer this replica's latest counter value.
    fn on_status_tick(&mut self, out: &mut Out) {
        self.fetches_answered = ReplicaSet::new();
        self.stables_served = ReplicaSet::new();
        self.prepares_served = ReplicaSet::new();
        self.chunks_served.clear();
        self.vc.proofs_served.clear();
        self.vc.copies_served.clear();
        self.rejoin.reports_served = ReplicaSet::new();
        if self.is_locked() {
            self.ask_to_rejoin(out);
        }
        self.fetch_missing_view_changes(out);
        self.fetch_stable_beyond_window(out);
        self.fetch_withheld_prepares(out);
        let gaps: Vec<(ReplicaId, u64)> = self.streams.gaps().collect();
        for (sender, from) in gaps {
            out.send(sender, Message::StreamFetch(StreamFetch { from }));
        }
        if let Some(last) = self.sent.back() {
            out.broadcast(Message::StreamHead(StreamHead {
                last: last.counter(),
                view: self.view,
            }));
        }
        out.set_timer(Timer::Status, self.options.base.status_interval);
    }

    /// A peer's latest counter value: fetch what is missing if nothing held shows
    /// the gap already (that case is fetched on the status tick).
    fn on_stream_head(&mut self, from: ReplicaId, head: StreamHead, out: &mut Out) {
        self.maybe_fetch_view(from, head.view, out);
        let Some(next) = self.streams.next_expected(from) else {
            return;
        };
        if next <= head.last && self.streams.held(from) == 0 {
            out.send(from, Message::StreamFetch(StreamFetch { from: next }));
        }
    }

    /// Resends own certified messages from `fetch.from` on: at most one hold-back
    /// queue's worth, and one answer per peer per status interval. If some of them
    /// were collected, the stable checkpoint certificate goes first: the receiver
    /// needs it to re-anchor the stream (see `transfer`).
    fn on_stream_fetch(&mut self, from: ReplicaId, fetch: StreamFetch, out: &mut Out) {
        if !self.fetches_answered.insert(from) {
            return;
        }
        if self.sent.front().is_some_and(|m| m.counter() > fetch.from) && self.low() > Seq(0) {
            out.send(from, Message::Stable(self.stable.clone()));
        }
        let capacity = self.streams.capacity();
        for message in self
            .sent
            .iter()
            .filter(|m| m.counter() >= fetch.from)
            .take(capacity)
        {
            out.send(from, Message::Certified(message.clone()));
        }
    }

    /// Internal consistency, checked by the simulator after every input.
    fn assert_invariants(&self) {
        assert!(self.transfer.is_some() || self.last_executed >= self.low());
        if let Some((first, _)) = self.log.first_key_value() {
            assert!(
                *first > self.low(),
                "slot {first} at or below the low watermark"
            );
        }
        for sender in self.streams.senders() {
            assert!(self.streams.held(sender) <= self.streams.capacity());
        }
        let counters: Vec<u64> = self.sent.iter().map(Certified::counter).collect();
        assert!(
            self.host_took_counters || counters.windows(2).all(|w| w[0] + 1 == w[1]),
            "own log has a gap"
        );
    }
}

impl diffuse_core::protocol::Replica for MinBftReplica {
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

    /// Seals the enclave (FastBFT §6.1's scheduled shutdown), so that the next
    /// start resumes it unlocked, with no REJOIN. Every message it certified is
    /// persisted already: `certify` persists before the message leaves.
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

    fn check_invariants(&self) {
        self.assert_invariants();
    }
}
