//! Stable checkpoints at a replica (`crate::checkpoint`) and state transfer.
//!
//! A replica keeps its own snapshot at every checkpoint it executes, adopts the
//! highest checkpoint it has a proof of (from the stream, an UPDATE, or a
//! NEW-VIEW's decision), truncates its log and its kept results below it, and
//! fetches the checkpoint's state from its peers, in chunks, when it has not
//! executed that far: the proof's state digest tells a good state from a bad one.

use super::{FastBftReplica, Out};
use crate::checkpoint::CheckpointProof;
use crate::message::Message;
use diffuse_core::codec::Blob;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{ReplicaId, Seq};
use diffuse_core::protocol::Observation;
use diffuse_core::service::{MAX_SNAPSHOT_BYTES, STATE_LABEL, StateSnapshot};
use diffuse_pbft::message::{FetchState, StateChunk};
use diffuse_tee::view_of_epoch;

/// Snapshots of own checkpoints kept besides the stable one's.
const SNAPSHOTS_KEPT: usize = 4;

/// An ongoing state transfer to the state of `target`.
#[derive(Debug)]
pub(crate) struct Transfer {
    target: CheckpointProof,
    /// The peer asked last; the next stall asks the next one.
    source: usize,
    received: Vec<u8>,
    total: Option<u64>,
}

impl Transfer {
    /// The checkpoint being transferred.
    pub(crate) fn target(&self) -> Seq {
        self.target.seq
    }
}

impl FastBftReplica {
    /// Snapshots the state after checkpoint `seq`, keeps it, and reports it.
    pub(super) fn take_snapshot(&mut self, seq: Seq, out: &mut Out) -> Digest {
        let snapshot = self.service.snapshot();
        let digest = snapshot.digest;
        out.observe(Observation::Checkpoint {
            seq,
            state: digest,
            app: snapshot.app_digest,
        });
        self.snapshots.insert(seq, snapshot);
        let stable = super::stable_seq(self.stable.as_ref());
        while self.snapshots.len() > SNAPSHOTS_KEPT {
            match self.snapshots.keys().find(|s| **s != stable).copied() {
                Some(oldest) => self.snapshots.remove(&oldest),
                None => break,
            };
        }
        digest
    }

    /// Makes `proof` the stable checkpoint if it is higher (or as high and of the
    /// current view, where the log can start at it); starts a state transfer if
    /// the replica has not executed that far.
    pub(super) fn adopt_stable(&mut self, proof: CheckpointProof, out: &mut Out) {
        let current = super::stable_seq(self.stable.as_ref());
        let in_view = |p: &CheckpointProof| view_of_epoch(p.commit_cert.view) == self.view;
        let better = proof.seq > current
            || (proof.seq == current
                && in_view(&proof)
                && !self.stable.as_ref().is_some_and(in_view));
        if !better {
            return;
        }
        let seq = proof.seq;
        self.log.truncate(self.view, &proof);
        self.stable = Some(proof);
        // Results stay for the batches a COMMIT may still name: those above the
        // stream's checkpoint (a re-COMMIT after a NEW-TREE).
        let keep = seq.min(self.stream.checkpoint.next());
        self.recent = self.recent.split_off(&keep);
        self.snapshots = self.snapshots.split_off(&seq);
        if seq > current {
            out.observe(Observation::StableCheckpoint { seq });
        }
        if self.executed < seq {
            self.start_transfer(out);
        }
    }

    /// Starts (or retargets) a state transfer to the stable checkpoint.
    pub(super) fn start_transfer(&mut self, out: &mut Out) {
        let Some(target) = self.stable.clone() else {
            return;
        };
        if self
            .transfer
            .as_ref()
            .is_some_and(|t| t.target.seq >= target.seq)
        {
            return;
        }
        self.transfer = Some(Transfer {
            target,
            source: self.id.index(),
            received: Vec::new(),
            total: None,
        });
        self.continue_transfer(out);
    }

    /// Asks the next peer for the rest of the state (on start and on every stall
    /// check while the transfer lasts).
    pub(super) fn continue_transfer(&mut self, out: &mut Out) {
        let n = self.n;
        let me = self.id;
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        transfer.source = (transfer.source + 1) % n;
        if transfer.source == me.index() {
            transfer.source = (transfer.source + 1) % n;
        }
        let fetch = FetchState {
            seq: transfer.target.seq,
            offset: transfer.received.len() as u64,
        };
        out.send(
            ReplicaId(transfer.source as u16),
            Message::FetchState(fetch),
        );
        if !self.stall_armed {
            self.stall_armed = true;
            out.set_timer(super::Timer::Stall, self.options.base.status_interval);
        }
    }

    /// A peer asks for a piece of a checkpoint's state: served from this
    /// replica's own snapshot, if it has one.
    pub(super) fn on_fetch_state(&mut self, from: ReplicaId, fetch: FetchState, out: &mut Out) {
        let Some(snapshot) = self.snapshots.get(&fetch.seq) else {
            return;
        };
        let total = snapshot.bytes.len() as u64;
        let Ok(offset) = usize::try_from(fetch.offset) else {
            return;
        };
        if fetch.offset >= total && total > 0 {
            return;
        }
        let end = offset
            .saturating_add(self.options.base.chunk_bytes)
            .min(snapshot.bytes.len());
        let Some(data) = snapshot.bytes.get(offset..end) else {
            return;
        };
        let Ok(data) = Blob::try_from_vec(data.to_vec()) else {
            return;
        };
        out.send(
            from,
            Message::StateChunk(StateChunk {
                seq: fetch.seq,
                total_len: total,
                offset: fetch.offset,
                data,
            }),
        );
    }

    /// A piece of the state being transferred.
    pub(super) fn on_state_chunk(&mut self, from: ReplicaId, chunk: StateChunk, out: &mut Out) {
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        if chunk.seq != transfer.target.seq
            || chunk.offset != transfer.received.len() as u64
            || chunk.total_len > MAX_SNAPSHOT_BYTES as u64
            || transfer.total.is_some_and(|t| t != chunk.total_len)
            || transfer.received.len() as u64 + chunk.data.len() as u64 > chunk.total_len
        {
            return;
        }
        transfer.total = Some(chunk.total_len);
        transfer.received.extend_from_slice(&chunk.data);
        if (transfer.received.len() as u64) < chunk.total_len {
            let fetch = FetchState {
                seq: chunk.seq,
                offset: transfer.received.len() as u64,
            };
            out.send(from, Message::FetchState(fetch));
            return;
        }
        let Some(transfer) = self.transfer.take() else {
            return;
        };
        if Digest::of(STATE_LABEL, &transfer.received) != transfer.target.state {
            // A faulty peer's state: start over with the next one.
            out.fault(from, "bad-state");
            self.transfer = Some(Transfer {
                received: Vec::new(),
                total: None,
                ..transfer
            });
            return self.continue_transfer(out);
        }
        self.install_state(transfer, out);
    }

    fn install_state(&mut self, transfer: Transfer, out: &mut Out) {
        let seq = transfer.target.seq;
        if self.executed >= seq {
            return self.run_committed(out);
        }
        if self.service.restore(&transfer.received).is_err() {
            // The digest matched, so every correct replica's state is this one.
            return self.halt("state-does-not-restore", out);
        }
        let snapshot = StateSnapshot {
            digest: transfer.target.state,
            app_digest: self.service.app_digest(),
            bytes: std::sync::Arc::new(transfer.received),
        };
        out.observe(Observation::StateTransferred {
            seq,
            state: snapshot.digest,
            app: snapshot.app_digest,
        });
        self.snapshots.insert(seq, snapshot);
        self.executed = seq;
        self.recent.clear();
        self.commits = self.commits.split_off(&seq.next());
        self.batches = self.batches.split_off(&seq.next());
        self.run_committed(out);
        if self.primary.is_some() {
            self.commit_ready(out);
        }
    }
}
