//! The client-side history of a simulated run: what each client asked and got.

use diffuse_apps::{KvOp, KvResult};
use diffuse_core::ids::ClientId;

/// One key-value operation as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The client that invoked it.
    pub client: ClientId,
    /// The operation.
    pub op: KvOp,
    /// Virtual time of the invocation, in nanoseconds.
    pub invoke_ns: u64,
    /// What came back.
    pub outcome: Outcome,
}

/// The outcome of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No result yet (possibly never): the operation may or may not have taken effect.
    Pending,
    /// The client accepted a result.
    Completed {
        /// Virtual time of the completion, in nanoseconds.
        at_ns: u64,
        /// The decoded result, or the raw bytes if they did not decode (which a
        /// correct system never delivers).
        result: Result<KvResult, Vec<u8>>,
    },
}

impl Operation {
    /// The completion time, if completed.
    pub fn completed_at(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Completed { at_ns, .. } => Some(at_ns),
            Outcome::Pending => None,
        }
    }
}
