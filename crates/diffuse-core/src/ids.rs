//! Identities and the two counters every ordering protocol uses.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The most replicas a cluster may have. Bounds every per-replica collection on the
/// wire and the size of [`crate::ReplicaSet`].
pub const MAX_REPLICAS: usize = 256;

/// A replica's index in the cluster configuration, `0..n`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ReplicaId(pub u16);

impl ReplicaId {
    /// The index as a `usize`, for slices indexed by replica.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// A client's identity, as registered in the cluster configuration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ClientId(pub u32);

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Any endpoint of an authenticated channel: a replica or a client.
///
/// The transport (the simulator's network, or the runtime's Noise channels)
/// authenticates the peer, so a `from: NodeId` handed to a protocol is true.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum NodeId {
    /// A replica.
    Replica(ReplicaId),
    /// A client.
    Client(ClientId),
}

impl NodeId {
    /// The replica id, if this node is a replica.
    pub fn replica(self) -> Option<ReplicaId> {
        match self {
            NodeId::Replica(id) => Some(id),
            NodeId::Client(_) => None,
        }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeId::Replica(id) => write!(f, "{id:?}"),
            NodeId::Client(id) => write!(f, "{id:?}"),
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<ReplicaId> for NodeId {
    fn from(id: ReplicaId) -> Self {
        NodeId::Replica(id)
    }
}

impl From<ClientId> for NodeId {
    fn from(id: ClientId) -> Self {
        NodeId::Client(id)
    }
}

/// A view number: the epoch in which one primary leads.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct View(pub u64);

impl View {
    /// The view after this one.
    pub fn next(self) -> View {
        View(self.0.saturating_add(1))
    }

    /// The primary of this view in a cluster of `n` replicas: `v mod n`.
    pub fn primary(self, n: usize) -> ReplicaId {
        debug_assert!(n > 0 && n <= MAX_REPLICAS);
        // n <= MAX_REPLICAS, so the remainder fits in a u16.
        ReplicaId((self.0 % n as u64) as u16)
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A sequence number in the total order of batches.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Seq(pub u64);

impl Seq {
    /// The next sequence number.
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }

    /// This sequence number plus `delta`, saturating.
    pub fn plus(self, delta: u64) -> Seq {
        Seq(self.0.saturating_add(delta))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_rotates_round_robin() {
        assert_eq!(View(0).primary(4), ReplicaId(0));
        assert_eq!(View(5).primary(4), ReplicaId(1));
        assert_eq!(View(u64::MAX).primary(4), ReplicaId(3));
    }

    #[test]
    fn counters_saturate_instead_of_overflowing() {
        assert_eq!(Seq(u64::MAX).next(), Seq(u64::MAX));
        assert_eq!(View(u64::MAX).next(), View(u64::MAX));
    }
}
