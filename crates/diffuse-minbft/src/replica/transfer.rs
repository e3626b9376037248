//! Catching up: adopting a newer stable checkpoint certificate, state transfer to
//! it, and re-anchoring a sender's stream past messages the sender collected.
//!
//! A receiver that fell behind a sender's collected log gets the sender's stable
//! checkpoint certificate first (see `on_stream_fetch`). It adopts it, certifies its
//! own CHECKPOINT for it (so its enclave's slot rule lets it vote above it), fetches
//! the state in chunks from the certificate's signers, and continues each stream
//! from the sender's anchor CHECKPOINT (the anchor rule in
//! `docs/protocols/minbft.md`: nothing certified before it concerns a sequence
//! number above the receiver's stable checkpoint).

use super::{MinBftReplica, Out, Timer};
use crate::message::{Certified, Checkpoint, CheckpointCert, Message};
use diffuse_core::codec::Blob;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{ReplicaId, Seq};
use diffuse_core::protocol::Observation;
use diffuse_core::service::{MAX_SNAPSHOT_BYTES, STATE_LABEL, StateSnapshot};
use diffuse_pbft::message::{FetchState, StateChunk};
use diffuse_tee::{Scope, TrustedComponent};
use std::sync::Arc;

/// State chunks a replica serves one peer per status interval: transfer keeps
/// going, a flood of FETCH-STATEs cannot make the replica send without bound.
const CHUNKS_PER_PEER_PER_INTERVAL: u32 = 64;

/// An ongoing state transfer.
#[derive(Debug)]
pub(crate) struct Transfer {
    target: CheckpointCert,
    sources: Vec<ReplicaId>,
    source: usize,
    received: Vec<u8>,
    total: Option<u64>,
}

impl MinBftReplica {
    /// A peer's stable checkpoint certificate: adopted if newer and valid.
    pub(super) fn on_stable_cert(&mut self, from: ReplicaId, cert: CheckpointCert, out: &mut Out) {
        if cert.seq <= self.low() {
            return;
        }
        let interval = self.options.base.checkpoint_interval.max(1);
        if cert.seq.0 % interval != 0 || !cert.is_valid(&self.quorum, &self.enclave_keys) {
            return out.fault(from, "bad-checkpoint-certificate");
        }
        self.adopt_stable(cert, out);
        self.drain_streams(out);
        self.propose_batches(false, out);
    }

    /// Every status interval: a sender whose stream stalls at a vote beyond this
    /// replica's window has a stable checkpoint above this replica's (it voted
    /// there); this replica missed the CHECKPOINTs in between, so it asks for the
    /// certificate instead of waiting for them.
    pub(super) fn fetch_stable_beyond_window(&self, out: &mut Out) {
        let high = self.high();
        let senders: Vec<ReplicaId> = self.streams.senders().collect();
        for sender in senders {
            let seq = match self.streams.peek(sender) {
                Some(Certified::Prepare(p)) if p.view <= self.view => p.seq,
                Some(Certified::Commit(c)) if c.prepare.view <= self.view => c.prepare.seq,
                _ => continue,
            };
            if seq > high {
                out.send(sender, Message::FetchStable(self.low()));
            }
        }
    }

    /// A peer with a lower stable checkpoint asked for this replica's: one answer
    /// per peer per status interval.
    pub(super) fn on_fetch_stable(&mut self, from: ReplicaId, low: Seq, out: &mut Out) {
        if self.low() > low && self.stables_served.insert(from) {
            out.send(from, Message::Stable(self.stable.clone()));
        }
    }

    /// Makes `cert` the stable checkpoint: truncates below it, certifies this
    /// replica's own CHECKPOINT for it if its enclave has none that high, and starts
    /// a state transfer if the replica has not executed that far.
    pub(super) fn adopt_stable(&mut self, cert: CheckpointCert, out: &mut Out) {
        let seq = cert.seq;
        let own = self
            .own_checkpoints
            .get(&seq)
            .filter(|s| s.digest == cert.state)
            .cloned();
        self.stable = cert;
        self.stable_snapshot = own;
        self.log = self.log.split_off(&seq.next());
        self.own_checkpoints = self.own_checkpoints.split_off(&seq.next());
        self.checkpoint_votes = self.checkpoint_votes.split_off(&seq.next());
        if self.next_seq <= seq {
            self.next_seq = seq.next();
        }
        out.observe(Observation::StableCheckpoint { seq });
        self.certify_stable_if_enclave_behind(out);
        out.persist(self.stable_writes());
        self.collect_sent(out);
        self.collect_proofs(out);
        if self.last_executed < seq {
            self.start_transfer(out);
        }
    }

    /// Certifies this replica's CHECKPOINT for its stable checkpoint if its enclave's
    /// last one is lower: the enclave's slot rule (`s <= last checkpoint + W`) would
    /// otherwise refuse every vote in this replica's window above `last + W`. It is
    /// called when a checkpoint is adopted and again when a REJOIN unlocks the
    /// enclave: a replica that adopted its stable checkpoint while locked (read back
    /// from disk, or a peer's certificate) could not certify it then, and its enclave
    /// resumes at the highest checkpoint its peers saw. Without this, such a replica
    /// votes for nothing until it executes to its next checkpoint with the votes of
    /// others, and with exactly `f + 1` replicas reachable nothing commits in any view.
    /// Safe as in `adopt_stable`: the certificate shows `f + 1` replicas' state at
    /// `low`, and the enclave still certifies no lower checkpoint after it.
    pub(super) fn certify_stable_if_enclave_behind(&mut self, out: &mut Out) {
        let seq = self.low();
        let behind = self
            .with_enclave(|e| !e.is_locked() && e.last_checkpoint() < seq.0)
            .unwrap_or(false);
        if seq > Seq(0) && behind {
            self.certify_checkpoint(seq, self.stable.state, out);
        }
    }

    /// Certifies and broadcasts this replica's CHECKPOINT for `(seq, state)`.
    pub(super) fn certify_checkpoint(&mut self, seq: Seq, state: Digest, out: &mut Out) {
        let me = self.id;
        let certified = self.certify(
            Scope::Checkpoint(seq.0),
            &Checkpoint::certified_digest(me, seq, &state),
            |ui| {
                Certified::Checkpoint(Checkpoint {
                    replica: me,
                    seq,
                    state,
                    ui,
                })
            },
            out,
        );
        if let Some(Certified::Checkpoint(checkpoint)) = certified {
            out.broadcast(Message::Certified(Certified::Checkpoint(checkpoint)));
            self.on_checkpoint(checkpoint, out);
        }
    }

    pub(super) fn start_transfer(&mut self, out: &mut Out) {
        let target = self.stable.clone();
        if self
            .transfer
            .as_ref()
            .is_some_and(|t| t.target.seq >= target.seq)
        {
            return;
        }
        let mut sources: Vec<ReplicaId> = target
            .votes
            .iter()
            .map(|v| v.replica)
            .filter(|r| *r != self.id)
            .collect();
        if sources.is_empty() {
            sources = self.quorum.replicas().filter(|r| *r != self.id).collect();
        }
        let start = (self.id.index() + target.seq.0 as usize) % sources.len().max(1);
        self.transfer = Some(Transfer {
            target,
            sources,
            source: start,
            received: Vec::new(),
            total: None,
        });
        self.request_chunk(out);
    }

    fn request_chunk(&mut self, out: &mut Out) {
        let Some(transfer) = &self.transfer else {
            return;
        };
        let Some(&source) = transfer.sources.get(transfer.source) else {
            return;
        };
        out.send(
            source,
            Message::FetchState(FetchState {
                seq: transfer.target.seq,
                offset: transfer.received.len() as u64,
            }),
        );
        out.set_timer(Timer::StateTransfer, self.options.base.fetch_timeout);
    }

    /// The source went quiet: start over from the next one. Its chunks are not
    /// continued, since their total length came from the old source, which may have
    /// lied; a correct new source would otherwise be blamed for disagreeing.
    pub(super) fn on_transfer_timeout(&mut self, out: &mut Out) {
        if self.transfer.is_some() {
            self.restart_transfer_elsewhere(out);
        }
    }

    /// Serves a chunk of the stable checkpoint's state; a peer asking for an older
    /// one gets the newer certificate instead.
    pub(super) fn on_fetch_state(&mut self, from: ReplicaId, fetch: FetchState, out: &mut Out) {
        let served = self.chunks_served.entry(from).or_default();
        if *served >= CHUNKS_PER_PEER_PER_INTERVAL {
            return;
        }
        *served += 1;
        if fetch.seq < self.low() {
            return out.send(from, Message::Stable(self.stable.clone()));
        }
        let Some(bytes) = self
            .stable_snapshot
            .as_ref()
            .filter(|_| fetch.seq == self.low())
            .map(|s| s.bytes.clone())
        else {
            return;
        };
        let start = usize::try_from(fetch.offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start
            .saturating_add(self.options.base.chunk_bytes.max(1))
            .min(bytes.len());
        out.send(
            from,
            Message::StateChunk(StateChunk {
                seq: fetch.seq,
                total_len: bytes.len() as u64,
                offset: start as u64,
                data: Blob::try_from_vec(bytes[start..end].to_vec()).unwrap_or_default(),
            }),
        );
    }

    pub(super) fn on_state_chunk(&mut self, from: ReplicaId, chunk: StateChunk, out: &mut Out) {
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        if chunk.seq != transfer.target.seq
            || transfer.sources.get(transfer.source) != Some(&from)
            || chunk.offset != transfer.received.len() as u64
        {
            return;
        }
        let total = *transfer.total.get_or_insert(chunk.total_len);
        let end = chunk.offset.saturating_add(chunk.data.len() as u64);
        if total != chunk.total_len
            || total > MAX_SNAPSHOT_BYTES as u64
            || end > total
            || (chunk.data.is_empty() && end < total)
        {
            out.fault(from, "bad-state-chunk");
            return self.restart_transfer_elsewhere(out);
        }
        transfer.received.extend_from_slice(&chunk.data);
        if end < total {
            return self.request_chunk(out);
        }
        self.finish_transfer(out);
    }

    fn restart_transfer_elsewhere(&mut self, out: &mut Out) {
        if let Some(transfer) = &mut self.transfer {
            transfer.received.clear();
            transfer.total = None;
            transfer.source = (transfer.source + 1) % transfer.sources.len().max(1);
        }
        self.request_chunk(out);
    }

    /// Checks the assembled state against the certified digest and installs it.
    fn finish_transfer(&mut self, out: &mut Out) {
        let Some(transfer) = self.transfer.take() else {
            return;
        };
        let digest = Digest::of(STATE_LABEL, &transfer.received);
        if digest != transfer.target.state || self.service.restore(&transfer.received).is_err() {
            // Not blamed on the last source: several may have contributed.
            self.transfer = Some(transfer);
            return self.restart_transfer_elsewhere(out);
        }
        out.cancel_timer(Timer::StateTransfer);
        let seq = transfer.target.seq;
        let snapshot = StateSnapshot {
            digest,
            app_digest: self.service.app_digest(),
            bytes: Arc::new(transfer.received),
        };
        out.observe(Observation::StateTransferred {
            seq,
            state: digest,
            app: snapshot.app_digest,
        });
        self.last_executed = seq;
        out.persist(vec![Self::checkpoint_write(seq, &snapshot)]);
        if seq == self.low() {
            self.stable_snapshot = Some(snapshot);
        } else if self.last_executed < self.low() {
            // A newer checkpoint became stable meanwhile: fetch that one too.
            self.start_transfer(out);
            return;
        }
        self.execute_ready(out);
        self.drain_streams(out);
        self.propose_batches(false, out);
    }
}
