//! The replicated application: what a cluster of replicas agrees to run.

use crate::crypto::Digest;

/// A deterministic service replicated by an ordering protocol.
///
/// Every correct replica calls [`Application::execute`] with the same operations in
/// the same order, so the implementation must be deterministic: no clocks, no
/// randomness, no iteration over hash maps with random seeds. Operation bytes come
/// from clients and may be garbage: `execute` answers them with an error result, it
/// never panics.
pub trait Application: Send {
    /// Executes one operation and returns its result.
    fn execute(&mut self, operation: &[u8]) -> Vec<u8>;

    /// A collision-resistant digest of the whole state.
    fn digest(&self) -> Digest;

    /// A canonical encoding of the whole state: equal states give equal bytes.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the state with a snapshot. The bytes may come from a peer: an
    /// invalid snapshot is an error and leaves the state unchanged.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError>;

    /// The result of `operation` if it only reads the state (and is well formed),
    /// without changing anything; `None` if it may write. A protocol with a
    /// read-only path (PBFT's, §5.1.3 of Castro and Liskov) answers such an
    /// operation from its current state without ordering it. Must give what
    /// `execute` would give for the same operation on the same state. The default
    /// marks every operation as a possible write.
    fn query(&self, operation: &[u8]) -> Option<Vec<u8>> {
        let _ = operation;
        None
    }
}

/// A snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid application snapshot: {0}")]
pub struct AppError(pub String);
