//! What a MinBFT replica persists, and how a restart reads it back.
//!
//! | key | value | written |
//! |---|---|---|
//! | `minbft/sent/<counter>` | an own certified message | before it leaves (collected with the log) |
//! | `minbft/body/<seq><digest>` | the batch a COMMIT votes for | before the COMMIT leaves |
//! | `minbft/checkpoint/<seq>` | the state after executing `seq` | before the own CHECKPOINT leaves |
//! | `minbft/stable` | the stable checkpoint certificate | when it changes; older checkpoints and bodies go in the same write |
//! | `minbft/proof/<view>` | a view's NEW-VIEW proof | when the view becomes active; collected with the votes in it |
//!
//! The own log and the bodies and proofs of the votes in it are what a later
//! VIEW-CHANGE must show: a restarted replica that forgot a vote could let a view
//! change drop a committed batch. The state is restored from the highest own
//! checkpoint, or fetched by state transfer.

use super::MinBftReplica;
use crate::message::{Certified, CheckpointCert, NewViewProof};
use diffuse_core::codec;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{Seq, View};
use diffuse_core::protocol::{Recovered, WriteOp};
use diffuse_core::service::StateSnapshot;
use diffuse_pbft::message::Batch;
use std::collections::{BTreeMap, VecDeque};

const SENT_PREFIX: &[u8] = b"minbft/sent/";
const BODY_PREFIX: &[u8] = b"minbft/body/";
const CHECKPOINT_PREFIX: &[u8] = b"minbft/checkpoint/";
const PROOF_PREFIX: &[u8] = b"minbft/proof/";
const STABLE_KEY: &[u8] = b"minbft/stable";

fn number_key(prefix: &[u8], number: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&number.to_be_bytes());
    key
}

/// The key of own certified message `counter`.
pub(super) fn sent_key(counter: u64) -> Vec<u8> {
    number_key(SENT_PREFIX, counter)
}

fn body_key(seq: Seq, digest: &Digest) -> Vec<u8> {
    let mut key = number_key(BODY_PREFIX, seq.0);
    key.extend_from_slice(&digest.0);
    key
}

/// The number right after `prefix` in `key`.
fn key_number(prefix: &[u8], key: &[u8]) -> Result<u64, CorruptStorage> {
    let bytes = key
        .get(prefix.len()..prefix.len() + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or(CorruptStorage("key"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Why persisted state could not be read back.
#[derive(Debug)]
pub(super) struct CorruptStorage(pub &'static str);

impl MinBftReplica {
    /// The body of a batch this replica is about to vote for.
    pub(super) fn body_write(seq: Seq, batch: &Batch) -> WriteOp {
        WriteOp::Put {
            key: body_key(seq, &batch.digest()),
            value: codec::encode_payload(batch),
        }
    }

    /// This replica's checkpoint state at `seq`.
    pub(super) fn checkpoint_write(seq: Seq, snapshot: &StateSnapshot) -> WriteOp {
        WriteOp::Put {
            key: number_key(CHECKPOINT_PREFIX, seq.0),
            value: snapshot.to_record(),
        }
    }

    /// The stable checkpoint certificate, and deletion of what it makes obsolete:
    /// older checkpoint states and the bodies of votes at or below it.
    pub(super) fn stable_writes(&self) -> Vec<WriteOp> {
        let low = self.low();
        vec![
            WriteOp::Put {
                key: STABLE_KEY.to_vec(),
                value: codec::encode_payload(&self.stable),
            },
            WriteOp::DeleteRange {
                start: number_key(CHECKPOINT_PREFIX, 0),
                end: number_key(CHECKPOINT_PREFIX, low.0),
            },
            WriteOp::DeleteRange {
                start: number_key(BODY_PREFIX, 0),
                end: number_key(BODY_PREFIX, low.0.saturating_add(1)),
            },
        ]
    }

    /// A view's proof, written when the view becomes active.
    pub(super) fn proof_write(proof: &NewViewProof) -> WriteOp {
        WriteOp::Put {
            key: number_key(PROOF_PREFIX, proof.new_view.view.0),
            value: codec::encode_payload(proof),
        }
    }

    /// Deletes a proof no retained vote needs.
    pub(super) fn proof_delete(view: View) -> WriteOp {
        WriteOp::Delete {
            key: number_key(PROOF_PREFIX, view.0),
        }
    }

    /// Restores the persisted state: stable checkpoint, own checkpoints (the state
    /// resumes from the highest), own log, voted bodies, view proofs, and the view
    /// this replica was in or leaving, as its own log shows.
    pub(super) fn load(&mut self, recovered: &Recovered) -> Result<(), CorruptStorage> {
        if let Some(bytes) = recovered.get(STABLE_KEY) {
            let stable: CheckpointCert =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("stable"))?;
            if stable.seq > Seq(0) && !stable.is_valid(&self.quorum, &self.enclave_keys) {
                return Err(CorruptStorage("stable certificate"));
            }
            self.stable = stable;
        }
        self.load_checkpoints(recovered)?;
        self.load_sent(recovered)?;
        let low = self.low();
        for message in &self.sent {
            if let Certified::Prepare(p) = message {
                if p.seq > low {
                    self.voted_bodies
                        .insert((p.seq, p.batch.digest()), p.batch.clone());
                }
            }
        }
        for (key, value) in recovered.with_prefix(BODY_PREFIX) {
            let seq = Seq(key_number(BODY_PREFIX, key)?);
            let batch: Batch = codec::decode_payload(value).map_err(|_| CorruptStorage("body"))?;
            if seq > low {
                self.voted_bodies.insert((seq, batch.digest()), batch);
            }
        }
        for (_, value) in recovered.with_prefix(PROOF_PREFIX) {
            let proof: NewViewProof =
                codec::decode_payload(value).map_err(|_| CorruptStorage("proof"))?;
            if !proof.is_valid(&self.quorum, &self.enclave_keys) {
                return Err(CorruptStorage("view proof"));
            }
            self.vc.proofs.insert(proof.new_view.view, proof);
        }
        self.restore_view();
        Ok(())
    }

    /// Own checkpoints at or above the stable one; the replica resumes from the
    /// highest (or needs state transfer if it has none at or above the stable one).
    fn load_checkpoints(&mut self, recovered: &Recovered) -> Result<(), CorruptStorage> {
        let low = self.low();
        let mut checkpoints = BTreeMap::new();
        for (key, value) in recovered.with_prefix(CHECKPOINT_PREFIX) {
            let seq = Seq(key_number(CHECKPOINT_PREFIX, key)?);
            if seq >= low {
                let snapshot =
                    StateSnapshot::from_record(value).ok_or(CorruptStorage("checkpoint"))?;
                checkpoints.insert(seq, snapshot);
            }
        }
        if low > Seq(0) {
            self.stable_snapshot = checkpoints
                .get(&low)
                .filter(|s| s.digest == self.stable.state)
                .cloned();
        }
        if let Some((seq, snapshot)) = checkpoints.last_key_value() {
            self.service
                .restore(&snapshot.bytes)
                .map_err(|_| CorruptStorage("checkpoint state"))?;
            self.last_executed = *seq;
        }
        checkpoints.remove(&low);
        self.own_checkpoints = checkpoints;
        Ok(())
    }

    /// The own certified log: contiguous counter values, each under its own key.
    fn load_sent(&mut self, recovered: &Recovered) -> Result<(), CorruptStorage> {
        let mut sent = VecDeque::new();
        for (key, value) in recovered.with_prefix(SENT_PREFIX) {
            let counter = key_number(SENT_PREFIX, key)?;
            let message: Certified =
                codec::decode_payload(value).map_err(|_| CorruptStorage("sent message"))?;
            let follows = sent
                .back()
                .is_none_or(|last: &Certified| last.counter() + 1 == counter);
            if message.counter() != counter || message.sender() != self.id || !follows {
                return Err(CorruptStorage("own log"));
            }
            sent.push_back(message);
        }
        self.sent = sent;
        Ok(())
    }

    /// The view the own log shows this replica in (its latest PREPARE, COMMIT,
    /// NEW-VIEW or NEW-VIEW-ACK), and the view it was leaving for (a later
    /// VIEW-CHANGE). Active if it is view 0 or its proof was persisted; otherwise
    /// the view-change timer moves the replica on.
    fn restore_view(&mut self) {
        let mut entered = View(0);
        let mut leaving = None;
        for message in &self.sent {
            match message {
                Certified::Prepare(p) => entered = entered.max(p.view),
                Certified::Commit(c) => entered = entered.max(c.prepare.view),
                Certified::NewView(nv) => entered = entered.max(nv.view),
                Certified::NewViewAck(ack) => entered = entered.max(ack.view),
                Certified::ViewChange(vc) => {
                    if leaving
                        .as_ref()
                        .is_none_or(|l: &crate::message::ViewChange| vc.view > l.view)
                    {
                        leaving = Some((**vc).clone());
                    }
                }
                Certified::Checkpoint(_) => {}
            }
        }
        self.view = entered;
        self.view_active = entered == View(0) || self.vc.proofs.contains_key(&entered);
        if let Some(vc) = leaving.filter(|vc| vc.view > entered) {
            self.view_active = false;
            self.vc.target = Some(vc.view);
            self.vc.received.insert((vc.view, self.id), vc);
        }
        let low = self.low();
        self.next_seq = self
            .sent
            .iter()
            .filter_map(|m| match m {
                Certified::Prepare(p) if p.view == entered => Some(p.seq),
                _ => None,
            })
            .max()
            .unwrap_or(low)
            .max(low)
            .next();
    }
}
