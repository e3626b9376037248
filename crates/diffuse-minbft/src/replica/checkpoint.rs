//! Checkpoints: each replica certifies its state digest every checkpoint interval;
//! `f + 1` matching ones are stable and truncate the log below them.

use super::{MinBftReplica, Out};
use crate::message::{Certified, Checkpoint, CheckpointCert};
use diffuse_core::codec::BoundedVec;
use diffuse_core::ids::Seq;
use diffuse_core::protocol::{Observation, WriteOp};
use diffuse_core::quorum::ReplicaSet;

/// Checkpoints above the window whose votes are kept too (a peer slightly ahead).
const CHECKPOINTS_BEYOND_WINDOW: usize = 4;

impl MinBftReplica {
    pub(super) fn take_checkpoint(&mut self, seq: Seq, out: &mut Out) {
        let snapshot = self.service.snapshot();
        out.observe(Observation::Checkpoint {
            seq,
            state: snapshot.digest,
            app: snapshot.app_digest,
        });
        let state = snapshot.digest;
        out.persist(vec![Self::checkpoint_write(seq, &snapshot)]);
        self.own_checkpoints.insert(seq, snapshot);
        self.certify_checkpoint(seq, state, out);
    }

    pub(super) fn on_checkpoint(&mut self, checkpoint: Checkpoint, out: &mut Out) {
        if checkpoint.seq <= self.low() {
            return;
        }
        let votes = self.checkpoint_votes.entry(checkpoint.seq).or_default();
        votes.insert(checkpoint.replica, checkpoint);
        let base = &self.options.base;
        let kept =
            (base.window / base.checkpoint_interval.max(1)) as usize + CHECKPOINTS_BEYOND_WINDOW;
        while self.checkpoint_votes.len() > kept {
            self.checkpoint_votes.pop_last();
        }
        self.try_stabilize(checkpoint.seq, out);
    }

    /// A checkpoint is stable once `f + 1` votes match a state this replica holds
    /// (it executed that far); catching up to a certified state it does not hold is
    /// state transfer, the next step.
    fn try_stabilize(&mut self, seq: Seq, out: &mut Out) {
        let Some(snapshot) = self.own_checkpoints.get(&seq).cloned() else {
            return;
        };
        let Some(votes) = self.checkpoint_votes.get(&seq) else {
            return;
        };
        let matching: Vec<Checkpoint> = votes
            .values()
            .filter(|v| v.state == snapshot.digest)
            .copied()
            .collect();
        let voters: ReplicaSet = matching.iter().map(|v| v.replica).collect();
        if !self.quorum.is_quorum(&voters) {
            return;
        }
        self.stable = CheckpointCert {
            seq,
            state: snapshot.digest,
            votes: BoundedVec::truncating(matching),
        };
        self.stable_snapshot = Some(snapshot);
        self.log = self.log.split_off(&seq.next());
        self.own_checkpoints = self.own_checkpoints.split_off(&seq.next());
        self.checkpoint_votes = self.checkpoint_votes.split_off(&seq.next());
        out.persist(self.stable_writes());
        self.collect_sent(out);
        self.collect_proofs(out);
        out.observe(Observation::StableCheckpoint { seq });
        self.propose_batches(false, out);
    }

    /// Drops own certified messages that no receiver or view change needs any more:
    /// everything before this replica's own CHECKPOINT for the checkpoint
    /// `W - I` below the stable one (see the anchor rule in
    /// `docs/protocols/minbft.md`), in memory and on disk.
    pub(super) fn collect_sent(&mut self, out: &mut Out) {
        let base = &self.options.base;
        let Some(anchor_seq) = self
            .stable
            .seq
            .0
            .checked_sub(base.window.saturating_sub(base.checkpoint_interval))
        else {
            return;
        };
        // The latest own checkpoint at or below the anchor bound: everything before
        // it concerns sequence numbers the stable checkpoint covers.
        let Some(last_anchor) = self
            .sent
            .iter()
            .rposition(|m| matches!(m, Certified::Checkpoint(c) if c.seq.0 <= anchor_seq))
        else {
            return;
        };
        if last_anchor == 0 {
            return;
        }
        let first_kept = self.sent[last_anchor].counter();
        let first = self.sent[0].counter();
        self.sent.drain(..last_anchor);
        out.persist(vec![WriteOp::DeleteRange {
            start: super::storage::sent_key(first),
            end: super::storage::sent_key(first_kept),
        }]);
    }
}
