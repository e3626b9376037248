//! The normal case: requests, batching, PRE-PREPARE / PREPARE / COMMIT, execution.

use super::{Admission, Out, PbftReplica, Timer};
use crate::message::{
    Batch, Commit, Message, PrePrepare, PrepareVote, PreparedCert, Proposal, Reply, Request,
};
use crate::options::Mutant;
use diffuse_core::codec::{Blob, BoundedVec};
use diffuse_core::crypto::{Digest, SignatureBatch, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq};
use diffuse_core::protocol::Observation;
use diffuse_core::quorum::ReplicaSet;
use diffuse_core::service::Execution;
use std::collections::BTreeSet;
use std::sync::Arc;

impl PbftReplica {
    /// Whether a request is well-formed and carries its (registered) client's valid
    /// signature: the proof every replica accepts. A request identical to a pending
    /// one whose signature was checked is not checked again.
    pub(super) fn request_is_signed(&mut self, request: &Request) -> bool {
        if request.operation.len() > self.options.max_operation_bytes {
            return false;
        }
        let Some(key) = self.keys.client(request.client) else {
            return false;
        };
        if self.pending.holds_proven(request) {
            return true;
        }
        self.request_signature_checks += 1;
        request.signature_is_valid(key)
    }

    /// Whether a request inside a PRE-PREPARE is authentic to this replica, and how:
    /// `Some(false)` if its own MAC entry verifies (or it is byte for byte a pending
    /// request that was checked before), `Some(true)` if it took the signature,
    /// `None` if neither (the primary forged it, or passed on a faulty client's
    /// request that a correct primary would have refused).
    fn authenticate_in_batch(&mut self, request: &Request) -> Option<bool> {
        if request.operation.len() > self.options.max_operation_bytes
            || self.keys.client(request.client).is_none()
        {
            return None;
        }
        if let Some(p) = self.pending.get(request.client) {
            if p.request == *request {
                return Some(p.proven);
            }
        }
        if self.options.is(Mutant::TrustRequestsInBatch) {
            return Some(false);
        }
        if self.macs.verify(request, &self.keys).is_ok() {
            return Some(false);
        }
        self.request_is_signed(request).then_some(true)
    }

    pub(super) fn on_request(&mut self, from: NodeId, request: Request, out: &mut Out) {
        let from_client = from == NodeId::Client(request.client);
        if matches!(from, NodeId::Client(_)) && !from_client {
            out.fault(from, "request-for-another-client");
            return;
        }
        // A request that reaches a replica directly (from its client, or relayed by a
        // replica) is taken only with a valid signature: a primary must propose only
        // requests that every correct backup can authenticate, and a backup must time
        // only requests that a correct primary would propose.
        let trusted_mac = self.options.is(Mutant::PrimaryTrustsMacs)
            && self.is_primary()
            && request.operation.len() <= self.options.max_operation_bytes
            && self.macs.verify(&request, &self.keys).is_ok();
        if trusted_mac {
            if self.accept_request(from, request, out) {
                self.propose_batches(false, out);
            }
            return;
        }
        if self.view_active && self.is_primary() && !self.pending.holds_proven(&request) {
            // The active primary checks signatures in batches: the request waits
            // (at most the batching delay) with the others that arrive meanwhile.
            self.stage_request(from, request, out);
            return;
        }
        if !self.request_is_signed(&request) {
            out.fault(from, "bad-request");
            return;
        }
        if self.accept_request(from, request, out) {
            self.propose_batches(false, out);
        }
    }

    /// Takes a request whose signature is valid (or, for the mutant, whose MAC is).
    /// Returns whether it is new to this replica as the active primary (so batches
    /// may be cut).
    fn accept_request(&mut self, from: NodeId, request: Request, out: &mut Out) -> bool {
        let from_client = from == NodeId::Client(request.client);
        let (client, timestamp) = (request.client, request.timestamp);
        let last = self.service.last_timestamp(client);
        if timestamp <= last {
            if timestamp == last && from_client {
                self.resend_reply(client, out);
            }
            return false;
        }
        let known = self.pending.get(client).map(|p| p.request.timestamp);
        if known.is_some_and(|t| t > timestamp) {
            return false;
        }
        if known == Some(timestamp) {
            // Held so far on the strength of a MAC only: keep the signed copy.
            self.pending.upgrade(&request);
        }
        let fresh = known != Some(timestamp) && self.pending.offer(request.clone(), None, true);
        if !self.view_active {
            return false;
        }
        if self.is_primary() {
            self.ensure_request_timer(out);
            return fresh;
        }
        // A backup relays a client's request to the primary: the first time it sees
        // it, and again when the client retransmits (the primary may have missed it).
        if from_client {
            out.send(self.primary(), Message::Request(request));
        }
        self.ensure_request_timer(out);
        false
    }

    /// As the active primary, holds a request until its signature is checked with
    /// those of the others staged meanwhile: when the batch timer fires, when a full
    /// batch is staged, or at once without a batching delay. At most one request per
    /// sender and client (a newer one replaces an older one), so the stage is bounded
    /// by the registered clients times the members.
    fn stage_request(&mut self, from: NodeId, request: Request, out: &mut Out) {
        if request.operation.len() > self.options.max_operation_bytes
            || self.keys.client(request.client).is_none()
        {
            out.fault(from, "bad-request");
            return;
        }
        let key = (from, request.client);
        if self
            .staged
            .get(&key)
            .is_some_and(|(_, held)| held.timestamp >= request.timestamp)
        {
            return;
        }
        let arrival = self.staged_arrivals;
        self.staged_arrivals += 1;
        self.staged.insert(key, (arrival, request));
        let full = self.staged.len() >= self.options.batch_max_requests;
        if full || self.options.batch_delay.is_zero() {
            self.propose_batches(true, out);
        } else if !self.batch_timer_running {
            out.set_timer(Timer::Batch, self.options.batch_delay);
            self.batch_timer_running = true;
        }
    }

    /// Checks the signatures of the staged requests in one batch (single checks for
    /// senders caught with a bad one before, so that a faulty client spoils at most
    /// one batch) and takes the valid ones, in arrival order. Returns whether any is
    /// new to this replica as the active primary.
    pub(super) fn verify_staged(&mut self, out: &mut Out) -> bool {
        if self.staged.is_empty() {
            return false;
        }
        let mut staged: Vec<_> = std::mem::take(&mut self.staged).into_iter().collect();
        staged.sort_by_key(|(_, (arrival, _))| *arrival);
        let mut batch = SignatureBatch::new();
        // Per staged request: `Some(i)` for the batch's `i`-th answer, `None` if
        // decided without it.
        let mut verdicts: Vec<(NodeId, Request, Option<usize>, bool)> = Vec::new();
        for ((from, _), (_, request)) in staged {
            let Some(key) = self.keys.client(request.client) else {
                verdicts.push((from, request, None, false));
                continue;
            };
            if self.pending.holds_proven(&request) {
                verdicts.push((from, request, None, true));
            } else if self.suspects.contains(&from) {
                self.request_signature_checks += 1;
                let valid = request.signature_is_valid(key);
                verdicts.push((from, request, None, valid));
            } else {
                self.request_signature_checks += 1;
                request.push_signature(key, &mut batch);
                verdicts.push((from, request, Some(batch.len() - 1), false));
            }
        }
        let answers = batch.verify();
        let mut fresh = false;
        for (from, request, index, decided) in verdicts {
            let valid = index.map_or(decided, |i| answers[i]);
            if valid {
                fresh |= self.accept_request(from, request, out);
            } else {
                if index.is_some() && self.suspects.len() < self.keys.clients().count() + self.n() {
                    self.suspects.insert(from);
                }
                out.fault(from, "bad-request");
            }
        }
        fresh
    }

    fn resend_reply(&self, client: ClientId, out: &mut Out) {
        if let Some((timestamp, result)) = self.service.cached_reply(client) {
            out.send(
                client,
                Message::Reply(self.reply(client, timestamp, result.to_vec())),
            );
        }
    }

    pub(super) fn reply(&self, client: ClientId, timestamp: u64, result: Vec<u8>) -> Reply {
        Reply {
            view: self.view,
            client,
            timestamp,
            replica: self.id,
            result: Blob::try_from_vec(result).unwrap_or_default(),
        }
    }

    /// As primary, cuts batches from pending requests while the window and the
    /// pipeline have room. A full batch goes at once, up to `max_in_flight` of them
    /// at a time. A partial batch goes only when no batch is in flight, and then
    /// once its delay is over (`flush`: the batch timer fired) or at once when no
    /// delay is configured: under load the requests that arrive during a round, and
    /// the next requests of the clients it answered, go together as one batch, so
    /// the per-batch costs (signatures, messages, durable commits) are shared by
    /// more requests, while an idle cluster still proposes after the batching
    /// delay. (FastBFT's primary has the same rule.)
    pub(super) fn propose_batches(&mut self, mut flush: bool, out: &mut Out) {
        if flush {
            self.verify_staged(out);
        }
        if !self.view_active || !self.is_primary() || self.needs_state {
            return;
        }
        if self
            .lost_votes_bound
            .is_some_and(|(view, _)| view == self.view)
        {
            // A crash may have lost proposals this primary sent in this view: any
            // new one could reuse their sequence numbers. The view changes instead.
            return;
        }
        loop {
            let in_flight = self.next_seq.0.saturating_sub(self.last_executed.0 + 1);
            if self.next_seq > self.high() || in_flight >= self.options.max_in_flight {
                return;
            }
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            // Whether another pending request would not fit in this batch.
            let mut full = false;
            // Every request an active primary holds had its signature checked (the
            // invariant is asserted); the filter only makes that local.
            for pending in self
                .pending
                .unproposed(self.view)
                .into_iter()
                .filter(|p| p.proven)
            {
                let size = pending.request.operation.len();
                if batch.len() == self.options.batch_max_requests
                    || (!batch.is_empty() && bytes + size > self.options.batch_max_bytes)
                {
                    full = true;
                    break;
                }
                bytes += size;
                batch.push(pending.request.clone());
            }
            if batch.is_empty() {
                if self.batch_timer_running && self.staged.is_empty() {
                    out.cancel_timer(Timer::Batch);
                    self.batch_timer_running = false;
                }
                return;
            }
            let full = full
                || batch.len() == self.options.batch_max_requests
                || bytes >= self.options.batch_max_bytes;
            if !full && in_flight > 0 {
                // A partial batch waits for the pipeline to drain, and then for the
                // batching delay: the clients the last batch answered send their
                // next requests meanwhile.
                return;
            }
            if !full && !flush && !self.options.batch_delay.is_zero() {
                if !self.batch_timer_running {
                    out.set_timer(Timer::Batch, self.options.batch_delay);
                    self.batch_timer_running = true;
                }
                return;
            }
            flush = false;
            self.propose(batch, out);
        }
    }

    fn propose(&mut self, requests: Vec<Request>, out: &mut Out) {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        for r in &requests {
            self.pending.mark_proposed(r.client, r.timestamp, self.view);
        }
        let batch = Batch {
            requests: BoundedVec::truncating(requests),
        };
        let digest = batch.digest();
        let proposal = Signed::sign(
            Proposal {
                view: self.view,
                seq,
                digest,
            },
            &self.secret,
        );
        let batch = Arc::new(batch);
        let slot = self.log.entry(seq).or_default();
        slot.proposal = Some(proposal.clone());
        slot.add_body(digest, batch.clone());
        // The assignment leaves ahead of its write: a primary that restarts in this
        // view proposes nothing more in it, so it cannot give this sequence number
        // to another batch even if the crash lost the write.
        self.cover_vote_ahead(seq, out);
        out.persist_unawaited(self.slot_writes(seq));
        out.broadcast(Message::PrePrepare(PrePrepare {
            proposal,
            batch: (*batch).clone(),
        }));
        self.check_prepared(seq, out);
    }

    pub(super) fn on_pre_prepare(&mut self, from: ReplicaId, pp: PrePrepare, out: &mut Out) {
        let Proposal { view, seq, digest } = pp.proposal.value;
        match self.admit(view, seq) {
            Admission::Now if !self.is_primary() => {}
            Admission::Later => return self.buffer_future(from, Message::PrePrepare(pp)),
            _ => return,
        }
        let primary = self.primary();
        let valid_signature = self
            .replica_key(primary)
            .is_some_and(|key| pp.proposal.verify(key));
        if !valid_signature {
            out.fault(from, "bad-pre-prepare-signature");
            return;
        }
        if pp.batch.digest() != digest {
            out.fault(from, "batch-digest-mismatch");
            return;
        }
        let existing = self.log.get(&seq).and_then(|s| s.proposed_digest());
        match existing {
            Some(d) if d == digest => {
                self.store_body(seq, digest, Arc::new(pp.batch), out);
                return;
            }
            Some(_) => {
                // Two signed proposals for one (view, seq): proof against the primary.
                out.fault(primary, "equivocating-primary");
                if !self.options.is(Mutant::AcceptConflictingPrePrepare) {
                    return;
                }
            }
            None => {}
        }
        let proven = match self.check_batch(&pp.batch) {
            Ok(proven) => proven,
            Err(kind) => {
                // The primary signed this batch's digest, so the batch is its doing
                // even when a correct replica relays it: MACs make authentication a
                // per-replica matter, and the relay may have authenticated it by its
                // own MAC entry. (A correct primary proposes only requests with a
                // valid signature, which every correct backup accepts.)
                out.fault(primary, kind);
                return;
            }
        };
        for (request, proven) in pp.batch.requests.iter().zip(proven) {
            if request.timestamp > self.service.last_timestamp(request.client) {
                self.pending.offer(request.clone(), None, proven);
            }
        }
        let withheld = self.vote_may_be_lost(seq);
        let slot = self.log.entry(seq).or_default();
        slot.proposal = Some(pp.proposal);
        slot.add_body(digest, Arc::new(pp.batch));
        slot.vote_withheld = withheld;
        if withheld {
            // Before its crash this replica may have voted for another proposal
            // here: it keeps the body (for execution) but does not vote.
            out.persist(self.slot_writes(seq));
        } else {
            // The PREPARE leaves ahead of the slot's write, under the bound.
            self.cover_vote_ahead(seq, out);
            out.persist_unawaited(self.slot_writes(seq));
            self.send_prepare(seq, digest, out);
        }
        self.ensure_request_timer(out);
        self.check_prepared(seq, out);
    }

    /// Checks the signature of every pending request held on the strength of a MAC
    /// only (from PRE-PREPAREs of the view being left) and drops those whose
    /// signature is invalid: in the new view, the primary proposes, and backups relay
    /// and time, only requests that a correct primary would propose.
    pub(super) fn prove_pending(&mut self) {
        let unproven = self.pending.unproven();
        let mut batch = SignatureBatch::new();
        let mut in_batch = Vec::with_capacity(unproven.len());
        for request in &unproven {
            let well_formed = request.operation.len() <= self.options.max_operation_bytes;
            match self.keys.client(request.client) {
                Some(key) if well_formed => {
                    self.request_signature_checks += 1;
                    request.push_signature(key, &mut batch);
                    in_batch.push(Some(batch.len() - 1));
                }
                _ => in_batch.push(None),
            }
        }
        let answers = batch.verify();
        for (request, index) in unproven.iter().zip(in_batch) {
            let valid = index.is_some_and(|i| answers[i]);
            self.pending.settle(request, valid);
        }
    }

    /// Checks every request of a proposed batch: registered client, size, this
    /// replica's MAC entry or else the signature, and at most one request per client.
    /// Returns, per request, whether its signature was checked.
    fn check_batch(&mut self, batch: &Batch) -> Result<Vec<bool>, &'static str> {
        let mut clients = BTreeSet::new();
        let mut proven = Vec::with_capacity(batch.requests.len());
        for request in batch.requests.iter() {
            if !clients.insert(request.client) {
                return Err("duplicate-client-in-batch");
            }
            match self.authenticate_in_batch(request) {
                Some(signed) => proven.push(signed),
                None => return Err("bad-request-in-batch"),
            }
        }
        Ok(proven)
    }

    /// Signs and broadcasts this backup's PREPARE (after the slot was persisted).
    pub(super) fn send_prepare(&mut self, seq: Seq, digest: Digest, out: &mut Out) {
        let prepare = Signed::sign(
            PrepareVote {
                view: self.view,
                seq,
                digest,
                replica: self.id,
            },
            &self.secret,
        );
        self.log
            .entry(seq)
            .or_default()
            .prepares
            .insert(self.id, prepare.clone());
        out.broadcast(Message::Prepare(prepare));
    }

    pub(super) fn on_prepare(
        &mut self,
        from: ReplicaId,
        prepare: Signed<PrepareVote>,
        out: &mut Out,
    ) {
        let vote = prepare.value;
        match self.admit(vote.view, vote.seq) {
            Admission::Now => {}
            Admission::Later => return self.buffer_future(from, Message::Prepare(prepare)),
            Admission::Never => return,
        }
        if !self.quorum.is_member(vote.replica) {
            out.fault(from, "unknown-replica");
            return;
        }
        if vote.replica == self.primary() {
            out.fault(from, "prepare-from-primary");
            return;
        }
        let slot = self.log.entry(vote.seq).or_default();
        match slot.prepares.get(&vote.replica) {
            Some(existing) if existing.digest == vote.digest => return,
            Some(_) => {
                let existing = slot.prepares[&vote.replica].clone();
                if self
                    .replica_key(vote.replica)
                    .is_some_and(|k| prepare.verify(k) && existing.verify(k))
                {
                    out.fault(vote.replica, "conflicting-prepare");
                } else {
                    out.fault(from, "bad-prepare-signature");
                }
                return;
            }
            None => {}
        }
        if !self
            .replica_key(vote.replica)
            .is_some_and(|k| prepare.verify(k))
        {
            out.fault(from, "bad-prepare-signature");
            return;
        }
        self.log
            .entry(vote.seq)
            .or_default()
            .prepares
            .insert(vote.replica, prepare);
        self.check_prepared(vote.seq, out);
    }

    /// Once the proposal and a quorum of matching prepares are in, records the
    /// prepared certificate durably and sends COMMIT.
    pub(super) fn check_prepared(&mut self, seq: Seq, out: &mut Out) {
        let primary = self.primary();
        let Some(slot) = self.log.get(&seq) else {
            return;
        };
        if slot.prepared_in_current_view() {
            self.check_committed(seq, out);
            return;
        }
        let Some(proposal) = slot.proposal.clone() else {
            return;
        };
        let matching: Vec<_> = slot
            .prepares
            .values()
            .filter(|p| p.digest == proposal.digest)
            .cloned()
            .collect();
        let mut senders: ReplicaSet = matching.iter().map(|p| p.replica).collect();
        senders.insert(primary);
        if !self.quorum.is_quorum(&senders) {
            return;
        }
        let cert = PreparedCert {
            proposal: proposal.clone(),
            prepares: BoundedVec::truncating(matching),
        };
        self.log.entry(seq).or_default().prepared = Some(cert);
        let writes = self.slot_writes(seq);
        out.persist(writes);
        let commit = Commit {
            view: self.view,
            seq,
            digest: proposal.digest,
            replica: self.id,
        };
        self.log
            .entry(seq)
            .or_default()
            .commits
            .insert(self.id, proposal.digest);
        out.broadcast(Message::Commit(commit));
        self.check_committed(seq, out);
    }

    pub(super) fn on_commit(&mut self, from: ReplicaId, commit: Commit, out: &mut Out) {
        if commit.replica != from {
            out.fault(from, "commit-sender-mismatch");
            return;
        }
        match self.admit(commit.view, commit.seq) {
            Admission::Now => {}
            Admission::Later => return self.buffer_future(from, Message::Commit(commit)),
            Admission::Never => return,
        }
        let slot = self.log.entry(commit.seq).or_default();
        match slot.commits.get(&from) {
            Some(d) if *d == commit.digest => return,
            Some(_) => {
                out.fault(from, "conflicting-commit");
                return;
            }
            None => {}
        }
        slot.commits.insert(from, commit.digest);
        self.check_committed(commit.seq, out);
    }

    /// Prepared here and a quorum of matching commits: the batch is committed.
    fn check_committed(&mut self, seq: Seq, out: &mut Out) {
        let Some(slot) = self.log.get(&seq) else {
            return;
        };
        if slot.committed.is_some() || !slot.prepared_in_current_view() {
            return;
        }
        let Some(digest) = slot.proposed_digest() else {
            return;
        };
        let senders: ReplicaSet = slot
            .commits
            .iter()
            .filter(|(_, d)| **d == digest)
            .map(|(r, _)| *r)
            .collect();
        let committed = if self.options.is(Mutant::CommitQuorumMinusOne) {
            senders.len() + 1 >= self.quorum.quorum_size()
        } else {
            self.quorum.is_quorum(&senders)
        };
        if committed {
            self.log.entry(seq).or_default().committed = Some(digest);
            self.execute_ready(out);
        }
    }

    /// Executes committed batches in sequence order, as far as bodies are known.
    pub(super) fn execute_ready(&mut self, out: &mut Out) {
        if self.needs_state {
            return;
        }
        let mut progressed = false;
        loop {
            let seq = self.last_executed.next();
            let Some(slot) = self.log.get(&seq) else {
                break;
            };
            let Some(digest) = slot.committed else { break };
            let Some(batch) = slot.body(&digest) else {
                self.fetch_batch(seq, digest, out);
                break;
            };
            self.execute_batch(seq, digest, &batch, out);
            self.last_executed = seq;
            progressed = true;
            if seq.0 % self.options.checkpoint_interval == 0 {
                self.take_checkpoint(seq, out);
            }
        }
        if progressed {
            self.after_progress(out);
        }
    }

    fn execute_batch(&mut self, seq: Seq, digest: Digest, batch: &Batch, out: &mut Out) {
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
            batch: digest,
            requests: executed,
        });
    }

    /// After execution: restart the request timer for what is still pending, and let
    /// the primary fill the pipeline again.
    pub(super) fn after_progress(&mut self, out: &mut Out) {
        if let Some((client, timestamp)) = self.request_timer_for {
            if !self.pending.contains(client, timestamp) {
                self.request_timer_for = None;
                out.cancel_timer(Timer::Request);
            }
        }
        self.ensure_request_timer(out);
        self.propose_batches(false, out);
    }

    /// In an active view, every replica (the primary too) runs the request timer while
    /// anything is pending: a primary that cannot get its own proposals executed joins
    /// the view change rather than wait for backups that may have nothing pending.
    pub(super) fn ensure_request_timer(&mut self, out: &mut Out) {
        if !self.view_active || self.request_timer_for.is_some() {
            return;
        }
        if let Some(oldest) = self.pending.oldest() {
            self.request_timer_for = Some(oldest);
            out.set_timer(Timer::Request, self.options.view_change_timeout);
        }
    }

    /// Stores a body whose digest matches, and resumes execution if it was missing.
    pub(super) fn store_body(
        &mut self,
        seq: Seq,
        digest: Digest,
        batch: Arc<Batch>,
        out: &mut Out,
    ) {
        let Some(slot) = self.log.get_mut(&seq) else {
            return;
        };
        if slot.body(&digest).is_some() {
            return;
        }
        slot.add_body(digest, batch);
        if self.fetching.get(&seq) == Some(&digest) {
            self.fetching.remove(&seq);
        }
        let writes = self.slot_writes(seq);
        out.persist(writes);
        self.execute_ready(out);
    }
}
