//! The view change's evidence (`docs/protocols/fastbft.md`, "View change"): what a
//! replica logs of its view's stream, the VIEW-CHANGE that carries the log, the
//! NEW-VIEW, and the decision every replica computes alike from `f + 1`
//! VIEW-CHANGEs.
//!
//! **The log.** A replica records every position of its view's stream it takes,
//! with the content the primary's certificate binds. Its enclave certifies the
//! position it left at, so a VIEW-CHANGE must list every position from the log's
//! start to there: a replica, even a faulty one, cannot hide a PREPARE it took.
//! The log starts at the COMMIT of the sender's stable checkpoint if that is in the
//! view (nothing that can commit above the checkpoint is certified before it,
//! `crate::checkpoint`), else at the view's NEW-VIEW, whose decision it carries.
//!
//! **Which PREPARE counts.** [`StreamState::accept_prepare`] is the rule every
//! replica applies in its view, and the one the decision replays: a PREPARE counts
//! if its checkpoint proof (if any) is valid and new, its sequence number is in the
//! window above the stream's checkpoint, its batch is the one fixed for that
//! sequence number (by the NEW-VIEW's decision or the first PREPARE that counted),
//! and its certificate is of the verified-batch kind: the primary's enclave
//! verified every request's client signature before it certified it
//! (`crate::authentic`). Nothing in it depends on the replica, so a correct replica
//! releases its share for a PREPARE exactly when the decision would count it.
//!
//! **The decision** ([`decide`]): the highest checkpoint proof anywhere in the
//! VIEW-CHANGEs; then, from the VIEW-CHANGEs of the highest view, the one whose
//! log reaches furthest, replayed: for each sequence number above the checkpoint,
//! the batch fixed for it (a null batch in gaps). Lower views' logs are ignored:
//! whatever committed there is in the higher view's NEW-VIEW, which a correct
//! replica checked (the enclaves enter a view only with `f + 1` votes).

use crate::checkpoint::{CheckpointProof, primary_key, seq_of};
use crate::message::{
    Cert, Prepare, SharedBatch, TreeConfig, batch_root, certifies_prepare, commit_digest,
    new_tree_digest, position,
};
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{Digest, PublicKey, Signed};
use diffuse_core::ids::{MAX_REPLICAS, ReplicaId, Seq};
use diffuse_pbft::message::{Batch, MAX_WINDOW};
use diffuse_tee::{
    ViewChangeCertificate, WrappedViewKey, first_epoch, rejoin_digest, view_of_epoch,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most positions a log holds. A replica takes no position past it (and asks
/// for a view change): a correct primary certifies about two positions per
/// sequence number between checkpoints, plus a few per tree rebuild.
pub const MAX_LOG_ENTRIES: usize = 8192;

/// The largest checkpoint interval FastBFT accepts, so that a log fits
/// [`MAX_LOG_ENTRIES`].
pub const MAX_CHECKPOINT_INTERVAL: u64 = 1024;

/// A stream position: `(epoch, counter)`.
pub type Position = (u64, u64);

/// A COMMIT as logged: what its certificate binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitEntry {
    /// The batch's sequence number.
    pub seq: Seq,
    /// The batch root.
    pub batch_root: Digest,
    /// The results root.
    pub results_root: Digest,
    /// The state digest, at a checkpoint.
    pub state: Option<Digest>,
    /// The certificate.
    pub cert: Cert,
}

/// A NEW-TREE as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTreeEntry {
    /// The next epoch's tree.
    pub config: TreeConfig,
    /// The certificate (the last position of its epoch).
    pub cert: Cert,
}

/// A position where a restarted replica rejoined the view: the primary's
/// certificate over `rejoin_digest(replica's enclave key, nonce)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinEntry {
    /// The replica that rejoined.
    pub replica: ReplicaId,
    /// Its enclave's nonce.
    pub nonce: Digest,
    /// The certificate.
    pub cert: Cert,
}

/// One position of a view's stream, with what its certificate binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEntry {
    /// A PREPARE (its batch without authenticators).
    Prepare(Prepare),
    /// A COMMIT.
    Commit(CommitEntry),
    /// A NEW-TREE.
    NewTree(NewTreeEntry),
    /// A restarted replica rejoined here.
    Rejoin(RejoinEntry),
}

impl LogEntry {
    /// The certificate.
    pub fn cert(&self) -> &Cert {
        match self {
            LogEntry::Prepare(p) => &p.cert,
            LogEntry::Commit(c) => &c.cert,
            LogEntry::NewTree(t) => &t.cert,
            LogEntry::Rejoin(r) => &r.cert,
        }
    }

    /// Whether the certificate binds this content (`enclave_keys`: every
    /// replica's, for a rejoin).
    pub fn binds(&self, enclave_keys: &[PublicKey]) -> bool {
        match self {
            LogEntry::Prepare(p) => certifies_prepare(
                &p.cert,
                p.seq,
                &batch_root(&p.batch),
                p.checkpoint_digest().as_ref(),
            ),
            LogEntry::Commit(c) => {
                c.cert.message
                    == commit_digest(c.seq, &c.batch_root, &c.results_root, c.state.as_ref())
            }
            LogEntry::NewTree(t) => {
                t.cert.message == new_tree_digest(&t.config)
                    && t.config.epoch == t.cert.view.saturating_add(1)
            }
            LogEntry::Rejoin(r) => enclave_keys
                .get(r.replica.index())
                .is_some_and(|key| r.cert.message == rejoin_digest(key, &r.nonce)),
        }
    }
}

/// What a view's NEW-VIEW decided: the checkpoint it starts from and the batches
/// the new primary re-proposes at `checkpoint + 1`, `checkpoint + 2`, ….
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The stable checkpoint (`None`: genesis).
    pub checkpoint: Option<CheckpointProof>,
    /// The batches above it, in order (empty batches fill gaps).
    pub batches: BoundedVec<Batch, MAX_WINDOW>,
}

impl Decision {
    /// The checkpoint's sequence number.
    pub fn base(&self) -> Seq {
        seq_of(self.checkpoint.as_ref())
    }

    /// The decided batches with their sequence numbers.
    pub fn entries(&self) -> impl Iterator<Item = (Seq, &Batch)> {
        let base = self.base().0;
        self.batches
            .iter()
            .enumerate()
            .map(move |(i, b)| (Seq(base + 1 + i as u64), b))
    }
}

/// What a NEW-VIEW certificate binds.
pub fn new_view_digest(view: u64, config: &TreeConfig, decision: &Decision) -> Digest {
    Digest::of_value("diffuse/fastbft/new-view", &(view, config, decision))
}

/// A view's NEW-VIEW as later logs carry it: without the VIEW-CHANGEs it was
/// decided from (the enclaves entered it only once a correct replica checked it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewViewHeader {
    /// The view.
    pub view: u64,
    /// Its first tree.
    pub config: TreeConfig,
    /// The decision.
    pub decision: Decision,
    /// The new primary's certificate, at counter value 0 of the view's first epoch.
    pub cert: Cert,
}

impl NewViewHeader {
    /// Whether this is the NEW-VIEW of `view` by its primary's enclave.
    pub fn is_valid(&self, rules: &Rules<'_>) -> bool {
        let Some(primary) = primary_key(rules.enclave_keys, self.view) else {
            return false;
        };
        Some(self.cert.view) == first_epoch(self.view)
            && self.cert.counter == 0
            && self.cert.message == new_view_digest(self.view, &self.config, &self.decision)
            && self.cert.verify(&primary)
            && self.decision.batches.len() as u64 <= rules.interval
            && self
                .decision
                .checkpoint
                .as_ref()
                .is_none_or(|p| p.is_valid(rules.enclave_keys, rules.interval))
    }
}

/// A replica's log of its view, as its VIEW-CHANGE carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewLog {
    /// The view the sender is in.
    pub view: u64,
    /// That view's NEW-VIEW (`None` in view 0).
    pub base: Option<NewViewHeader>,
    /// The sender's stable checkpoint (`None`: genesis).
    pub checkpoint: Option<CheckpointProof>,
    /// Every position from the log's start ([`ViewLog::start`]) on.
    pub entries: BoundedVec<LogEntry, MAX_LOG_ENTRIES>,
}

impl ViewLog {
    /// What the sender's enclave certifies.
    pub fn digest(&self) -> Digest {
        Digest::of_value("diffuse/fastbft/view-log", self)
    }

    /// The position just before the first entry: the stable checkpoint's COMMIT if
    /// it is in this view, else the view's NEW-VIEW (genesis: `(0, 0)`).
    pub fn start(&self) -> Option<Position> {
        start_of(self.view, self.checkpoint.as_ref())
    }
}

/// Where a log of `view` with stable checkpoint `checkpoint` starts.
pub fn start_of(view: u64, checkpoint: Option<&CheckpointProof>) -> Option<Position> {
    match checkpoint {
        Some(proof) if view_of_epoch(proof.commit_cert.view) == view => {
            Some(position(&proof.commit_cert))
        }
        _ => first_epoch(view).map(|e| (e, 0)),
    }
}

/// VIEW-CHANGE: replica `replica` left its view for `cert.target` with `log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// The sender.
    pub replica: ReplicaId,
    /// Its enclave's certificate of its position and of the log's digest.
    pub cert: Signed<ViewChangeCertificate>,
    /// The log.
    pub log: ViewLog,
}

/// NEW-VIEW: the new primary's `f + 1` VIEW-CHANGEs, its first tree, and its
/// certificate over the decision they give.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// The view.
    pub view: u64,
    /// The VIEW-CHANGEs, from distinct replicas.
    pub view_changes: BoundedVec<ViewChange, MAX_REPLICAS>,
    /// The view's first tree.
    pub config: TreeConfig,
    /// `⟨new_view_digest(view, config, decision), (0, first_epoch(view))⟩`.
    pub cert: Cert,
    /// The view keys, wrapped for the active replicas, in tree order.
    pub keys: BoundedVec<WrappedViewKey, MAX_REPLICAS>,
}

/// What every check here needs to know of the cluster.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    /// The enclave key of every replica.
    pub enclave_keys: &'a [PublicKey],
    /// `K`, the checkpoint interval, also the window.
    pub interval: u64,
    /// The mutant `decide-drops-an-entry`: the decision loses its last batch.
    pub drop_last_decided: bool,
}

impl Rules<'_> {
    fn n(&self) -> usize {
        self.enclave_keys.len()
    }
}

/// A PREPARE whose content its certificate does not bind.
pub const MISMATCH: &str = "prepare does not match its certificate";

/// Why a VIEW-CHANGE or NEW-VIEW is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// Checks one VIEW-CHANGE for view `target`: the sender's enclave certified this
/// log, and the log lists every position of the sender's view from its start to
/// the position the enclave left at, each bound by the view's primary.
pub fn check_view_change(vc: &ViewChange, target: u64, rules: &Rules<'_>) -> Result<(), Invalid> {
    let sender = rules
        .enclave_keys
        .get(vc.replica.index())
        .ok_or(Invalid("unknown sender"))?;
    let cert = &vc.cert;
    if !cert.verify(sender) || cert.target != target || cert.log != vc.log.digest() {
        return Err(Invalid("view-change certificate"));
    }
    let log = &vc.log;
    let view = view_of_epoch(cert.epoch);
    if log.view != view || view >= target {
        return Err(Invalid("view-change view"));
    }
    check_log(log, (cert.epoch, cert.counter), rules)
}

/// Checks a log of view `log.view` that must reach position `end`: its base and
/// checkpoint are valid, and its entries run from its start to `end` without a
/// gap, each bound by the view's primary.
pub fn check_log(log: &ViewLog, end: Position, rules: &Rules<'_>) -> Result<(), Invalid> {
    let view = log.view;
    match (&log.base, view) {
        (None, 0) => {}
        (Some(base), _) if base.view == view && base.is_valid(rules) => {}
        _ => return Err(Invalid("view-change base")),
    }
    if let Some(proof) = &log.checkpoint
        && !proof.is_valid(rules.enclave_keys, rules.interval)
    {
        return Err(Invalid("view-change checkpoint"));
    }
    let primary = primary_key(rules.enclave_keys, view).ok_or(Invalid("no primary"))?;
    let mut at = log.start().ok_or(Invalid("view out of range"))?;
    for entry in log.entries.iter() {
        let cert = entry.cert();
        if position(cert) != (at.0, at.1.saturating_add(1))
            || !cert.verify(&primary)
            || !entry.binds(rules.enclave_keys)
        {
            return Err(Invalid("view-change log entry"));
        }
        at = position(cert);
        if let LogEntry::NewTree(_) = entry {
            let next = at.0.saturating_add(1);
            if view_of_epoch(next) != view {
                return Err(Invalid("view-change log leaves its view"));
            }
            at = (next, 0);
        }
    }
    if at != end {
        return Err(Invalid("view-change log does not reach its position"));
    }
    Ok(())
}

/// A view's stream as the PREPARE rule sees it: the checkpoint met in it and the
/// batch fixed for each sequence number.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    /// The highest checkpoint whose proof the stream carried (or the NEW-VIEW's).
    pub checkpoint: Seq,
    /// The batch root fixed for each sequence number above it.
    pub fixed: BTreeMap<Seq, Digest>,
}

impl StreamState {
    /// The stream at the start of a view with `decision`.
    pub fn after(decision: &Decision) -> StreamState {
        StreamState {
            checkpoint: decision.base(),
            fixed: decision
                .entries()
                .map(|(seq, batch)| (seq, batch_root(batch)))
                .collect(),
        }
    }

    /// Whether `prepare` counts (see the module's doc), and if so takes it: its
    /// checkpoint proof moves the stream's checkpoint, its batch is fixed. The
    /// certificate's signature is assumed checked; if it does not certify this
    /// PREPARE, of the verified-batch kind, the error is [`MISMATCH`]. Returns the
    /// proof it carried, if new.
    pub fn accept_prepare(
        &mut self,
        prepare: &Prepare,
        rules: &Rules<'_>,
    ) -> Result<Option<CheckpointProof>, Invalid> {
        let interval = rules.interval.max(1);
        let root = batch_root(&prepare.batch);
        if !certifies_prepare(
            &prepare.cert,
            prepare.seq,
            &root,
            prepare.checkpoint_digest().as_ref(),
        ) {
            return Err(Invalid(MISMATCH));
        }
        let mut checkpoint = self.checkpoint;
        if let Some(proof) = &prepare.checkpoint {
            if proof.seq <= self.checkpoint
                || prepare.seq != proof.seq.next()
                || !proof.is_valid(rules.enclave_keys, interval)
            {
                return Err(Invalid("prepare carries a bad checkpoint"));
            }
            checkpoint = proof.seq;
        }
        if prepare.seq <= checkpoint || prepare.seq.0 > checkpoint.0.saturating_add(interval) {
            return Err(Invalid("prepare outside the window"));
        }
        if self.fixed.get(&prepare.seq).is_some_and(|r| *r != root) {
            return Err(Invalid("prepare for a sequence number fixed otherwise"));
        }
        self.fixed.insert(prepare.seq, root);
        let carried = if checkpoint > self.checkpoint {
            self.checkpoint = checkpoint;
            self.fixed = self.fixed.split_off(&checkpoint.next());
            prepare.checkpoint.as_deref().cloned()
        } else {
            None
        };
        Ok(carried)
    }
}

/// The decision from checked VIEW-CHANGEs (see the module's doc), in the order
/// given: the same VIEW-CHANGEs give every replica the same decision.
pub fn decide(view_changes: &[ViewChange], rules: &Rules<'_>) -> Decision {
    let interval = rules.interval.max(1);
    // The highest checkpoint proof anywhere.
    let mut candidates: Vec<&CheckpointProof> = Vec::new();
    for vc in view_changes {
        let log = &vc.log;
        candidates.extend(log.checkpoint.iter());
        candidates.extend(
            log.base
                .iter()
                .filter_map(|b| b.decision.checkpoint.as_ref()),
        );
        for entry in log.entries.iter() {
            if let LogEntry::Prepare(p) = entry
                && let Some(proof) = &p.checkpoint
            {
                candidates.push(proof);
            }
        }
    }
    let mut best: Option<&CheckpointProof> = None;
    for proof in candidates {
        if proof.seq > seq_of(best) && proof.is_valid(rules.enclave_keys, interval) {
            best = Some(proof);
        }
    }
    let checkpoint = best.cloned();
    let base = seq_of(checkpoint.as_ref());
    // The log of the highest view that reaches furthest.
    let furthest = view_changes.iter().max_by(|a, b| {
        (a.log.view, a.cert.epoch, a.cert.counter)
            .cmp(&(b.log.view, b.cert.epoch, b.cert.counter))
            .then(b.replica.cmp(&a.replica))
    });
    let batches = furthest
        .map(|vc| replay(&vc.log, rules).1)
        .unwrap_or_default();
    let mut decided: Vec<Batch> = Vec::new();
    let last = batches
        .range(base.next()..)
        .map(|(s, _)| *s)
        .rfind(|s| s.0 <= base.0.saturating_add(interval));
    if let Some(last) = last {
        for s in base.0 + 1..=last.0 {
            decided.push(
                batches
                    .get(&Seq(s))
                    .map(|b| Batch::clone(b))
                    .unwrap_or_default(),
            );
        }
    }
    if rules.drop_last_decided {
        decided.pop();
    }
    Decision {
        checkpoint,
        batches: BoundedVec::truncating(decided),
    }
}

/// A log replayed under the PREPARE rule from its start: the stream's state at
/// its end, and the batch fixed for each sequence number (the NEW-VIEW's
/// decision's, then each PREPARE's that counted).
pub fn replay(log: &ViewLog, rules: &Rules<'_>) -> (StreamState, BTreeMap<Seq, SharedBatch>) {
    let interval = rules.interval.max(1);
    let decided = log.base.as_ref().map(|b| &b.decision);
    let mut stream = decided.map(StreamState::after).unwrap_or_default();
    let mut batches: BTreeMap<Seq, SharedBatch> = BTreeMap::new();
    for (seq, batch) in decided.into_iter().flat_map(|d| d.entries()) {
        batches.insert(seq, std::sync::Arc::new(batch.clone()));
    }
    if let Some(proof) = &log.checkpoint
        && view_of_epoch(proof.commit_cert.view) == log.view
    {
        // The stream's checkpoint when that COMMIT was taken: one interval below.
        stream.checkpoint = Seq(proof.seq.0.saturating_sub(interval)).max(stream.checkpoint);
    }
    for entry in log.entries.iter() {
        if let LogEntry::Prepare(prepare) = entry
            && stream.accept_prepare(prepare, rules).is_ok()
        {
            batches
                .entry(prepare.seq)
                .or_insert_with(|| prepare.batch.clone());
        }
    }
    (stream, batches)
}

/// Checks a NEW-VIEW for `nv.view`: exactly `f + 1` VIEW-CHANGEs from distinct
/// replicas, each valid; a tree a correct primary sends; and the certificate over
/// the decision they give. Returns the decision.
pub fn check_new_view(nv: &NewView, rules: &Rules<'_>) -> Result<Decision, Invalid> {
    let n = rules.n();
    let f = (n.saturating_sub(1)) / 2;
    let primary = primary_key(rules.enclave_keys, nv.view).ok_or(Invalid("no primary"))?;
    if Some(nv.cert.view) != first_epoch(nv.view)
        || nv.cert.counter != 0
        || !nv.cert.verify(&primary)
    {
        return Err(Invalid("new-view certificate"));
    }
    let mut senders = std::collections::BTreeSet::new();
    if nv.view_changes.len() != f + 1
        || !nv.view_changes.iter().all(|vc| senders.insert(vc.replica))
    {
        return Err(Invalid(
            "new-view needs f + 1 view-changes from distinct replicas",
        ));
    }
    for vc in nv.view_changes.iter() {
        check_view_change(vc, nv.view, rules)?;
    }
    let new_primary = crate::checkpoint::primary_of(nv.view, n);
    let mut seen = std::collections::BTreeSet::new();
    if nv.config.actives.len() != f
        || nv.config.fallback
        || nv.keys.len() != f
        || nv.config.epoch != nv.cert.view
        || !nv
            .config
            .actives
            .iter()
            .all(|r| r.index() < n && *r != new_primary && seen.insert(*r))
        || diffuse_tee::Tree::balanced(f, usize::from(nv.config.fan_out)).is_err()
    {
        return Err(Invalid("new-view tree"));
    }
    let decision = decide(&nv.view_changes, rules);
    if nv.cert.message != new_view_digest(nv.view, &nv.config, &decision) {
        return Err(Invalid("new-view decision"));
    }
    Ok(decision)
}
