//! Quorum systems: the one place where every threshold in Diffuse comes from.
//!
//! Protocols never write `2 * f + 1`. They ask a [`QuorumSystem`] whether a set of
//! distinct, authenticated senders is a quorum (any two quorums intersect in at least
//! one correct replica) or merely contains a correct replica. Threshold systems answer
//! by counting; adversary structures (Q³ and hybrid models from the SINTRA documents)
//! can later answer by set membership without touching the protocols.

use crate::ids::{MAX_REPLICAS, ReplicaId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A set of replicas, as a fixed-size bitset over `0..MAX_REPLICAS`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ReplicaSet {
    words: [u64; MAX_REPLICAS / 64],
}

impl ReplicaSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns whether it was new. Ids beyond [`MAX_REPLICAS`] are ignored.
    pub fn insert(&mut self, id: ReplicaId) -> bool {
        let i = id.index();
        if i >= MAX_REPLICAS {
            return false;
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        fresh
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: ReplicaId) -> bool {
        let i = id.index();
        i < MAX_REPLICAS && self.words[i / 64] & (1u64 << (i % 64)) != 0
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        (0..MAX_REPLICAS)
            .filter(|i| self.words[i / 64] & (1u64 << (i % 64)) != 0)
            .map(|i| ReplicaId(i as u16))
    }
}

impl FromIterator<ReplicaId> for ReplicaSet {
    fn from_iter<I: IntoIterator<Item = ReplicaId>>(iter: I) -> Self {
        let mut set = ReplicaSet::new();
        for id in iter {
            set.insert(id);
        }
        set
    }
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Why a quorum system cannot be built for a cluster size.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuorumError {
    /// The cluster is empty or larger than [`MAX_REPLICAS`].
    #[error("cluster size {n} is outside 1..={MAX_REPLICAS}")]
    BadSize {
        /// The requested size.
        n: usize,
    },
    /// `n` replicas cannot tolerate `f` faults under this failure model.
    #[error("{n} replicas cannot tolerate {f} faults: {model} needs n >= {needed}")]
    TooFewReplicas {
        /// Cluster size.
        n: usize,
        /// Requested fault threshold.
        f: usize,
        /// The failure model's name.
        model: &'static str,
        /// The smallest `n` that would work.
        needed: usize,
    },
}

/// The failure model behind a quorum system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureModel {
    /// Up to `f` Byzantine replicas, `n >= 3f + 1` (PBFT, the asynchronous stack).
    Byzantine,
    /// Up to `f` Byzantine replicas whose trusted component can only crash,
    /// `n >= 2f + 1` (MinBFT, FastBFT).
    TrustedComponent,
}

/// Threshold quorums for `n` replicas of which at most `f` are faulty.
///
/// For [`FailureModel::Byzantine`] a quorum has `ceil((n + f + 1) / 2)` members,
/// which is `2f + 1` when `n = 3f + 1`: two quorums then share `f + 1` replicas, at
/// least one of them correct. For [`FailureModel::TrustedComponent`] a quorum has
/// `f + 1` members out of `n = 2f + 1`: two quorums share one replica, whose trusted
/// counter prevents it from equivocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumSystem {
    n: usize,
    f: usize,
    model: FailureModel,
}

impl QuorumSystem {
    /// The Byzantine quorum system with the largest `f` that `n` tolerates.
    pub fn byzantine(n: usize) -> Result<Self, QuorumError> {
        Self::check_size(n)?;
        Self::byzantine_with(n, (n - 1) / 3)
    }

    /// The Byzantine quorum system for an explicit `f`.
    pub fn byzantine_with(n: usize, f: usize) -> Result<Self, QuorumError> {
        Self::check_size(n)?;
        let needed = 3 * f + 1;
        if n < needed {
            return Err(QuorumError::TooFewReplicas {
                n,
                f,
                model: "Byzantine",
                needed,
            });
        }
        Ok(Self {
            n,
            f,
            model: FailureModel::Byzantine,
        })
    }

    /// The trusted-component quorum system with the largest `f` that `n` tolerates.
    pub fn trusted(n: usize) -> Result<Self, QuorumError> {
        Self::check_size(n)?;
        let f = (n - 1) / 2;
        Ok(Self {
            n,
            f,
            model: FailureModel::TrustedComponent,
        })
    }

    fn check_size(n: usize) -> Result<(), QuorumError> {
        if n == 0 || n > MAX_REPLICAS {
            return Err(QuorumError::BadSize { n });
        }
        Ok(())
    }

    /// Number of replicas.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of faulty replicas tolerated.
    pub fn f(&self) -> usize {
        self.f
    }

    /// The failure model.
    pub fn model(&self) -> FailureModel {
        self.model
    }

    /// Size of the smallest quorum.
    pub fn quorum_size(&self) -> usize {
        match self.model {
            FailureModel::Byzantine => (self.n + self.f + 1).div_ceil(2),
            FailureModel::TrustedComponent => self.f + 1,
        }
    }

    /// Whether `set` is a quorum: any two quorums intersect in a correct replica
    /// (or, with trusted components, in a replica that cannot equivocate).
    pub fn is_quorum(&self, set: &ReplicaSet) -> bool {
        self.members(set) >= self.quorum_size()
    }

    /// Whether `set` surely contains a correct replica (`f + 1` members): enough
    /// matching replies for a client, or to join a view change.
    pub fn contains_correct(&self, set: &ReplicaSet) -> bool {
        self.members(set) > self.f
    }

    /// Whether `id` names a replica of this cluster.
    pub fn is_member(&self, id: ReplicaId) -> bool {
        id.index() < self.n
    }

    /// All replica ids of the cluster.
    pub fn replicas(&self) -> impl Iterator<Item = ReplicaId> + use<> {
        (0..self.n).map(|i| ReplicaId(i as u16))
    }

    fn members(&self, set: &ReplicaSet) -> usize {
        set.iter().filter(|id| self.is_member(*id)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u16]) -> ReplicaSet {
        ids.iter().map(|i| ReplicaId(*i)).collect()
    }

    #[test]
    fn byzantine_thresholds_follow_3f_plus_1() {
        // Golden values: (n, f, quorum).
        for (n, f, q) in [
            (1, 0, 1),
            (4, 1, 3),
            (5, 1, 4),
            (7, 2, 5),
            (10, 3, 7),
            (13, 4, 9),
            (31, 10, 21),
        ] {
            let qs = QuorumSystem::byzantine(n).unwrap();
            assert_eq!((qs.f(), qs.quorum_size()), (f, q), "n = {n}");
        }
    }

    #[test]
    fn any_two_byzantine_quorums_share_a_correct_replica() {
        for n in 1..=40 {
            let qs = QuorumSystem::byzantine(n).unwrap();
            let q = qs.quorum_size();
            assert!(2 * q - n > qs.f(), "n = {n}");
            assert!(
                q <= n - qs.f(),
                "quorum must be reachable without the faulty: n = {n}"
            );
        }
    }

    #[test]
    fn trusted_thresholds_follow_2f_plus_1() {
        let qs = QuorumSystem::trusted(5).unwrap();
        assert_eq!((qs.f(), qs.quorum_size()), (2, 3));
    }

    #[test]
    fn only_members_count() {
        let qs = QuorumSystem::byzantine(4).unwrap();
        assert!(!qs.is_quorum(&set(&[0, 1, 9])));
        assert!(qs.is_quorum(&set(&[0, 1, 3])));
        assert!(qs.contains_correct(&set(&[2, 3])));
        assert!(!qs.contains_correct(&set(&[3])));
    }

    #[test]
    fn rejects_impossible_clusters() {
        assert_eq!(
            QuorumSystem::byzantine(0),
            Err(QuorumError::BadSize { n: 0 })
        );
        assert!(QuorumSystem::byzantine_with(6, 2).is_err());
        assert!(QuorumSystem::byzantine(MAX_REPLICAS + 1).is_err());
    }

    #[test]
    fn replica_set_counts_distinct_members() {
        let mut s = ReplicaSet::new();
        assert!(s.insert(ReplicaId(3)));
        assert!(!s.insert(ReplicaId(3)));
        assert!(s.insert(ReplicaId(200)));
        assert!(!s.insert(ReplicaId(300)));
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![ReplicaId(3), ReplicaId(200)]
        );
    }
}
