//! Core of Diffuse: the pieces every protocol, the simulator and the runtime share.
//!
//! - [`ids`]: replica and client identities, views and sequence numbers.
//! - [`quorum`]: [`QuorumSystem`], the one place every threshold comes from.
//! - [`codec`]: the versioned wire envelope with hard size limits and typed errors.
//! - [`crypto`]: digests (BLAKE3) and Ed25519 signatures behind small wrappers.
//! - [`protocol`]: the sans-IO interface: [`Input`]s in, [`Action`]s out.
//! - [`app`] and [`service`]: the replicated application and the exactly-once layer
//!   (per-client last reply) that every ordering protocol puts in front of it.
//! - [`config`]: cluster membership and key files.
//! - [`suite`]: how a protocol presents itself to the simulator and the runtime,
//!   including its named Byzantine behaviours and mutants.
//!
//! Nothing in this crate reads a clock, touches the network or the file system, or
//! draws OS randomness: time and randomness come in from the driver, so one seed
//! replays one simulated run exactly.

pub mod app;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod ids;
pub mod protocol;
pub mod quorum;
pub mod service;
pub mod suite;

pub use app::{AppError, Application};
pub use codec::{Blob, BoundedVec, DecodeError, WireMessage};
pub use crypto::{Digest, PublicKey, SecretKey, Signature, Signed};
pub use ids::{ClientId, NodeId, ReplicaId, Seq, View};
pub use protocol::{Action, Actions, Input, Observation, Recovered, WriteOp};
pub use quorum::{QuorumError, QuorumSystem, ReplicaSet};
