//! Opening one secret over the tree (Fig. 4, lines 9–36): each active replica
//! XORs its share with its children's aggregates, each checked against the hash
//! its enclave released, and passes the result to its parent; the primary XORs
//! its children's aggregates into the secret.
//!
//! Failure detection (§4.3): a parent waits for each child for `share_timeout`
//! per level below it, so the deepest parent times out first; on a timeout or a
//! wrong aggregate it sends SUSPECT to the primary (and to its own parent, which
//! then stops waiting for the accuser: its subtree is reported already). The
//! primary acts on the first valid SUSPECT of an epoch by rebuilding the tree.

use super::{FastBftReplica, Out, Timer};
use crate::message::{Message, Position, ShareUp, Suspect};
use crate::options::Mutant;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{NodeId, ReplicaId};
use diffuse_tee::{OpenedShare, Share, Tree, aggregate_hash};

/// Aggregates kept for rounds not opened yet, at most.
const MAX_EARLY_SHARES: usize = 1024;
/// Finished rounds kept to recognise duplicate shares.
const KEPT_FINISHED_ROUNDS: usize = 64;
/// Rounds kept in all; only past this do unfinished rounds go.
const MAX_OPEN_ROUNDS: usize = diffuse_tee::fastbft::MAX_PREPROCESSING + KEPT_FINISHED_ROUNDS;

/// Which secret of a batch a round opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The PREPARE's: the batch is committed once it opens.
    Prepare,
    /// The COMMIT's: every active replica executed the batch with these results.
    Reply,
}

/// One secret being opened at this replica.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    pub(crate) phase: Phase,
    /// `h_c` as the enclave released it (the primary's own commitment at the root).
    pub(crate) secret_hash: Digest,
    /// This replica's children, their expected aggregate hashes, and what arrived.
    children: Vec<ReplicaId>,
    hashes: Vec<Digest>,
    received: Vec<Option<Share>>,
    /// Children that reported a SUSPECT about their own child: not accused here.
    excused: Vec<bool>,
    /// The XOR so far (this replica's share, or zero at the primary).
    aggregate: Share,
    /// In a fallback epoch, at the primary: its own Shamir share, and the shares
    /// needed besides (`f`); the children's points are `threshold_point(i)`.
    threshold: Option<(Share, usize)>,
    /// `None` at the primary.
    parent: Option<ReplicaId>,
    pub(super) done: bool,
    accused: bool,
}

impl Round {
    fn complete(&self) -> bool {
        match self.threshold {
            Some((_, needed)) => self.received.iter().flatten().count() >= needed,
            None => self.received.iter().all(Option::is_some),
        }
    }

    /// What goes up (or, at the primary, the secret): the XOR of this replica's
    /// share and its children's aggregates, or in a fallback epoch the Shamir
    /// combination of the primary's share and the backups'.
    fn result(&self) -> Option<Share> {
        match self.threshold {
            Some((own, _)) => {
                let mut points = vec![(diffuse_tee::THRESHOLD_PRIMARY_POINT, own)];
                points.extend(
                    self.received
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| s.map(|s| (diffuse_tee::threshold_point(i), s))),
                );
                diffuse_tee::combine_threshold(&points)
            }
            None => Some(
                self.received
                    .iter()
                    .flatten()
                    .fold(self.aggregate, |acc, s| acc.xor(s)),
            ),
        }
    }
}

/// Levels below tree position `i` (0 for a leaf).
fn height(tree: &Tree, i: usize) -> u32 {
    tree.children(i)
        .map(|c| 1 + height(tree, c))
        .max()
        .unwrap_or(0)
}

impl FastBftReplica {
    /// Starts the round of `at` at an active replica, with what its enclave released.
    pub(super) fn start_round(
        &mut self,
        at: Position,
        phase: Phase,
        opened: OpenedShare,
        out: &mut Out,
    ) {
        let Some(epoch) = &self.epoch else {
            return;
        };
        let Some(i) = epoch.index_of(self.id) else {
            return;
        };
        // In a fallback epoch every backup is a leaf under the primary.
        let fallback = epoch.config.fallback;
        let children: Vec<ReplicaId> = if fallback {
            Vec::new()
        } else {
            epoch
                .tree
                .children(i)
                .map(|c| epoch.config.actives[c])
                .collect()
        };
        let parent = Some(match epoch.tree.parent(i) {
            Some(p) if !fallback => epoch.config.actives[p],
            _ => self.primary_id(),
        });
        let levels = if fallback { 0 } else { height(&epoch.tree, i) };
        self.open_round(
            at,
            Round {
                phase,
                secret_hash: opened.secret_hash,
                received: vec![None; children.len()],
                excused: vec![false; children.len()],
                hashes: opened.children_hashes,
                children,
                aggregate: opened.share,
                threshold: None,
                parent,
                done: false,
                accused: false,
            },
            levels,
            out,
        );
    }

    /// Starts the round of `at` at the primary: its children are the root's.
    pub(super) fn start_root_round(
        &mut self,
        at: Position,
        phase: Phase,
        secret_hash: Digest,
        hashes: Vec<Digest>,
        own_share: Option<Share>,
        out: &mut Out,
    ) {
        let Some(epoch) = &self.epoch else {
            return;
        };
        let (children, levels, threshold): (Vec<ReplicaId>, u32, _) = if epoch.config.fallback {
            let Some(own) = own_share else {
                return;
            };
            (epoch.config.actives.to_vec(), 1, Some((own, self.f)))
        } else {
            let children = epoch
                .tree
                .root_children()
                .map(|c| epoch.config.actives[c])
                .collect();
            let levels = 1 + epoch
                .tree
                .root_children()
                .map(|c| height(&epoch.tree, c))
                .max()
                .unwrap_or(0);
            (children, levels, None)
        };
        self.open_round(
            at,
            Round {
                phase,
                secret_hash,
                received: vec![None; children.len()],
                excused: vec![false; children.len()],
                hashes,
                children,
                aggregate: Share::default(),
                threshold,
                parent: None,
                done: false,
                accused: false,
            },
            levels,
            out,
        );
    }

    fn open_round(&mut self, at: Position, round: Round, levels: u32, out: &mut Out) {
        let leaf = round.children.is_empty();
        let children = round.children.clone();
        self.rounds.insert(at, round);
        self.early_shares = self.early_shares.split_off(&(at, ReplicaId(0)));
        for child in children {
            if let Some(aggregate) = self.early_shares.remove(&(at, child)) {
                self.on_share(
                    NodeId::Replica(child),
                    ShareUp {
                        epoch: at.0,
                        counter: at.1,
                        aggregate,
                    },
                    out,
                );
            }
        }
        if self.rounds.get(&at).is_none_or(|r| r.done) {
            return;
        }
        self.prune_rounds(out);
        if leaf {
            self.finish_round(at, out);
        } else {
            out.set_timer(
                Timer::Round(at.0, at.1),
                self.options.share_timeout * levels.max(1),
            );
        }
    }

    /// Bounds the rounds kept. Finished rounds go first, oldest first: an
    /// unfinished round is still waiting for a child, and dropping it would
    /// drop its timer, so a lost share would never be noticed. Unfinished
    /// rounds go only past [`MAX_OPEN_ROUNDS`], which a correct primary's
    /// pipeline (bounded by the preprocessing pool) never reaches.
    fn prune_rounds(&mut self, out: &mut Out) {
        while self.rounds.len() > KEPT_FINISHED_ROUNDS {
            let finished = self.rounds.iter().find(|(_, r)| r.done).map(|(at, _)| *at);
            let victim = match finished {
                Some(at) => at,
                None if self.rounds.len() > MAX_OPEN_ROUNDS => match self.rounds.keys().next() {
                    Some(at) => *at,
                    None => return,
                },
                None => return,
            };
            self.rounds.remove(&victim);
            out.cancel_timer(Timer::Round(victim.0, victim.1));
        }
    }

    pub(super) fn on_share(&mut self, from: NodeId, share: ShareUp, out: &mut Out) {
        let NodeId::Replica(child) = from else {
            return;
        };
        let at = (share.epoch, share.counter);
        let check = !self.options.is(Mutant::ParentSkipsAggregateCheck);
        let Some(round) = self.rounds.get_mut(&at) else {
            // Not opened here yet (this replica is behind): keep it for then.
            let ahead = at.1.saturating_sub(self.next_position().1);
            if at >= self.next_position()
                && ahead <= diffuse_tee::fastbft::MAX_PREPROCESSING as u64
                && self.early_shares.len() < MAX_EARLY_SHARES
            {
                self.early_shares.insert((at, child), share.aggregate);
            }
            return;
        };
        let Some(k) = round.children.iter().position(|c| *c == child) else {
            return;
        };
        if round.done || round.received[k].is_some() {
            return;
        }
        if check && aggregate_hash(&share.aggregate, at.1, at.0) != round.hashes[k] {
            out.fault(child, "wrong-aggregate");
            if round.threshold.is_some() {
                // The fallback: the other shares will do.
                return;
            }
            return self.suspect(at, child, out);
        }
        round.received[k] = Some(share.aggregate);
        if round.threshold.is_some()
            && let Some(state) = self.primary.as_mut()
        {
            state.responsive.insert(child);
        }
        if round.complete() {
            self.finish_round(at, out);
        }
    }

    fn finish_round(&mut self, at: Position, out: &mut Out) {
        let Some(round) = self.rounds.get_mut(&at) else {
            return;
        };
        round.done = true;
        let result = round.result();
        let (phase, parent) = (round.phase, round.parent);
        out.cancel_timer(Timer::Round(at.0, at.1));
        let Some(aggregate) = result else {
            return;
        };
        match parent {
            Some(parent) => out.send(
                parent,
                Message::Share(ShareUp {
                    epoch: at.0,
                    counter: at.1,
                    aggregate,
                }),
            ),
            None => self.secret_opened(at, phase, aggregate, out),
        }
    }

    pub(super) fn on_round_timeout(&mut self, at: Position, out: &mut Out) {
        let Some(round) = self.rounds.get(&at) else {
            return;
        };
        if round.done || round.accused {
            return;
        }
        if round.threshold.is_some() {
            // The fallback: fewer than f backups answered in time (shares lost):
            // a fresh fallback epoch prepares the batches again.
            return self.fallback_stalled(out);
        }
        let late = round
            .children
            .iter()
            .zip(round.received.iter().zip(&round.excused))
            .find(|(_, (got, excused))| got.is_none() && !**excused)
            .map(|(child, _)| *child);
        if let Some(child) = late {
            self.suspect(at, child, out);
        }
    }

    /// Reports `child` as failed in the round of `at`.
    fn suspect(&mut self, at: Position, child: ReplicaId, out: &mut Out) {
        let Some(round) = self.rounds.get_mut(&at) else {
            return;
        };
        if round.accused {
            return;
        }
        round.accused = true;
        match round.parent {
            None => self.suspected(child, self.id, out),
            Some(parent) => {
                let suspect = Suspect {
                    epoch: at.0,
                    counter: at.1,
                    accused: child,
                };
                out.send(self.primary_id(), Message::Suspect(suspect));
                if parent != self.primary_id() {
                    out.send(parent, Message::Suspect(suspect));
                }
            }
        }
    }

    pub(super) fn on_suspect(&mut self, from: NodeId, suspect: Suspect, out: &mut Out) {
        let NodeId::Replica(accuser) = from else {
            return;
        };
        if self.is_primary() {
            if self.primary.is_some() {
                self.on_suspect_at_primary(accuser, suspect, out);
            }
            return;
        }
        // A child reports its own child: stop waiting for the accuser.
        let at = (suspect.epoch, suspect.counter);
        if let Some(round) = self.rounds.get_mut(&at)
            && let Some(k) = round.children.iter().position(|c| *c == accuser)
        {
            round.excused[k] = true;
        }
    }

    fn on_suspect_at_primary(&mut self, accuser: ReplicaId, suspect: Suspect, out: &mut Out) {
        let Some(epoch) = &self.epoch else {
            return;
        };
        if suspect.epoch != epoch.number() || epoch.config.fallback {
            return;
        }
        let (Some(i), Some(j)) = (epoch.index_of(accuser), epoch.index_of(suspect.accused)) else {
            return;
        };
        if epoch.tree.parent(j) != Some(i) {
            return;
        }
        self.suspected(suspect.accused, accuser, out);
    }
}
