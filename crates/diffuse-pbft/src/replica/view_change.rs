//! View change: VIEW-CHANGE, NEW-VIEW, and the timers that drive them.
//!
//! A backup whose oldest pending request does not execute in time moves to the next
//! view and broadcasts a VIEW-CHANGE with its stable checkpoint (`C`) and its
//! prepared certificates (`P`). The new primary collects a quorum of them (`V`),
//! computes one proposal per sequence number above the highest checkpoint in `V`
//! (`O`: the highest-view prepared digest, or the null batch for gaps) and
//! broadcasts NEW-VIEW. Backups recompute `O` from `V` and accept only an exact match.
//!
//! Liveness follows Castro and Liskov: a replica that sees `f + 1` view changes for
//! higher views joins the smallest of them, and the NEW-VIEW timer doubles with each
//! failed view change (capped by `view_change_backoff_max`). One refinement: the
//! NEW-VIEW timer starts once a quorum of replicas is at *this or a higher* view
//! (not only exactly this one), so replicas that lost each other's view changes
//! before the network stabilised cannot wait on each other forever.

use super::{Out, PbftReplica, Timer};
use crate::message::{
    CheckpointCert, Message, NewView, PreparedCert, Proposal, ViewChange, ViewChangeBody,
};
use crate::options::Mutant;
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::{ReplicaId, Seq, View};
use diffuse_core::protocol::Observation;
use diffuse_core::quorum::ReplicaSet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// View-change bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct ViewChangeState {
    /// This replica's VIEW-CHANGE for the view it is changing to.
    pub own: Option<ViewChange>,
    /// The latest valid VIEW-CHANGE of each replica (this one included).
    pub received: BTreeMap<ReplicaId, ViewChange>,
    /// Identities of view changes already verified, so that a NEW-VIEW carrying
    /// them does not cost the signature checks twice.
    verified: BTreeSet<Digest>,
    /// Consecutive failed view changes, for the timer's back-off.
    pub attempts: u32,
    /// The view whose NEW-VIEW timer runs.
    new_view_timer_for: Option<View>,
}

/// What a NEW-VIEW must contain, computed from its view changes.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The highest stable checkpoint among the view changes.
    pub stable: CheckpointCert,
    /// One digest per sequence number above it, up to the highest prepared one.
    pub entries: Vec<(Seq, Digest)>,
    /// The highest sequence number in `entries` (or the checkpoint's).
    pub max_seq: Seq,
}

impl PbftReplica {
    /// Moves to `target` (higher than the current view) and broadcasts VIEW-CHANGE.
    pub(super) fn start_view_change(&mut self, target: View, out: &mut Out) {
        debug_assert!(target > self.view);
        if target <= self.view {
            return;
        }
        // Requests staged as primary are checked and kept (or refused) before the
        // view is left: they go to the next primary like any pending request.
        self.verify_staged(out);
        self.view = target;
        self.view_active = false;
        self.current_new_view = None;
        for timer in [Timer::Batch, Timer::Request, Timer::NewView] {
            out.cancel_timer(timer);
        }
        self.batch_timer_running = false;
        self.request_timer_for = None;
        self.view_change.new_view_timer_for = None;
        for slot in self.log.values_mut() {
            slot.enter_view();
        }
        let vc = self.build_view_change(target);
        self.view_change.own = Some(vc.clone());
        self.view_change.received.insert(self.id, vc.clone());
        // The new view must be durable before anyone learns this replica left the old
        // one: after a restart it must not take part in the old view again.
        let writes = self.view_writes();
        out.persist(writes);
        out.broadcast(Message::ViewChange(vc));
        out.observe(Observation::ViewChangeStarted { view: target });
        self.check_view_change_progress(out);
    }

    /// This replica's VIEW-CHANGE for `target`: its stable checkpoint and, for each
    /// sequence number above it, its highest-view prepared certificate.
    pub(super) fn build_view_change(&self, target: View) -> ViewChange {
        let prepared: Vec<PreparedCert> = self
            .log
            .values()
            .filter_map(|slot| slot.prepared.clone())
            .collect();
        Signed::sign(
            ViewChangeBody {
                new_view: target,
                replica: self.id,
                stable: self.stable.clone(),
                prepared: BoundedVec::truncating(prepared),
            },
            &self.secret,
        )
    }

    pub(super) fn on_view_change(&mut self, from: ReplicaId, vc: ViewChange, out: &mut Out) {
        let (new_view, replica) = (vc.new_view, vc.replica);
        if new_view < self.view || (new_view == self.view && self.view_active) {
            return;
        }
        if !self.quorum.is_member(replica) {
            out.fault(from, "unknown-replica");
            return;
        }
        if self
            .view_change
            .received
            .get(&replica)
            .is_some_and(|existing| existing.new_view >= new_view)
        {
            return;
        }
        if !self.view_change_is_valid(&vc) {
            out.fault(from, "bad-view-change");
            return;
        }
        self.view_change.received.insert(replica, vc);
        self.check_view_change_progress(out);
    }

    /// Joins higher views on `f + 1` evidence, starts the NEW-VIEW timer once a quorum
    /// is at this view or higher, and as the new primary sends NEW-VIEW.
    fn check_view_change_progress(&mut self, out: &mut Out) {
        let higher: Vec<(ReplicaId, View)> = self
            .view_change
            .received
            .iter()
            .filter(|(r, vc)| **r != self.id && vc.new_view > self.view)
            .map(|(r, vc)| (*r, vc.new_view))
            .collect();
        let set: ReplicaSet = higher.iter().map(|(r, _)| *r).collect();
        if self.quorum.contains_correct(&set) {
            if let Some(target) = higher.iter().map(|(_, v)| *v).min() {
                self.start_view_change(target, out);
                return;
            }
        }
        if self.view_active {
            return;
        }
        let at_least: ReplicaSet = self
            .view_change
            .received
            .iter()
            .filter(|(_, vc)| vc.new_view >= self.view)
            .map(|(r, _)| *r)
            .collect();
        if self.quorum.is_quorum(&at_least)
            && self.view_change.new_view_timer_for != Some(self.view)
        {
            self.view_change.new_view_timer_for = Some(self.view);
            let timeout = self
                .options
                .view_change_timeout_after(self.view_change.attempts);
            out.set_timer(Timer::NewView, timeout);
        }
        if self.is_primary() {
            let exact: Vec<ViewChange> = self
                .view_change
                .received
                .values()
                .filter(|vc| vc.new_view == self.view)
                .cloned()
                .collect();
            let senders: ReplicaSet = exact.iter().map(|vc| vc.replica).collect();
            if self.quorum.is_quorum(&senders) {
                self.send_new_view(exact, out);
            }
        }
    }

    pub(super) fn on_new_view_timeout(&mut self, out: &mut Out) {
        if self.view_active || self.view_change.new_view_timer_for != Some(self.view) {
            return;
        }
        self.view_change.attempts = self.view_change.attempts.saturating_add(1);
        self.start_view_change(self.view.next(), out);
    }

    /// As the new primary: picks a quorum of view changes (its own, then the others by
    /// id), lists them by replica id, computes `O`, broadcasts NEW-VIEW and installs it.
    fn send_new_view(&mut self, mut candidates: Vec<ViewChange>, out: &mut Out) {
        candidates.sort_by_key(|vc| (vc.replica != self.id, vc.replica));
        let mut chosen = Vec::new();
        let mut senders = ReplicaSet::new();
        for vc in candidates {
            if self.quorum.is_quorum(&senders) {
                break;
            }
            senders.insert(vc.replica);
            chosen.push(vc);
        }
        chosen.sort_by_key(|vc| vc.replica);
        let plan = self.plan(&chosen);
        let proposals: Vec<Signed<Proposal>> = plan
            .entries
            .iter()
            .map(|(seq, digest)| {
                Signed::sign(
                    Proposal {
                        view: self.view,
                        seq: *seq,
                        digest: *digest,
                    },
                    &self.secret,
                )
            })
            .collect();
        let new_view = NewView {
            view: self.view,
            view_changes: BoundedVec::truncating(chosen),
            proposals: BoundedVec::truncating(proposals),
        };
        self.install_new_view(new_view, plan, out);
    }

    /// `O` from `V`: the deterministic function both the new primary and the backups
    /// compute. For each sequence number above the highest stable checkpoint, the
    /// digest prepared in the highest view, or the null batch if none prepared.
    pub(super) fn plan(&self, view_changes: &[ViewChange]) -> Plan {
        let stable = view_changes
            .iter()
            .map(|vc| &vc.stable)
            .max_by_key(|cert| cert.seq)
            .cloned()
            .unwrap_or_else(|| self.stable.clone());
        let low = stable.seq;
        let mut best: BTreeMap<Seq, (View, Digest)> = BTreeMap::new();
        for vc in view_changes {
            for cert in vc.prepared.iter() {
                let Proposal { view, seq, digest } = cert.proposal.value;
                if seq <= low {
                    continue;
                }
                if best.get(&seq).is_none_or(|(v, _)| view > *v) {
                    best.insert(seq, (view, digest));
                }
            }
        }
        let max_seq = best.keys().next_back().copied().unwrap_or(low).max(low);
        let drop_prepared = self.options.is(Mutant::NewViewDropsPrepared);
        let entries = (low.0 + 1..=max_seq.0)
            .map(Seq)
            .map(|seq| {
                let digest = match best.get(&seq) {
                    Some((_, digest)) if !drop_prepared => *digest,
                    _ => self.null_digest,
                };
                (seq, digest)
            })
            .collect();
        Plan {
            stable,
            entries,
            max_seq,
        }
    }

    pub(super) fn on_new_view(&mut self, from: ReplicaId, new_view: NewView, out: &mut Out) {
        if new_view.view < self.view
            || (new_view.view == self.view && self.view_active)
            || new_view.view.primary(self.n()) == self.id
        {
            return;
        }
        match self.verify_new_view(&new_view) {
            Ok(plan) => self.install_new_view(new_view, plan, out),
            Err(kind) => out.fault(from, kind),
        }
    }

    /// Checks `V` (a quorum of valid view changes for this view) and that `O` is
    /// exactly what `V` implies, signed by the view's primary.
    fn verify_new_view(&mut self, new_view: &NewView) -> Result<Plan, &'static str> {
        let mut senders = ReplicaSet::new();
        for vc in new_view.view_changes.iter() {
            if vc.new_view != new_view.view || !senders.insert(vc.replica) {
                return Err("bad-new-view");
            }
            if !self.view_change_is_valid(vc) {
                return Err("bad-view-change-in-new-view");
            }
        }
        if !self.quorum.is_quorum(&senders) {
            return Err("new-view-without-quorum");
        }
        let plan = self.plan(&new_view.view_changes);
        if plan.entries.len() != new_view.proposals.len() {
            return Err("new-view-proposals-mismatch");
        }
        let primary = new_view.view.primary(self.n());
        let key = self.replica_key(primary).copied();
        for ((seq, digest), proposal) in plan.entries.iter().zip(new_view.proposals.iter()) {
            let expected = Proposal {
                view: new_view.view,
                seq: *seq,
                digest: *digest,
            };
            if proposal.value != expected {
                return Err("new-view-proposals-mismatch");
            }
            if !key.is_some_and(|k| proposal.verify(&k)) {
                return Err("bad-new-view-proposal-signature");
            }
        }
        Ok(plan)
    }

    /// Whether a VIEW-CHANGE is signed by its sender and carries a valid checkpoint
    /// certificate and valid prepared certificates inside its window.
    pub(super) fn view_change_is_valid(&mut self, vc: &ViewChange) -> bool {
        let identity = Digest::of_value("diffuse/pbft/view-change-id", vc);
        if self.view_change.verified.contains(&identity) {
            return true;
        }
        let valid = self.check_view_change(vc);
        if valid {
            if self.view_change.verified.len() >= 4 * self.n() {
                self.view_change.verified.clear();
            }
            self.view_change.verified.insert(identity);
        }
        valid
    }

    fn check_view_change(&self, vc: &ViewChange) -> bool {
        let body = &vc.value;
        if !self.replica_key(body.replica).is_some_and(|k| vc.verify(k)) {
            return false;
        }
        if !self.checkpoint_cert_is_valid(&body.stable) {
            return false;
        }
        let low = body.stable.seq;
        let high = low.plus(self.options.window);
        let mut previous = low;
        for cert in body.prepared.iter() {
            let Proposal { view, seq, .. } = cert.proposal.value;
            if seq <= previous || seq > high || view >= body.new_view {
                return false;
            }
            previous = seq;
            if !self.options.is(Mutant::TrustViewChangeCertificates)
                && !self.prepared_cert_is_valid(cert)
            {
                return false;
            }
        }
        true
    }

    /// A prepared certificate: the primary's signed proposal and matching signed
    /// prepares from distinct backups, together a quorum.
    fn prepared_cert_is_valid(&self, cert: &PreparedCert) -> bool {
        let Proposal { view, seq, digest } = cert.proposal.value;
        let primary = view.primary(self.n());
        if !self
            .replica_key(primary)
            .is_some_and(|k| cert.proposal.verify(k))
        {
            return false;
        }
        let mut signers = ReplicaSet::new();
        signers.insert(primary);
        for prepare in cert.prepares.iter() {
            if prepare.view != view || prepare.seq != seq || prepare.digest != digest {
                return false;
            }
            if !self.quorum.is_member(prepare.replica) || !signers.insert(prepare.replica) {
                return false;
            }
            if !self
                .replica_key(prepare.replica)
                .is_some_and(|k| prepare.verify(k))
            {
                return false;
            }
        }
        self.quorum.is_quorum(&signers)
    }

    /// Enters the view of a verified NEW-VIEW and prepares its proposals.
    fn install_new_view(&mut self, new_view: NewView, plan: Plan, out: &mut Out) {
        self.verify_staged(out);
        let view = new_view.view;
        self.view = view;
        self.view_active = true;
        self.view_change.attempts = 0;
        self.view_change.own = None;
        self.view_change.new_view_timer_for = None;
        self.view_change.received.retain(|_, vc| vc.new_view > view);
        for timer in [Timer::NewView, Timer::Request, Timer::Batch] {
            out.cancel_timer(timer);
        }
        self.request_timer_for = None;
        self.batch_timer_running = false;
        self.prove_pending();
        for slot in self.log.values_mut() {
            slot.enter_view();
        }
        let primary = self.is_primary();
        let floor = self.low().max(plan.stable.seq);
        self.next_seq = plan.max_seq.max(floor).next();
        let null_batch = Arc::new(crate::message::Batch::default());
        let mut to_prepare = Vec::new();
        for proposal in new_view
            .proposals
            .iter()
            .filter(|p| p.seq > floor && p.seq <= floor.plus(self.options.window))
        {
            let (seq, digest) = (proposal.seq, proposal.digest);
            let slot = self.log.entry(seq).or_default();
            slot.proposal = Some(proposal.clone());
            if digest == self.null_digest {
                slot.add_body(digest, null_batch.clone());
            }
            if primary {
                if let Some(body) = slot.body(&digest) {
                    for r in body.requests.iter() {
                        self.pending.mark_proposed(r.client, r.timestamp, view);
                    }
                }
            }
            to_prepare.push((seq, digest));
        }
        self.current_new_view = Some(Arc::new(new_view.clone()));
        let mut writes = self.view_writes();
        for (seq, _) in &to_prepare {
            writes.extend(self.slot_writes(*seq));
        }
        out.persist(writes);
        if primary {
            out.broadcast(Message::NewView(new_view));
        }
        out.observe(Observation::ViewInstalled { view });
        if plan.stable.seq > self.low() {
            self.advance_stable(plan.stable, out);
        }
        for (seq, digest) in &to_prepare {
            if !self.log.contains_key(seq) {
                continue;
            }
            if !primary {
                self.send_prepare(*seq, *digest, out);
            }
            if self.log.get(seq).is_some_and(|s| s.body(digest).is_none()) {
                self.fetch_batch(*seq, *digest, out);
            }
        }
        self.replay_future(out);
        if !primary {
            let to_primary = self.primary();
            for pending in self.pending.iter() {
                out.send(to_primary, Message::Request(pending.request.clone()));
            }
        }
        for (seq, _) in &to_prepare {
            self.check_prepared(*seq, out);
        }
        self.ensure_request_timer(out);
        self.propose_batches(false, out);
    }
}
