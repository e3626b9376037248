//! The view change (§4.4, Fig. 6, as `docs/protocols/fastbft.md` builds it).
//!
//! A backup keeps the client requests that reach it and asks for the next view
//! (REQ-VIEW-CHANGE) when one waits too long, or at once when the primary sends
//! something only a faulty primary sends. `f + 1` requests for a view make a
//! replica leave its view: its enclave freezes its position and certifies it with
//! the digest of its log, and the VIEW-CHANGE goes to the new primary. With `f + 1`
//! checked VIEW-CHANGEs the new primary computes the decision, picks `f` active
//! replicas, starts the view in its enclave and broadcasts NEW-VIEW. A replica
//! checks the NEW-VIEW (every VIEW-CHANGE, the decision recomputed, the tree),
//! votes for it with its enclave (ACCEPT), and enters the view once `f` replicas
//! besides the new primary voted. The new primary then PREPAREs the decided
//! batches again, at the same sequence numbers, before anything new.

use super::{Epoch, FastBftReplica, Out, Timer};
use crate::checkpoint::{primary_key, primary_of};
use crate::message::{Accept, ClientReply, Message, ReqViewChange, TreeConfig};
use crate::view_log::{
    Decision, NewView, NewViewHeader, StreamState, ViewChange, check_new_view, check_view_change,
    decide, new_view_digest,
};
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{PublicKey, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_core::protocol::Observation;
use diffuse_pbft::message::Request;
use diffuse_tee::{FastBftComponent, Tree, ViewAccept, first_epoch};
use std::collections::BTreeMap;

/// Client requests a backup watches, at most.
const MAX_WATCHED_REQUESTS: usize = 4096;
/// Request timer periods a request may wait while the stream moves (tree
/// rebuilds, other batches) before the backup suspects the primary of ignoring it.
const PATIENCE_WITH_PROGRESS: u8 = 16;
/// Request timer periods a request may wait while the stream does not move.
const PATIENCE_WITHOUT_PROGRESS: u8 = 2;

/// The view-change state of a replica.
#[derive(Debug, Default)]
pub(crate) struct ViewChangeState {
    /// The view this replica left its own for, until it enters one.
    pub(crate) target: Option<u64>,
    /// The highest view this replica asked for.
    asked: u64,
    /// The highest view each replica asked for.
    requested: BTreeMap<ReplicaId, u64>,
    /// As the primary of a view ahead: each sender's checked VIEW-CHANGE for the
    /// highest view it asked this replica to lead.
    received: BTreeMap<ReplicaId, ViewChange>,
    /// A checked NEW-VIEW waiting for votes, with its decision.
    pending: Option<Box<(NewView, Decision)>>,
    /// Each replica's latest vote for a view ahead (or, at a primary, for its own).
    votes: BTreeMap<ReplicaId, Accept>,
    /// As the primary of the current view: its NEW-VIEW, for replicas that missed
    /// it, and the replicas it was sent to again this status interval.
    installed: Option<Box<NewView>>,
    served: std::collections::BTreeSet<ReplicaId>,
    served_timer: bool,
    /// Failed view changes in a row: the timer doubles with each.
    backoff: u32,
    timer_armed: bool,
    /// Client requests waiting here, with how long they waited
    /// ([`Waiting`]).
    pub(crate) requests: BTreeMap<(ClientId, u64), (Request, Waiting)>,
    /// Per client, the highest timestamp this backup saw a proven REPLY for (one
    /// entry per registered client at most).
    answered: BTreeMap<ClientId, u64>,
    request_timer: bool,
    /// The stream position when the request timer last fired.
    position_at_fire: Option<crate::message::Position>,
}

/// How long a watched request has waited, in request timer periods.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Waiting {
    /// Periods in all.
    periods: u8,
    /// Periods in which this replica's stream did not move.
    quiet: u8,
    /// Came from its client: relayed to the other backups if it is still waiting
    /// a full period later.
    relay: bool,
}

/// Request timer periods a request from its client waits here before this backup
/// relays it to the others (see [`FastBftReplica::on_request_timer`]).
const PERIODS_BEFORE_RELAY: u8 = 2;

impl FastBftReplica {
    /// A client's request: the primary orders it, a backup watches it.
    pub(super) fn on_request(&mut self, from: NodeId, request: Request, out: &mut Out) {
        // Clients send their own requests; replicas forward them to a new primary.
        if matches!(from, NodeId::Client(c) if c != request.client) {
            return out.fault(from, "request-for-another-client");
        }
        if self.primary.is_some() && self.in_view() {
            return self.on_primary_request(from, request, out);
        }
        let Some(key) = self.keys.client(request.client) else {
            return;
        };
        if !still_waiting(
            &self.service,
            &self.vc.answered,
            request.client,
            request.timestamp,
        ) || self.vc.requests.len() >= MAX_WATCHED_REQUESTS
            || self
                .vc
                .requests
                .contains_key(&(request.client, request.timestamp))
        {
            return;
        }
        if request.operation.len() > self.options.base.max_operation_bytes
            || !request.signature_is_valid(key)
        {
            return out.fault(from, "bad-request");
        }
        let client = request.client;
        // One request per client: its latest.
        let older: Vec<_> = self
            .vc
            .requests
            .range((client, 0)..(client, request.timestamp))
            .map(|(k, _)| *k)
            .collect();
        for k in older {
            self.vc.requests.remove(&k);
        }
        self.vc
            .requests
            .entry((client, request.timestamp))
            .or_insert((
                request,
                Waiting {
                    relay: matches!(from, NodeId::Client(_)),
                    ..Waiting::default()
                },
            ));
        if !self.vc.request_timer {
            self.vc.request_timer = true;
            out.set_timer(Timer::Request, self.request_timer_period());
        }
    }

    /// A batch ran: the requests it executed wait only for their REPLY, and the
    /// view works.
    pub(super) fn unblock_requests(&mut self, _out: &mut Out) {
        self.vc.backoff = 0;
        self.forget_answered_requests();
    }

    /// Stops watching the requests that no longer wait: older than their client's
    /// latest executed one, or executed with a proven REPLY.
    fn forget_answered_requests(&mut self) {
        let (service, answered) = (&self.service, &self.vc.answered);
        self.vc
            .requests
            .retain(|(client, t), _| still_waiting(service, answered, *client, *t));
    }

    /// A REPLY relayed to this backup (by the primary, answering a request the
    /// backup forwarded): if it proves the result of a request watched here, the
    /// request is answered. The backup relays it to the client itself, so that a
    /// primary cannot end the watch while keeping the client waiting.
    pub(super) fn on_reply_proof(&mut self, reply: ClientReply, out: &mut Out) {
        let key = (reply.client, reply.timestamp);
        let Some((request, _)) = self.vc.requests.get(&key) else {
            return;
        };
        // A faulty client may have sent two requests under one timestamp, and a
        // correct primary proves the other one: not a fault, just no proof.
        if !crate::client::reply_proves(&reply, request, &self.enclave_keys) {
            return;
        }
        self.vc.requests.remove(&key);
        let answered = self.vc.answered.entry(reply.client).or_default();
        *answered = (*answered).max(reply.timestamp);
        out.send(NodeId::Client(reply.client), Message::Reply(reply));
    }

    /// The request timer. A request that waits [`PATIENCE_WITHOUT_PROGRESS`]
    /// periods while the stream stands still (the primary orders nothing), or
    /// [`PATIENCE_WITH_PROGRESS`] periods in all (the primary orders others' but
    /// not this one), makes the backup suspect the primary. While the tree is
    /// rebuilt around a faulty active replica the stream moves, so failures the
    /// tree handles do not cost a view change (§4.3).
    pub(super) fn on_request_timer(&mut self, out: &mut Out) {
        self.vc.request_timer = false;
        self.forget_answered_requests();
        if self.vc.requests.is_empty() {
            return;
        }
        // An executed request whose client still asks: the primary either opens
        // its reply round and proves it to this backup, or is suspected like one
        // that ignores a request (a primary that lets batches execute but never
        // opens their replies must not stall the clients forever).
        if self.in_view() && !self.is_primary() {
            let primary = self.primary_id();
            for ((client, t), (request, _)) in &self.vc.requests {
                if *t <= self.service.last_timestamp(*client) {
                    out.send(primary, Message::Request(request.clone()));
                }
            }
        }
        let position = self.next_position();
        let moved = self.vc.position_at_fire != Some(position);
        self.vc.position_at_fire = Some(position);
        let mut late = false;
        let (primary, me, n, in_view) = (self.primary_id(), self.id, self.n, self.in_view());
        for (request, waiting) in self.vc.requests.values_mut() {
            waiting.periods = waiting.periods.saturating_add(1);
            // A request from its client that still waits a full period later is
            // relayed to the other backups (the client widens its retransmissions
            // one backup at a time, see `client.rs`), so that every correct backup
            // watches it once one does. Relayed requests are not relayed again,
            // and a request answered within the period (most, even in a cluster
            // too slow for the clients' first timeouts) costs no relay: relaying
            // at once made 512 starting clients of 103 replicas send 50,000
            // relays, each a signature check, and the cluster stalled.
            if waiting.relay && waiting.periods >= PERIODS_BEFORE_RELAY && in_view {
                waiting.relay = false;
                let others = (0..n as u16)
                    .map(ReplicaId)
                    .filter(|r| *r != me && *r != primary);
                out.multicast(others, Message::Request(request.clone()));
            }
            waiting.quiet = if moved {
                0
            } else {
                waiting.quiet.saturating_add(1)
            };
            late |= waiting.quiet >= PATIENCE_WITHOUT_PROGRESS
                || waiting.periods >= PATIENCE_WITH_PROGRESS;
        }
        if late && self.in_view() {
            self.suspect_primary("request-timeout", out);
        }
        self.vc.request_timer = true;
        out.set_timer(Timer::Request, self.request_timer_period());
    }

    /// The request timer's period: the view-change timeout, doubled for each
    /// view change since a batch last executed (as the view-change timer), so
    /// that a new view gets the time to build its tree and fill its pipeline
    /// before its primary is suspected in turn.
    fn request_timer_period(&self) -> std::time::Duration {
        self.options.base.view_change_timeout_after(self.vc.backoff)
    }

    /// Asks for the view after the one this replica is in or going to, once.
    pub(super) fn suspect_primary(&mut self, _why: &'static str, out: &mut Out) {
        let next = self.vc.target.unwrap_or(self.view).saturating_add(1);
        if next > self.vc.asked {
            self.request_view(next, out);
        }
    }

    /// Broadcasts REQ-VIEW-CHANGE for `view` and waits for it.
    fn request_view(&mut self, view: u64, out: &mut Out) {
        self.vc.asked = self.vc.asked.max(view);
        out.broadcast(Message::ReqViewChange(ReqViewChange {
            view,
            replace_me: false,
        }));
        self.note_request(self.id, view, false, out);
        self.arm_view_change_timer(out);
    }

    fn arm_view_change_timer(&mut self, out: &mut Out) {
        if self.vc.timer_armed {
            return;
        }
        self.vc.timer_armed = true;
        let timeout = self.options.base.view_change_timeout_after(self.vc.backoff);
        self.vc.backoff = self.vc.backoff.saturating_add(1);
        out.set_timer(Timer::ViewChange, timeout);
    }

    /// The view change did not complete in time: ask for the next view.
    pub(super) fn on_view_change_timer(&mut self, out: &mut Out) {
        self.vc.timer_armed = false;
        self.repeat_vote(out);
        if self.in_view() && self.vc.pending.is_none() {
            if self.vc.asked > self.view {
                // Fewer than f + 1 replicas asked yet (or the requests were lost):
                // ask again.
                out.broadcast(Message::ReqViewChange(ReqViewChange {
                    view: self.vc.asked,
                    replace_me: false,
                }));
                self.arm_view_change_timer(out);
            }
            return;
        }
        let next = self
            .vc
            .target
            .unwrap_or(self.view)
            .max(self.vc.pending.as_ref().map_or(0, |p| p.0.view))
            .saturating_add(1);
        self.request_view(next.max(self.vc.asked), out);
    }

    pub(super) fn on_req_view_change(
        &mut self,
        from: ReplicaId,
        req: ReqViewChange,
        out: &mut Out,
    ) {
        if from.index() >= self.n {
            return;
        }
        if self.primary.is_some() {
            // It may have missed this view's NEW-VIEW (if it asks for this view or
            // an earlier one, it did).
            self.send_new_view_to(from, out);
        }
        self.note_request(from, req.view, req.replace_me, out);
    }

    /// Sends this view's NEW-VIEW and the votes for it to a replica that missed
    /// them, once per replica and status interval.
    pub(super) fn send_new_view_to(&mut self, replica: ReplicaId, out: &mut Out) {
        let Some(nv) = self.vc.installed.clone() else {
            return;
        };
        // Once per replica and status interval: a lost answer is sent again on
        // the next request, and a flood of requests costs one answer each.
        if replica == self.id || !self.vc.served.insert(replica) {
            return;
        }
        self.arm_served_timer(out);
        out.send(replica, Message::NewView(nv));
        for vote in self.vc.votes.values().filter(|a| a.view == self.view) {
            out.send(replica, Message::Accept(vote.clone()));
        }
    }

    /// Records that `from` asked for `view`; leaves for the highest view that
    /// `f + 1` replicas asked for at least, if it is above the current target.
    fn note_request(&mut self, from: ReplicaId, view: u64, replace_me: bool, out: &mut Out) {
        if view <= self.view || first_epoch(view).is_none() {
            return;
        }
        let entry = self.vc.requested.entry(from).or_insert(view);
        *entry = (*entry).max(view);
        let mut views: Vec<u64> = self
            .vc
            .requested
            .values()
            .copied()
            .filter(|v| *v > self.view)
            .collect();
        views.sort_unstable_by(|a, b| b.cmp(a));
        // The primary asking to be replaced (it restarted, and cannot rejoin its
        // own view) is enough: a faulty primary can stop the view anyway. Only
        // when it says so: a request it sent before it led this view (asking to
        // skip it, sweep seed 1556 at n = 7) arrives late as one of f + 1.
        let primary_asks =
            replace_me && from == self.primary_id() && from != self.id && view == self.view + 1;
        let agreed = match views.get(self.f) {
            Some(&agreed) => agreed,
            None if primary_asks => view,
            None => return,
        };
        if self.vc.target.is_none_or(|t| agreed > t) {
            self.start_view_change(agreed, out);
        }
    }

    /// Stops following the current view: no primary duties, no rounds.
    fn leave_current_view(&mut self, out: &mut Out) {
        for (at, _) in std::mem::take(&mut self.rounds) {
            out.cancel_timer(Timer::Round(at.0, at.1));
        }
        if let Some(epoch) = &self.epoch {
            out.cancel_timer(Timer::Rebuild(epoch.number()));
        }
        out.cancel_timer(Timer::Batch);
        self.early_shares.clear();
        self.primary = None;
    }

    /// Leaves the view for `target`: the enclave certifies this replica's position
    /// and log, and the VIEW-CHANGE goes to the new primary. A replica whose log
    /// a restart lost waits for the view without a VIEW-CHANGE.
    pub(super) fn start_view_change(&mut self, target: u64, out: &mut Out) {
        if self.rejoin.log_lost {
            if self.vc.target.is_none_or(|t| t < target) && !self.rejoin.locked {
                self.vc.target = Some(target);
                self.arm_view_change_timer(out);
            }
            return;
        }
        let log = self.log.to_view_log(self.view, self.stable.as_ref());
        let digest = log.digest();
        let Ok(cert) = self.enclave_call(|e| e.leave_view(target, &digest)) else {
            return;
        };
        self.leave_current_view(out);
        self.vc.target = Some(target);
        if self.vc.pending.as_ref().is_some_and(|p| p.0.view < target) {
            self.vc.pending = None;
        }
        out.observe(Observation::ViewChangeStarted { view: View(target) });
        self.arm_view_change_timer(out);
        let vc = ViewChange {
            replica: self.id,
            cert,
            log,
        };
        let new_primary = primary_of(target, self.n);
        if new_primary == self.id {
            self.on_view_change(self.id, vc, out);
        } else {
            out.send(new_primary, Message::ViewChange(Box::new(vc)));
        }
    }

    /// A VIEW-CHANGE for a view this replica leads.
    pub(super) fn on_view_change(&mut self, from: ReplicaId, vc: ViewChange, out: &mut Out) {
        let target = vc.cert.target;
        if vc.replica != from || primary_of(target, self.n) != self.id || target <= self.view {
            return;
        }
        if self
            .vc
            .received
            .get(&from)
            .is_some_and(|known| known.cert.target >= target)
        {
            return;
        }
        if check_view_change(&vc, target, &self.rules()).is_err() {
            return out.fault(from, "bad-view-change");
        }
        self.vc.received.insert(from, vc);
        self.try_new_view(target, out);
    }

    /// With `f + 1` VIEW-CHANGEs for `target`: NEW-VIEW.
    fn try_new_view(&mut self, target: u64, out: &mut Out) {
        let count = self
            .vc
            .received
            .values()
            .filter(|vc| vc.cert.target == target)
            .count();
        if count <= self.f || target <= self.view {
            return;
        }
        if self.vc.target.is_none_or(|t| t < target) {
            // f + 1 replicas left: so does the new primary (its own VIEW-CHANGE
            // comes back here).
            return self.start_view_change(target, out);
        }
        if self.vc.target != Some(target) {
            return;
        }
        // Its own VIEW-CHANGE first (if any), then by sender.
        let mut chosen: Vec<ViewChange> = self
            .vc
            .received
            .values()
            .filter(|vc| vc.cert.target == target)
            .cloned()
            .collect();
        chosen.sort_by_key(|vc| (vc.replica != self.id, vc.replica));
        chosen.truncate(self.f + 1);
        let decision = decide(&chosen, &self.rules());
        let actives = self.choose_actives(&chosen);
        let Some(epoch) = first_epoch(target) else {
            return;
        };
        let fan_out = self.options.fan_out;
        let Ok(tree) = Tree::balanced(actives.len(), fan_out) else {
            return;
        };
        let config = TreeConfig {
            epoch,
            actives: BoundedVec::truncating(actives),
            fan_out: fan_out as u16,
            fallback: false,
        };
        let digest = new_view_digest(target, &config, &decision);
        let keys: Vec<PublicKey> = config
            .actives
            .iter()
            .map(|r| self.enclave_keys[r.index()])
            .collect();
        let Ok((cert, wrapped)) = self.enclave_call(|e| e.start_view(target, &digest, &keys, tree))
        else {
            return;
        };
        let nv = NewView {
            view: target,
            view_changes: BoundedVec::truncating(chosen),
            config: config.clone(),
            cert: cert.clone(),
            keys: BoundedVec::truncating(wrapped),
        };
        out.broadcast(Message::NewView(Box::new(nv.clone())));
        let header = NewViewHeader {
            view: target,
            config,
            decision,
            cert,
        };
        self.install_view(header, tree, out);
        self.vc.installed = Some(Box::new(nv));
        self.start_view_as_primary(out);
    }

    /// The new view's `f` active replicas: those whose VIEW-CHANGEs came (they are
    /// up), then the others after the new primary, in order.
    fn choose_actives(&self, chosen: &[ViewChange]) -> Vec<ReplicaId> {
        let mut actives: Vec<ReplicaId> = chosen
            .iter()
            .map(|vc| vc.replica)
            .filter(|r| *r != self.id)
            .collect();
        for k in 1..self.n {
            let r = ReplicaId(((self.id.index() + k) % self.n) as u16);
            if !actives.contains(&r) {
                actives.push(r);
            }
        }
        actives.truncate(self.f);
        actives
    }

    /// A NEW-VIEW: checked, voted for, and entered once `f` others voted.
    pub(super) fn on_new_view(&mut self, from: ReplicaId, nv: NewView, out: &mut Out) {
        let view = nv.view;
        if from != primary_of(view, self.n)
            || view <= self.view
            || self.vc.target.is_some_and(|t| view < t)
            || self.vc.pending.as_ref().is_some_and(|p| p.0.view >= view)
        {
            return;
        }
        let decision = match check_new_view(&nv, &self.rules()) {
            Ok(decision) => decision,
            Err(_) => {
                out.fault(from, "bad-new-view");
                if view.saturating_add(1) > self.vc.asked {
                    self.request_view(view.saturating_add(1), out);
                }
                return;
            }
        };
        let Some(primary) = primary_key(&self.enclave_keys, view) else {
            return;
        };
        let Ok(vote) = self.enclave_call(|e| e.accept_view(&primary, &nv.cert)) else {
            return;
        };
        if self.vc.target.is_none_or(|t| t < view) {
            self.leave_current_view(out);
            self.vc.target = Some(view);
        }
        let accept = Accept {
            replica: self.id,
            view,
            accept: vote,
        };
        out.broadcast(Message::Accept(accept.clone()));
        self.vc.votes.insert(self.id, accept);
        self.vc.pending = Some(Box::new((nv, decision)));
        self.arm_view_change_timer(out);
        self.try_enter(out);
    }

    /// A replica's vote for a NEW-VIEW (its enclave's signature, checked when the
    /// votes are counted, says whose it is, whoever relays it).
    pub(super) fn on_accept(&mut self, accept: Accept, out: &mut Out) {
        let voter = accept.replica;
        if accept.view < self.view {
            return;
        }
        // Checked now, so that a vote relayed in another's name cannot take the
        // voter's place.
        let genuine = self
            .enclave_keys
            .get(voter.index())
            .is_some_and(|key| accept.accept.verify(key))
            && Some(accept.accept.epoch) == first_epoch(accept.view);
        if !genuine {
            return;
        }
        if accept.view == self.view && voter != self.id && self.vc.served.insert(voter) {
            // A vote for the view this replica is in: its voter is still waiting
            // for votes (it sends its own again until it enters); answer with ours.
            self.arm_served_timer(out);
            if let Some(own) = self.vc.votes.get(&self.id).filter(|a| a.view == self.view) {
                out.send(voter, Message::Accept(own.clone()));
            }
        }
        let own_view = accept.view == self.view && self.primary.is_some();
        if (accept.view == self.view && !own_view)
            || self
                .vc
                .votes
                .get(&voter)
                .is_some_and(|known| known.view >= accept.view)
        {
            return;
        }
        self.vc.votes.insert(voter, accept);
        self.try_enter(out);
    }

    /// While a NEW-VIEW waits for votes: sends this replica's own vote again (the
    /// replicas in the view answer with theirs).
    pub(super) fn repeat_vote(&mut self, out: &mut Out) {
        let Some(pending) = &self.vc.pending else {
            return;
        };
        let view = pending.0.view;
        if let Some(own) = self.vc.votes.get(&self.id).filter(|a| a.view == view) {
            out.broadcast(Message::Accept(own.clone()));
        }
    }

    /// Enters the pending NEW-VIEW's view once `f` replicas other than its primary
    /// voted for it.
    fn try_enter(&mut self, out: &mut Out) {
        let Some(pending) = &self.vc.pending else {
            return;
        };
        let (nv, _) = &**pending;
        let view = nv.view;
        let new_primary = primary_of(view, self.n);
        let votes: Vec<(PublicKey, Signed<ViewAccept>)> = self
            .vc
            .votes
            .iter()
            .filter(|(r, a)| a.view == view && **r != new_primary)
            .filter_map(|(r, a)| Some((*self.enclave_keys.get(r.index())?, a.accept.clone())))
            .collect();
        if votes.len() < self.f {
            return;
        }
        let Some(primary) = primary_key(&self.enclave_keys, view) else {
            return;
        };
        let my_key = nv
            .config
            .actives
            .iter()
            .position(|r| *r == self.id)
            .and_then(|i| nv.keys.get(i).cloned());
        let entered =
            self.enclave_call(|e| e.enter_view(&primary, &nv.cert, &votes, my_key.as_ref()));
        if entered.is_err() {
            return;
        }
        let Some(pending) = self.vc.pending.take() else {
            return;
        };
        let (nv, decision) = *pending;
        let Ok(tree) = Tree::balanced(nv.config.actives.len(), usize::from(nv.config.fan_out))
        else {
            return;
        };
        let header = NewViewHeader {
            view,
            config: nv.config,
            decision,
            cert: nv.cert,
        };
        self.install_view(header, tree, out);
        // The requests waiting here go to the new primary at once.
        let waiting: Vec<Request> = self.vc.requests.values().map(|(r, _)| r.clone()).collect();
        for request in waiting {
            out.send(new_primary, Message::Request(request));
        }
    }

    /// Enters view `header.view`: its first tree, its decision as the stream's
    /// start, a fresh log based on its NEW-VIEW.
    fn install_view(&mut self, header: NewViewHeader, tree: Tree, out: &mut Out) {
        let view = header.view;
        self.view = view;
        self.rejoin.log_lost = false;
        self.rejoin.replace_me = false;
        self.vc.target = None;
        self.vc.pending = None;
        self.vc.received.retain(|_, vc| vc.cert.target > view);
        self.vc.votes.retain(|_, a| a.view >= view);
        self.vc.installed = None;
        self.vc.served.clear();
        self.vc.requested.retain(|_, v| *v > view);
        if self.vc.timer_armed {
            self.vc.timer_armed = false;
            out.cancel_timer(Timer::ViewChange);
        }
        self.leave_current_view(out);
        self.stream = StreamState::after(&header.decision);
        self.epoch = Some(Epoch {
            config: header.config.clone(),
            tree,
        });
        let first = (header.cert.view, 0);
        self.held = self.held.split_off(&first);
        self.packages = self.packages.split_off(&first);
        self.fetched_at = None;
        self.package_waits = 0;
        self.batches.clear();
        let checkpoint = header.decision.checkpoint.clone();
        self.log.replace(super::log::PositionLog::entered(header));
        out.observe(Observation::ViewInstalled { view: View(view) });
        if let Some(proof) = checkpoint {
            self.adopt_stable(proof, out);
        }
        self.drain(out);
    }

    /// The decision of the view just entered (for its new primary).
    pub(super) fn decided(&self) -> Vec<(Seq, diffuse_pbft::message::Batch)> {
        self.log
            .base()
            .map(|b| b.decision.entries().map(|(s, b)| (s, b.clone())).collect())
            .unwrap_or_default()
    }
}

impl FastBftReplica {
    fn arm_served_timer(&mut self, out: &mut Out) {
        if !self.vc.served_timer {
            self.vc.served_timer = true;
            out.set_timer(Timer::Served, self.options.base.status_interval);
        }
    }

    /// A status interval passed: NEW-VIEWs and votes may be sent again.
    pub(super) fn on_served_timer(&mut self) {
        self.vc.served_timer = false;
        self.vc.served.clear();
    }
}

/// Whether a backup still watches request `(client, t)`: not executed yet, or its
/// client's latest executed request with no REPLY proven to this backup. (A client
/// retransmits to the backups only while it has no REPLY.)
fn still_waiting(
    service: &diffuse_core::service::ReplicatedService,
    answered: &BTreeMap<ClientId, u64>,
    client: ClientId,
    t: u64,
) -> bool {
    let last = service.last_timestamp(client);
    t > last || (t == last && answered.get(&client).is_none_or(|a| *a < t))
}
