//! A binary Merkle tree over BLAKE3 digests, so that one signed root covers a whole
//! batch and a client checks its own request and result with a short path.
//!
//! Leaves and inner nodes are hashed under different labels (no second-preimage
//! trick across levels); an odd node at the end of a level is promoted unchanged.
//! A path is checked against the leaf's index and the tree's size, so a path of
//! the wrong shape never verifies.

use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::Digest;

/// The longest path: trees have at most `2^MAX_DEPTH` leaves.
pub const MAX_DEPTH: usize = 16;

/// The siblings from a leaf up to the root (promoted levels skipped).
pub type Path = BoundedVec<Digest, MAX_DEPTH>;

fn node(left: &Digest, right: &Digest) -> Digest {
    let mut bytes = [0u8; 64];
    bytes[..32].copy_from_slice(&left.0);
    bytes[32..].copy_from_slice(&right.0);
    Digest::of("diffuse/fastbft/merkle/node", &bytes)
}

/// The level above `level`: pairs hashed, an odd last node promoted.
fn next_level(level: &[Digest]) -> Vec<Digest> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [left, right] => node(left, right),
            _ => pair[0],
        })
        .collect()
}

/// The root of `leaves` (a fixed digest for none).
pub fn root(leaves: &[Digest]) -> Digest {
    if leaves.is_empty() {
        return Digest::of("diffuse/fastbft/merkle/empty", &[]);
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = next_level(&level);
    }
    level[0]
}

/// The path of leaf `index` (empty if out of range). Builds the whole tree: for
/// the paths of many leaves of one tree, build a [`Tree`] once.
pub fn path(leaves: &[Digest], index: usize) -> Path {
    Tree::new(leaves).path(index)
}

/// Every level of a tree, built once, so that the primary answers each request of
/// a batch with its path in `O(log n)` (rebuilding the tree per reply made a
/// batch of `b` replies cost `O(b²)` hashes).
#[derive(Debug, Clone)]
pub struct Tree {
    /// The leaves first, the root's level last.
    levels: Vec<Vec<Digest>>,
}

impl Tree {
    /// The tree over `leaves`.
    pub fn new(leaves: &[Digest]) -> Tree {
        let mut levels = vec![leaves.to_vec()];
        while let Some(level) = levels.last().filter(|l| l.len() > 1) {
            let next = next_level(level);
            levels.push(next);
        }
        Tree { levels }
    }

    /// The root (as [`root`] computes it).
    pub fn root(&self) -> Digest {
        match self.levels.last().and_then(|level| level.first()) {
            Some(root) => *root,
            None => root(&[]),
        }
    }

    /// The path of leaf `index` (as [`path`] computes it; empty if out of range).
    pub fn path(&self, index: usize) -> Path {
        let leaves = self.levels.first().map_or(0, Vec::len);
        if index >= leaves {
            return Path::new();
        }
        let mut siblings = Vec::new();
        let mut at = index;
        for level in &self.levels[..self.levels.len() - 1] {
            if let Some(sibling) = level.get(at ^ 1) {
                siblings.push(*sibling);
            }
            at /= 2;
        }
        Path::truncating(siblings)
    }
}

/// Whether `leaf` is leaf `index` of a tree of `len` leaves with root `root`.
pub fn verify(root_digest: &Digest, leaf: &Digest, index: usize, len: usize, path: &Path) -> bool {
    if index >= len || len > 1 << MAX_DEPTH {
        return false;
    }
    let mut hash = *leaf;
    let (mut at, mut width) = (index, len);
    let mut siblings = path.iter();
    while width > 1 {
        let sibling = at ^ 1;
        if sibling < width {
            let Some(other) = siblings.next() else {
                return false;
            };
            hash = if at % 2 == 0 {
                node(&hash, other)
            } else {
                node(other, &hash)
            };
        }
        at /= 2;
        width = width.div_ceil(2);
    }
    siblings.next().is_none() && hash == *root_digest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| Digest::of("leaf", &(i as u64).to_be_bytes()))
            .collect()
    }

    #[test]
    fn every_leaf_of_every_size_verifies_and_nothing_else_does() {
        for n in 1..40 {
            let leaves = leaves(n);
            let root = root(&leaves);
            for i in 0..n {
                let p = path(&leaves, i);
                assert!(verify(&root, &leaves[i], i, n, &p), "n {n} i {i}");
                if n > 1 {
                    assert!(!verify(&root, &leaves[(i + 1) % n], i, n, &p));
                    assert!(!verify(&root, &leaves[i], (i + 1) % n, n, &p));
                }
            }
            assert!(!verify(&root, &leaves[0], n, n, &Path::new()));
        }
    }

    #[test]
    fn a_built_tree_gives_the_same_root_and_paths() {
        for n in 0..40 {
            let leaves = leaves(n);
            let tree = Tree::new(&leaves);
            assert_eq!(tree.root(), root(&leaves), "n {n}");
            for i in 0..=n {
                let mut level = leaves.clone();
                let mut at = i;
                let mut expected = Vec::new();
                while i < n && level.len() > 1 {
                    if let Some(sibling) = level.get(at ^ 1) {
                        expected.push(*sibling);
                    }
                    level = next_level(&level);
                    at /= 2;
                }
                assert_eq!(tree.path(i).to_vec(), expected, "n {n} i {i}");
            }
        }
    }

    #[test]
    fn a_single_leaf_is_its_own_root() {
        let leaves = leaves(1);
        assert_eq!(root(&leaves), leaves[0]);
        assert!(verify(&leaves[0], &leaves[0], 0, 1, &Path::new()));
    }
}
