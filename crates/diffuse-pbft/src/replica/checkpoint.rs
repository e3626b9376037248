//! Checkpoints, stable checkpoints and log truncation.

use super::{Out, PbftReplica, Timer};
use crate::message::{CheckpointCert, CheckpointVote, Message};
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::{ReplicaId, Seq};
use diffuse_core::protocol::Observation;
use diffuse_core::quorum::ReplicaSet;
use std::collections::BTreeMap;

impl PbftReplica {
    /// The most checkpoint votes kept per sender: enough for every checkpoint in the
    /// window, plus one beyond it that tells this replica it is behind.
    fn votes_per_sender(&self) -> usize {
        (self.options.window / self.options.checkpoint_interval) as usize + 2
    }

    /// Snapshots the state after executing `seq` and announces its digest.
    pub(super) fn take_checkpoint(&mut self, seq: Seq, out: &mut Out) {
        let snapshot = self.service.snapshot();
        out.observe(Observation::Checkpoint {
            seq,
            state: snapshot.digest,
            app: snapshot.app_digest,
        });
        let vote = Signed::sign(
            CheckpointVote {
                seq,
                state: snapshot.digest,
                replica: self.id,
            },
            &self.secret,
        );
        // The vote promises that this replica can serve the state, even after a
        // crash: the snapshot is durable before the vote leaves.
        out.persist(self.checkpoint_writes(seq, &snapshot));
        self.own_checkpoints.insert(seq, snapshot);
        self.record_checkpoint_vote(vote.clone());
        out.broadcast(Message::Checkpoint(vote));
        self.try_stabilize(seq, out);
    }

    pub(super) fn on_checkpoint(
        &mut self,
        from: ReplicaId,
        vote: Signed<CheckpointVote>,
        out: &mut Out,
    ) {
        let CheckpointVote {
            seq,
            state,
            replica,
        } = vote.value;
        if seq <= self.low() {
            return;
        }
        if seq.0 % self.options.checkpoint_interval != 0 {
            out.fault(from, "checkpoint-off-interval");
            return;
        }
        let Some(key) = self.replica_key(replica) else {
            out.fault(from, "unknown-replica");
            return;
        };
        if !vote.verify(key) {
            out.fault(from, "bad-checkpoint-signature");
            return;
        }
        if let Some(existing) = self
            .checkpoint_votes
            .get(&replica)
            .and_then(|v| v.get(&seq))
        {
            if existing.state != state {
                out.fault(replica, "conflicting-checkpoint");
            }
            return;
        }
        self.record_checkpoint_vote(vote);
        self.try_stabilize(seq, out);
    }

    fn record_checkpoint_vote(&mut self, vote: Signed<CheckpointVote>) {
        let cap = self.votes_per_sender();
        let votes = self.checkpoint_votes.entry(vote.replica).or_default();
        votes.insert(vote.seq, vote);
        while votes.len() > cap {
            votes.pop_first();
        }
    }

    /// If a quorum agrees on the state at `seq`, that checkpoint becomes stable.
    fn try_stabilize(&mut self, seq: Seq, out: &mut Out) {
        let mut by_digest: BTreeMap<Digest, Vec<Signed<CheckpointVote>>> = BTreeMap::new();
        for votes in self.checkpoint_votes.values() {
            if let Some(vote) = votes.get(&seq) {
                by_digest.entry(vote.state).or_default().push(vote.clone());
            }
        }
        for (state, votes) in by_digest {
            let signers: ReplicaSet = votes.iter().map(|v| v.replica).collect();
            if self.quorum.is_quorum(&signers) {
                let cert = CheckpointCert {
                    seq,
                    state,
                    votes: BoundedVec::truncating(votes),
                };
                self.on_stable_certificate(cert, out);
                return;
            }
        }
    }

    pub(super) fn on_checkpoint_cert(
        &mut self,
        from: ReplicaId,
        cert: CheckpointCert,
        out: &mut Out,
    ) {
        if cert.seq <= self.low() {
            return;
        }
        if !self.checkpoint_cert_is_valid(&cert) {
            out.fault(from, "bad-checkpoint-certificate");
            return;
        }
        // A certificate is sent to a replica whose STATUS shows it behind: no reason
        // to wait for execution to get there by itself.
        self.advance_stable(cert, out);
    }

    /// A checkpoint is certified. If this replica has executed up to it, or it lies
    /// beyond the window, the low watermark moves now. If it is inside the window
    /// but not executed yet, the replica is probably only a few messages behind: it
    /// gets `fetch_timeout` to get there by itself before it transfers state.
    /// Unless it is a whole checkpoint interval behind (a replica just restarted
    /// or back from a state transfer, under load): waiting then only lets the
    /// others move on, and a replica that pays a grace period per checkpoint can
    /// trail the cluster forever.
    fn on_stable_certificate(&mut self, cert: CheckpointCert, out: &mut Out) {
        if cert.seq <= self.low() {
            return;
        }
        let whole_interval_behind =
            cert.seq.0.saturating_sub(self.last_executed.0) >= self.options.checkpoint_interval;
        if self.last_executed >= cert.seq
            || cert.seq > self.high()
            || self.needs_state
            || whole_interval_behind
        {
            self.advance_stable(cert, out);
            return;
        }
        if self
            .deferred_stable
            .as_ref()
            .is_none_or(|d| d.seq < cert.seq)
        {
            self.deferred_stable = Some(cert);
            out.set_timer(Timer::CatchUp, self.options.fetch_timeout);
        }
    }

    /// The grace period is over: move to the deferred checkpoint, by state transfer
    /// if execution has not reached it.
    pub(super) fn on_catch_up_timeout(&mut self, out: &mut Out) {
        if let Some(cert) = self.deferred_stable.take() {
            if cert.seq > self.low() {
                self.advance_stable(cert, out);
            }
        }
    }

    /// A certificate is valid if it is the genesis checkpoint, or a quorum of distinct
    /// replicas signed matching votes for a checkpoint sequence number.
    pub(super) fn checkpoint_cert_is_valid(&self, cert: &CheckpointCert) -> bool {
        if cert.seq == Seq(0) {
            return cert.state == self.genesis && cert.votes.is_empty();
        }
        if cert.seq.0 % self.options.checkpoint_interval != 0 {
            return false;
        }
        let mut signers = ReplicaSet::new();
        for vote in cert.votes.iter() {
            if vote.seq != cert.seq || vote.state != cert.state || !signers.insert(vote.replica) {
                return false;
            }
            if !self
                .replica_key(vote.replica)
                .is_some_and(|k| vote.verify(k))
            {
                return false;
            }
        }
        self.quorum.is_quorum(&signers)
    }

    /// Moves the low watermark to a certified checkpoint: truncates the log, and
    /// either keeps this replica's own snapshot of that state or fetches it.
    pub(super) fn advance_stable(&mut self, cert: CheckpointCert, out: &mut Out) {
        if cert.seq <= self.low() {
            return;
        }
        let seq = cert.seq;
        if self.deferred_stable.as_ref().is_some_and(|d| d.seq <= seq) {
            self.deferred_stable = None;
            out.cancel_timer(Timer::CatchUp);
        }
        self.stable = cert;
        self.log.retain(|s, _| *s > seq);
        self.fetching.retain(|s, _| *s > seq);
        for votes in self.checkpoint_votes.values_mut() {
            votes.retain(|s, _| *s > seq);
        }
        self.checkpoint_votes.retain(|_, v| !v.is_empty());
        let own = self.own_checkpoints.remove(&seq);
        self.own_checkpoints.retain(|s, _| *s > seq);
        out.observe(Observation::StableCheckpoint { seq });
        match own {
            Some(snapshot) if snapshot.digest == self.stable.state => {
                self.stable_snapshot = Some(snapshot);
                self.needs_state = false;
            }
            Some(_) => {
                // This replica executed to a different state than a quorum certified:
                // a non-deterministic application or a bug. Replace it with the
                // certified state rather than fork.
                out.fault(self.id, "state-divergence");
                self.stable_snapshot = None;
                self.needs_state = true;
                self.start_transfer(out);
            }
            None if self.last_executed >= seq => {
                // Executed past it without a snapshot at this exact point (the
                // checkpoint interval divides every checkpoint, so only a replica that
                // installed a later state by transfer gets here): nothing to serve, but
                // nothing missing either.
                self.stable_snapshot = None;
            }
            None => {
                self.stable_snapshot = None;
                self.needs_state = true;
                self.start_transfer(out);
            }
        }
        // Also without the state: the window has moved, and the slots this replica
        // writes from now on (certificates it reports with COMMITs among them) lie
        // above the old one. A restart must not read them back against the old
        // low watermark, which would drop them; it fetches the state instead.
        out.persist(self.stable_writes());
        if self.next_seq <= seq {
            self.next_seq = seq.next();
        }
        self.replay_future(out);
        self.execute_ready(out);
        self.propose_batches(false, out);
    }
}
