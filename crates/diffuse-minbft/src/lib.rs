//! MinBFT (Veronese et al., "Efficient Byzantine Fault-Tolerance", IEEE TC 2013):
//! `n = 2f + 1` replicas order requests because each has a trusted component (USIG,
//! `diffuse-tee`) that binds every message it certifies to a unique, sequential
//! counter value.
//!
//! **Status:** the normal case (batching, PREPARE / COMMIT with UIs, per-sender
//! continuity with bounded hold-back and retransmission, execution, replies),
//! checkpoints with log truncation, state transfer with stream re-anchoring, the
//! view change, REJOIN after an unscheduled reboot, and sealing at a scheduled
//! shutdown; in the simulator and on the runtime (`docs/protocols/minbft.md`).

pub mod byzantine;
pub mod evidence;
pub mod message;
pub mod options;
pub mod replica;
pub mod stream;
pub mod tee_host;

pub use message::Message;
pub use options::{MinBftOptions, Mutant};
pub use replica::{MinBftReplica, Timer};
pub use tee_host::TeeHost;

use diffuse_core::app::Application;
use diffuse_core::quorum::{QuorumError, QuorumSystem};
use diffuse_core::suite::{
    Behaviour, ClientSetup, Coalition, Entropy, Named, ProtocolSuite, ReplicaSetup,
};
use diffuse_pbft::{ClientTimer, Pbft, PbftClient};

/// MinBFT as a [`ProtocolSuite`] for the simulator and the runtime.
pub struct MinBft;

impl ProtocolSuite for MinBft {
    type Message = Message;
    type Timer = Timer;
    type ClientTimer = ClientTimer;
    type Options = MinBftOptions;
    type Replica = MinBftReplica;
    type Client = PbftClient<Message>;

    const NAME: &'static str = "minbft";

    const REBOOT_IS_A_FAULT: bool = true;

    /// MinBFT needs `n = 2f + 1` exactly: with an even `n`, two quorums of `f + 1`
    /// can be disjoint (`{0, 1}` and `{2, 3}` at `n = 4`), and the view change's
    /// argument needs them to share a replica.
    fn quorum(n: usize) -> Result<QuorumSystem, QuorumError> {
        let quorum = QuorumSystem::trusted(n)?;
        if n != 2 * quorum.f() + 1 {
            return Err(QuorumError::TooFewReplicas {
                n,
                f: quorum.f() + 1,
                model: "MinBFT (n = 2f + 1 exactly; an even n adds no tolerance)",
                needed: 2 * quorum.f() + 3,
            });
        }
        Ok(quorum)
    }

    fn default_options() -> MinBftOptions {
        MinBftOptions {
            base: Pbft::default_options(),
            tee: TeeHost::simulated([0; 32]),
            mutant: None,
        }
    }

    fn configured_options(section: &toml::Table) -> Result<MinBftOptions, String> {
        Ok(MinBftOptions {
            base: Pbft::configured_options(section)?,
            ..Self::default_options()
        })
    }

    fn simulation_options(entropy: &mut dyn Entropy) -> MinBftOptions {
        let base = Pbft::simulation_options(entropy);
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_mut(8) {
            chunk.copy_from_slice(&entropy.next_u64().to_le_bytes());
        }
        MinBftOptions {
            base,
            tee: TeeHost::simulated(seed),
            mutant: None,
        }
    }

    fn mutants() -> &'static [Named] {
        const NAMES: [Named; 2] = [Mutant::ALL[0].1, Mutant::ALL[1].1];
        &NAMES
    }

    fn apply_mutant(options: &mut MinBftOptions, name: &str) -> bool {
        match Mutant::from_name(name) {
            Some(mutant) => {
                options.mutant = Some(mutant);
                if mutant == Mutant::EnclaveWithoutRollbackProtection {
                    options.tee = options.tee.clone().without_rollback_protection();
                }
                true
            }
            None => false,
        }
    }

    fn replica(setup: ReplicaSetup<MinBftOptions>, app: Box<dyn Application>) -> MinBftReplica {
        MinBftReplica::new(setup, app)
    }

    fn client(setup: ClientSetup<MinBftOptions>) -> PbftClient<Message> {
        let quorum = QuorumSystem::trusted(setup.keys.n())
            .expect("ClusterKeys guarantees 1..=MAX_REPLICAS replicas");
        PbftClient::with_quorum(
            ClientSetup {
                id: setup.id,
                keys: setup.keys,
                secret: setup.secret,
                options: setup.options.base,
                first_timestamp: setup.first_timestamp,
            },
            quorum,
        )
    }

    fn behaviours() -> &'static [Named] {
        byzantine::BEHAVIOURS
    }

    fn behaviour(
        name: &str,
        setup: &ReplicaSetup<MinBftOptions>,
        coalition: &Coalition,
    ) -> Option<Box<dyn Behaviour<Message>>> {
        byzantine::build(name, setup, coalition)
    }
}
