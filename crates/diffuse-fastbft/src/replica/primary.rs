//! The primary (Fig. 4, lines 1–7, 23–35): a pool of preprocessed counter values,
//! batching, PREPARE, COMMIT once the PREPARE's secret opens, REPLY once the
//! COMMIT's does, NEW-TREE on a detected failure, and FETCH answers.
//!
//! Batches are PREPAREd only within the window of one checkpoint interval above
//! the stream's checkpoint (`crate::checkpoint`); the first PREPARE after a
//! checkpoint carries its proof. Every certificate the primary issues is logged
//! like any position a backup takes (`super::log`).

use super::rounds::Phase;
use super::{Epoch, Executed, FastBftReplica, Out, ReplyTrees, Timer, client_reply};
use crate::authentic;
use crate::checkpoint::CheckpointProof;
use crate::message::{
    Cert, ClientReply, Commit, Fetch, Message, NewTree, Opened, Packages, Position, Prepare,
    SharedBatch, TreeConfig, Update, certify_prepare, commit_digest, new_tree_digest, position,
    request_leaf,
};
use crate::view_log::{CommitEntry, LogEntry, NewTreeEntry};
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq};
use diffuse_pbft::message::{Batch, Request};
use diffuse_tee::{FastBftComponent, FastBftError, Package, SecretCommitment};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Requests waiting for a batch, at most.
const MAX_PENDING: usize = 16_384;
/// Stream messages and UPDATEs kept for FETCH answers.
const LOG_KEPT: usize = 4096;
/// Stream messages sent in answer to one FETCH.
const FETCH_ANSWER: usize = 32;

/// A queued request's key (see [`PrimaryState::queued`]).
type Queued = (ClientId, u64, [u8; 64]);

/// How many of the `pending` requests, from the front, the next batch takes, and
/// their operation bytes: at most `max` requests and `max_bytes` bytes, but at
/// least one request (a single operation is bounded by `max_operation_bytes`).
fn batch_size(pending: &VecDeque<Request>, max: usize, max_bytes: usize) -> (usize, usize) {
    let (mut take, mut bytes) = (0, 0);
    for request in pending.iter().take(max) {
        let size = request.operation.len();
        if take > 0 && bytes + size > max_bytes {
            break;
        }
        (take, bytes) = (take + 1, bytes + size);
    }
    (take, bytes)
}

fn queued_key(request: &Request) -> Queued {
    (
        request.client,
        request.timestamp,
        request.signed.signature.0,
    )
}

/// A batch between PREPARE and its REPLY.
#[derive(Debug)]
struct InFlight {
    batch: SharedBatch,
    leaves: Vec<Digest>,
    /// The checkpoint proof its latest PREPARE carried.
    carried: Option<Box<CheckpointProof>>,
    prepared: Option<(Cert, Opened)>,
    committed: Option<(Cert, Arc<Executed>)>,
}

impl std::fmt::Debug for Executed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executed")
            .field("results", &self.results.len())
            .finish_non_exhaustive()
    }
}

/// A preprocessed counter value as the primary keeps it.
#[derive(Debug)]
struct Pooled {
    commitment: Signed<SecretCommitment>,
    root_hashes: Vec<Digest>,
    /// The primary's own share, in a fallback epoch.
    own_share: Option<diffuse_tee::Share>,
    /// `ϱ_c^i` per active replica, for FETCH answers.
    packages: Vec<Package>,
}

/// The primary's own state.
#[derive(Debug, Default)]
pub(crate) struct PrimaryState {
    pending: VecDeque<Request>,
    /// The operation bytes of `pending`.
    pending_bytes: usize,
    /// The requests pending or in a batch not executed yet, by client, timestamp
    /// and signature: the signature is checked by the enclave only, so an unsigned
    /// copy of a request must not keep the genuine one out.
    queued: BTreeSet<Queued>,
    batch_timer: bool,
    /// While a partial batch lingers: the pending requests when the batch timer
    /// was last set, and the periods it has lingered.
    linger: Option<(usize, u32)>,
    next_seq: Seq,
    /// The batches between PREPARE and COMMIT (at most `max_in_flight`).
    preparing: BTreeSet<Seq>,
    in_flight: BTreeMap<Seq, InFlight>,
    pool: BTreeMap<u64, Pooled>,
    /// Where each position's certificate went, for FETCH answers.
    log: BTreeMap<Position, (Message, Option<Seq>)>,
    updates: BTreeMap<Seq, Update>,
    replies: BTreeMap<ClientId, ClientReply>,
    passives: VecDeque<ReplicaId>,
    pub(crate) failures: u64,
    /// Tree rebuilds since a secret last opened.
    rebuilds_without_progress: u32,
    /// Replicas that accused a child at some point.
    accusers: BTreeSet<ReplicaId>,
    /// The failure reported in this epoch, waiting for the rebuild timer.
    suspected: Option<(ReplicaId, ReplicaId)>,
    /// The proof of the latest checkpoint, until a PREPARE carries it.
    proof_to_carry: Option<CheckpointProof>,
    /// Rejoin positions given to restarted replicas.
    pub(crate) rejoins: super::rejoin::RejoinsGiven,
    /// In the fallback: the backups whose shares came since it started.
    pub(crate) responsive: BTreeSet<ReplicaId>,
}

impl PrimaryState {
    fn log(&mut self, at: Position, message: Message, seq: Option<Seq>) {
        self.log.insert(at, (message, seq));
        while self.log.len() > LOG_KEPT {
            self.log.pop_first();
        }
    }
}

impl FastBftReplica {
    fn state(&mut self) -> &mut PrimaryState {
        self.primary
            .as_mut()
            .expect("primary-only code runs at the primary")
    }

    /// Genesis: the primary and replicas `1..=f` are the `f + 1` active replicas,
    /// the other `f` are passive.
    pub(super) fn start_as_primary(&mut self, out: &mut Out) {
        let actives: Vec<ReplicaId> = (1..=self.f as u16).map(ReplicaId).collect();
        let passives = (self.f as u16 + 1..self.n as u16).map(ReplicaId).collect();
        self.primary = Some(PrimaryState {
            next_seq: Seq(1),
            passives,
            ..PrimaryState::default()
        });
        if self.options.fallback_only {
            return self.enter_fallback(out);
        }
        self.install_tree(actives, false, out);
    }

    /// The primary of a view just entered by its NEW-VIEW: PREPAREs the decided
    /// batches again, at their sequence numbers, then orders the requests that
    /// waited here.
    pub(super) fn start_view_as_primary(&mut self, out: &mut Out) {
        let actives: BTreeSet<ReplicaId> = self.actives().into_iter().collect();
        let passives = (0..self.n as u16)
            .map(ReplicaId)
            .filter(|r| *r != self.id && !actives.contains(r))
            .collect();
        let decided = self.decided();
        let next_seq = decided
            .last()
            .map_or(self.stream.checkpoint.next(), |(s, _)| s.next());
        let mut state = PrimaryState {
            next_seq,
            passives,
            ..PrimaryState::default()
        };
        for (seq, batch) in decided {
            let leaves = batch
                .requests
                .iter()
                .map(|r| request_leaf(&r.signed))
                .collect();
            state.in_flight.insert(
                seq,
                InFlight {
                    batch: batch.into(),
                    leaves,
                    carried: None,
                    prepared: None,
                    committed: None,
                },
            );
        }
        let waiting: Vec<Request> = std::mem::take(&mut self.vc.requests)
            .into_values()
            .map(|(r, _)| r)
            .collect();
        self.primary = Some(state);
        if self.options.fallback_only {
            // A NEW-TREE into the fallback; it PREPAREs the decided batches again.
            self.enter_fallback(out);
        } else {
            self.refill(out);
            let seqs: Vec<Seq> = self.state().in_flight.keys().copied().collect();
            for seq in seqs {
                self.send_prepare(seq, out);
            }
        }
        for request in waiting {
            self.queue_request(request, out);
        }
        self.propose(false, out);
    }

    /// Ends the current epoch (or the genesis one) with a NEW-TREE for `actives`
    /// (in the fallback: every backup, no tree).
    fn install_tree(&mut self, actives: Vec<ReplicaId>, fallback: bool, out: &mut Out) {
        let current = self.enclave_call(|e| e.fastbft_counter().1);
        let config = TreeConfig {
            epoch: current + 1,
            actives: BoundedVec::truncating(actives),
            fan_out: self.options.fan_out as u16,
            fallback,
        };
        let Some(tree) = self.check_config(&config) else {
            self.halt("no-tree-for-these-actives", out);
            return;
        };
        let keys: Vec<_> = config
            .actives
            .iter()
            .map(|r| self.enclave_keys[r.index()])
            .collect();
        let digest = new_tree_digest(&config);
        let made = self.enclave_call(|e| {
            let cert = e.request_counter(&digest)?;
            let wrapped = if fallback {
                e.be_primary_threshold(&keys)?
            } else {
                e.be_primary(&keys, tree)?
            };
            Ok::<_, diffuse_tee::FastBftError>((cert, wrapped))
        });
        let Ok((cert, wrapped)) = made else {
            // The enclave refused (locked, exhausted): this primary can do nothing.
            self.halt("enclave-refused-new-tree", out);
            return;
        };
        let new_tree = NewTree {
            config: config.clone(),
            cert,
            keys: BoundedVec::truncating(wrapped),
        };
        for (at, _) in std::mem::take(&mut self.rounds) {
            out.cancel_timer(Timer::Round(at.0, at.1));
        }
        let at = position(&new_tree.cert);
        out.broadcast(Message::NewTree(new_tree.clone()));
        self.log.record(LogEntry::NewTree(NewTreeEntry {
            config: new_tree.config.clone(),
            cert: new_tree.cert.clone(),
        }));
        let state = self.state();
        state.log(at, Message::NewTree(new_tree), None);
        state.pool.clear();
        state.suspected = None;
        self.epoch = Some(Epoch { config, tree });
        self.refill(out);
        self.resume_in_flight(out);
        self.propose(false, out);
    }

    /// After a NEW-TREE: re-commits the batches whose REPLY did not open, and
    /// re-prepares the one whose PREPARE did not.
    fn resume_in_flight(&mut self, out: &mut Out) {
        self.prune_in_flight();
        let seqs: Vec<Seq> = self.state().in_flight.keys().copied().collect();
        self.state().preparing.clear();
        for seq in seqs {
            let Some(flight) = self.state().in_flight.get(&seq) else {
                continue;
            };
            if flight.committed.is_some() {
                self.send_commit(seq, true, out);
            } else if flight.prepared.is_some() {
                self.commit_ready(out);
            } else {
                self.send_prepare(seq, out);
            }
        }
    }

    /// Forgets the batches at or below the stable checkpoint: their replies did not
    /// open, but the checkpoint covers them (a replica that took its state by
    /// transfer could not check their COMMITs). Their clients retransmit and get
    /// the cached result in a new batch.
    fn prune_in_flight(&mut self) {
        let stable = super::stable_seq(self.stable.as_ref());
        let keep = self.stream.checkpoint.max(stable).next();
        let state = self.state();
        state.in_flight = state.in_flight.split_off(&keep);
        state.preparing = state.preparing.split_off(&keep);
    }

    /// Keeps `preprocess_ahead` counter values preprocessed past the enclave's.
    fn refill(&mut self, out: &mut Out) {
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        let (counter, _) = self.enclave_call(|e| e.fastbft_counter());
        let ahead = self.options.preprocess_ahead as u64;
        // A used secret stays pooled while its round is open: the root needs its
        // commitment when the (perhaps late) aggregate arrives.
        let open: BTreeSet<u64> = self
            .rounds
            .iter()
            .filter(|((e, _), round)| *e == epoch.config.epoch && !round.done)
            .map(|((_, c), _)| *c)
            .collect();
        let state = self.state();
        state.pool.retain(|c, _| *c >= counter || open.contains(c));
        let prepared = state.pool.last_key_value().map_or(counter, |(c, _)| *c);
        let have = prepared.saturating_sub(counter);
        if have >= ahead / 2 {
            return;
        }
        let wanted = (ahead - have) as usize;
        let Ok(batch) = self.enclave_call(|e| e.preprocessing(wanted)) else {
            return;
        };
        let mut per_active: Vec<Vec<Package>> = vec![Vec::new(); epoch.config.actives.len()];
        let state = self.state();
        for prepared in batch {
            for (i, package) in prepared.packages.iter().enumerate() {
                if let Some(list) = per_active.get_mut(i) {
                    list.push(package.clone());
                }
            }
            state.pool.insert(
                prepared.commitment.counter,
                Pooled {
                    commitment: prepared.commitment,
                    root_hashes: prepared.root_children_hashes,
                    own_share: prepared.primary_share,
                    packages: prepared.packages,
                },
            );
        }
        for (replica, packages) in epoch.config.actives.iter().zip(per_active) {
            out.send(
                *replica,
                Message::Packages(Packages {
                    epoch: epoch.config.epoch,
                    packages: BoundedVec::truncating(packages),
                }),
            );
        }
    }

    /// A client's request at the primary. A request already executed at its
    /// client's latest timestamp is answered with the REPLY kept for it, or, if
    /// this primary has none (it was a backup then), ordered again: its batch
    /// proves the cached result (`FastBftReplica::execute`).
    ///
    /// The host does not check the signature of a client's own request: the
    /// enclave does, for the whole batch at once, before it certifies the PREPARE
    /// (`send_prepare`), and names the requests that fail, which the host then
    /// drops. A request another replica forwards is checked here, once: the
    /// transport authenticated the sender, not the client, and a faulty replica
    /// must not fill the pending queue with requests no client sent.
    pub(super) fn on_primary_request(&mut self, from: NodeId, request: Request, out: &mut Out) {
        if self.keys.client(request.client).is_none() {
            return;
        }
        if request.operation.len() > self.options.base.max_operation_bytes {
            return out.fault(from, "bad-request");
        }
        // Stale and executed requests are settled before any signature check: a
        // slow cluster's backups forward every executed request they watch, and
        // checking each again made the primary slower still. Answering a forged
        // copy with the genuine request's REPLY is harmless: the REPLY proves the
        // genuine request, not the copy.
        let last = self.service.last_timestamp(request.client);
        if request.timestamp < last {
            return;
        }
        if request.timestamp == last
            && let Some(reply) = self.state().replies.get(&request.client)
            && reply.timestamp == request.timestamp
        {
            let reply = reply.clone();
            return match from {
                // A backup forwards an executed request its client still asks
                // for: the REPLY proves to it that the client can be answered,
                // and the backup relays it to the client itself.
                NodeId::Replica(backup) => out.send(backup, Message::Reply(reply)),
                NodeId::Client(_) => {
                    out.send(NodeId::Client(request.client), Message::Reply(reply))
                }
            };
        }
        let forwarded = matches!(from, NodeId::Replica(r) if r != self.id);
        if forwarded
            && !self
                .keys
                .client(request.client)
                .is_some_and(|key| request.signature_is_valid(key))
        {
            return out.fault(from, "bad-request");
        }
        self.queue_request(request, out);
    }

    /// Queues a checked request for the next batch.
    fn queue_request(&mut self, request: Request, out: &mut Out) {
        if request.timestamp < self.service.last_timestamp(request.client) {
            return;
        }
        let request = Request {
            authenticator: Default::default(),
            ..request
        };
        let state = self.state();
        if state.pending.len() >= MAX_PENDING || !state.queued.insert(queued_key(&request)) {
            return;
        }
        state.pending_bytes += request.operation.len();
        state.pending.push_back(request);
        self.propose(false, out);
    }

    pub(super) fn on_batch_timer(&mut self, out: &mut Out) {
        if self.primary.is_some() {
            self.state().batch_timer = false;
            self.propose(true, out);
        }
    }

    /// PREPAREs batches of pending requests. With no batch between PREPARE and
    /// COMMIT, a batch goes when full or when the batch timer fires; with some, only
    /// full batches go, up to `max_in_flight` at once. Partial batches wait for the
    /// tree instead: at large `n` every batch costs O(n) messages, so many small
    /// batches cost far more than one large one. For the same reason a partial
    /// batch lingers while earlier batches are in their reply round (their
    /// clients, once answered, send the next requests) or requests keep arriving,
    /// one timer period at a time, at most [`Self::linger_periods`].
    fn propose(&mut self, mut timer_fired: bool, out: &mut Out) {
        let max = self.options.base.batch_max_requests.max(1);
        let max_bytes = self.options.base.batch_max_bytes.max(1);
        // A full batch: as many requests, or as many operation bytes, as one
        // batch may hold (the bytes bound keeps PREPAREs and the view change's
        // logs far below the largest frame whatever the operations' size).
        let full =
            |state: &PrimaryState| state.pending.len() >= max || state.pending_bytes >= max_bytes;
        let delay = self.options.base.batch_delay;
        let in_flight = usize::try_from(self.options.base.max_in_flight.max(1)).unwrap_or(1);
        let interval = self.interval();
        let linger_periods = self.linger_periods();
        loop {
            let checkpoint = self.stream.checkpoint;
            let state = self.state();
            let carried = state.proof_to_carry.as_ref().map_or(checkpoint, |p| p.seq);
            let window_end = carried.max(checkpoint).0.saturating_add(interval);
            if state.preparing.len() >= in_flight
                || state.pending.is_empty()
                || state.next_seq.0 > window_end
            {
                return;
            }
            if !state.preparing.is_empty() && !full(state) {
                return;
            }
            if !full(state) && !delay.is_zero() && !timer_fired {
                if !state.batch_timer {
                    state.batch_timer = true;
                    state.linger.get_or_insert((state.pending.len(), 0));
                    out.set_timer(Timer::Batch, delay);
                }
                return;
            }
            if timer_fired
                && !full(state)
                && let Some((seen, periods)) = state.linger
                && periods < linger_periods
                && (!state.in_flight.is_empty() || state.pending.len() > seen)
            {
                // Earlier batches are replying, or their clients' next requests
                // are arriving: wait for more.
                state.linger = Some((state.pending.len(), periods + 1));
                state.batch_timer = true;
                out.set_timer(Timer::Batch, delay);
                return;
            }
            state.linger = None;
            timer_fired = false;
            let (take, bytes) = batch_size(&state.pending, max, max_bytes);
            state.pending_bytes = state.pending_bytes.saturating_sub(bytes);
            let requests: Vec<Request> = state.pending.drain(..take).collect();
            let seq = state.next_seq;
            state.next_seq = seq.next();
            let batch = Batch {
                requests: BoundedVec::truncating(requests),
            };
            let leaves = batch
                .requests
                .iter()
                .map(|r| request_leaf(&r.signed))
                .collect();
            state.in_flight.insert(
                seq,
                InFlight {
                    batch: batch.into(),
                    leaves,
                    carried: None,
                    prepared: None,
                    committed: None,
                },
            );
            self.send_prepare(seq, out);
            if self.halted {
                return;
            }
        }
    }

    /// Batch timer periods a partial batch may linger for more requests
    /// ([`FastBftOptions::batch_linger`](crate::FastBftOptions::batch_linger)).
    fn linger_periods(&self) -> u32 {
        let delay = self.options.base.batch_delay;
        match self.options.batch_linger {
            _ if delay.is_zero() => 0,
            Some(linger) => u32::try_from(linger.as_nanos() / delay.as_nanos()).unwrap_or(u32::MAX),
            None => u32::try_from(self.f + 1).unwrap_or(u32::MAX),
        }
    }

    fn send_prepare(&mut self, seq: Seq, out: &mut Out) {
        self.refill(out);
        let checkpoint = self.stream.checkpoint;
        // The first PREPARE after a checkpoint carries its proof.
        let carried = self
            .state()
            .proof_to_carry
            .as_ref()
            .filter(|p| p.seq > checkpoint && p.seq.next() == seq)
            .map(|p| Box::new(p.clone()));
        let proof_digest = carried.as_ref().map(|p| p.digest());
        let Some(cert) = self.certify_batch(seq, proof_digest.as_ref(), out) else {
            return;
        };
        let Some(flight) = self.state().in_flight.get(&seq) else {
            return;
        };
        let batch = flight.batch.clone();
        let at = position(&cert);
        let prepare = Prepare {
            seq,
            batch,
            checkpoint: carried.clone(),
            cert,
        };
        let mut stream = self.stream.clone();
        let own = stream.accept_prepare(&prepare, &self.rules());
        self.stream = stream;
        if own.is_err() {
            // Only a bug gets here: the stream rule would refuse this primary's own
            // PREPARE at every correct replica.
            out.fault(self.id, "own-prepare-refused");
        }
        self.prepare_to_actives(&prepare, out);
        self.log.record(LogEntry::Prepare(prepare.clone()));
        if let Some(proof) = &carried {
            self.state().proof_to_carry = None;
            self.adopt_stable((**proof).clone(), out);
            self.prune_in_flight();
        }
        let state = self.state();
        state.preparing.insert(seq);
        if let Some(flight) = state.in_flight.get_mut(&seq) {
            flight.carried = carried;
        }
        state.log(at, Message::Prepare(prepare), Some(seq));
        self.start_pooled_round(at, Phase::Prepare, out);
    }

    /// Has the enclave certify the PREPARE of the in-flight batch `seq`. The
    /// enclave verifies every request's signature first; the requests it names
    /// (not signed by their client, which only a faulty replica or client sends)
    /// leave the batch, and the rest is certified. A batch whose root is fixed
    /// already (prepared before, or decided by the NEW-VIEW) is never changed:
    /// every request of it passed an enclave's check, so a refusal there is a
    /// bug, and this replica halts.
    fn certify_batch(
        &mut self,
        seq: Seq,
        proof_digest: Option<&Digest>,
        out: &mut Out,
    ) -> Option<Cert> {
        loop {
            let batch = self.state().in_flight.get(&seq)?.batch.clone();
            match self.enclave_call(|e| certify_prepare(e, seq, &batch, proof_digest)) {
                Ok(cert) => return Some(cert),
                Err(FastBftError::UnsignedRequests(bad))
                    if !bad.is_empty() && !self.stream.fixed.contains_key(&seq) =>
                {
                    let state = self.state();
                    let flight = state.in_flight.get_mut(&seq)?;
                    let mut requests = flight.batch.requests.to_vec();
                    let before = requests.len();
                    for &i in bad.iter().rev() {
                        if i < requests.len() {
                            let dropped = requests.remove(i);
                            state.queued.remove(&queued_key(&dropped));
                        }
                    }
                    if requests.len() == before {
                        self.halt("enclave-refused-counter", out);
                        return None;
                    }
                    flight.leaves = requests.iter().map(|r| request_leaf(&r.signed)).collect();
                    flight.batch = Arc::new(Batch {
                        requests: BoundedVec::truncating(requests),
                    });
                }
                Err(FastBftError::UnsignedRequests(_)) => {
                    self.halt("enclave-refused-a-fixed-batch", out);
                    return None;
                }
                Err(_) => {
                    self.halt("enclave-refused-counter", out);
                    return None;
                }
            }
        }
    }

    /// Sends the PREPARE to the active replicas.
    fn prepare_to_actives(&self, prepare: &Prepare, out: &mut Out) {
        self.to_actives(Message::Prepare(prepare.clone()), out);
    }

    /// One message for every active replica, encoded once by the driver.
    fn to_actives(&self, message: Message, out: &mut Out) {
        if let Some(epoch) = &self.epoch {
            out.multicast(epoch.config.actives.iter().copied(), message);
        }
    }

    fn start_pooled_round(&mut self, at: Position, phase: Phase, out: &mut Out) {
        let Some(pooled) = self.state().pool.get(&at.1) else {
            // Not preprocessed (the enclave refused): nothing can open this round;
            // a child's timeout will rebuild the tree.
            return;
        };
        let (hash, hashes, own) = (
            pooled.commitment.secret_hash,
            pooled.root_hashes.clone(),
            pooled.own_share,
        );
        self.start_root_round(at, phase, hash, hashes, own, out);
    }

    /// The root of the round of `at` has the secret.
    pub(super) fn secret_opened(
        &mut self,
        at: Position,
        phase: Phase,
        secret: diffuse_tee::Share,
        out: &mut Out,
    ) {
        let Some(pooled) = self.state().pool.get(&at.1) else {
            return;
        };
        let opened = Opened {
            commitment: pooled.commitment.clone(),
            secret,
        };
        self.state().rebuilds_without_progress = 0;
        let Some(seq) = self.state().log.get(&at).and_then(|(_, seq)| *seq) else {
            return;
        };
        match phase {
            Phase::Prepare => {
                let state = self.state();
                let cert = match state.log.get(&at) {
                    Some((Message::Prepare(p), _)) => p.cert.clone(),
                    _ => return,
                };
                if let Some(flight) = state.in_flight.get_mut(&seq) {
                    flight.prepared = Some((cert, opened));
                }
                state.preparing.remove(&seq);
                self.commit_ready(out);
                self.propose(false, out);
            }
            Phase::Reply => self.reply(seq, opened, out),
        }
    }

    /// Executes and COMMITs the batches whose PREPAREs opened, in order. A batch
    /// this replica executed already (a re-proposal after a view change) is
    /// committed with the results it kept.
    pub(super) fn commit_ready(&mut self, out: &mut Out) {
        if self.transfer.is_some() {
            return;
        }
        let seqs: Vec<Seq> = self.state().in_flight.keys().copied().collect();
        for seq in seqs {
            let Some(flight) = self.state().in_flight.get(&seq) else {
                continue;
            };
            if flight.committed.is_some() {
                continue;
            }
            if flight.prepared.is_none() {
                return;
            }
            let batch = flight.batch.clone();
            let root = crate::merkle::root(&flight.leaves);
            let executed = if seq <= self.executed {
                match self.recent.get(&seq) {
                    Some(executed) => executed.clone(),
                    // Executed and forgotten: only a bug gets here.
                    None => return self.halt("re-proposal-without-results", out),
                }
            } else if seq == self.executed.next() {
                self.execute(seq, &batch, root, out)
            } else {
                return;
            };
            for request in batch.requests.iter() {
                self.state().queued.remove(&queued_key(request));
            }
            if let Some(flight) = self.state().in_flight.get_mut(&seq)
                && let Some((prepare_cert, _)) = &flight.prepared
            {
                // A placeholder: `send_commit` puts the COMMIT's certificate here.
                flight.committed = Some((prepare_cert.clone(), executed));
            }
            self.send_commit(seq, false, out);
        }
    }

    /// Certifies and sends the COMMIT of `seq` (with the batch after a NEW-TREE).
    fn send_commit(&mut self, seq: Seq, with_batch: bool, out: &mut Out) {
        self.refill(out);
        let Some(flight) = self.state().in_flight.get(&seq) else {
            return;
        };
        let (Some((prepare_cert, prepared)), Some((_, executed))) =
            (&flight.prepared, &flight.committed)
        else {
            return;
        };
        let root = crate::merkle::root(&flight.leaves);
        let digest = commit_digest(
            seq,
            &root,
            &executed.results_root(),
            executed.state.as_ref(),
        );
        let prepare_checkpoint = flight.carried.as_ref().map(|p| p.digest());
        let (prepare_cert, prepared, results_root, state) = (
            prepare_cert.clone(),
            prepared.clone(),
            executed.results_root(),
            executed.state,
        );
        // Actives check a re-committed batch's root, not its requests.
        let batch = with_batch.then(|| authentic::without_authenticators(&flight.batch));
        let Ok(cert) = self.enclave_call(|e| e.request_counter(&digest)) else {
            self.halt("enclave-refused-counter", out);
            return;
        };
        let at = position(&cert);
        let commit = Commit {
            seq,
            batch_root: root,
            results_root,
            state,
            prepare_checkpoint,
            prepare_cert,
            prepared,
            batch,
            cert: cert.clone(),
        };
        self.to_actives(Message::Commit(commit.clone()), out);
        self.log.record(LogEntry::Commit(CommitEntry {
            seq,
            batch_root: root,
            results_root,
            state,
            cert: cert.clone(),
        }));
        let state = self.state();
        if let Some(flight) = state.in_flight.get_mut(&seq)
            && let Some((commit_cert, _)) = &mut flight.committed
        {
            *commit_cert = cert;
        }
        state.log(at, Message::Commit(commit), Some(seq));
        self.start_pooled_round(at, Phase::Reply, out);
    }

    /// The COMMIT's secret opened: REPLY to the clients and UPDATE to the others.
    fn reply(&mut self, seq: Seq, replied: Opened, out: &mut Out) {
        let Some(flight) = self.state().in_flight.remove(&seq) else {
            return;
        };
        let (Some((prepare_cert, prepared)), Some((commit_cert, executed))) =
            (flight.prepared, flight.committed)
        else {
            return;
        };
        let update = Update {
            seq,
            batch: authentic::without_authenticators(&flight.batch),
            checkpoint: flight.carried.clone(),
            results_root: executed.results_root(),
            state: executed.state,
            prepare_cert: prepare_cert.clone(),
            prepared: prepared.clone(),
            commit_cert: commit_cert.clone(),
            replied: replied.clone(),
        };
        if let Some(state) = executed.state {
            let proof = CheckpointProof {
                seq,
                state,
                batch_root: crate::merkle::root(&flight.leaves),
                results_root: executed.results_root(),
                commit_cert: commit_cert.clone(),
                replied: replied.clone(),
            };
            if proof.seq > self.stream.checkpoint {
                self.state().proof_to_carry = Some(proof.clone());
            }
            self.adopt_stable(proof, out);
            self.prune_in_flight();
        }
        let carried_digest = flight.carried.as_ref().map(|p| p.digest());
        let actives: BTreeSet<ReplicaId> = self
            .epoch
            .as_ref()
            .map(|e| e.config.actives.iter().copied().collect())
            .unwrap_or_default();
        let passives = (0..self.n as u16)
            .map(ReplicaId)
            .filter(|r| *r != self.id && !actives.contains(r));
        out.multicast(passives, Message::Update(update.clone()));
        let trees = ReplyTrees::new(&flight.leaves, &executed);
        for index in 0..flight.batch.requests.len() {
            if let Some(reply) = client_reply(
                seq,
                &flight.batch,
                &executed,
                index,
                carried_digest,
                (&prepare_cert, &prepared),
                (&commit_cert, &replied),
                &trees,
            ) {
                out.send(reply.client, Message::Reply(reply.clone()));
                self.state().replies.insert(reply.client, reply);
            }
        }
        let state = self.state();
        state.updates.insert(seq, update);
        while state.updates.len() > LOG_KEPT {
            state.updates.pop_first();
        }
        self.propose(false, out);
    }

    /// A failure reported in the current epoch (the first one counts). The first
    /// rebuild after progress is immediate; while rebuilds bring no progress, each
    /// waits twice as long as the last (from `share_timeout`, at most 64 times
    /// it), so that replicas that fell behind can catch up before they are judged.
    pub(super) fn suspected(&mut self, accused: ReplicaId, accuser: ReplicaId, out: &mut Out) {
        let Some(epoch) = self.epoch.as_ref().map(|e| e.number()) else {
            return;
        };
        let state = self.state();
        if state.suspected.is_some() {
            return;
        }
        state.suspected = Some((accused, accuser));
        match state.rebuilds_without_progress {
            0 => self.on_rebuild_timer(epoch, out),
            k => out.set_timer(Timer::Rebuild(epoch), self.rebuild_back_off(k)),
        }
    }

    /// The wait before the `k`-th rebuild in a row without progress: doubling from
    /// `share_timeout`, at most 64 times it, and never as long as half a request
    /// timer period, so that the stream moves often enough for the backups not to
    /// take failures the tree handles for a stalled primary.
    fn rebuild_back_off(&self, k: u32) -> std::time::Duration {
        (self.options.share_timeout * (1u32 << k.min(6)))
            .min(self.options.base.view_change_timeout / 2)
            .max(self.options.share_timeout)
    }

    pub(super) fn on_rebuild_timer(&mut self, epoch: u64, out: &mut Out) {
        if self.primary.is_none() || self.epoch.as_ref().map(|e| e.number()) != Some(epoch) {
            return;
        }
        let fallback = self.epoch.as_ref().is_some_and(|e| e.config.fallback);
        if let Some((accused, accuser)) = self.state().suspected.take() {
            if fallback {
                let backups = self.epoch.as_ref().map(|e| e.config.actives.to_vec());
                if let Some(backups) = backups {
                    self.install_tree(backups, true, out);
                }
                return;
            }
            self.rebuild_tree(accused, accuser, out);
        }
    }

    /// A failure detected in the tree: `accused` goes passive, a passive replica
    /// takes its place, and the accuser moves to a leaf (§4.3).
    pub(super) fn rebuild_tree(&mut self, accused: ReplicaId, accuser: ReplicaId, out: &mut Out) {
        let Some(epoch) = &self.epoch else {
            return;
        };
        let mut actives = epoch.config.actives.to_vec();
        let Some(slot) = actives.iter().position(|r| *r == accused) else {
            return;
        };
        let me = self.id;
        let state = self.state();
        let Some(replacement) = state.passives.pop_front() else {
            return;
        };
        state.passives.push_back(accused);
        state.failures += 1;
        state.rebuilds_without_progress = state.rebuilds_without_progress.saturating_add(1);
        actives[slot] = replacement;
        if accuser != me {
            state.accusers.insert(accuser);
        }
        // Every replica that ever accused goes to the leaves (the accuser of this
        // rebuild last), so that no accuser keeps a child to accuse while a leaf
        // position is held by one that never did (§4.3 moves only the accuser; with
        // several false accusers taking turns that can go on for ever).
        let accusers = &state.accusers;
        actives.sort_by_key(|r| (accusers.contains(r), *r == accuser));
        if state.failures >= self.options.failure_threshold {
            return self.enter_fallback(out);
        }
        self.install_tree(actives, false, out);
    }

    /// Too many failures detected (§4.3, §4.5): the fallback, classical BFT with
    /// Shamir aggregation (every backup active, any `f` of them with the primary),
    /// for `fallback_duration`; then back to a tree of backups that answered.
    pub(super) fn enter_fallback(&mut self, out: &mut Out) {
        let backups: Vec<ReplicaId> = (0..self.n as u16)
            .map(ReplicaId)
            .filter(|r| *r != self.id)
            .collect();
        let state = self.state();
        state.responsive.clear();
        state.rebuilds_without_progress = 0;
        out.observe(diffuse_core::protocol::Observation::ModeChanged { mode: "fallback" });
        self.install_tree(backups, true, out);
        if self.options.fallback_only {
            return;
        }
        if let Some(epoch) = self.epoch.as_ref().map(|e| e.number()) {
            out.set_timer(Timer::FallbackEnd(epoch), self.options.fallback_duration);
        }
    }

    /// A fallback round got fewer than `f` shares in time (they were lost): a
    /// fresh fallback epoch prepares the batches again, after a back-off while
    /// this brings no progress.
    pub(super) fn fallback_stalled(&mut self, out: &mut Out) {
        let Some(epoch) = self.epoch.as_ref().map(|e| e.number()) else {
            return;
        };
        let me = self.id;
        let state = self.state();
        if state.suspected.is_some() {
            return;
        }
        state.suspected = Some((me, me));
        let k = state.rebuilds_without_progress;
        state.rebuilds_without_progress = k.saturating_add(1);
        out.set_timer(Timer::Rebuild(epoch), self.rebuild_back_off(k));
    }

    /// The fallback's time is up: back to the normal case with `f` backups that
    /// answered in it (accusers last), or another round of fallback if fewer did.
    pub(super) fn on_fallback_end(&mut self, epoch: u64, out: &mut Out) {
        if self.primary.is_none()
            || self.options.fallback_only
            || !self.epoch.as_ref().is_some_and(|e| e.config.fallback)
        {
            return;
        }
        let f = self.f;
        let state = self.state();
        let accusers = state.accusers.clone();
        let mut responsive: Vec<ReplicaId> = state.responsive.iter().copied().collect();
        if responsive.len() < f {
            let current = self.epoch.as_ref().map_or(epoch, |e| e.number());
            out.set_timer(Timer::FallbackEnd(current), self.options.fallback_duration);
            return;
        }
        responsive.sort_by_key(|r| (accusers.contains(r), *r));
        responsive.truncate(f);
        let (me, n) = (self.id, self.n);
        let state = self.state();
        state.failures = 0;
        state.rebuilds_without_progress = 0;
        state.passives = (0..n as u16)
            .map(ReplicaId)
            .filter(|r| *r != me && !responsive.contains(r))
            .collect();
        out.observe(diffuse_core::protocol::Observation::ModeChanged { mode: "tree" });
        self.install_tree(responsive, false, out);
    }

    /// A rejoin position was certified: every replica takes it (it is logged for
    /// FETCH answers like any position).
    pub(super) fn primary_issued_rejoin(
        &mut self,
        entry: crate::view_log::RejoinEntry,
        checkpoint: Seq,
        count: u32,
        out: &mut Out,
    ) {
        let at = position(&entry.cert);
        self.log.record(LogEntry::Rejoin(entry.clone()));
        out.broadcast(Message::Rejoined(entry.clone()));
        let state = self.state();
        state.log(at, Message::Rejoined(entry.clone()), None);
        state
            .rejoins
            .given
            .insert(entry.replica, (entry, checkpoint, count));
    }

    /// The UPDATEs kept for batches above `stable`.
    pub(super) fn primary_updates_above(&mut self, stable: Seq) -> Vec<Update> {
        self.state()
            .updates
            .range(stable.next()..)
            .map(|(_, u)| u.clone())
            .collect()
    }

    /// Answers a replica that is missing stream messages or packages.
    pub(super) fn on_fetch(&mut self, from: NodeId, fetch: Fetch, out: &mut Out) {
        let NodeId::Replica(replica) = from else {
            return;
        };
        if diffuse_tee::view_of_epoch(fetch.epoch) < self.view {
            // A replica still in an earlier view: it missed this view's NEW-VIEW.
            return self.send_new_view_to(replica, out);
        }
        let Some(epoch) = self.epoch.clone() else {
            return;
        };
        if fetch.packages {
            if let Some(i) = epoch.index_of(replica)
                && fetch.epoch == epoch.number()
            {
                let packages: Vec<Package> = self
                    .state()
                    .pool
                    .range(fetch.counter..)
                    .filter_map(|(_, p)| p.packages.get(i).cloned())
                    .collect();
                out.send(
                    replica,
                    Message::Packages(Packages {
                        epoch: epoch.number(),
                        packages: BoundedVec::truncating(packages),
                    }),
                );
            }
            return;
        }
        let asked = (fetch.epoch, fetch.counter);
        let oldest = self.state().log.first_key_value().map(|(at, _)| *at);
        if oldest.is_some_and(|oldest| asked < oldest) {
            // Too far behind to catch up position by position: the log itself.
            return self.send_catch_up(replica, out);
        }
        let state = self.state();
        let mut sent_updates = BTreeSet::new();
        let mut answers = Vec::new();
        for (at, (message, seq)) in state
            .log
            .range((fetch.epoch, fetch.counter)..)
            .take(FETCH_ANSWER)
        {
            // The UPDATE stands for this position only if it carries this very
            // certificate: a batch re-committed after a NEW-TREE has older COMMITs.
            let covering = seq
                .and_then(|s| state.updates.get(&s).map(|u| (s, u)))
                .filter(|(_, u)| {
                    position(&u.prepare_cert) == *at || position(&u.commit_cert) == *at
                });
            match covering {
                Some((s, update)) => {
                    if sent_updates.insert(s) {
                        answers.push(Message::Update(update.clone()));
                    }
                }
                None => answers.push(message.clone()),
            }
        }
        for answer in answers {
            out.send(replica, answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffuse_core::codec::Blob;
    use diffuse_core::crypto::SecretKey;
    use diffuse_pbft::message::RequestBody;

    fn pending(sizes: &[usize]) -> VecDeque<Request> {
        let key = SecretKey::from_seed([7; 32]);
        sizes
            .iter()
            .enumerate()
            .map(|(t, size)| {
                let body = RequestBody {
                    client: ClientId(1),
                    timestamp: t as u64,
                    operation: Blob::try_from_vec(vec![0; *size]).unwrap(),
                };
                Request::signed_only(body, &key)
            })
            .collect()
    }

    #[test]
    fn a_batch_is_bounded_by_requests_and_by_bytes_but_takes_at_least_one() {
        let queue = pending(&[10, 10, 10, 10]);
        assert_eq!(batch_size(&queue, 3, 1000), (3, 30), "by requests");
        assert_eq!(batch_size(&queue, 10, 25), (2, 20), "by bytes");
        assert_eq!(batch_size(&queue, 10, 40), (4, 40), "exactly the bytes");
        let large = pending(&[100, 10]);
        assert_eq!(batch_size(&large, 10, 25), (1, 100), "one over the bound");
        assert_eq!(batch_size(&pending(&[]), 10, 25), (0, 0));
    }
}
