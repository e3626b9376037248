//! FastBFT (Liu, Li, Karame, Asokan: "Scalable Byzantine Consensus via
//! Hardware-assisted Secret Sharing", IEEE TC 2019): `n = 2f + 1` replicas with a
//! trusted component each; `f + 1` active replicas in a tree rooted at the primary
//! open a secret per counter value by XORing their shares upwards, so a request
//! costs `O(n)` messages and no public-key operation on the tree: the primary's
//! enclave verifies the clients' signatures before it certifies a batch, and the
//! replicas trust its certificate (`authentic`).
//!
//! **Status** (`docs/protocols/fastbft.md`): the normal case (preprocessing pool,
//! batching, PREPARE / COMMIT / REPLY with tree aggregation and checks, UPDATEs
//! to the passive replicas, one verified REPLY per client), failure detection
//! (per-child timers, SUSPECT, NEW-TREE with a passive replica in place of the
//! accused and the accuser at a leaf, FETCH to catch up), stable checkpoints with
//! state transfer, the view change (REQ-VIEW-CHANGE, VIEW-CHANGE with the
//! enclave-certified log, NEW-VIEW with a decision every replica recomputes, votes
//! from the enclaves), durable state with recovery and REJOIN, and the fallback
//! (Shamir aggregation, every backup active) after repeated failures.

pub mod authentic;
pub mod byzantine;
pub mod checkpoint;
pub mod client;
pub use diffuse_tee::fastbft::merkle;
pub mod message;
pub mod options;
pub mod replica;
pub mod view_log;

pub use client::FastBftClient;
pub use message::Message;
pub use options::{FastBftOptions, Mutant};
pub use replica::{FastBftReplica, Timer};

use diffuse_core::app::Application;
use diffuse_core::quorum::{QuorumError, QuorumSystem};
use diffuse_core::suite::{
    Behaviour, ClientSetup, Coalition, Entropy, Named, ProtocolSuite, ReplicaSetup,
};
use diffuse_minbft::TeeHost;
use diffuse_pbft::{ClientTimer, Pbft};
use std::time::Duration;

/// Parses a boolean option.
fn boolean(section: &toml::Table, key: &str) -> Result<Option<bool>, String> {
    match section.get(key) {
        None => Ok(None),
        Some(toml::Value::Boolean(v)) => Ok(Some(*v)),
        Some(_) => Err(format!("options.{key} must be true or false")),
    }
}

/// FastBFT as a [`ProtocolSuite`] for the simulator.
pub struct FastBft;

/// The longest `batch_linger_ms` accepted: a partial batch that waits longer
/// than a client's first retransmission timeout only adds retransmissions.
const MAX_BATCH_LINGER_MS: i64 = 500;

/// FastBFT's default `checkpoint_interval`, shorter than PBFT's 128: every
/// replica holds each batch (in its log, its stream and its execution queue)
/// until a checkpoint truncates it, and at `n = 103` 128 batches are about 16 s
/// of them, a heap that keeps growing into fresh pages. With 16 the same cluster
/// served 10-15 % more operations per second (`docs/performance.md`, "FastBFT at
/// n = 103"); the VIEW-CHANGE's log, which spans one interval, is shorter too.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 16;

/// FastBFT's default `batch_max_requests`, twice PBFT's 512: every batch costs
/// O(n) messages and a tree round, so at large `n` a batch should hold as many
/// requests as are waiting. At `n = 103` with 1,024 clients, 4,652-6,215 ops/s
/// against 3,383-4,840 with 512, and no change with 512 clients
/// (`docs/performance.md`, "Batches of up to 1,024"). `batch_max_bytes` bounds a
/// batch too, so that PREPAREs and VIEW-CHANGE logs stay far below the largest
/// frame whatever the operations' size.
pub const DEFAULT_BATCH_MAX_REQUESTS: usize = 1024;

/// Parses a positive integer option.
fn positive(section: &toml::Table, key: &str) -> Result<Option<u64>, String> {
    match section.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(v)) if *v > 0 => Ok(Some(*v as u64)),
        Some(_) => Err(format!("options.{key} must be a positive integer")),
    }
}

impl ProtocolSuite for FastBft {
    type Message = Message;
    type Timer = Timer;
    type ClientTimer = ClientTimer;
    type Options = FastBftOptions;
    type Replica = FastBftReplica;
    type Client = FastBftClient;

    const NAME: &'static str = "fastbft";

    const REBOOT_IS_A_FAULT: bool = true;

    const REPLACES_PRIMARY: bool = true;

    const SURVIVES_RESTARTS: bool = true;

    /// The client hears from the primary only.
    const CLIENT_HEARS_FROM_EVERY_REPLICA: bool = false;

    /// The enclave's counters, not the disk, are what a crashed replica must not
    /// forget: it comes back locked and rejoins (`docs/protocols/fastbft.md`,
    /// "Restarts and REJOIN").
    const MESSAGES_WAIT_FOR_WRITES: bool = false;

    /// `n = 2f + 1` exactly, as MinBFT.
    fn quorum(n: usize) -> Result<QuorumSystem, QuorumError> {
        diffuse_minbft::MinBft::quorum(n)
    }

    fn default_options() -> FastBftOptions {
        FastBftOptions {
            base: diffuse_pbft::PbftOptions {
                checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
                batch_max_requests: DEFAULT_BATCH_MAX_REQUESTS,
                ..Pbft::default_options()
            },
            fan_out: 2,
            preprocess_ahead: 64,
            batch_linger: None,
            share_timeout: Duration::from_millis(200),
            failure_threshold: 16,
            fallback_duration: Duration::from_secs(10),
            fallback_only: false,
            tee: TeeHost::simulated([0; 32]),
            mutant: None,
        }
    }

    fn configured_options(section: &toml::Table) -> Result<FastBftOptions, String> {
        let mut base_section = section.clone();
        for key in [
            "fan_out",
            "preprocess_ahead",
            "batch_linger_ms",
            "share_timeout_ms",
            "failure_threshold",
            "fallback_duration_ms",
            "fallback_only",
        ] {
            base_section.remove(key);
        }
        let defaults = Self::default_options();
        let mut options = FastBftOptions {
            base: diffuse_pbft::PbftSettings::parse_onto(&base_section, defaults.base.clone())?,
            ..defaults
        };
        if let Some(v) = positive(section, "fan_out")? {
            options.fan_out = v as usize;
        }
        if let Some(v) = positive(section, "preprocess_ahead")? {
            options.preprocess_ahead = v as usize;
        }
        match section.get("batch_linger_ms") {
            None => {}
            Some(toml::Value::Integer(ms)) if (0..=MAX_BATCH_LINGER_MS).contains(ms) => {
                options.batch_linger = Some(Duration::from_millis(*ms as u64));
            }
            Some(_) => {
                return Err(format!(
                    "options.batch_linger_ms must be an integer from 0 to {MAX_BATCH_LINGER_MS}"
                ));
            }
        }
        if let Some(v) = positive(section, "share_timeout_ms")? {
            options.share_timeout = Duration::from_millis(v);
        }
        if let Some(v) = positive(section, "failure_threshold")? {
            options.failure_threshold = v;
        }
        if let Some(v) = positive(section, "fallback_duration_ms")? {
            options.fallback_duration = Duration::from_millis(v);
        }
        if let Some(v) = boolean(section, "fallback_only")? {
            options.fallback_only = v;
        }
        options.validate()?;
        Ok(options)
    }

    fn simulation_options(entropy: &mut dyn Entropy) -> FastBftOptions {
        let base = Pbft::simulation_options(entropy);
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_mut(8) {
            chunk.copy_from_slice(&entropy.next_u64().to_le_bytes());
        }
        let pick =
            |e: &mut dyn Entropy, values: &[u64]| values[e.below(values.len() as u64) as usize];
        FastBftOptions {
            base,
            fan_out: pick(entropy, &[1, 2, 3]) as usize,
            preprocess_ahead: pick(entropy, &[4, 16, 64]) as usize,
            batch_linger: None,
            share_timeout: Duration::from_millis(pick(entropy, &[40, 100])),
            failure_threshold: pick(entropy, &[4, 16]),
            fallback_duration: Duration::from_millis(pick(entropy, &[500, 2000])),
            // One run in eight stays in the fallback for good.
            fallback_only: entropy.below(8) == 0,
            tee: TeeHost::simulated(seed),
            mutant: None,
        }
    }

    fn mutants() -> &'static [Named] {
        const NAMES: [Named; 6] = [
            Mutant::ALL[0].1,
            Mutant::ALL[1].1,
            Mutant::ALL[2].1,
            Mutant::ALL[3].1,
            Mutant::ALL[4].1,
            Mutant::ALL[5].1,
        ];
        &NAMES
    }

    fn apply_mutant(options: &mut FastBftOptions, name: &str) -> bool {
        match Mutant::from_name(name) {
            Some(mutant) => {
                options.mutant = Some(mutant);
                if mutant == Mutant::EnclaveWithoutRollbackProtection {
                    options.tee = options.tee.clone().without_rollback_protection();
                }
                if mutant == Mutant::EnclaveSkipsRequestSignatures {
                    options.tee = options.tee.clone().without_request_signatures();
                }
                true
            }
            None => false,
        }
    }

    fn replica(setup: ReplicaSetup<FastBftOptions>, app: Box<dyn Application>) -> FastBftReplica {
        FastBftReplica::new(setup, app)
    }

    fn client(setup: ClientSetup<FastBftOptions>) -> FastBftClient {
        FastBftClient::new(setup)
    }

    fn behaviours() -> &'static [Named] {
        byzantine::BEHAVIOURS
    }

    fn behaviour(
        name: &str,
        setup: &ReplicaSetup<FastBftOptions>,
        coalition: &Coalition,
    ) -> Option<Box<dyn Behaviour<Message>>> {
        byzantine::build(name, setup, coalition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FastBftOptions, String> {
        FastBft::configured_options(&text.parse::<toml::Table>().expect("toml"))
    }

    #[test]
    fn options_parse_and_refuse_bad_values() {
        let options = parse(
            "fan_out = 4\nfailure_threshold = 3\nfallback_duration_ms = 250\nfallback_only = true\nmax_in_flight = 2",
        )
        .expect("valid");
        assert_eq!(options.fan_out, 4);
        assert_eq!(options.failure_threshold, 3);
        assert_eq!(options.fallback_duration, Duration::from_millis(250));
        assert!(options.fallback_only);
        assert_eq!(options.base.max_in_flight, 2);
        assert!(!parse("").expect("defaults").fallback_only);
        assert!(parse("fallback_only = 1").is_err(), "not a boolean");
        assert!(parse("failure_threshold = 0").is_err(), "not positive");
        assert!(parse("fan_out = 99").is_err(), "over MAX_FAN_OUT");
        assert!(parse("no_such_option = 1").is_err(), "unknown key");
        assert_eq!(parse("").expect("defaults").batch_linger, None);
        assert_eq!(
            parse("batch_linger_ms = 0")
                .expect("zero turns lingering off")
                .batch_linger,
            Some(Duration::ZERO)
        );
        assert!(parse("batch_linger_ms = -1").is_err(), "negative");
        assert!(parse("batch_linger_ms = 501").is_err(), "over the bound");
    }

    #[test]
    fn the_checkpoint_interval_and_batch_size_default_to_fastbfts_own() {
        let defaults = parse("").expect("defaults");
        assert_eq!(
            defaults.base.checkpoint_interval,
            DEFAULT_CHECKPOINT_INTERVAL
        );
        assert_ne!(
            DEFAULT_CHECKPOINT_INTERVAL,
            Pbft::default_options().checkpoint_interval,
            "otherwise this test proves nothing"
        );
        assert_eq!(
            FastBft::default_options().base.checkpoint_interval,
            DEFAULT_CHECKPOINT_INTERVAL
        );
        assert_eq!(defaults.base.batch_max_requests, DEFAULT_BATCH_MAX_REQUESTS);
        assert_ne!(
            DEFAULT_BATCH_MAX_REQUESTS,
            Pbft::default_options().batch_max_requests
        );
        let set = parse("checkpoint_interval = 64\nbatch_delay_ms = 3").expect("valid");
        assert_eq!(set.base.checkpoint_interval, 64);
        assert_eq!(set.base.batch_delay, Duration::from_millis(3));
        assert!(parse("checkpoint_interval = 0").is_err(), "not positive");
        assert!(
            parse("window = 100").is_err(),
            "not a multiple of the interval"
        );
    }
}
