//! The rollback attack on a FastBFT primary (§6.1).
//!
//! A prepare secret `s_c` is bound to its position `(epoch, counter)` only, not to
//! the message certified there: every active replica releases its share of `s_c`
//! for whatever certificate of the primary's enclave takes that position. Only the
//! primary's trusted counter, which certifies one message per position, stops two
//! PREPAREs at one position. A host that can run a second copy of the primary's
//! enclave from an old sealed state has two counters, and the protocol's safety
//! goes with them.

use crate::message::{
    Commit, Message, Position, Prepare, TreeConfig, certify_prepare, commit_digest,
    new_tree_digest, position,
};
use crate::options::FastBftOptions;
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{NodeId, ReplicaId, Seq};
use diffuse_core::suite::{Behaviour, Entropy, Outgoing, ReplicaSetup};
use diffuse_minbft::TeeHost;
use diffuse_pbft::message::Batch;
use diffuse_tee::{FastBftComponent, SoftwareEnclave, Tree, TrustedComponent, view_of_epoch};
use std::collections::{BTreeMap, BTreeSet};

/// Throwaway certificates the copy may issue to catch up with the live enclave,
/// at most (a correct primary's first PREPARE is the first position of its
/// first epoch; this only bounds the work on odd schedules).
const MAX_CATCH_UP: u64 = 4096;

/// Attempts at most (see [`Rollback`]).
const MAX_TRIES: u32 = 4;

/// The rollback attack, as primary of view 0, on its first own PREPARE, at
/// position `(e, c)`:
///
/// 1. The host starts a copy of its enclave from the first state ever sealed
///    ([`TeeHost::roll_back`]) and brings it to where the live enclave was in
///    epoch `e` by replaying what the honest primary did since boot: for each
///    NEW-TREE it sent (the genesis one first), `request_counter` with throwaway
///    digests up to the NEW-TREE's counter value, `request_counter` over the
///    NEW-TREE, then `be_primary` (`be_primary_threshold` for a fallback tree)
///    with the same actives; then throwaway certificates up to `c - 1`. No
///    `preprocessing` is needed: `request_counter` certifies without a prepared
///    secret, and the copy signs with the enclave's own key, the one the backups
///    check, whatever view keys it drew. The copy then certifies, at exactly
///    `(e, c)`, a conflicting PREPARE: the same sequence number with an **empty
///    batch**. If its certificate is not at `(e, c)` there is no attack. A
///    protected enclave comes up locked and certifies nothing: the primary then
///    stays honest for good.
/// 2. The upper half of the epoch's active backups by id (at least one: the only
///    one at `n = 3`) get the conflicting PREPARE in place of the original, the
///    others the original. Every one of them releases its share of `s_c`, so the
///    primary's prepare round opens as usual.
/// 3. When the honest primary sends its COMMIT for that PREPARE (at `(e, c')`,
///    `c' = c + 1` unless other PREPAREs went in between), the copy catches up to
///    `c' - 1` and certifies at `(e, c')` a COMMIT of the empty batch:
///    `commit_digest(seq, root of the empty batch, root of no results, the
///    original's state digest)`, with the conflicting PREPARE's certificate and
///    the same opened `s_c`. A replica that released its share for `(e, c)` checks
///    the opened secret against its own round's hash only, and its stream fixed the
///    empty batch at `seq`: it executes the empty batch. Its results root is the
///    one the COMMIT carries, so it releases its part of the reply secret, the
///    reply round opens, and the primary sends the clients their REPLYs and the
///    passive replicas an UPDATE of the original batch, which they execute: two
///    correct replicas executed different batches at `seq` (the agreement checker),
///    and their states part (the state checker, at the next checkpoint).
///
/// Both substitutions are by position and recipient, so an answer to a FETCH
/// (which the honest primary takes from its log) tells each replica the same
/// story as the first copy did.
///
/// **Retries.** An attempt dies when the tree is rebuilt before its COMMIT: the
/// network lost the share (or the PREPARE), the primary replaced the misled
/// replica and prepares the original batch again at a new position. Tried once
/// only, the attack left 16 of the 85 runs with a faulty primary among the first
/// 100 seeds of `--n 3 --faults rollback` uncaught. So, while no COMMIT was
/// forged, it starts over (a fresh copy, the NEW-TREEs replayed) on an own
/// PREPARE of a later epoch for a higher sequence number than the last
/// attempt's, at most [`MAX_TRIES`] times: 5 of the 85 uncaught. Not on the
/// original's re-PREPARE: the replicas misled the second time fetch the first
/// epoch's positions, find the original there and fix its batch, so a second
/// conflicting PREPARE for it only gets the primary blamed (retrying on any
/// PREPARE: 15 uncaught).
///
/// **Why an empty batch** rather than the original without its last request (as
/// `equivocate` makes its twin): the COMMIT must carry the results root the
/// misled replicas compute, which for a shorter batch the host would have to
/// execute to know. The empty batch's is known without executing anything. (In
/// the simulator the first batch almost always holds one request, so the two are
/// the same batch there, and catch the mutant as often.)
pub(crate) struct Rollback {
    me: ReplicaId,
    tee: TeeHost,
    /// Attempts made.
    tries: u32,
    /// The sequence number of the last attempt's PREPARE.
    last_seq: Seq,
    /// The rolled-back copy came up locked: the enclave is protected, and no
    /// attempt can succeed.
    protected: bool,
    /// The NEW-TREEs it sent in view 0, by position.
    trees: BTreeMap<Position, TreeConfig>,
    attack: Option<Attack>,
}

/// An attack under way.
struct Attack {
    /// The rolled-back copy of the enclave.
    copy: SoftwareEnclave,
    /// The attacked position `(e, c)`.
    at: Position,
    /// The conflicting PREPARE certified there by the copy.
    prepare: Prepare,
    /// The backups that get the conflicting messages.
    misled: BTreeSet<ReplicaId>,
    /// The conflicting COMMIT, once certified, by the position the honest one took
    /// (`None` there if the copy could not certify it).
    commit: Option<(Position, Option<Commit>)>,
}

impl Rollback {
    pub(crate) fn new(setup: &ReplicaSetup<FastBftOptions>) -> Self {
        Self {
            me: setup.id,
            tee: setup.options.tee.clone(),
            tries: 0,
            last_seq: Seq(0),
            protected: false,
            trees: BTreeMap::new(),
            attack: None,
        }
    }

    /// Whether to attack the own PREPARE `prepare`: the first one of view 0, or
    /// one for a later sequence number than the last attempt's if that attempt
    /// came to nothing (its epoch ended before its COMMIT), a few times at most.
    fn should_try(&self, prepare: &Prepare) -> bool {
        let epoch = prepare.cert.view;
        let under_way = self
            .attack
            .as_ref()
            .is_some_and(|a| a.commit.is_some() || a.at.0 >= epoch);
        !under_way
            && !self.protected
            && self.tries < MAX_TRIES
            && view_of_epoch(epoch) == 0
            && prepare.seq > self.last_seq
    }

    /// The copy of the enclave at `original`'s position with a conflicting
    /// PREPARE certified there, or `None` (no attack).
    fn forge(&mut self, original: &Prepare) -> Option<Attack> {
        let at = position(&original.cert);
        let keys = self.tee.enclave_keys()?;
        let mut copy = self.tee.roll_back(self.me).ok()?;
        if copy.is_locked() {
            self.protected = true;
            return None;
        }
        let mut config = None;
        for (tree_at, tree) in self.trees.range(..at) {
            catch_up(&mut copy, *tree_at)?;
            let cert = copy.request_counter(&new_tree_digest(tree)).ok()?;
            if position(&cert) != *tree_at {
                return None;
            }
            let actives = active_keys(tree, &keys)?;
            if tree.fallback {
                copy.be_primary_threshold(&actives).ok()?;
            } else {
                let shape = Tree::balanced(actives.len(), usize::from(tree.fan_out)).ok()?;
                copy.be_primary(&actives, shape).ok()?;
            }
            if copy.fastbft_counter() != (0, tree.epoch) {
                return None;
            }
            config = Some(tree);
        }
        let config = config.filter(|c| c.epoch == at.0)?;
        catch_up(&mut copy, at)?;
        let batch = Batch {
            requests: BoundedVec::new(),
        };
        let root = crate::message::batch_root(&batch);
        if root == crate::message::batch_root(&original.batch) {
            return None;
        }
        let checkpoint = original.checkpoint.as_ref().map(|p| p.digest());
        // Through the batch check like any PREPARE: the empty batch passes it.
        let cert = certify_prepare(&mut copy, original.seq, &batch, checkpoint.as_ref()).ok()?;
        if position(&cert) != at {
            return None;
        }
        let mut backups: Vec<ReplicaId> = config.actives.to_vec();
        backups.sort();
        let half = backups.len() / 2;
        let misled = backups.split_off(half).into_iter().collect();
        Some(Attack {
            copy,
            at,
            prepare: Prepare {
                seq: original.seq,
                batch: batch.into(),
                checkpoint: original.checkpoint.clone(),
                cert,
            },
            misled,
            commit: None,
        })
    }
}

/// The enclave keys of `tree`'s actives, in tree order.
fn active_keys(tree: &TreeConfig, keys: &[PublicKey]) -> Option<Vec<PublicKey>> {
    tree.actives
        .iter()
        .map(|r| keys.get(r.index()).copied())
        .collect()
}

/// Has `copy` certify throwaway digests until its next certificate takes `at`;
/// `None` if it cannot (another epoch, already past, locked, too far).
fn catch_up(copy: &mut SoftwareEnclave, at: Position) -> Option<()> {
    let (counter, epoch) = copy.fastbft_counter();
    let target = at.1.checked_sub(1)?;
    if epoch != at.0 || counter > target || target - counter > MAX_CATCH_UP {
        return None;
    }
    for _ in counter..target {
        copy.request_counter(&Digest::default()).ok()?;
    }
    (copy.fastbft_counter() == (target, at.0)).then_some(())
}

impl Attack {
    /// The conflicting COMMIT in place of `original` (the honest COMMIT of the
    /// attacked PREPARE), certified once by the copy at `original`'s position.
    fn commit(&mut self, original: &Commit) -> Option<Commit> {
        let at = position(&original.cert);
        if let Some((done_at, commit)) = &self.commit {
            return commit.clone().filter(|_| *done_at == at);
        }
        let commit = self.certify_commit(original, at);
        self.commit = Some((at, commit.clone()));
        commit
    }

    fn certify_commit(&mut self, original: &Commit, at: Position) -> Option<Commit> {
        catch_up(&mut self.copy, at)?;
        let batch_root = crate::message::batch_root(&self.prepare.batch);
        let results_root = crate::merkle::root(&[]);
        let digest = commit_digest(
            original.seq,
            &batch_root,
            &results_root,
            original.state.as_ref(),
        );
        let cert = self.copy.request_counter(&digest).ok()?;
        if position(&cert) != at {
            return None;
        }
        Some(Commit {
            seq: original.seq,
            batch_root,
            results_root,
            state: original.state,
            prepare_checkpoint: original.prepare_checkpoint,
            prepare_cert: self.prepare.cert.clone(),
            prepared: original.prepared.clone(),
            batch: original.batch.as_ref().map(|_| self.prepare.batch.clone()),
            cert,
        })
    }
}

impl Behaviour<Message> for Rollback {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        match &message {
            Message::NewTree(new_tree) if view_of_epoch(new_tree.cert.view) == 0 => {
                self.trees
                    .entry(position(&new_tree.cert))
                    .or_insert_with(|| new_tree.config.clone());
            }
            Message::Prepare(prepare) if self.should_try(prepare) => {
                self.tries += 1;
                self.last_seq = prepare.seq;
                self.attack = self.forge(prepare);
            }
            _ => {}
        }
        let NodeId::Replica(r) = to else {
            return out.push(Outgoing::now(to, message));
        };
        if let Some(attack) = self.attack.as_mut().filter(|a| a.misled.contains(&r)) {
            match &message {
                Message::Prepare(prepare) if position(&prepare.cert) == attack.at => {
                    let forged = Message::Prepare(attack.prepare.clone());
                    return out.push(Outgoing::now(to, forged));
                }
                Message::Commit(commit)
                    if position(&commit.prepare_cert) == attack.at
                        && commit.seq == attack.prepare.seq
                        && commit.cert.view == attack.at.0 =>
                {
                    if let Some(forged) = attack.commit(commit) {
                        return out.push(Outgoing::now(to, Message::Commit(forged)));
                    }
                }
                _ => {}
            }
        }
        out.push(Outgoing::now(to, message));
    }
}
