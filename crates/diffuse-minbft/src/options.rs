//! MinBFT's options: PBFT's knobs (batching, checkpoints, timers, client), the
//! machine the enclave comes from, and the mutants.

use crate::tee_host::TeeHost;
use diffuse_core::suite::Named;
use diffuse_pbft::PbftOptions;

/// A deliberately broken MinBFT that the simulator's checkers must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// Consumes certified messages as they arrive, without holding back those above
    /// a gap: an equivocating primary then splits the replicas.
    NoContinuityCheck,
    /// Enclaves accept a stale sealed state: the `rollback` behaviour then
    /// certifies a second PREPARE under a counter value already used.
    EnclaveWithoutRollbackProtection,
}

impl Mutant {
    /// Every mutant with its name.
    pub const ALL: [(Mutant, Named); 2] = [
        (
            Mutant::NoContinuityCheck,
            Named {
                name: "no-continuity-check",
                description: "replicas accept certified messages out of counter order",
            },
        ),
        (
            Mutant::EnclaveWithoutRollbackProtection,
            Named {
                name: "enclave-without-rollback-protection",
                description: "enclaves accept a stale sealed state (run with --faults rollback)",
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

/// MinBFT's options.
#[derive(Debug, Clone)]
pub struct MinBftOptions {
    /// Batching, checkpoint interval and window, timers, client behaviour: as PBFT.
    /// The window must be a multiple of the checkpoint interval; the enclave enforces
    /// it as the slot rule.
    pub base: PbftOptions,
    /// Where the enclaves come from.
    pub tee: TeeHost,
    /// A deliberate bug, for checker tests.
    pub mutant: Option<Mutant>,
}

impl MinBftOptions {
    /// Whether the mutant `m` is active.
    pub fn is(&self, m: Mutant) -> bool {
        self.mutant == Some(m)
    }
}
