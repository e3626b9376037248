//! The normal case: requests, batching, PREPARE / COMMIT, execution.

use super::{MinBftReplica, Out, Slot, Timer};
use crate::message::{Certified, Commit, Message, Prepare};
use diffuse_core::codec::{Blob, BoundedVec};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq};
use diffuse_core::protocol::Observation;
use diffuse_core::quorum::ReplicaSet;
use diffuse_core::service::Execution;
use diffuse_pbft::message::{Batch, Reply, Request};
use diffuse_tee::{Scope, TrustedComponent};

impl MinBftReplica {
    fn request_is_valid(&self, request: &Request) -> bool {
        self.pending
            .request_is_valid(request, &self.keys, self.options.base.max_operation_bytes)
    }

    pub(super) fn on_request(&mut self, from: NodeId, request: Request, out: &mut Out) {
        let from_client = from == NodeId::Client(request.client);
        if matches!(from, NodeId::Client(_)) && !from_client {
            return out.fault(from, "request-for-another-client");
        }
        if !self.request_is_valid(&request) {
            return out.fault(from, "bad-request");
        }
        let (client, timestamp) = (request.client, request.timestamp);
        let last = self.service.last_timestamp(client);
        if timestamp <= last {
            if timestamp == last && from_client {
                self.resend_reply(client, out);
            }
            return;
        }
        let known = self.pending.get(client).map(|p| p.request.timestamp);
        if known.is_some_and(|t| t > timestamp) {
            return;
        }
        let fresh = known != Some(timestamp) && self.pending.offer(request.clone(), None, true);
        self.ensure_request_timer(out);
        if self.is_primary() {
            if fresh {
                self.propose_batches(false, out);
            }
        } else if from_client {
            out.send(self.primary(), Message::Request(request));
        }
    }

    fn resend_reply(&self, client: ClientId, out: &mut Out) {
        if let Some((timestamp, result)) = self.service.cached_reply(client) {
            out.send(
                client,
                Message::Reply(self.reply(client, timestamp, result.to_vec())),
            );
        }
    }

    fn reply(&self, client: ClientId, timestamp: u64, result: Vec<u8>) -> Reply {
        Reply {
            view: self.view,
            client,
            timestamp,
            replica: self.id,
            result: Blob::try_from_vec(result).unwrap_or_default(),
        }
    }

    /// As primary, cuts batches from pending requests while the window, the
    /// pipeline and the enclave's slot rule allow. A partial batch goes out only when
    /// `flush` is set (the batch timer fired) or when no delay is configured.
    /// (Unlike PBFT, MinBFT pipelines partial batches too: holding them until the
    /// pipeline drains measured no faster here, and slower at 64 clients; see
    /// `docs/protocols/pbft.md`, "Options".)
    pub(super) fn propose_batches(&mut self, mut flush: bool, out: &mut Out) {
        if !self.is_primary() || !self.view_active {
            return;
        }
        let base = &self.options.base;
        let (max_requests, max_bytes, max_in_flight, delay) = (
            base.batch_max_requests,
            base.batch_max_bytes,
            base.max_in_flight,
            base.batch_delay,
        );
        loop {
            let in_flight = self.next_seq.0.saturating_sub(self.last_executed.0 + 1);
            let enclave_limit = self
                .with_enclave(|e| e.last_checkpoint())
                .map_or(0, |last| last + self.options.base.window);
            if self.next_seq > self.high()
                || self.next_seq.0 > enclave_limit
                || in_flight >= max_in_flight
            {
                return;
            }
            let mut requests = Vec::new();
            let mut bytes = 0usize;
            // Whether another pending request would not fit in this batch.
            let mut full = false;
            for pending in self.pending.unproposed(self.view) {
                let size = pending.request.operation.len();
                if requests.len() == max_requests
                    || (!requests.is_empty() && bytes + size > max_bytes)
                {
                    full = true;
                    break;
                }
                bytes += size;
                requests.push(pending.request.clone());
            }
            if requests.is_empty() {
                return;
            }
            let full = full || requests.len() == max_requests || bytes >= max_bytes;
            if !full && !flush && !delay.is_zero() {
                if !self.batch_timer_running {
                    self.batch_timer_running = true;
                    out.set_timer(Timer::Batch, delay);
                }
                return;
            }
            flush = false;
            let proposed: Vec<_> = requests.iter().map(|r| (r.client, r.timestamp)).collect();
            let batch = Batch {
                requests: BoundedVec::truncating(requests),
            };
            let seq = self.next_seq;
            if !self.send_prepare(seq, batch, out) {
                return; // the enclave refused: the requests stay unproposed
            }
            for (client, timestamp) in proposed {
                self.pending.mark_proposed(client, timestamp, self.view);
            }
            self.next_seq = seq.next();
        }
    }

    /// As primary: certifies and sends PREPARE for `batch` at `seq`, which is also
    /// this replica's vote. `false` if the enclave refused.
    pub(super) fn send_prepare(&mut self, seq: Seq, batch: Batch, out: &mut Out) -> bool {
        let (view, replica) = (self.view, self.id);
        let digest = batch.digest();
        let certified = self.certify(
            Scope::Slot(seq.0),
            &Prepare::certified_digest(replica, view, seq, &digest),
            |ui| {
                Certified::Prepare(Prepare {
                    replica,
                    view,
                    seq,
                    batch,
                    ui,
                })
            },
            out,
        );
        let Some(Certified::Prepare(prepare)) = certified else {
            return false;
        };
        out.broadcast(Message::Certified(Certified::Prepare(prepare.clone())));
        self.voted_bodies
            .insert((seq, digest), prepare.batch.clone());
        let slot = self.log.entry(seq).or_default();
        slot.prepare = Some(prepare);
        slot.votes.insert(replica);
        self.try_commit(seq, out);
        true
    }

    /// The first PREPARE for a slot in the primary's stream is the one accepted.
    pub(super) fn on_prepare(&mut self, prepare: Prepare, out: &mut Out) {
        if prepare.replica != prepare.view.primary(self.n()) {
            return out.fault(prepare.replica, "prepare-from-a-backup");
        }
        if prepare.view < self.view
            || self.skipped_view(prepare.view)
            || prepare.seq <= self.low()
            || self.sender_left(prepare.replica, prepare.view)
        {
            return;
        }
        if !self.knows_new_view(prepare.view) {
            // Restarted without this view's NEW-VIEW: it cannot judge the PREPARE
            // (nor vote for it) until it has the view's proof.
            return;
        }
        let seq = prepare.seq;
        let decided = match self.new_view_constraint(&prepare) {
            Ok(decided) => decided,
            Err(()) => return out.fault(prepare.replica, "prepare-outside-its-new-view"),
        };
        if decided.is_some_and(|d| d != prepare.batch.digest()) {
            return out.fault(prepare.replica, "prepare-against-new-view-decision");
        }
        // The PREPARE taken from a copy (`on_prepare_copy`), now the first for the
        // slot in the primary's stream: this replica votes for it, as others may
        // still need its vote.
        let copied = self.log.get(&seq).is_some_and(|slot| {
            slot.copied
                && slot.prepare.as_ref().map(Prepare::reference) == Some(prepare.reference())
        });
        if !copied
            && self
                .log
                .get(&seq)
                .is_some_and(|slot| slot.prepare.is_some() || slot.rejected)
        {
            return out.fault(prepare.replica, "second-prepare-for-a-slot");
        }
        if !self.pending.all_valid(
            prepare.batch.requests.iter(),
            &self.keys,
            self.options.base.max_operation_bytes,
        ) {
            // The first PREPARE for the slot in the primary's stream was invalid: the
            // slot takes no later one in this view, so "first in counter order" means
            // the same thing to every replica and to the view change.
            self.log.entry(seq).or_default().rejected = true;
            return out.fault(prepare.replica, "prepare-with-bad-request");
        }
        let reference = prepare.reference();
        self.voted_bodies
            .insert((seq, reference.digest), prepare.batch.clone());
        let slot = self.log.entry(seq).or_default();
        slot.copied = false;
        slot.votes.insert(prepare.replica);
        let early = std::mem::take(&mut slot.early_votes);
        for (voter, _) in early.into_iter().filter(|(_, r)| *r == reference) {
            slot.votes.insert(voter);
        }
        slot.prepare = Some(prepare);
        if self.vc.target.is_some() {
            // Leaving this view: the PREPARE can still gather others' votes and
            // commit, but this replica no longer votes in the view.
            return self.try_commit(seq, out);
        }
        let me = self.id;
        if let Some(batch) = self.voted_bodies.get(&(seq, reference.digest)) {
            out.persist(vec![Self::body_write(seq, batch)]);
        }
        let certified = self.certify(
            Scope::Slot(seq.0),
            &Commit::certified_digest(me, &reference),
            |ui| {
                Certified::Commit(Commit {
                    replica: me,
                    prepare: reference,
                    ui,
                })
            },
            out,
        );
        if let Some(commit) = certified {
            out.broadcast(Message::Certified(commit));
            if let Some(slot) = self.log.get_mut(&seq) {
                slot.votes.insert(me);
            }
        }
        self.try_commit(seq, out);
    }

    /// A COMMIT counts only for the PREPARE this replica accepted for the slot.
    pub(super) fn on_commit(&mut self, commit: Commit, out: &mut Out) {
        let seq = commit.prepare.seq;
        if commit.prepare.view < self.view
            || self.skipped_view(commit.prepare.view)
            || seq <= self.low()
            || self.sender_left(commit.replica, commit.prepare.view)
        {
            return;
        }
        let slot = self.log.entry(seq).or_default();
        let accepted = slot.prepare.as_ref().map(Prepare::reference);
        let Some(accepted) = accepted else {
            // Its PREPARE is still on its way in the primary's stream.
            slot.early_votes.insert(commit.replica, commit.prepare);
            return;
        };
        if accepted != commit.prepare {
            return out.fault(commit.replica, "commit-for-another-prepare");
        }
        if let Some(slot) = self.log.get_mut(&seq) {
            slot.votes.insert(commit.replica);
        }
        self.try_commit(seq, out);
    }

    /// Every status interval: the next slot to execute has no PREPARE while a later
    /// one has votes. A Byzantine primary may have sent its PREPAREs to some
    /// replicas only and answer nobody else's STREAM-FETCH, or a new primary may
    /// skip re-proposals its stable checkpoint covers; if the replicas that executed
    /// have nothing pending, they never join a view change. The voters of the first
    /// voted slot from it on accepted its PREPAREs: ask them.
    pub(super) fn fetch_withheld_prepares(&mut self, out: &mut Out) {
        let next = self.last_executed.max(self.low()).next();
        let previous = self.stuck_at.take();
        if self
            .log
            .get(&next)
            .is_some_and(|slot| slot.prepare.is_some() || slot.rejected)
        {
            return;
        }
        let voters = self.log.range(next..).find_map(|(_, slot)| {
            let voters: ReplicaSet = slot
                .votes
                .iter()
                .chain(slot.early_votes.keys().copied())
                .filter(|voter| *voter != self.id)
                .collect();
            (!voters.is_empty()).then_some(voters)
        });
        if voters.is_none() {
            return;
        }
        self.stuck_at = Some(next);
        if previous != Some(next) {
            return; // first seen stuck: the PREPARE may just be in flight
        }
        for voter in voters.iter().flat_map(ReplicaSet::iter) {
            out.send(voter, Message::FetchPrepares(next));
        }
    }

    /// Copies of the PREPAREs this replica accepted from `seq` on, after its stable
    /// certificate if it collected `seq`: one answer per peer per status interval.
    pub(super) fn on_fetch_prepares(&mut self, from: ReplicaId, seq: Seq, out: &mut Out) {
        if !self.prepares_served.insert(from) {
            return;
        }
        if seq <= self.low() {
            out.send(from, Message::Stable(self.stable.clone()));
        }
        for prepare in self
            .log
            .range(seq..)
            .filter_map(|(_, s)| s.prepare.as_ref())
        {
            out.send(from, Message::PrepareCopy(Box::new(prepare.clone())));
        }
    }

    /// A PREPARE from outside the primary's stream: taken only if, with the
    /// COMMITs for it consumed from their senders' streams, it has `f + 1` votes.
    /// Unless the primary is correct, one of those COMMITs is then from a correct
    /// replica, which accepted it as the slot's first PREPARE in the primary's
    /// stream before the primary left the view: the slot is committed as if this
    /// replica had consumed it. This replica votes for it only once it comes
    /// through the primary's stream (`on_prepare`).
    pub(super) fn on_prepare_copy(&mut self, from: ReplicaId, prepare: Prepare, out: &mut Out) {
        let seq = prepare.seq;
        let unseen = self
            .streams
            .next_expected(prepare.replica)
            .is_some_and(|next| next <= prepare.ui.counter);
        if self.is_locked()
            || self.transfer.is_some()
            || !unseen
            || prepare.view != self.view
            || prepare.replica != self.primary()
            || seq <= self.low()
        {
            return;
        }
        let reference = prepare.reference();
        let Some(slot) = self.log.get(&seq) else {
            return;
        };
        if slot.prepare.is_some() || slot.rejected {
            return;
        }
        let mut votes: ReplicaSet = slot
            .early_votes
            .iter()
            .filter(|(_, named)| **named == reference)
            .map(|(voter, _)| *voter)
            .collect();
        votes.insert(prepare.replica);
        if !self.quorum.is_quorum(&votes) {
            return;
        }
        let Some(key) = self.enclave_keys.get(prepare.replica.index()).copied() else {
            return;
        };
        let digest =
            Prepare::certified_digest(prepare.replica, prepare.view, seq, &prepare.batch.digest());
        if !self
            .with_enclave(|e| e.accept_ui(&key, Scope::Slot(seq.0), &digest, &prepare.ui))
            .unwrap_or(false)
        {
            return out.fault(from, "bad-prepare-copy");
        }
        if let Some(slot) = self.log.get_mut(&seq) {
            slot.early_votes.clear();
            slot.votes = votes;
            slot.prepare = Some(prepare);
            slot.copied = true;
        }
        self.try_commit(seq, out);
    }

    fn try_commit(&mut self, seq: Seq, out: &mut Out) {
        let Some(slot) = self.log.get_mut(&seq) else {
            return;
        };
        if !slot.committed && slot.prepare.is_some() && self.quorum.is_quorum(&slot.votes) {
            slot.committed = true;
            self.execute_ready(out);
        }
    }

    pub(super) fn execute_ready(&mut self, out: &mut Out) {
        let mut progressed = false;
        loop {
            let seq = self.last_executed.next();
            let Some(Slot {
                prepare: Some(prepare),
                committed: true,
                ..
            }) = self.log.get(&seq)
            else {
                break;
            };
            let batch = prepare.batch.clone();
            self.execute_batch(seq, &batch, out);
            self.last_executed = seq;
            progressed = true;
            if seq.0 % self.options.base.checkpoint_interval == 0 {
                self.take_checkpoint(seq, out);
            }
        }
        if progressed {
            // Progress: the request timer starts over for what is still pending.
            out.cancel_timer(Timer::Request);
            self.request_timer_running = false;
            self.ensure_request_timer(out);
            self.propose_batches(false, out);
        }
    }

    /// In an active view, every replica (the primary too) runs the request timer
    /// while a request is pending.
    pub(super) fn ensure_request_timer(&mut self, out: &mut Out) {
        if self.view_active && !self.request_timer_running && !self.pending.is_empty() {
            self.request_timer_running = true;
            out.set_timer(Timer::Request, self.view_change_timeout());
        }
    }

    fn execute_batch(&mut self, seq: Seq, batch: &Batch, out: &mut Out) {
        let mut executed = 0;
        for request in batch.requests.iter() {
            let (client, timestamp) = (request.client, request.timestamp);
            self.pending.executed(client, timestamp);
            if let Execution::Executed(result) =
                self.service.execute(client, timestamp, &request.operation)
            {
                executed += 1;
                out.send(
                    client,
                    Message::Reply(self.reply(client, timestamp, result)),
                );
            }
        }
        out.observe(Observation::Executed {
            seq,
            batch: batch.digest(),
            requests: executed,
        });
    }
}
