//! View change: REQ-VIEW-CHANGE, VIEW-CHANGE, NEW-VIEW and NEW-VIEW-ACK.
//!
//! `f + 1` requests for a view (a VIEW-CHANGE counts as one) make a replica leave
//! its view and certify a VIEW-CHANGE. The new primary names `f + 1` VIEW-CHANGEs
//! in its NEW-VIEW with the decision from them (`crate::evidence`); every replica
//! consumes those VIEW-CHANGEs from their senders' streams, recomputes the decision,
//! and acknowledges. The view becomes active with `f + 1` acknowledgements: the
//! NEW-VIEW is then a proof that later VIEW-CHANGEs carry for votes in this view.
//! The primary then re-proposes the decided batches as ordinary PREPAREs.

use super::{MinBftReplica, Out, Timer};
use crate::evidence::{Decision, Rules, decide};
use crate::message::{
    Certified, FetchViewChanges, LogEntry, Message, NewView, NewViewAck, NewViewProof, Prepare,
    ReqViewChange, ViewChange, ViewChangeDraft, ViewChangeRef,
};
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{ReplicaId, Seq, View};
use diffuse_core::protocol::Observation;
use diffuse_pbft::message::Batch;
use diffuse_tee::{Scope, verify_scoped_ui};
use std::collections::{BTreeMap, BTreeSet};

/// VIEW-CHANGEs kept per sender (for different views): a NEW-VIEW may name one
/// that its sender has already superseded by a VIEW-CHANGE for a later view.
const VIEW_CHANGES_PER_SENDER: usize = 4;

/// The view-change state of a replica.
#[derive(Debug, Default)]
pub(crate) struct ViewChangeState {
    /// The view this replica sent a VIEW-CHANGE for and has not entered yet.
    pub target: Option<View>,
    /// The highest view each replica asked for (REQ-VIEW-CHANGE or VIEW-CHANGE).
    pub requested: BTreeMap<ReplicaId, View>,
    /// Checked VIEW-CHANGEs for views above the current one, by view and sender
    /// (at most [`VIEW_CHANGES_PER_SENDER`] per sender: its newest).
    pub received: BTreeMap<(View, ReplicaId), ViewChange>,
    /// The view each sender has left its older views for, by its stream: its later
    /// messages for older views are ignored.
    pub left: BTreeMap<ReplicaId, View>,
    /// Views whose first NEW-VIEW was invalid: no later one is accepted for them.
    pub dead: BTreeSet<View>,
    /// Failed view changes in a row: the timer doubles with each.
    pub backoff: u32,
    /// The current view's NEW-VIEW and its acknowledgements, until active.
    pub new_view: Option<NewView>,
    pub acks: BTreeMap<ReplicaId, NewViewAck>,
    /// Proofs of the views this replica voted in above its stable checkpoint.
    pub proofs: BTreeMap<View, NewViewProof>,
    /// As the new primary: the decided bodies to re-propose once active.
    pub reproposals: BTreeMap<Seq, Batch>,
    /// Peers that asked for a view proof this status interval.
    pub proofs_served: BTreeSet<ReplicaId>,
    /// The VIEW-CHANGEs the current view's NEW-VIEW names (if this replica entered
    /// it by the NEW-VIEW): copies for replicas that did not get them.
    pub named: Vec<ViewChange>,
    /// Peers that asked for VIEW-CHANGE copies this status interval.
    pub copies_served: BTreeSet<ReplicaId>,
}

impl MinBftReplica {
    fn rules(&self) -> Rules<'_> {
        Rules {
            quorum: &self.quorum,
            enclave_keys: &self.enclave_keys,
            checkpoint_interval: self.options.base.checkpoint_interval,
            window: self.options.base.window,
            genesis: self.genesis,
        }
    }

    /// The request timer fired, or a view change took too long: ask for the next view.
    pub(super) fn suspect_primary(&mut self, out: &mut Out) {
        let next = self.vc.target.unwrap_or(self.view).next();
        self.vc.backoff = self.vc.backoff.saturating_add(1);
        out.broadcast(Message::ReqViewChange(ReqViewChange { view: next }));
        self.note_request(self.id, next, out);
        // Wait for others to agree; ask again (one view higher) if nothing happens.
        out.set_timer(Timer::ViewChange, self.view_change_timeout());
    }

    pub(super) fn view_change_timeout(&self) -> std::time::Duration {
        self.options.base.view_change_timeout_after(self.vc.backoff)
    }

    pub(super) fn on_req_view_change(
        &mut self,
        from: ReplicaId,
        req: ReqViewChange,
        out: &mut Out,
    ) {
        self.note_request(from, req.view, out);
    }

    /// Records that `from` asked for `view`; joins the lowest view that `f + 1`
    /// replicas asked for at least, if it is above the current one.
    fn note_request(&mut self, from: ReplicaId, view: View, out: &mut Out) {
        if view <= self.view {
            return;
        }
        let entry = self.vc.requested.entry(from).or_insert(view);
        *entry = (*entry).max(view);
        let mut views: Vec<View> = self.vc.requested.values().copied().collect();
        views.sort_unstable_by(|a, b| b.cmp(a));
        let Some(&agreed) = views.get(self.quorum.f()) else {
            return;
        };
        if agreed > self.view && self.vc.target.is_none_or(|t| agreed > t) {
            self.start_view_change(agreed, out);
        }
    }

    /// Leaves the current view for `target`: certifies and sends a VIEW-CHANGE.
    fn start_view_change(&mut self, target: View, out: &mut Out) {
        self.view_active = false;
        self.batch_timer_running = false;
        self.request_timer_running = false;
        for timer in [Timer::Batch, Timer::Request] {
            out.cancel_timer(timer);
        }
        let draft = self.build_view_change(target);
        let digest = draft.certified_digest();
        let certified = self.certify(
            Scope::Free,
            &digest,
            |ui| Certified::ViewChange(Box::new(draft.certified(ui))),
            out,
        );
        let Some(Certified::ViewChange(vc)) = certified else {
            return;
        };
        self.vc.target = Some(target);
        out.observe(Observation::ViewChangeStarted { view: target });
        out.broadcast(Message::Certified(Certified::ViewChange(vc.clone())));
        self.vc.received.insert((target, self.id), *vc);
        out.set_timer(Timer::ViewChange, self.view_change_timeout());
        self.try_send_new_view(out);
    }

    /// This replica's VIEW-CHANGE for `target`, without its UI yet.
    fn build_view_change(&self, target: View) -> ViewChangeDraft {
        let reach = self
            .options
            .base
            .window
            .saturating_sub(self.options.base.checkpoint_interval);
        let anchor = match self.sent.front() {
            Some(Certified::Checkpoint(cp))
                if cp.seq.0.saturating_add(reach) <= self.stable.seq.0 && cp.ui.counter > 1 =>
            {
                Some(*cp)
            }
            _ => None,
        };
        let log: Vec<LogEntry> = self
            .sent
            .iter()
            .skip(usize::from(anchor.is_some()))
            .map(LogEntry::of)
            .collect();
        let mut batches: BTreeMap<Digest, Batch> = BTreeMap::new();
        let mut views: BTreeSet<View> = BTreeSet::new();
        for vote in log.iter().filter_map(LogEntry::vote) {
            if vote.seq <= self.stable.seq {
                continue;
            }
            if let Some(batch) = self.voted_bodies.get(&(vote.seq, vote.digest)) {
                batches.insert(vote.digest, batch.clone());
            }
            if vote.view > View(0) {
                views.insert(vote.view);
            }
        }
        let proofs = views
            .iter()
            .filter_map(|v| self.vc.proofs.get(v).cloned())
            .collect();
        ViewChangeDraft {
            replica: self.id,
            view: target,
            stable: self.stable.clone(),
            anchor,
            log: BoundedVec::truncating(log),
            batches: BoundedVec::truncating(batches.into_values().collect()),
            proofs: BoundedVec::truncating(proofs),
        }
    }

    /// A VIEW-CHANGE, consumed in its sender's stream order.
    pub(super) fn on_view_change(&mut self, vc: ViewChange, out: &mut Out) {
        let sender = vc.replica;
        let left = self.vc.left.entry(sender).or_default();
        *left = (*left).max(vc.view);
        if vc.view <= self.view {
            return;
        }
        if let Err(why) = self.rules().check_view_change(&vc) {
            return out.fault(sender, why);
        }
        let view = vc.view;
        self.vc.received.insert((view, sender), vc);
        let mine: Vec<View> = self
            .vc
            .received
            .keys()
            .filter(|(_, r)| *r == sender)
            .map(|(v, _)| *v)
            .collect();
        for old in mine
            .iter()
            .take(mine.len().saturating_sub(VIEW_CHANGES_PER_SENDER))
        {
            self.vc.received.remove(&(*old, sender));
        }
        self.note_request(sender, view, out);
        self.try_send_new_view(out);
    }

    /// The VIEW-CHANGEs received for `view`, ordered by sender.
    fn view_changes_for(&self, view: View) -> Vec<&ViewChange> {
        self.vc
            .received
            .range((view, ReplicaId(0))..=(view, ReplicaId(u16::MAX)))
            .map(|(_, vc)| vc)
            .collect()
    }

    fn decide_from(&self, vcs: &[&ViewChange]) -> Decision {
        decide(vcs, |batch| {
            self.pending.all_valid(
                batch.requests.iter(),
                &self.keys,
                self.options.base.max_operation_bytes,
            )
        })
    }

    /// As the new primary with `f + 1` VIEW-CHANGEs for its view: NEW-VIEW.
    fn try_send_new_view(&mut self, out: &mut Out) {
        let Some(target) = self.vc.target else {
            return;
        };
        // `vc.new_view` may still hold the NEW-VIEW of the view being left (entered,
        // never activated): that one must not stop this replica's NEW-VIEW.
        let sent = matches!(&self.vc.new_view, Some(nv) if nv.view >= target);
        if target.primary(self.n()) != self.id || sent {
            return;
        }
        let vcs: Vec<&ViewChange> = self
            .view_changes_for(target)
            .into_iter()
            .take(self.quorum.f() + 1)
            .collect();
        if vcs.len() <= self.quorum.f() {
            return;
        }
        let decision = self.decide_from(&vcs);
        let refs: Vec<ViewChangeRef> = vcs
            .iter()
            .map(|vc| ViewChangeRef {
                replica: vc.replica,
                counter: vc.ui.counter,
                digest: vc.certified_digest(),
            })
            .collect();
        let (replica, base) = (self.id, decision.base.seq);
        let decisions = BoundedVec::truncating(decision.decisions.clone());
        let view_changes = BoundedVec::truncating(refs);
        let digest = NewView::digest_of(replica, target, base, &decisions, &view_changes);
        let certified = self.certify(
            Scope::Free,
            &digest,
            |ui| {
                Certified::NewView(NewView {
                    replica,
                    view: target,
                    base,
                    decisions,
                    view_changes,
                    ui,
                })
            },
            out,
        );
        if let Some(Certified::NewView(new_view)) = certified {
            out.broadcast(Message::Certified(Certified::NewView(new_view.clone())));
            self.install(new_view, decision, out);
        }
    }

    /// Whether the VIEW-CHANGEs a NEW-VIEW names may still arrive in their
    /// senders' streams (the NEW-VIEW waits for them).
    pub(super) fn new_view_waits(&self, nv: &NewView) -> bool {
        nv.view_changes.iter().any(|r| {
            let have = self.vc.received.contains_key(&(nv.view, r.replica));
            !have
                && r.replica != self.id
                && self
                    .streams
                    .next_expected(r.replica)
                    .is_some_and(|next| next <= r.counter)
        })
    }

    /// A NEW-VIEW, consumed in the primary's stream once the VIEW-CHANGEs it names
    /// were consumed: recomputed, then entered.
    pub(super) fn on_new_view(&mut self, nv: NewView, out: &mut Out) {
        let primary = nv.replica;
        let target = self.vc.target.unwrap_or(self.view);
        if nv.view <= self.view || nv.view < target || self.vc.dead.contains(&nv.view) {
            return;
        }
        if primary != nv.view.primary(self.n()) {
            return out.fault(primary, "new-view-from-a-backup");
        }
        let mut vcs: Vec<&ViewChange> = Vec::new();
        let mut senders = BTreeSet::new();
        for r in nv.view_changes.iter() {
            let found = self
                .vc
                .received
                .get(&(nv.view, r.replica))
                .filter(|vc| vc.ui.counter == r.counter && vc.certified_digest() == r.digest);
            match found {
                Some(vc) if senders.insert(r.replica) => vcs.push(vc),
                _ => {
                    // Not blamed: this replica may have re-anchored the sender's
                    // stream past it. It catches up by the view's proof instead.
                    self.vc.dead.insert(nv.view);
                    return;
                }
            }
        }
        if vcs.len() != self.quorum.f() + 1 {
            self.vc.dead.insert(nv.view);
            return out.fault(primary, "new-view-wrong-number-of-view-changes");
        }
        let decision = self.decide_from(&vcs);
        if decision.base.seq != nv.base || !decision.decisions.iter().eq(nv.decisions.iter()) {
            self.vc.dead.insert(nv.view);
            return out.fault(primary, "new-view-wrong-decision");
        }
        self.install(nv, decision, out);
    }

    /// Enters the NEW-VIEW's view: adopts its checkpoint, drops the old views'
    /// slots, and acknowledges.
    fn install(&mut self, nv: NewView, decision: Decision, out: &mut Out) {
        let view = nv.view;
        if decision.base.seq > self.low() {
            self.adopt_stable(decision.base, out);
        }
        let named: Vec<ViewChange> = nv
            .view_changes
            .iter()
            .filter_map(|r| self.vc.received.get(&(view, r.replica)).cloned())
            .collect();
        self.enter_view(&nv);
        self.vc.named = named;
        if self.is_primary() {
            for (offset, digest) in nv.decisions.iter().enumerate() {
                let seq = Seq(nv.base.0 + 1 + offset as u64);
                if let Some(body) = decision.bodies.get(digest).filter(|_| seq > self.low()) {
                    self.vc.reproposals.insert(seq, body.clone());
                }
            }
        }
        let nv_digest = nv.certified_digest();
        self.vc.acks.clear();
        self.vc.new_view = Some(nv);
        if let Some(ack) = self.acknowledge(view, nv_digest, out) {
            self.on_new_view_ack(ack, out);
        }
        out.set_timer(Timer::ViewChange, self.view_change_timeout());
    }

    /// Certifies and broadcasts this replica's NEW-VIEW-ACK for `view`'s NEW-VIEW.
    fn acknowledge(&mut self, view: View, nv_digest: Digest, out: &mut Out) -> Option<NewViewAck> {
        let me = self.id;
        let certified = self.certify(
            Scope::Free,
            &NewViewAck::certified_digest(me, view, &nv_digest),
            |ui| {
                Certified::NewViewAck(NewViewAck {
                    replica: me,
                    view,
                    new_view: nv_digest,
                    ui,
                })
            },
            out,
        );
        let Some(Certified::NewViewAck(ack)) = certified else {
            return None;
        };
        out.broadcast(Message::Certified(Certified::NewViewAck(ack)));
        Some(ack)
    }

    /// The bookkeeping of entering `nv`'s view (not active yet): older views'
    /// view-change state, slots and re-proposals are dropped.
    fn enter_view(&mut self, nv: &NewView) {
        let view = nv.view;
        self.view = view;
        self.view_active = false;
        self.vc.target = None;
        self.vc.received.retain(|(v, _), _| *v > view);
        self.vc.requested.retain(|_, v| *v > view);
        self.vc.dead.retain(|v| *v > view);
        self.vc.reproposals.clear();
        self.vc.named.clear();
        self.log.clear();
        self.next_seq = nv.last_decided().max(self.low()).next();
    }

    /// A NEW-VIEW-ACK, consumed in its sender's stream order.
    pub(super) fn on_new_view_ack(&mut self, ack: NewViewAck, out: &mut Out) {
        let left = self.vc.left.entry(ack.replica).or_default();
        *left = (*left).max(ack.view);
        let Some(nv) = &self.vc.new_view else {
            return;
        };
        if ack.view != self.view || self.view_active || ack.new_view != nv.certified_digest() {
            return;
        }
        self.vc.acks.insert(ack.replica, ack);
        let ackers = self.vc.acks.keys().copied().collect();
        if self.quorum.is_quorum(&ackers) {
            self.activate(out);
        }
    }

    /// `f + 1` replicas entered the view: it is active. The primary re-proposes the
    /// decided batches; everyone resumes the streams that waited for the view.
    fn activate(&mut self, out: &mut Out) {
        let Some(nv) = self.vc.new_view.take() else {
            return;
        };
        let acks = std::mem::take(&mut self.vc.acks).into_values().collect();
        let proof = NewViewProof {
            new_view: nv,
            acks: BoundedVec::truncating(acks),
        };
        out.persist(vec![Self::proof_write(&proof)]);
        self.vc.proofs.insert(self.view, proof);
        self.view_active = true;
        self.vc.backoff = 0;
        out.cancel_timer(Timer::ViewChange);
        out.observe(Observation::ViewInstalled { view: self.view });
        let reproposals = std::mem::take(&mut self.vc.reproposals);
        for (seq, batch) in reproposals {
            if seq > self.low() {
                self.send_prepare(seq, batch, out);
            }
        }
        self.ensure_request_timer(out);
        self.propose_batches(false, out);
    }

    /// A certified NEW-VIEW of a view this replica missed (it was behind): entered
    /// directly, because one of its `f + 1` acknowledgers checked it. This replica
    /// acknowledges it too: replicas still collecting acknowledgements may be
    /// missing those of Byzantine acknowledgers that sent theirs to some only. A
    /// proof of the view this replica entered and waits in only activates it.
    pub(super) fn on_new_view_proof(
        &mut self,
        from: ReplicaId,
        proof: NewViewProof,
        out: &mut Out,
    ) {
        let view = proof.new_view.view;
        let nv_digest = proof.new_view.certified_digest();
        let entered = self.waiting_for_acks()
            && self.vc.new_view.as_ref().map(NewView::certified_digest) == Some(nv_digest);
        let restored = view == self.view && self.lacks_new_view();
        if !(view > self.view || entered || restored) || self.vc.target.is_some_and(|t| t > view) {
            return;
        }
        if !proof.is_valid(&self.quorum, &self.enclave_keys) {
            return out.fault(from, "bad-new-view-proof");
        }
        if !entered {
            self.enter_view(&proof.new_view);
            self.acknowledge(view, nv_digest, out);
        }
        self.vc.new_view = Some(proof.new_view.clone());
        self.vc.acks = proof.acks.iter().map(|a| (a.replica, *a)).collect();
        self.activate(out);
        self.drain_streams(out);
    }

    /// Whether this replica entered its view by the NEW-VIEW and is still collecting
    /// acknowledgements.
    fn waiting_for_acks(&self) -> bool {
        !self.view_active && self.vc.target.is_none() && self.vc.new_view.is_some()
    }

    /// A peer announced a view above this replica's, or the view this replica is
    /// in but not active in: ask it for the proof. Acks that Byzantine replicas sent
    /// to some only, or that their sender collected before this replica's stream
    /// reached them, may never arrive; the proof stands for them.
    pub(super) fn maybe_fetch_view(&mut self, from: ReplicaId, view: View, out: &mut Out) {
        let stuck = self.waiting_for_acks() || self.lacks_new_view();
        let behind = view > self.view || (view == self.view && stuck);
        if behind && self.vc.target.is_none_or(|t| t <= view) {
            out.send(from, Message::FetchNewView(view));
        }
    }

    pub(super) fn on_fetch_new_view(&mut self, from: ReplicaId, view: View, out: &mut Out) {
        if !self.view_active || view != self.view || !self.vc.proofs_served.insert(from) {
            return;
        }
        if let Some(proof) = self.vc.proofs.get(&view) {
            out.send(from, Message::NewViewProof(Box::new(proof.clone())));
        }
    }

    /// Every status interval: for each NEW-VIEW held in its primary's stream because
    /// VIEW-CHANGEs it names have not come through their senders' streams, ask the
    /// primary for copies (a Byzantine sender may have certified its VIEW-CHANGE
    /// for the primary only; the primary named it, so the primary has it).
    pub(super) fn fetch_missing_view_changes(&self, out: &mut Out) {
        let senders: Vec<ReplicaId> = self.streams.senders().collect();
        for sender in senders {
            let Some(Certified::NewView(nv)) = self.streams.peek(sender) else {
                continue;
            };
            if nv.view <= self.view || self.skipped_view(nv.view) || !self.new_view_waits(nv) {
                continue;
            }
            let missing: Vec<ReplicaId> = nv
                .view_changes
                .iter()
                .map(|r| r.replica)
                .filter(|r| *r != self.id && !self.vc.received.contains_key(&(nv.view, *r)))
                .collect();
            out.send(
                nv.replica,
                Message::FetchViewChanges(FetchViewChanges {
                    view: nv.view,
                    missing: BoundedVec::truncating(missing),
                }),
            );
        }
    }

    /// Copies of the current view's named VIEW-CHANGEs: one answer per peer per
    /// status interval.
    pub(super) fn on_fetch_view_changes(
        &mut self,
        from: ReplicaId,
        fetch: FetchViewChanges,
        out: &mut Out,
    ) {
        if fetch.view != self.view || !self.vc.copies_served.insert(from) {
            return;
        }
        for vc in self
            .vc
            .named
            .iter()
            .filter(|vc| fetch.missing.contains(&vc.replica))
        {
            out.send(from, Message::ViewChangeCopy(Box::new(vc.clone())));
        }
    }

    /// A VIEW-CHANGE copy: used if the NEW-VIEW waiting at the head of its
    /// primary's stream names it, and checked like one from the sender's stream.
    pub(super) fn on_view_change_copy(&mut self, from: ReplicaId, vc: ViewChange, out: &mut Out) {
        let primary = vc.view.primary(self.n());
        let named = match self.streams.peek(primary) {
            Some(Certified::NewView(nv)) if nv.view == vc.view => nv.view_changes.iter().any(|r| {
                r.replica == vc.replica
                    && r.counter == vc.ui.counter
                    && r.digest == vc.certified_digest()
            }),
            _ => false,
        };
        if !named || vc.view <= self.view || self.vc.received.contains_key(&(vc.view, vc.replica)) {
            return;
        }
        let Some(key) = self.enclave_keys.get(vc.replica.index()) else {
            return;
        };
        if !verify_scoped_ui(key, Scope::Free, &vc.certified_digest(), &vc.ui) {
            return out.fault(from, "bad-view-change-copy");
        }
        self.on_view_change(vc, out);
        self.drain_streams(out);
    }

    /// Whether a vote of `sender` in `view` comes from a view it has left.
    pub(super) fn sender_left(&self, sender: ReplicaId, view: View) -> bool {
        self.vc.left.get(&sender).is_some_and(|left| view < *left)
    }

    /// Whether this replica is in a view whose NEW-VIEW it does not have: it
    /// restarted after acknowledging it, before the view was active. It fetches the
    /// view's proof, and cannot judge the view's PREPAREs until then.
    pub(super) fn lacks_new_view(&self) -> bool {
        self.view > View(0)
            && !self.view_active
            && self.vc.target.is_none()
            && self.vc.new_view.is_none()
    }

    /// Whether the NEW-VIEW of `view` is known here (view 0 has none).
    pub(super) fn knows_new_view(&self, view: View) -> bool {
        view == View(0)
            || self.vc.proofs.contains_key(&view)
            || self.vc.new_view.as_ref().is_some_and(|nv| nv.view == view)
    }

    /// The decision a PREPARE of the current view must match, if its slot was
    /// re-proposed; `Err` if the PREPARE cannot be valid in this view at all.
    pub(super) fn new_view_constraint(&self, prepare: &Prepare) -> Result<Option<Digest>, ()> {
        let entered = self
            .vc
            .proofs
            .get(&prepare.view)
            .map(|proof| &proof.new_view)
            .or(self
                .vc
                .new_view
                .as_ref()
                .filter(|nv| nv.view == prepare.view));
        let Some(nv) = entered else {
            return if prepare.view == View(0) {
                Ok(None)
            } else {
                Err(())
            };
        };
        if prepare.ui.counter <= nv.ui.counter || prepare.seq <= nv.base {
            return Err(());
        }
        Ok(nv.decision(prepare.seq))
    }

    /// Forgets proofs of views no retained vote is in (they are all below the
    /// stable checkpoint).
    pub(super) fn collect_proofs(&mut self, out: &mut Out) {
        let low = self.low();
        let needed: BTreeSet<View> = self
            .sent
            .iter()
            .filter_map(|m| match m {
                Certified::Prepare(p) if p.seq > low => Some(p.view),
                Certified::Commit(c) if c.prepare.seq > low => Some(c.prepare.view),
                _ => None,
            })
            .collect();
        let current = self.view;
        let obsolete: Vec<View> = self
            .vc
            .proofs
            .keys()
            .filter(|view| **view != current && !needed.contains(view))
            .copied()
            .collect();
        for view in obsolete {
            self.vc.proofs.remove(&view);
            out.persist(vec![Self::proof_delete(view)]);
        }
        self.voted_bodies = self
            .voted_bodies
            .split_off(&(low.next(), Digest::default()));
    }
}
