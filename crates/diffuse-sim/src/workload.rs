//! The key-value workload each simulated client runs.

use crate::rng::SimRng;
use diffuse_apps::{KvOp, KvResult};
use diffuse_core::ids::ClientId;
use diffuse_core::suite::Entropy;
use std::collections::BTreeMap;

/// A closed-loop client workload: one operation at a time, over a few hot keys, with
/// values unique per write so that every read tells which write it saw.
pub struct Workload {
    client: ClientId,
    remaining: usize,
    keys: usize,
    written: u64,
    /// The last value this client saw per key, used as the expected value of CAS.
    seen: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Workload {
    /// A workload of `ops` operations over `keys` keys.
    pub fn new(client: ClientId, ops: usize, keys: usize) -> Self {
        Self {
            client,
            remaining: ops,
            keys: keys.max(1),
            written: 0,
            seen: BTreeMap::new(),
        }
    }

    /// Operations still to invoke.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// The next operation.
    pub fn next_op(&mut self, rng: &mut SimRng) -> KvOp {
        self.remaining = self.remaining.saturating_sub(1);
        let key = format!("k{}", rng.below(self.keys as u64)).into_bytes();
        let roll = rng.below(100);
        if roll < 30 {
            KvOp::put(&key, &self.fresh_value())
        } else if roll < 60 {
            KvOp::get(&key)
        } else if roll < 85 {
            let expected = self.seen.get(&key).cloned().flatten();
            KvOp::cas(&key, expected.as_deref(), &self.fresh_value())
        } else {
            KvOp::delete(&key)
        }
    }

    /// Learns from a result (for the next CAS's expected value).
    pub fn observe(&mut self, op: &KvOp, result: &KvResult) {
        let key = op.key().to_vec();
        match (op, result) {
            (KvOp::Put { value, .. }, KvResult::Done) => {
                self.seen.insert(key, Some(value.to_vec()));
            }
            (KvOp::Get { .. }, KvResult::Value(v)) => {
                self.seen.insert(key, v.as_ref().map(|v| v.to_vec()));
            }
            (KvOp::Cas { new, .. }, KvResult::Swapped { swapped, previous }) => {
                let now = if *swapped {
                    Some(new.to_vec())
                } else {
                    previous.as_ref().map(|v| v.to_vec())
                };
                self.seen.insert(key, now);
            }
            (KvOp::Delete { .. }, KvResult::Deleted { .. }) => {
                self.seen.insert(key, None);
            }
            _ => {}
        }
    }

    fn fresh_value(&mut self) -> Vec<u8> {
        self.written += 1;
        format!("{}-{}", self.client, self.written).into_bytes()
    }
}
