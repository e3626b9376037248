//! One sequence number's worth of protocol state.

use crate::message::{Batch, PrepareVote, PreparedCert, Proposal};
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::ReplicaId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The most batch bodies a slot keeps (current proposal, prepared, committed).
const MAX_BODIES: usize = 3;

/// What a replica knows about one sequence number inside its window.
#[derive(Debug, Default, Clone)]
pub(crate) struct Slot {
    /// The accepted PRE-PREPARE of the current view.
    pub proposal: Option<Signed<Proposal>>,
    /// PREPAREs of the current view, one per sender.
    pub prepares: BTreeMap<ReplicaId, Signed<PrepareVote>>,
    /// COMMITs of the current view, one per sender.
    pub commits: BTreeMap<ReplicaId, Digest>,
    /// The prepared certificate of the highest view this replica prepared in.
    pub prepared: Option<PreparedCert>,
    /// The digest committed here (in any view): safe to execute.
    pub committed: Option<Digest>,
    /// This replica holds the current view's proposal without having voted for it
    /// (a crash may have lost its vote for this slot): its record then leaves the
    /// proposal out, which a restart would otherwise take for a vote.
    pub vote_withheld: bool,
    /// Batch bodies known for this sequence number, by digest.
    bodies: Vec<(Digest, Arc<Batch>)>,
}

impl Slot {
    /// The digest of the current view's proposal.
    pub fn proposed_digest(&self) -> Option<Digest> {
        self.proposal.as_ref().map(|p| p.digest)
    }

    /// Whether this slot prepared in the current view (the proposal's view).
    pub fn prepared_in_current_view(&self) -> bool {
        match (&self.proposal, &self.prepared) {
            (Some(p), Some(cert)) => cert.proposal.value == p.value,
            _ => false,
        }
    }

    /// The body with `digest`, if known.
    pub fn body(&self, digest: &Digest) -> Option<Arc<Batch>> {
        self.bodies
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, b)| b.clone())
    }

    /// All bodies, for persistence.
    pub fn bodies(&self) -> impl Iterator<Item = &Arc<Batch>> {
        self.bodies.iter().map(|(_, b)| b)
    }

    /// Records a body whose digest the caller has checked.
    pub fn add_body(&mut self, digest: Digest, batch: Arc<Batch>) {
        if self.body(&digest).is_some() {
            return;
        }
        if self.bodies.len() >= MAX_BODIES {
            let needed = [
                self.proposed_digest(),
                self.prepared.as_ref().map(|c| c.proposal.digest),
                self.committed,
            ];
            self.bodies.retain(|(d, _)| needed.contains(&Some(*d)));
            if self.bodies.len() >= MAX_BODIES {
                return;
            }
        }
        self.bodies.push((digest, batch));
    }

    /// Forgets everything that belonged to the previous view.
    pub fn enter_view(&mut self) {
        self.proposal = None;
        self.vote_withheld = false;
        self.prepares.clear();
        self.commits.clear();
    }
}
