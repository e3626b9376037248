//! A replicated key-value store.

use diffuse_core::app::{AppError, Application};
use diffuse_core::codec::{self, Blob, BoundedVec, DecodeError};
use diffuse_core::crypto::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// The longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The most entries a snapshot may hold.
pub const MAX_ENTRIES: usize = 1 << 24;
/// Default capacity of the store (keys plus values), in bytes.
pub const DEFAULT_CAPACITY_BYTES: usize = 256 * 1024 * 1024;

/// A key.
pub type Key = Blob<MAX_KEY_BYTES>;
/// A value.
pub type Value = Blob<MAX_VALUE_BYTES>;

/// An operation on the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum KvOp {
    /// Store `value` under `key`. Result: [`KvResult::Done`].
    Put {
        /// The key.
        key: Key,
        /// The value.
        value: Value,
    },
    /// Read `key`. Result: [`KvResult::Value`].
    Get {
        /// The key.
        key: Key,
    },
    /// Store `new` under `key` if its current value is `expected` (`None`: absent).
    /// Result: [`KvResult::Swapped`].
    Cas {
        /// The key.
        key: Key,
        /// The value the key must hold (or `None` for "absent").
        expected: Option<Value>,
        /// The value to store.
        new: Value,
    },
    /// Remove `key`. Result: [`KvResult::Deleted`].
    Delete {
        /// The key.
        key: Key,
    },
}

/// The result of a [`KvOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum KvResult {
    /// A put was stored.
    Done,
    /// The value read (`None`: absent).
    Value(Option<Value>),
    /// Whether a compare-and-swap stored its value, and the value it found.
    Swapped {
        /// True if `new` was stored.
        swapped: bool,
        /// The value before the operation.
        previous: Option<Value>,
    },
    /// Whether a delete found the key.
    Deleted {
        /// True if the key was present.
        existed: bool,
    },
    /// The operation was rejected (malformed, or the store is full).
    Error(Blob<256>),
}

impl KvOp {
    /// The key the operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            KvOp::Put { key, .. }
            | KvOp::Get { key }
            | KvOp::Cas { key, .. }
            | KvOp::Delete { key } => key,
        }
    }

    /// Encodes the operation for a request.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_payload(self)
    }

    /// Decodes an operation from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<KvOp, DecodeError> {
        codec::decode_payload(bytes)
    }

    /// A put, with keys and values truncated to their limits.
    pub fn put(key: &[u8], value: &[u8]) -> KvOp {
        KvOp::Put {
            key: blob(key),
            value: blob(value),
        }
    }

    /// Whether the operation only reads (a GET): a client may send it on a
    /// protocol's read-only path.
    pub fn is_read_only(&self) -> bool {
        matches!(self, KvOp::Get { .. })
    }

    /// A get.
    pub fn get(key: &[u8]) -> KvOp {
        KvOp::Get { key: blob(key) }
    }

    /// A compare-and-swap.
    pub fn cas(key: &[u8], expected: Option<&[u8]>, new: &[u8]) -> KvOp {
        KvOp::Cas {
            key: blob(key),
            expected: expected.map(blob),
            new: blob(new),
        }
    }

    /// A delete.
    pub fn delete(key: &[u8]) -> KvOp {
        KvOp::Delete { key: blob(key) }
    }
}

impl KvResult {
    /// Encodes the result for a reply.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_payload(self)
    }

    /// Decodes a result from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<KvResult, DecodeError> {
        codec::decode_payload(bytes)
    }

    fn error(message: &str) -> KvResult {
        KvResult::Error(blob(message.as_bytes()))
    }
}

fn blob<const MAX: usize>(bytes: &[u8]) -> Blob<MAX> {
    Blob::try_from_vec(bytes[..bytes.len().min(MAX)].to_vec()).unwrap_or_default()
}

/// The store: an ordered map with a byte capacity.
#[derive(Debug, Clone)]
pub struct KvStore {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    used_bytes: usize,
    capacity_bytes: usize,
}

impl Default for KvStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY_BYTES)
    }
}

impl KvStore {
    /// An empty store that holds at most `capacity_bytes` of keys and values.
    pub fn with_capacity(capacity_bytes: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            used_bytes: 0,
            capacity_bytes,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reads a key directly (for tests and the demo's final check).
    pub fn read(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Applies an operation.
    pub fn apply(&mut self, op: KvOp) -> KvResult {
        match op {
            KvOp::Put { key, value } => match self.store(key.into_inner(), value.into_inner()) {
                Ok(()) => KvResult::Done,
                Err(e) => e,
            },
            KvOp::Get { key } => KvResult::Value(self.entries.get(&*key).map(|v| blob(v))),
            KvOp::Cas { key, expected, new } => {
                let previous = self.entries.get(&*key).cloned();
                let matches = previous.as_deref() == expected.as_deref();
                if matches {
                    if let Err(e) = self.store(key.into_inner(), new.into_inner()) {
                        return e;
                    }
                }
                KvResult::Swapped {
                    swapped: matches,
                    previous: previous.map(|v| blob(&v)),
                }
            }
            KvOp::Delete { key } => {
                let removed = self.entries.remove(&*key);
                if let Some(v) = &removed {
                    self.used_bytes -= key.len() + v.len();
                }
                KvResult::Deleted {
                    existed: removed.is_some(),
                }
            }
        }
    }

    fn store(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), KvResult> {
        let old = self.entries.get(&key).map_or(0, |v| key.len() + v.len());
        let used = self.used_bytes - old + key.len() + value.len();
        if used > self.capacity_bytes || (old == 0 && self.entries.len() >= MAX_ENTRIES) {
            return Err(KvResult::error("store is full"));
        }
        self.used_bytes = used;
        self.entries.insert(key, value);
        Ok(())
    }
}

/// Snapshot encoding: entries in key order.
type SnapshotEntries = BoundedVec<(Key, Value), MAX_ENTRIES>;

impl Application for KvStore {
    fn execute(&mut self, operation: &[u8]) -> Vec<u8> {
        let result = match KvOp::decode(operation) {
            Ok(op) => self.apply(op),
            Err(e) => KvResult::error(&format!("malformed operation: {e}")),
        };
        result.encode()
    }

    fn query(&self, operation: &[u8]) -> Option<Vec<u8>> {
        match KvOp::decode(operation) {
            Ok(KvOp::Get { key }) => {
                Some(KvResult::Value(self.entries.get(&*key).map(|v| blob(v))).encode())
            }
            _ => None,
        }
    }

    fn digest(&self) -> Digest {
        Digest::of("diffuse/kv", &self.snapshot())
    }

    fn snapshot(&self) -> Vec<u8> {
        let entries: Vec<(Key, Value)> = self
            .entries
            .iter()
            .map(|(k, v)| (blob(k), blob(v)))
            .collect();
        codec::encode_payload(&SnapshotEntries::truncating(entries))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError> {
        let entries: SnapshotEntries =
            codec::decode_payload(snapshot).map_err(|e| AppError(e.to_string()))?;
        let mut restored = KvStore::with_capacity(self.capacity_bytes);
        let mut previous: Option<&[u8]> = None;
        for (key, value) in entries.iter() {
            if previous.is_some_and(|p| p >= &key[..]) {
                return Err(AppError("snapshot keys are not strictly ascending".into()));
            }
            previous = Some(key);
            restored
                .store(key.to_vec(), value.to_vec())
                .map_err(|_| AppError("snapshot exceeds the store's capacity".into()))?;
        }
        *self = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(store: &mut KvStore, op: KvOp) -> KvResult {
        KvResult::decode(&store.execute(&op.encode())).unwrap()
    }

    #[test]
    fn put_get_cas_delete() {
        let mut s = KvStore::default();
        assert_eq!(run(&mut s, KvOp::get(b"k")), KvResult::Value(None));
        assert_eq!(run(&mut s, KvOp::put(b"k", b"1")), KvResult::Done);
        assert_eq!(
            run(&mut s, KvOp::get(b"k")),
            KvResult::Value(Some(blob(b"1")))
        );
        assert_eq!(
            run(&mut s, KvOp::cas(b"k", Some(b"0"), b"2")),
            KvResult::Swapped {
                swapped: false,
                previous: Some(blob(b"1"))
            }
        );
        assert_eq!(
            run(&mut s, KvOp::cas(b"k", Some(b"1"), b"2")),
            KvResult::Swapped {
                swapped: true,
                previous: Some(blob(b"1"))
            }
        );
        assert_eq!(
            run(&mut s, KvOp::delete(b"k")),
            KvResult::Deleted { existed: true }
        );
        assert_eq!(
            run(&mut s, KvOp::delete(b"k")),
            KvResult::Deleted { existed: false }
        );
        assert_eq!(
            run(&mut s, KvOp::cas(b"k", None, b"3")),
            KvResult::Swapped {
                swapped: true,
                previous: None
            }
        );
    }

    #[test]
    fn garbage_operation_is_an_error_result() {
        let mut s = KvStore::default();
        let result = KvResult::decode(&s.execute(&[0xff, 0x01])).unwrap();
        assert!(matches!(result, KvResult::Error(_)));
        assert!(s.is_empty());
    }

    #[test]
    fn capacity_is_enforced() {
        let mut s = KvStore::with_capacity(10);
        assert_eq!(run(&mut s, KvOp::put(b"abc", b"defg")), KvResult::Done);
        assert!(matches!(
            run(&mut s, KvOp::put(b"xyz", b"1234")),
            KvResult::Error(_)
        ));
        assert_eq!(run(&mut s, KvOp::put(b"abc", b"1234567")), KvResult::Done);
        assert_eq!(
            run(&mut s, KvOp::delete(b"abc")),
            KvResult::Deleted { existed: true }
        );
        assert_eq!(run(&mut s, KvOp::put(b"xyz", b"1234")), KvResult::Done);
    }

    #[test]
    fn snapshot_round_trip_and_bad_snapshots() {
        let mut s = KvStore::default();
        for i in 0..20u8 {
            run(&mut s, KvOp::put(&[i], &[i, i]));
        }
        let mut t = KvStore::default();
        t.restore(&s.snapshot()).unwrap();
        assert_eq!(t.digest(), s.digest());
        let unsorted = codec::encode_payload(&SnapshotEntries::truncating(vec![
            (blob(b"b"), blob(b"1")),
            (blob(b"a"), blob(b"1")),
        ]));
        assert!(t.restore(&unsorted).is_err());
        assert_eq!(t.digest(), s.digest(), "a failed restore changes nothing");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut s = KvStore::default();
            let _ = s.execute(&bytes);
            let _ = s.restore(&bytes);
            let _ = KvResult::decode(&bytes);
        }
    }
}
