//! What a VIEW-CHANGE proves, and what a NEW-VIEW decides from `f + 1` of them.
//!
//! Pure functions, shared by the new primary (which builds the NEW-VIEW) and every
//! replica (which recomputes it before entering the view). The argument is in
//! `docs/protocols/minbft.md`: a VIEW-CHANGE lists every message its sender
//! certified since an anchor, so the one replica shared with any commit quorum
//! cannot hide its vote; votes in a view `w > 0` count only if they are consistent
//! with that view's acknowledged NEW-VIEW.

use crate::message::{CheckpointCert, NewView, PrepareRef, ViewChange};
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{Seq, View};
use diffuse_core::quorum::QuorumSystem;
use diffuse_pbft::message::Batch;
use diffuse_tee::{Scope, verify_scoped_ui};
use std::collections::BTreeMap;

/// What checking a VIEW-CHANGE needs to know about the cluster.
pub struct Rules<'a> {
    /// The replicas.
    pub quorum: &'a QuorumSystem,
    /// Every replica's enclave key, by index.
    pub enclave_keys: &'a [PublicKey],
    /// The checkpoint interval `I`.
    pub checkpoint_interval: u64,
    /// The window `W`.
    pub window: u64,
    /// The state digest of the genesis checkpoint.
    pub genesis: Digest,
}

impl Rules<'_> {
    fn stable_is_valid(&self, cert: &CheckpointCert) -> bool {
        if cert.seq == Seq(0) {
            return cert.state == self.genesis && cert.votes.is_empty();
        }
        cert.seq.0 % self.checkpoint_interval.max(1) == 0
            && cert.is_valid(self.quorum, self.enclave_keys)
    }

    /// Whether the primary of `vote.view` certified the PREPARE `vote`.
    fn primary_certified(&self, vote: &PrepareRef) -> bool {
        vote.replica == vote.view.primary(self.quorum.n())
            && self
                .enclave_keys
                .get(vote.replica.index())
                .is_some_and(|key| {
                    verify_scoped_ui(
                        key,
                        Scope::Slot(vote.seq.0),
                        &vote.certified_digest(),
                        &vote.ui,
                    )
                })
    }

    /// Checks a VIEW-CHANGE whose own UI was verified already: its checkpoint, its
    /// anchor, the continuity and certificates of its log, and that every vote above
    /// its checkpoint comes with its batch and, in a view `> 0`, that view's proof.
    pub fn check_view_change(&self, vc: &ViewChange) -> Result<(), &'static str> {
        let sender = vc.replica;
        let Some(key) = self.enclave_keys.get(sender.index()) else {
            return Err("view-change-from-unknown-replica");
        };
        if !self.stable_is_valid(&vc.stable) {
            return Err("view-change-bad-checkpoint");
        }
        let reach = self.window.saturating_sub(self.checkpoint_interval);
        let first = match &vc.anchor {
            None => 1,
            Some(anchor) => {
                let digest = crate::message::Checkpoint::certified_digest(
                    anchor.replica,
                    anchor.seq,
                    &anchor.state,
                );
                if anchor.replica != sender
                    || anchor.seq.0.saturating_add(reach) > vc.stable.seq.0
                    || !verify_scoped_ui(key, Scope::Checkpoint(anchor.seq.0), &digest, &anchor.ui)
                {
                    return Err("view-change-bad-anchor");
                }
                anchor.ui.counter.saturating_add(1)
            }
        };
        if first.saturating_add(vc.log.len() as u64) != vc.ui.counter {
            return Err("view-change-log-not-contiguous");
        }
        let bodies: BTreeMap<Digest, &Batch> = vc.batches.iter().map(|b| (b.digest(), b)).collect();
        let mut proofs: BTreeMap<View, &NewView> = BTreeMap::new();
        for proof in vc.proofs.iter() {
            if !proof.is_valid(self.quorum, self.enclave_keys)
                || proofs
                    .insert(proof.new_view.view, &proof.new_view)
                    .is_some()
            {
                return Err("view-change-bad-proof");
            }
        }
        for (offset, entry) in vc.log.iter().enumerate() {
            if entry.ui().counter != first.saturating_add(offset as u64) {
                return Err("view-change-log-not-contiguous");
            }
            if !entry.is_certified_by(sender, key) {
                return Err("view-change-bad-log-entry");
            }
            let Some(vote) = entry.vote() else {
                continue;
            };
            if vote.seq <= vc.stable.seq {
                continue;
            }
            if vote.seq.0 > vc.stable.seq.0.saturating_add(self.window) {
                return Err("view-change-vote-above-window");
            }
            if !self.primary_certified(vote) {
                return Err("view-change-bad-prepare");
            }
            if !bodies.contains_key(&vote.digest) {
                return Err("view-change-missing-batch");
            }
            if vote.view > View(0) && !proofs.contains_key(&vote.view) {
                return Err("view-change-missing-proof");
            }
        }
        Ok(())
    }
}

/// A NEW-VIEW's content, computed from checked VIEW-CHANGEs.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The highest stable checkpoint among them.
    pub base: CheckpointCert,
    /// The batch digest for `base + 1`, `base + 2`, ... (the empty batch for gaps).
    pub decisions: Vec<Digest>,
    /// Every batch body they carried, by digest (the empty batch included).
    pub bodies: BTreeMap<Digest, Batch>,
}

/// Whether a vote in a view `> 0` is consistent with that view's NEW-VIEW: made
/// after it, above its base, and for its decision where it re-proposed.
fn consistent_with(vote: &PrepareRef, new_view: &NewView) -> bool {
    vote.ui.counter > new_view.ui.counter
        && vote.seq > new_view.base
        && new_view
            .decision(vote.seq)
            .is_none_or(|digest| digest == vote.digest)
}

/// The decision every replica reaches from the same checked VIEW-CHANGEs: from the
/// highest stable checkpoint on, for each sequence number the vote of the highest
/// view and, within it, the lowest primary counter (correct replicas accept the
/// first valid PREPARE of a slot in the primary's stream), among votes whose batch
/// is valid and, in views `> 0`, consistent with that view's NEW-VIEW.
pub fn decide(view_changes: &[&ViewChange], batch_is_valid: impl Fn(&Batch) -> bool) -> Decision {
    let base = view_changes
        .iter()
        .map(|vc| &vc.stable)
        .max_by_key(|cert| cert.seq)
        .cloned()
        .unwrap_or_else(|| CheckpointCert::genesis(Digest::default()));
    let mut bodies: BTreeMap<Digest, Batch> = BTreeMap::new();
    let null = Batch::default();
    bodies.insert(null.digest(), null.clone());
    for vc in view_changes {
        for batch in vc.batches.iter() {
            bodies
                .entry(batch.digest())
                .or_insert_with(|| batch.clone());
        }
    }
    // Per sequence number: (view, primary counter, digest) of the best vote so far.
    let mut best: BTreeMap<Seq, (View, u64, Digest)> = BTreeMap::new();
    for vc in view_changes {
        let proofs: BTreeMap<View, &NewView> = vc
            .proofs
            .iter()
            .map(|p| (p.new_view.view, &p.new_view))
            .collect();
        for vote in vc.log.iter().filter_map(|entry| entry.vote()) {
            if vote.seq <= base.seq {
                continue;
            }
            let consistent = vote.view == View(0)
                || proofs
                    .get(&vote.view)
                    .is_some_and(|nv| consistent_with(vote, nv));
            let valid_body = bodies.get(&vote.digest).is_some_and(&batch_is_valid);
            if !consistent || !valid_body {
                continue;
            }
            let candidate = (vote.view, vote.ui.counter, vote.digest);
            best.entry(vote.seq)
                .and_modify(|current| {
                    if (candidate.0, std::cmp::Reverse(candidate.1))
                        > (current.0, std::cmp::Reverse(current.1))
                    {
                        *current = candidate;
                    }
                })
                .or_insert(candidate);
        }
    }
    let last = best.keys().next_back().copied().unwrap_or(base.seq);
    let decisions = (base.seq.next().0..=last.0)
        .map(|s| best.get(&Seq(s)).map_or(null.digest(), |(_, _, d)| *d))
        .collect();
    Decision {
        base,
        decisions,
        bodies,
    }
}
