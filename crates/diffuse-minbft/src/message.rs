//! MinBFT's wire messages.
//!
//! Requests, replies and batches are PBFT's (`diffuse_pbft::message`). Every message
//! a replica certifies with its enclave (PREPARE, COMMIT, CHECKPOINT) is a
//! [`Certified`] message: it names its sender, carries a UI, and is processed by
//! every receiver in the sender's counter order (see `docs/protocols/minbft.md`).

use diffuse_core::codec::{BoundedVec, WireMessage};
use diffuse_core::crypto::Digest;
use diffuse_core::crypto::PublicKey;
use diffuse_core::ids::{MAX_REPLICAS, ReplicaId, Seq, View};
use diffuse_core::quorum::{QuorumSystem, ReplicaSet};
use diffuse_pbft::message::{Batch, FetchState, Reply, Request, StateChunk};
use diffuse_tee::{Scope, Ui, verify_scoped_ui};
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

/// A message certified by its sender's enclave, processed in counter order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Certified {
    /// PREPARE.
    Prepare(Prepare),
    /// COMMIT.
    Commit(Commit),
    /// CHECKPOINT.
    Checkpoint(Checkpoint),
}

impl Certified {
    /// The replica whose enclave certified it.
    pub fn sender(&self) -> ReplicaId {
        match self {
            Certified::Prepare(p) => p.replica,
            Certified::Commit(c) => c.replica,
            Certified::Checkpoint(c) => c.replica,
        }
    }

    /// Its UI.
    pub fn ui(&self) -> &Ui {
        match self {
            Certified::Prepare(p) => &p.ui,
            Certified::Commit(c) => &c.ui,
            Certified::Checkpoint(c) => &c.ui,
        }
    }

    /// The scope the UI must certify.
    pub fn scope(&self) -> Scope {
        match self {
            Certified::Prepare(p) => Scope::Slot(p.seq.0),
            Certified::Commit(c) => Scope::Slot(c.prepare.seq.0),
            Certified::Checkpoint(c) => Scope::Checkpoint(c.seq.0),
        }
    }

    /// The digest the UI must certify.
    pub fn certified_digest(&self) -> Digest {
        match self {
            Certified::Prepare(p) => p.reference().certified_digest(),
            Certified::Commit(c) => Commit::certified_digest(c.replica, &c.prepare),
            Certified::Checkpoint(c) => Checkpoint::certified_digest(c.replica, c.seq, &c.state),
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

/// The sender's latest counter value, sent every status interval so that a receiver
/// that lost the sender's last messages (no later one shows the gap) fetches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    /// The counter value of the sender's latest certified message.
    pub last: u64,
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
    /// State transfer: a request for a checkpoint's state.
    FetchState(FetchState),
    /// State transfer: a piece of a checkpoint's state.
    StateChunk(StateChunk),
}

impl WireMessage for Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Request(_) => "request",
            Message::Reply(_) => "reply",
            Message::Certified(Certified::Prepare(_)) => "prepare",
            Message::Certified(Certified::Commit(_)) => "commit",
            Message::Certified(Certified::Checkpoint(_)) => "checkpoint",
            Message::StreamFetch(_) => "stream-fetch",
            Message::StreamHead(_) => "stream-head",
            Message::Stable(_) => "stable-checkpoint",
            Message::FetchState(_) => "fetch-state",
            Message::StateChunk(_) => "state-chunk",
        }
    }
}

impl diffuse_pbft::ClientWire for Message {
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
