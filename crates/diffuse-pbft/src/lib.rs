//! PBFT: Castro and Liskov's Practical Byzantine Fault Tolerance, as a sans-IO state
//! machine.
//!
//! # Guarantees
//!
//! With `n = 3f + 1` replicas of which at most `f` are Byzantine, all correct
//! replicas execute the same batches in the same order (safety, in any network), and
//! after the network stabilises every request of a correct client completes
//! (liveness). Quorums are `2f + 1`: any two share `f + 1` replicas, at least one of
//! them correct, so two conflicting batches can never both gather a quorum of
//! prepares in one view, and a committed batch is always in the prepared set `P` of
//! some correct member of any view-change quorum.
//!
//! # How it works
//!
//! 1. A client signs a request and sends it to the primary (`view mod n`); on
//!    timeout it sends it to every replica, and backups forward it to the primary.
//! 2. The primary batches pending requests and sends PRE-PREPARE(view, seq, digest)
//!    with the batch. A backup checks the signatures and the window
//!    `(low, low + L]` and answers with a signed PREPARE.
//! 3. With the proposal and `2f` matching prepares a replica is *prepared*; it
//!    persists the certificate and sends COMMIT. With `2f + 1` matching commits the
//!    batch is *committed* and executes in sequence order. Each replica replies; the
//!    client accepts `f + 1` matching replies.
//! 4. Every `K` sequence numbers replicas exchange signed checkpoint digests; `2f + 1`
//!    matching ones make the checkpoint stable and truncate the log below it.
//! 5. A backup whose oldest pending request does not execute in time starts a view
//!    change; see the `replica` module's view-change part for the details.
//!
//! See `docs/protocols/pbft.md` in the repository for message formats and every choice
//! made where the papers leave a detail open.

pub mod auth;
pub mod byzantine;
pub mod client;
pub mod message;
pub mod options;
pub mod pending;
pub mod replica;
pub mod retransmit;

pub use client::{ClientTimer, ClientWire, PbftClient};
pub use message::Message;
pub use options::{Mutant, PbftOptions, PbftSettings};
pub use replica::{PbftReplica, Timer};

use diffuse_core::app::Application;
use diffuse_core::quorum::{QuorumError, QuorumSystem};
use diffuse_core::suite::{
    Behaviour, ClientSetup, Coalition, Entropy, Named, ProtocolSuite, ReplicaSetup,
};
use std::time::Duration;

/// PBFT as a [`ProtocolSuite`] for the simulator and the runtime.
pub struct Pbft;

impl ProtocolSuite for Pbft {
    type Message = Message;
    type Timer = Timer;
    type ClientTimer = ClientTimer;
    type Options = PbftOptions;
    type Replica = PbftReplica;
    type Client = PbftClient;

    const NAME: &'static str = "pbft";

    fn quorum(n: usize) -> Result<QuorumSystem, QuorumError> {
        QuorumSystem::byzantine(n)
    }

    fn default_options() -> PbftOptions {
        PbftOptions::default()
    }

    fn configured_options(section: &toml::Table) -> Result<PbftOptions, String> {
        PbftSettings::parse_onto(section, PbftOptions::default())
    }

    fn simulation_options(entropy: &mut dyn Entropy) -> PbftOptions {
        let pick =
            |e: &mut dyn Entropy, values: &[u64]| values[e.below(values.len() as u64) as usize];
        let checkpoint_interval = pick(entropy, &[2, 4, 8, 16]);
        let window = checkpoint_interval * pick(entropy, &[2, 3, 4]);
        PbftOptions {
            checkpoint_interval,
            window,
            batch_max_requests: pick(entropy, &[1, 2, 4, 16]) as usize,
            batch_delay: Duration::from_millis(pick(entropy, &[0, 1, 5])),
            max_in_flight: pick(entropy, &[1, 2, 4, 16]),
            view_change_timeout: Duration::from_millis(300),
            view_change_backoff_max: 3,
            status_interval: Duration::from_millis(pick(entropy, &[50, 100, 400])),
            fetch_timeout: Duration::from_millis(100),
            client_retransmit: Duration::from_millis(200),
            client_retransmit_max: Duration::from_millis(800),
            chunk_bytes: pick(entropy, &[64, 512, 4096]) as usize,
            future_messages_per_sender: 64,
            ..PbftOptions::default()
        }
    }

    fn mutants() -> &'static [Named] {
        const NAMES: [Named; 10] = [
            Mutant::ALL[0].1,
            Mutant::ALL[1].1,
            Mutant::ALL[2].1,
            Mutant::ALL[3].1,
            Mutant::ALL[4].1,
            Mutant::ALL[5].1,
            Mutant::ALL[6].1,
            Mutant::ALL[7].1,
            Mutant::ALL[8].1,
            Mutant::ALL[9].1,
        ];
        &NAMES
    }

    fn apply_mutant(options: &mut PbftOptions, name: &str) -> bool {
        match Mutant::from_name(name) {
            Some(mutant) => {
                options.mutant = Some(mutant);
                true
            }
            None => false,
        }
    }

    fn replica(setup: ReplicaSetup<PbftOptions>, app: Box<dyn Application>) -> PbftReplica {
        PbftReplica::new(setup, app)
    }

    fn client(setup: ClientSetup<PbftOptions>) -> PbftClient {
        PbftClient::new(setup)
    }

    fn behaviours() -> &'static [Named] {
        byzantine::BEHAVIOURS
    }

    fn behaviour(
        name: &str,
        setup: &ReplicaSetup<PbftOptions>,
        coalition: &Coalition,
    ) -> Option<Box<dyn Behaviour<Message>>> {
        byzantine::build(name, setup, coalition)
    }

    fn client_behaviours() -> &'static [Named] {
        byzantine::CLIENT_BEHAVIOURS
    }

    fn client_behaviour(
        name: &str,
        setup: &ClientSetup<PbftOptions>,
    ) -> Option<Box<dyn Behaviour<Message>>> {
        byzantine::build_client(name, setup)
    }
}
