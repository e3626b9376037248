//! State transfer (for a replica behind the low watermark) and fetching batch bodies
//! it is missing (named by a NEW-VIEW, or committed while it missed the PRE-PREPARE).
//!
//! State is fetched in chunks from one replica at a time, chosen among the signers
//! of the stable-checkpoint certificate and rotated on timeout. Every correct replica
//! holds identical bytes for a certified checkpoint, so a new source continues at the
//! same offset; the assembled state is checked against the certified digest, and a
//! mismatch (a Byzantine source) restarts the transfer from another source.

use super::{Out, PbftReplica, Timer};
use crate::message::{BatchData, CheckpointCert, FetchBatch, FetchState, Message, StateChunk};
use crate::options::Mutant;
use diffuse_core::codec::Blob;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{ReplicaId, Seq};
use diffuse_core::protocol::Observation;
use diffuse_core::service::{MAX_SNAPSHOT_BYTES, STATE_LABEL, StateSnapshot};
use std::sync::Arc;

/// An ongoing state transfer.
#[derive(Debug)]
pub(crate) struct Transfer {
    target: CheckpointCert,
    sources: Vec<ReplicaId>,
    source: usize,
    received: Vec<u8>,
    total: Option<u64>,
    /// Every replica that contributed bytes to `received`: a bad result can only be
    /// blamed on a source that sent all of it.
    contributors: Vec<ReplicaId>,
}

impl PbftReplica {
    /// Starts (or retargets) a transfer of the stable checkpoint's state.
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
        // Spread the load: each replica starts with a different source.
        let start = (self.id.index() + target.seq.0 as usize) % sources.len().max(1);
        self.transfer = Some(Transfer {
            target,
            sources,
            source: start,
            received: Vec::new(),
            total: None,
            contributors: Vec::new(),
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
        out.set_timer(Timer::StateTransfer, self.options.fetch_timeout);
    }

    /// The source went quiet: start over from the next one. Its chunks are not
    /// continued, since their total length came from the old source, which may have
    /// lied; a correct new source would otherwise be blamed for disagreeing.
    pub(super) fn on_transfer_timeout(&mut self, out: &mut Out) {
        if self.transfer.is_some() {
            self.restart_transfer_elsewhere(out);
        }
    }

    /// Serves a chunk of a checkpoint's state this replica holds; a replica asking for
    /// an older checkpoint than this one's stable one is sent the newer certificate.
    pub(super) fn on_fetch_state(&mut self, from: ReplicaId, fetch: FetchState, out: &mut Out) {
        if !self.status.allow_expensive(from) {
            return;
        }
        let bytes = if fetch.seq == self.low() {
            self.stable_snapshot.as_ref().map(|s| s.bytes.clone())
        } else {
            self.own_checkpoints
                .get(&fetch.seq)
                .map(|s| s.bytes.clone())
        };
        match bytes {
            Some(bytes) => {
                let start = (fetch.offset as usize).min(bytes.len());
                let end = (start + self.options.chunk_bytes).min(bytes.len());
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
            None if fetch.seq < self.low() && self.stable_snapshot.is_some() => {
                out.send(from, Message::CheckpointCert(self.stable.clone()));
            }
            None => {}
        }
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
            self.restart_transfer_elsewhere(out);
            return;
        }
        transfer.received.extend_from_slice(&chunk.data);
        if !transfer.contributors.contains(&from) {
            transfer.contributors.push(from);
        }
        if end < total {
            self.request_chunk(out);
            return;
        }
        self.finish_transfer(from, out);
    }

    fn restart_transfer_elsewhere(&mut self, out: &mut Out) {
        if let Some(transfer) = &mut self.transfer {
            transfer.received.clear();
            transfer.total = None;
            transfer.contributors.clear();
            transfer.source = (transfer.source + 1) % transfer.sources.len().max(1);
        }
        self.request_chunk(out);
    }

    /// Checks the assembled state against the certified digest and installs it.
    fn finish_transfer(&mut self, from: ReplicaId, out: &mut Out) {
        let Some(transfer) = self.transfer.take() else {
            return;
        };
        let digest = Digest::of(STATE_LABEL, &transfer.received);
        let trusted = self.options.is(Mutant::UnverifiedStateTransfer);
        let sole_source = transfer.contributors == [from];
        if digest != transfer.target.state && !trusted {
            if sole_source {
                out.fault(from, "state-digest-mismatch");
            }
            self.transfer = Some(transfer);
            self.restart_transfer_elsewhere(out);
            return;
        }
        if let Err(_error) = self.service.restore(&transfer.received) {
            if sole_source {
                out.fault(from, "invalid-state");
            }
            self.transfer = Some(transfer);
            self.restart_transfer_elsewhere(out);
            return;
        }
        out.cancel_timer(Timer::StateTransfer);
        let seq = transfer.target.seq;
        let app = self.service.app_digest();
        let snapshot = StateSnapshot {
            digest,
            app_digest: app,
            bytes: Arc::new(transfer.received),
        };
        let mut writes = Vec::new();
        // A newer checkpoint may have become stable while this one was transferred.
        if seq == self.low() {
            writes = self.checkpoint_writes(seq, &snapshot);
            self.stable_snapshot = Some(snapshot);
            self.needs_state = false;
        }
        self.last_executed = seq;
        self.own_checkpoints.clear();
        out.observe(Observation::StateTransferred {
            seq,
            state: digest,
            app,
        });
        if self.needs_state {
            out.persist(writes);
            self.start_transfer(out);
            return;
        }
        writes.extend(self.stable_writes());
        out.persist(writes);
        // Requests the installed state executed are done: left pending, they would
        // run out the request timer and make this replica suspect a primary that
        // served them while it was away.
        let service = &self.service;
        self.pending
            .drop_executed(|client| service.last_timestamp(client));
        self.execute_ready(out);
        self.after_progress(out);
        // The batches between the checkpoint and where the others are now were sent
        // while this replica was away: ask for them now rather than at the next
        // status tick, before the others' logs move past them.
        self.broadcast_status(out);
    }

    /// Asks every replica for a batch body this replica needs at `seq`.
    pub(super) fn fetch_batch(&mut self, seq: Seq, digest: Digest, out: &mut Out) {
        if self.fetching.get(&seq) == Some(&digest) {
            return;
        }
        let first = self.fetching.is_empty();
        self.fetching.insert(seq, digest);
        out.broadcast(Message::FetchBatch(FetchBatch { seq, digest }));
        if first {
            out.set_timer(Timer::FetchBatch, self.options.fetch_timeout);
        }
    }

    pub(super) fn on_fetch_timeout(&mut self, out: &mut Out) {
        self.fetching.retain(|seq, _| *seq > self.stable.seq);
        let wanted: Vec<(Seq, Digest)> = self.fetching.iter().map(|(s, d)| (*s, *d)).collect();
        for (seq, digest) in wanted.iter().take(16) {
            out.broadcast(Message::FetchBatch(FetchBatch {
                seq: *seq,
                digest: *digest,
            }));
        }
        if !wanted.is_empty() {
            out.set_timer(Timer::FetchBatch, self.options.fetch_timeout);
        }
    }

    pub(super) fn on_fetch_batch(&mut self, from: ReplicaId, fetch: FetchBatch, out: &mut Out) {
        if !self.status.allow_expensive(from) {
            return;
        }
        if let Some(batch) = self.log.get(&fetch.seq).and_then(|s| s.body(&fetch.digest)) {
            out.send(
                from,
                Message::BatchData(BatchData {
                    seq: fetch.seq,
                    batch: (*batch).clone(),
                }),
            );
        }
    }

    pub(super) fn on_batch_data(&mut self, _from: ReplicaId, data: BatchData, out: &mut Out) {
        let Some(&wanted) = self.fetching.get(&data.seq) else {
            return;
        };
        let digest = data.batch.digest();
        if digest != wanted {
            // Possibly an answer to an older request; not proof of anything.
            return;
        }
        self.fetching.remove(&data.seq);
        self.store_body(data.seq, digest, Arc::new(data.batch), out);
    }
}
