//! The deterministic simulator: the project's strongest test tool.
//!
//! Many replicas and clients of any [`ProtocolSuite`](diffuse_core::suite::ProtocolSuite)
//! run in one process, in virtual time, driven by one seeded random stream: the same
//! seed replays the same run, event for event. The network is hostile until a global
//! stabilisation time (loss, duplication, reordering, delay spikes, partitions that
//! heal), replicas crash and restart with only what they persisted, and up to `f`
//! replicas are Byzantine with named behaviours (the protocol's own, plus the generic
//! ones in [`behaviours`]). Every run is judged by the [`checkers`].
//!
//! ```
//! use diffuse_sim::{FaultMix, RunConfig, run_one};
//! let config = RunConfig { n: 4, seed: 7, mix: FaultMix::Network, mutant: None, trace: false };
//! let report = run_one::<diffuse_pbft::Pbft>(&config).unwrap();
//! assert!(report.violations.is_empty(), "{:?}", report.violations);
//! assert!(report.metrics.completed_ops > 0);
//! ```

pub mod behaviours;
pub mod checkers;
pub mod history;
pub mod metrics;
pub mod rng;
pub mod scenario;
pub mod sweep;
pub mod workload;
pub mod world;

pub use checkers::{Checker, Violation};
pub use scenario::{FaultMix, Tolerance};
pub use sweep::{SweepConfig, SweepReport, run_one, sweep};
pub use world::{RunConfig, RunReport, SetupError, behaviour_names, liveness_bound_ns};
