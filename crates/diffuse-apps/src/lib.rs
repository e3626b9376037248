//! Applications replicated by Diffuse.
//!
//! [`KvStore`] is the first: a key-value store with put, get, compare-and-swap and
//! delete. Its operations and results have a typed encoding ([`KvOp`], [`KvResult`])
//! so that clients, the simulator's linearizability checker and the benchmark share it.

pub mod kv;

pub use kv::{KvOp, KvResult, KvStore};
