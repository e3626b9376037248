//! Stable checkpoints (`docs/protocols/fastbft.md`, "Checkpoints").
//!
//! Every `checkpoint_interval` sequence numbers `K`, the COMMIT of batch `s`
//! (`s mod K = 0`) also binds the digest of the replicated state after `s`; every
//! active replica checks it against its own before it releases its part of the
//! reply secret. Once that secret opens, the COMMIT's certificate and the opened
//! secret are a **proof** anyone can check with the primary's enclave key: all
//! `f + 1` active replicas, so one correct replica, had that state.
//!
//! The proof travels in the stream: the first PREPARE after the checkpoint (for
//! `s + 1`) carries it, bound into its certificate, and a replica accepts a PREPARE
//! for `s'` only if `s' ≤ c + K`, where `c` is the highest checkpoint whose proof it
//! met in the current view's stream (or the view's NEW-VIEW). So nothing above
//! `s` that can commit is certified before the proof exists, which is what lets a
//! VIEW-CHANGE's log start at the checkpoint's COMMIT (`crate::view_log`).

use crate::message::{Cert, Opened, commit_digest};
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{ReplicaId, Seq};
use diffuse_tee::view_of_epoch;
use serde::{Deserialize, Serialize};

/// The proof that checkpoint `seq` is stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointProof {
    /// The checkpoint's sequence number, a multiple of the interval.
    pub seq: Seq,
    /// The digest of the replicated state after `seq`.
    pub state: Digest,
    /// The Merkle root of batch `seq`.
    pub batch_root: Digest,
    /// The Merkle root of its results.
    pub results_root: Digest,
    /// The COMMIT's certificate, which binds all of the above.
    pub commit_cert: Cert,
    /// Its secret, opened: every active replica had this state.
    pub replied: Opened,
}

impl CheckpointProof {
    /// What a PREPARE's certificate binds when it carries this proof.
    pub fn digest(&self) -> Digest {
        Digest::of_value("diffuse/fastbft/checkpoint-proof", self)
    }

    /// Whether this proves checkpoint `seq` of a cluster whose enclave keys are
    /// `enclave_keys`, with checkpoints every `interval`.
    pub fn is_valid(&self, enclave_keys: &[PublicKey], interval: u64) -> bool {
        let Some(primary) = primary_key(enclave_keys, view_of_epoch(self.commit_cert.view)) else {
            return false;
        };
        self.seq.0 > 0
            && interval > 0
            && self.seq.0 % interval == 0
            && self.commit_cert.message
                == commit_digest(
                    self.seq,
                    &self.batch_root,
                    &self.results_root,
                    Some(&self.state),
                )
            && self.commit_cert.verify(&primary)
            && self.replied.opens(&self.commit_cert, &primary)
    }
}

/// The sequence number a proof (or genesis, `None`) stands for.
pub fn seq_of(proof: Option<&CheckpointProof>) -> Seq {
    proof.map_or(Seq(0), |p| p.seq)
}

/// The primary of `view` among `n` replicas.
pub fn primary_of(view: u64, n: usize) -> ReplicaId {
    ReplicaId((view % n.max(1) as u64) as u16)
}

/// The enclave key of the primary of `view`.
pub fn primary_key(enclave_keys: &[PublicKey], view: u64) -> Option<PublicKey> {
    enclave_keys
        .get(primary_of(view, enclave_keys.len()).index())
        .copied()
}
