//! MinBFT's wire messages.
//!
//! Requests, replies and batches are PBFT's (`diffuse_pbft::message`). Every message
//! a replica certifies with its enclave (PREPARE, COMMIT, CHECKPOINT) is a
//! [`Certified`] message: it names its sender, carries a UI, and is processed by
//! every receiver in the sender's counter order (see `docs/protocols/minbft.md`).

use diffuse_core::codec::{BoundedVec, WireMessage};
use diffuse_core::crypto::{Digest, PublicKey, Signed};
use diffuse_core::ids::{MAX_REPLICAS, ReplicaId, Seq, View};
use diffuse_core::quorum::{QuorumSystem, ReplicaSet};
use diffuse_pbft::message::{Batch, FetchState, Reply, Request, StateChunk};
use diffuse_tee::{CounterReport, Scope, Ui, verify_scoped_ui};
use serde::{Deserialize, Serialize};

/// PREPARE: the primary assigns `batch` to `seq` in `view`; also its commit vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// The primary of `view`.
    pub replica: ReplicaId,
    /// The view.
    pub view: View,
    /// The sequence number.
    pub seq: Seq,
    /// The requests.
    pub batch: Batch,
    /// The primary's UI, scope `Slot(seq)`, over [`PrepareRef::certified_digest`].
    pub ui: Ui,
}

/// A PREPARE without its batch: what a COMMIT points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRef {
    /// The primary.
    pub replica: ReplicaId,
    /// The view.
    pub view: View,
    /// The sequence number.
    pub seq: Seq,
    /// The batch digest.
    pub digest: Digest,
    /// The primary's UI.
    pub ui: Ui,
}

impl PrepareRef {
    /// The digest the primary's UI certifies.
    pub fn certified_digest(&self) -> Digest {
        Prepare::certified_digest(self.replica, self.view, self.seq, &self.digest)
    }
}

impl Prepare {
    /// The digest the primary's UI certifies for `batch` at `(view, seq)`.
    pub fn certified_digest(replica: ReplicaId, view: View, seq: Seq, batch: &Digest) -> Digest {
        Digest::of_value("diffuse/minbft/prepare", &(replica, view, seq, batch))
    }

    /// The reference a COMMIT carries.
    pub fn reference(&self) -> PrepareRef {
        PrepareRef {
            replica: self.replica,
            view: self.view,
            seq: self.seq,
            digest: self.batch.digest(),
            ui: self.ui,
        }
    }
}

/// COMMIT: the sender accepted the primary's PREPARE `prepare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The sender.
    pub replica: ReplicaId,
    /// The PREPARE accepted.
    pub prepare: PrepareRef,
    /// The sender's UI, scope `Slot(seq)`, over [`Commit::certified_digest`].
    pub ui: Ui,
}

impl Commit {
    /// The digest the sender's UI certifies.
    pub fn certified_digest(replica: ReplicaId, prepare: &PrepareRef) -> Digest {
        Digest::of_value("diffuse/minbft/commit", &(replica, prepare))
    }
}

/// CHECKPOINT: the sender's state digest after executing `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The sender.
    pub replica: ReplicaId,
    /// The checkpoint's sequence number (a multiple of the interval).
    pub seq: Seq,
    /// Digest of the replicated state after executing `seq`.
    pub state: Digest,
    /// The sender's UI, scope `Checkpoint(seq)`, over [`Checkpoint::certified_digest`].
    pub ui: Ui,
}

impl Checkpoint {
    /// The digest the sender's UI certifies.
    pub fn certified_digest(replica: ReplicaId, seq: Seq, state: &Digest) -> Digest {
        Digest::of_value("diffuse/minbft/checkpoint", &(replica, seq, state))
    }
}

/// A stable checkpoint: `f + 1` matching CHECKPOINTs (none for the genesis, seq 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCert {
    /// The checkpoint's sequence number.
    pub seq: Seq,
    /// The certified state digest.
    pub state: Digest,
    /// The votes.
    pub votes: BoundedVec<Checkpoint, MAX_REPLICAS>,
}

impl CheckpointCert {
    /// The genesis checkpoint (sequence number 0), which needs no votes.
    pub fn genesis(state: Digest) -> Self {
        CheckpointCert {
            seq: Seq(0),
            state,
            votes: BoundedVec::default(),
        }
    }

    /// Whether `f + 1` distinct replicas' enclaves certified this checkpoint
    /// (`enclave_keys` by replica index). The genesis is checked by the caller.
    pub fn is_valid(&self, quorum: &QuorumSystem, enclave_keys: &[PublicKey]) -> bool {
        let mut voters = ReplicaSet::new();
        for vote in self.votes.iter() {
            let Some(key) = enclave_keys.get(vote.replica.index()) else {
                return false;
            };
            let digest = Checkpoint::certified_digest(vote.replica, vote.seq, &vote.state);
            if vote.seq != self.seq
                || vote.state != self.state
                || !quorum.is_member(vote.replica)
                || !voters.insert(vote.replica)
                || !verify_scoped_ui(key, Scope::Checkpoint(self.seq.0), &digest, &vote.ui)
            {
                return false;
            }
        }
        quorum.is_quorum(&voters)
    }
}

/// Entries of a VIEW-CHANGE's log.
pub const MAX_VIEW_CHANGE_LOG: usize = 16_384;
/// Batch bodies in a VIEW-CHANGE.
pub const MAX_VIEW_CHANGE_BATCHES: usize = 4_096;
/// NEW-VIEW proofs in a VIEW-CHANGE (views with evidence above its checkpoint).
pub const MAX_VIEW_CHANGE_PROOFS: usize = 256;
/// Decisions in a NEW-VIEW (at most the window).
pub const MAX_DECISIONS: usize = 4_096;

/// One message of a VIEW-CHANGE's log: what the sender certified, without batch
/// bodies, and messages of the `Free` scope reduced to their digest (enough to
/// check the UI and the counter's continuity; their content is not evidence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEntry {
    /// The sender's PREPARE, without its batch.
    Prepare(PrepareRef),
    /// The sender's COMMIT.
    Commit(Commit),
    /// The sender's CHECKPOINT.
    Checkpoint(Checkpoint),
    /// A VIEW-CHANGE, NEW-VIEW or NEW-VIEW-ACK of the sender.
    Free {
        /// The certified digest.
        digest: Digest,
        /// Its UI.
        ui: Ui,
    },
}

impl LogEntry {
    /// The entry for a certified message.
    pub fn of(message: &Certified) -> LogEntry {
        match message {
            Certified::Prepare(p) => LogEntry::Prepare(p.reference()),
            Certified::Commit(c) => LogEntry::Commit(*c),
            Certified::Checkpoint(c) => LogEntry::Checkpoint(*c),
            Certified::ViewChange(_) | Certified::NewView(_) | Certified::NewViewAck(_) => {
                LogEntry::Free {
                    digest: message.certified_digest(),
                    ui: *message.ui(),
                }
            }
        }
    }

    /// Its UI.
    pub fn ui(&self) -> &Ui {
        match self {
            LogEntry::Prepare(p) => &p.ui,
            LogEntry::Commit(c) => &c.ui,
            LogEntry::Checkpoint(c) => &c.ui,
            LogEntry::Free { ui, .. } => ui,
        }
    }

    /// Whether `sender`'s enclave (key `key`) certified it.
    pub fn is_certified_by(&self, sender: ReplicaId, key: &PublicKey) -> bool {
        let (replica, scope, digest) = match self {
            LogEntry::Prepare(p) => (p.replica, Scope::Slot(p.seq.0), p.certified_digest()),
            LogEntry::Commit(c) => (
                c.replica,
                Scope::Slot(c.prepare.seq.0),
                Commit::certified_digest(c.replica, &c.prepare),
            ),
            LogEntry::Checkpoint(c) => (
                c.replica,
                Scope::Checkpoint(c.seq.0),
                Checkpoint::certified_digest(c.replica, c.seq, &c.state),
            ),
            LogEntry::Free { digest, .. } => (sender, Scope::Free, *digest),
        };
        replica == sender && verify_scoped_ui(key, scope, &digest, self.ui())
    }

    /// The PREPARE this entry is a vote for, if it is a vote.
    pub fn vote(&self) -> Option<&PrepareRef> {
        match self {
            LogEntry::Prepare(p) => Some(p),
            LogEntry::Commit(c) => Some(&c.prepare),
            _ => None,
        }
    }
}

/// VIEW-CHANGE: the sender leaves its view for `view` and shows everything it
/// certified since its anchor, so that its votes cannot be hidden.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// The sender.
    pub replica: ReplicaId,
    /// The view the sender moves to.
    pub view: View,
    /// The sender's stable checkpoint.
    pub stable: CheckpointCert,
    /// The sender's own CHECKPOINT the log starts after (`None`: from counter 1).
    pub anchor: Option<Checkpoint>,
    /// Every message the sender certified after the anchor and before this one.
    pub log: BoundedVec<LogEntry, MAX_VIEW_CHANGE_LOG>,
    /// The bodies of the batches its votes above `stable` are for.
    pub batches: BoundedVec<Batch, MAX_VIEW_CHANGE_BATCHES>,
    /// The certified NEW-VIEW of every view `> 0` its votes above `stable` are in.
    pub proofs: BoundedVec<NewViewProof, MAX_VIEW_CHANGE_PROOFS>,
    /// The sender's UI, scope `Free`.
    pub ui: Ui,
}

/// A VIEW-CHANGE before its sender's enclave certified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChangeDraft {
    /// See [`ViewChange::replica`].
    pub replica: ReplicaId,
    /// See [`ViewChange::view`].
    pub view: View,
    /// See [`ViewChange::stable`].
    pub stable: CheckpointCert,
    /// See [`ViewChange::anchor`].
    pub anchor: Option<Checkpoint>,
    /// See [`ViewChange::log`].
    pub log: BoundedVec<LogEntry, MAX_VIEW_CHANGE_LOG>,
    /// See [`ViewChange::batches`].
    pub batches: BoundedVec<Batch, MAX_VIEW_CHANGE_BATCHES>,
    /// See [`ViewChange::proofs`].
    pub proofs: BoundedVec<NewViewProof, MAX_VIEW_CHANGE_PROOFS>,
}

impl ViewChangeDraft {
    /// The digest the sender's UI certifies.
    pub fn certified_digest(&self) -> Digest {
        Digest::of_value("diffuse/minbft/view-change", self)
    }

    /// The VIEW-CHANGE with its UI.
    pub fn certified(self, ui: Ui) -> ViewChange {
        ViewChange {
            replica: self.replica,
            view: self.view,
            stable: self.stable,
            anchor: self.anchor,
            log: self.log,
            batches: self.batches,
            proofs: self.proofs,
            ui,
        }
    }
}

impl ViewChange {
    /// The digest the sender's UI certifies.
    pub fn certified_digest(&self) -> Digest {
        #[derive(Serialize)]
        struct Draft<'a> {
            replica: ReplicaId,
            view: View,
            stable: &'a CheckpointCert,
            anchor: &'a Option<Checkpoint>,
            log: &'a BoundedVec<LogEntry, MAX_VIEW_CHANGE_LOG>,
            batches: &'a BoundedVec<Batch, MAX_VIEW_CHANGE_BATCHES>,
            proofs: &'a BoundedVec<NewViewProof, MAX_VIEW_CHANGE_PROOFS>,
        }
        Digest::of_value(
            "diffuse/minbft/view-change",
            &Draft {
                replica: self.replica,
                view: self.view,
                stable: &self.stable,
                anchor: &self.anchor,
                log: &self.log,
                batches: &self.batches,
                proofs: &self.proofs,
            },
        )
    }
}

/// Which VIEW-CHANGE a NEW-VIEW is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChangeRef {
    /// Its sender.
    pub replica: ReplicaId,
    /// Its UI's counter value.
    pub counter: u64,
    /// Its certified digest.
    pub digest: Digest,
}

/// NEW-VIEW: the new primary's decision, which every replica recomputes from the
/// `f + 1` VIEW-CHANGEs it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// The new primary.
    pub replica: ReplicaId,
    /// The new view.
    pub view: View,
    /// The highest stable checkpoint among the VIEW-CHANGEs.
    pub base: Seq,
    /// The batch digest re-proposed at `base + 1`, `base + 2`, ...
    pub decisions: BoundedVec<Digest, MAX_DECISIONS>,
    /// The VIEW-CHANGEs decided from.
    pub view_changes: BoundedVec<ViewChangeRef, MAX_REPLICAS>,
    /// The new primary's UI, scope `Free`.
    pub ui: Ui,
}

impl NewView {
    /// The digest the primary's UI certifies.
    pub fn certified_digest(&self) -> Digest {
        Self::digest_of(
            self.replica,
            self.view,
            self.base,
            &self.decisions,
            &self.view_changes,
        )
    }

    /// [`NewView::certified_digest`] of a NEW-VIEW not certified yet.
    pub fn digest_of(
        replica: ReplicaId,
        view: View,
        base: Seq,
        decisions: &BoundedVec<Digest, MAX_DECISIONS>,
        view_changes: &BoundedVec<ViewChangeRef, MAX_REPLICAS>,
    ) -> Digest {
        Digest::of_value(
            "diffuse/minbft/new-view",
            &(replica, view, base, decisions, view_changes),
        )
    }

    /// The decision at `seq`, if `seq` is re-proposed.
    pub fn decision(&self, seq: Seq) -> Option<Digest> {
        let index = seq.0.checked_sub(self.base.0.checked_add(1)?)?;
        self.decisions.get(usize::try_from(index).ok()?).copied()
    }

    /// The highest re-proposed sequence number (`base` if none).
    pub fn last_decided(&self) -> Seq {
        self.base.plus(self.decisions.len() as u64)
    }
}

/// NEW-VIEW-ACK: the sender checked the NEW-VIEW (recomputed its decision) and
/// entered the view. `f + 1` of them make the NEW-VIEW a proof others can check
/// without its VIEW-CHANGEs: one of the signers is correct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewViewAck {
    /// The sender.
    pub replica: ReplicaId,
    /// The view.
    pub view: View,
    /// The NEW-VIEW's certified digest.
    pub new_view: Digest,
    /// The sender's UI, scope `Free`.
    pub ui: Ui,
}

impl NewViewAck {
    /// The digest the sender's UI certifies.
    pub fn certified_digest(replica: ReplicaId, view: View, new_view: &Digest) -> Digest {
        Digest::of_value("diffuse/minbft/new-view-ack", &(replica, view, new_view))
    }
}

/// A NEW-VIEW with `f + 1` acknowledgements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewViewProof {
    /// The NEW-VIEW.
    pub new_view: NewView,
    /// The acknowledgements.
    pub acks: BoundedVec<NewViewAck, MAX_REPLICAS>,
}

impl NewViewProof {
    /// Whether the primary of the view certified the NEW-VIEW and `f + 1` distinct
    /// replicas acknowledged it.
    pub fn is_valid(&self, quorum: &QuorumSystem, enclave_keys: &[PublicKey]) -> bool {
        let nv = &self.new_view;
        let digest = nv.certified_digest();
        let primary_ok = nv.replica == nv.view.primary(quorum.n())
            && enclave_keys
                .get(nv.replica.index())
                .is_some_and(|key| verify_scoped_ui(key, Scope::Free, &digest, &nv.ui));
        if !primary_ok {
            return false;
        }
        let mut ackers = ReplicaSet::new();
        for ack in self.acks.iter() {
            let Some(key) = enclave_keys.get(ack.replica.index()) else {
                return false;
            };
            let ack_digest = NewViewAck::certified_digest(ack.replica, ack.view, &ack.new_view);
            if ack.view != nv.view
                || ack.new_view != digest
                || !quorum.is_member(ack.replica)
                || !ackers.insert(ack.replica)
                || !verify_scoped_ui(key, Scope::Free, &ack_digest, &ack.ui)
            {
                return false;
            }
        }
        quorum.is_quorum(&ackers)
    }
}

/// REQ-VIEW-CHANGE: the sender suspects the primary and asks to move to `view`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReqViewChange {
    /// The view asked for.
    pub view: View,
}

/// A message certified by its sender's enclave, processed in counter order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Certified {
    /// PREPARE.
    Prepare(Prepare),
    /// COMMIT.
    Commit(Commit),
    /// CHECKPOINT.
    Checkpoint(Checkpoint),
    /// VIEW-CHANGE.
    ViewChange(Box<ViewChange>),
    /// NEW-VIEW.
    NewView(NewView),
    /// NEW-VIEW-ACK.
    NewViewAck(NewViewAck),
}

impl Certified {
    /// The replica whose enclave certified it.
    pub fn sender(&self) -> ReplicaId {
        match self {
            Certified::Prepare(p) => p.replica,
            Certified::Commit(c) => c.replica,
            Certified::Checkpoint(c) => c.replica,
            Certified::ViewChange(v) => v.replica,
            Certified::NewView(v) => v.replica,
            Certified::NewViewAck(a) => a.replica,
        }
    }

    /// Its UI.
    pub fn ui(&self) -> &Ui {
        match self {
            Certified::Prepare(p) => &p.ui,
            Certified::Commit(c) => &c.ui,
            Certified::Checkpoint(c) => &c.ui,
            Certified::ViewChange(v) => &v.ui,
            Certified::NewView(v) => &v.ui,
            Certified::NewViewAck(a) => &a.ui,
        }
    }

    /// The scope the UI must certify.
    pub fn scope(&self) -> Scope {
        match self {
            Certified::Prepare(p) => Scope::Slot(p.seq.0),
            Certified::Commit(c) => Scope::Slot(c.prepare.seq.0),
            Certified::Checkpoint(c) => Scope::Checkpoint(c.seq.0),
            Certified::ViewChange(_) | Certified::NewView(_) | Certified::NewViewAck(_) => {
                Scope::Free
            }
        }
    }

    /// The digest the UI must certify.
    pub fn certified_digest(&self) -> Digest {
        match self {
            Certified::Prepare(p) => p.reference().certified_digest(),
            Certified::Commit(c) => Commit::certified_digest(c.replica, &c.prepare),
            Certified::Checkpoint(c) => Checkpoint::certified_digest(c.replica, c.seq, &c.state),
            Certified::ViewChange(v) => v.certified_digest(),
            Certified::NewView(v) => v.certified_digest(),
            Certified::NewViewAck(a) => {
                NewViewAck::certified_digest(a.replica, a.view, &a.new_view)
            }
        }
    }

    /// The counter value of its UI.
    pub fn counter(&self) -> u64 {
        self.ui().counter
    }
}

/// Asks a replica to resend its certified messages from counter `from` on (it
/// missed some: a gap it cannot close otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamFetch {
    /// The first counter value wanted.
    pub from: u64,
}

/// The sender's latest counter value and view, sent every status interval so that
/// a receiver that lost the sender's last messages (no later one shows the gap)
/// fetches them, and one that missed a view asks for its proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    /// The counter value of the sender's latest certified message.
    pub last: u64,
    /// The sender's current view (active).
    pub view: View,
}

/// A request for the VIEW-CHANGEs of `view`'s NEW-VIEW that these senders certified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchViewChanges {
    /// The view whose NEW-VIEW names them.
    pub view: View,
    /// The senders whose VIEW-CHANGEs are missing.
    pub missing: BoundedVec<ReplicaId, MAX_REPLICAS>,
}

/// Every MinBFT message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Client to replicas (or forwarded by a backup to the primary).
    Request(Request),
    /// Replica to client.
    Reply(Reply),
    /// An enclave-certified replica message.
    Certified(Certified),
    /// Retransmission request for a sender's certified messages.
    StreamFetch(StreamFetch),
    /// The sender's latest counter value.
    StreamHead(StreamHead),
    /// The sender's stable checkpoint: sent before a retransmission that starts
    /// above what the receiver asked for (the sender collected those messages), so
    /// that the receiver can catch up by state transfer and re-anchor the stream.
    Stable(CheckpointCert),
    /// The sender's stable checkpoint; asks for the receiver's if it is higher
    /// (answered with [`Message::Stable`]). Sent by a replica whose stream of the
    /// receiver stalls beyond its window: it missed the checkpoints in between.
    FetchStable(Seq),
    /// State transfer: a request for a checkpoint's state.
    FetchState(FetchState),
    /// State transfer: a piece of a checkpoint's state.
    StateChunk(StateChunk),
    /// The sender suspects the primary.
    ReqViewChange(ReqViewChange),
    /// Asks for the proof of a view the receiver announced (it fell behind it).
    FetchNewView(View),
    /// A view's certified NEW-VIEW, for a replica that missed it.
    NewViewProof(Box<NewViewProof>),
    /// Asks the new primary for VIEW-CHANGEs its NEW-VIEW names that never came
    /// through their senders' streams (a Byzantine sender can send its VIEW-CHANGE
    /// to the primary only).
    FetchViewChanges(FetchViewChanges),
    /// A VIEW-CHANGE a NEW-VIEW names, sent outside its sender's stream (it is
    /// self-certifying: enclave UI, stable certificate, and the log since it).
    ViewChangeCopy(Box<ViewChange>),
    /// REJOIN: the sender's enclave is locked after an unscheduled reboot; asks for
    /// a report of its counter bound to this challenge.
    Rejoin(Digest),
    /// The receiver's enclave's report on the sender's counter, for its REJOIN.
    RejoinReport(Box<Signed<CounterReport>>),
    /// Asks a replica that voted in a slot this one cannot execute up to for the
    /// PREPAREs it accepted from this slot on (its stable certificate first if it
    /// collected the slot): the primary may have sent them to some only.
    FetchPrepares(Seq),
    /// A PREPARE sent outside the primary's stream, in answer to
    /// [`Message::FetchPrepares`].
    PrepareCopy(Box<Prepare>),
}

impl WireMessage for Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Request(_) => "request",
            Message::Reply(_) => "reply",
            Message::Certified(Certified::Prepare(_)) => "prepare",
            Message::Certified(Certified::Commit(_)) => "commit",
            Message::Certified(Certified::Checkpoint(_)) => "checkpoint",
            Message::Certified(Certified::ViewChange(_)) => "view-change",
            Message::Certified(Certified::NewView(_)) => "new-view",
            Message::Certified(Certified::NewViewAck(_)) => "new-view-ack",
            Message::ReqViewChange(_) => "req-view-change",
            Message::FetchNewView(_) => "fetch-new-view",
            Message::NewViewProof(_) => "new-view-proof",
            Message::FetchViewChanges(_) => "fetch-view-changes",
            Message::ViewChangeCopy(_) => "view-change-copy",
            Message::Rejoin(_) => "rejoin",
            Message::RejoinReport(_) => "rejoin-report",
            Message::FetchPrepares(_) => "fetch-prepares",
            Message::PrepareCopy(_) => "prepare-copy",
            Message::StreamFetch(_) => "stream-fetch",
            Message::StreamHead(_) => "stream-head",
            Message::Stable(_) => "stable-checkpoint",
            Message::FetchStable(_) => "fetch-stable",
            Message::FetchState(_) => "fetch-state",
            Message::StateChunk(_) => "state-chunk",
        }
    }

    fn is_client_request(&self) -> bool {
        matches!(self, Message::Request(_))
    }

    fn client(&self) -> Option<diffuse_core::ids::ClientId> {
        match self {
            Message::Request(request) => Some(request.client),
            Message::Reply(reply) => Some(reply.client),
            _ => None,
        }
    }
}

impl diffuse_pbft::ClientWire for Message {
    /// MinBFT checks every request's signature (its view change judges batches by a
    /// rule every replica must evaluate alike; see `docs/protocols/minbft.md`), so
    /// its clients send no authenticator.
    const AUTHENTICATORS: bool = false;

    fn request(request: Request) -> Self {
        Message::Request(request)
    }

    fn into_reply(self) -> Option<Reply> {
        match self {
            Message::Reply(reply) => Some(reply),
            _ => None,
        }
    }
}
