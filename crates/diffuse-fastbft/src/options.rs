//! FastBFT's options: PBFT's batching and client knobs, the share tree, the
//! preprocessing pool, failure detection, the machine the enclave comes from, and
//! the mutants.

use diffuse_core::suite::Named;
use diffuse_minbft::TeeHost;
use diffuse_pbft::PbftOptions;
use std::time::Duration;

/// A deliberately broken FastBFT that the simulator's checkers must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// Parents (the primary included) XOR their children's aggregates without
    /// checking them against the enclave's hashes: one wrong share spoils the
    /// secret, and the correct replicas then blame the correct primary.
    ParentSkipsAggregateCheck,
    /// Replicas apply a REPLY (UPDATE) without checking its certificates and
    /// opened secrets: a faulty replica's forged UPDATE makes them execute a batch
    /// that was never ordered.
    ReplicaTrustsUpdates,
    /// Clients accept a REPLY without checking its certificates, paths and secrets:
    /// a faulty replica's forged REPLY completes an operation with a made-up result.
    ClientTrustsReplies,
    /// The view change's decision loses its last batch (every replica computes it
    /// alike, so the NEW-VIEW checks pass): a batch committed in the old view is
    /// ordered again with other requests, or not at all.
    DecideDropsAnEntry,
    /// Enclaves accept a stale sealed state: the `rollback` behaviour then has a
    /// second copy of the primary's enclave certify a conflicting PREPARE (and its
    /// COMMIT) at a position the live enclave used, and the shares of the
    /// position's secret, bound to the position only, open it for either.
    EnclaveWithoutRollbackProtection,
    /// The primary's enclave certifies a batch of registered clients' requests
    /// without verifying their signatures: the `forge-requests` behaviour then gets
    /// a request no client sent ordered, and the replicas, which check no
    /// signature themselves, execute it.
    EnclaveSkipsRequestSignatures,
}

impl Mutant {
    /// Every mutant with its name.
    pub const ALL: [(Mutant, Named); 6] = [
        (
            Mutant::ParentSkipsAggregateCheck,
            Named {
                name: "parent-skips-aggregate-check",
                description: "parents XOR children's aggregates unchecked (run with --faults wrong-share)",
            },
        ),
        (
            Mutant::ReplicaTrustsUpdates,
            Named {
                name: "replica-trusts-updates",
                description: "replicas apply UPDATEs unchecked (run with --faults forge-update)",
            },
        ),
        (
            Mutant::ClientTrustsReplies,
            Named {
                name: "client-trusts-replies",
                description: "clients accept REPLYs unchecked (run with --faults forge-update)",
            },
        ),
        (
            Mutant::DecideDropsAnEntry,
            Named {
                name: "decide-drops-an-entry",
                description: "the view change's decision loses its last batch (run with --faults restart)",
            },
        ),
        (
            Mutant::EnclaveWithoutRollbackProtection,
            Named {
                name: "enclave-without-rollback-protection",
                description: "enclaves accept a stale sealed state (run with --faults rollback)",
            },
        ),
        (
            Mutant::EnclaveSkipsRequestSignatures,
            Named {
                name: "enclave-skips-request-signatures",
                description: "the primary's enclave certifies batches without verifying their requests' signatures (run with --faults forge-requests)",
            },
        ),
    ];

    /// The mutant called `name`.
    pub fn from_name(name: &str) -> Option<Mutant> {
        Self::ALL
            .iter()
            .find(|(_, named)| named.name == name)
            .map(|(m, _)| *m)
    }
}

/// FastBFT's options.
#[derive(Debug, Clone)]
pub struct FastBftOptions {
    /// Batching (`batch_max_requests`, `batch_delay`), the stall check
    /// (`status_interval`), and the client's retransmission: as PBFT.
    pub base: PbftOptions,
    /// Children per node of the share tree.
    pub fan_out: usize,
    /// Counter values the primary keeps preprocessed ahead of the next one.
    pub preprocess_ahead: usize,
    /// How long, at most, a partial batch waits for more requests while earlier
    /// batches are still in their reply round. `None`: one
    /// `batch_delay` per active replica, because a batch costs `O(f)` messages
    /// whatever its size (`docs/protocols/fastbft.md`, "Normal case").
    pub batch_linger: Option<Duration>,
    /// How long a parent waits for a child's aggregate, per level below the parent.
    pub share_timeout: Duration,
    /// Detected failures (tree rebuilds) after which the primary switches to the
    /// fallback protocol (§4.5).
    pub failure_threshold: u64,
    /// How long the fallback lasts before the primary goes back to a tree of the
    /// backups that answered in it.
    pub fallback_duration: Duration,
    /// Stay in the fallback for good: every view starts in it and never goes back
    /// to a tree. For clusters where tree failures are the rule (and to measure
    /// the fallback: `diffuse bench --protocol fastbft --set fallback_only=true`).
    pub fallback_only: bool,
    /// Where the enclaves come from.
    pub tee: TeeHost,
    /// A deliberate bug, for checker tests.
    pub mutant: Option<Mutant>,
}

impl FastBftOptions {
    /// Whether the mutant `m` is active.
    pub fn is(&self, m: Mutant) -> bool {
        self.mutant == Some(m)
    }

    /// Checks the FastBFT-specific knobs.
    pub fn validate(&self) -> Result<(), String> {
        if self.fan_out == 0 || self.fan_out > diffuse_tee::fastbft::MAX_FAN_OUT {
            return Err(format!(
                "fan_out must be 1 to {}",
                diffuse_tee::fastbft::MAX_FAN_OUT
            ));
        }
        if self.preprocess_ahead < 4
            || self.preprocess_ahead > diffuse_tee::fastbft::MAX_PREPROCESSING
        {
            return Err(format!(
                "preprocess_ahead must be 4 to {}",
                diffuse_tee::fastbft::MAX_PREPROCESSING
            ));
        }
        if self.share_timeout.is_zero() {
            return Err("share_timeout must be positive".into());
        }
        if self.base.checkpoint_interval > crate::view_log::MAX_CHECKPOINT_INTERVAL {
            return Err(format!(
                "checkpoint_interval must be at most {} for FastBFT (a VIEW-CHANGE's log spans one)",
                crate::view_log::MAX_CHECKPOINT_INTERVAL
            ));
        }
        self.base.validate().map_err(|e| e.to_string())
    }
}
