//! PBFT's tunable parameters and its mutants.

use crate::message::{MAX_BATCH_REQUESTS, MAX_OPERATION_BYTES, MAX_WINDOW};
use diffuse_core::suite::Named;
use std::time::Duration;

/// Parameters of a PBFT replica and client. Every replica of a cluster must use the
/// same values for `checkpoint_interval` and `window`: certificates are checked
/// against them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbftOptions {
    /// `K`: a checkpoint is taken every `K` sequence numbers.
    pub checkpoint_interval: u64,
    /// `L`: sequence numbers accepted above the stable checkpoint (a multiple of `K`).
    pub window: u64,
    /// The most requests in one batch.
    pub batch_max_requests: usize,
    /// The most operation bytes in one batch (a single larger request still goes alone).
    pub batch_max_bytes: usize,
    /// How long the primary waits to fill a batch when no batch is in flight.
    pub batch_delay: Duration,
    /// The most batches proposed but not executed. Only full batches are pipelined:
    /// a partial one waits until none is in flight, so batches grow with the load
    /// (see `docs/protocols/pbft.md`, "Options").
    pub max_in_flight: u64,
    /// How long a backup waits for a pending request before suspecting the primary.
    pub view_change_timeout: Duration,
    /// The view-change timer doubles per failed view change up to `2^this` times.
    pub view_change_backoff_max: u32,
    /// How often a replica that is not making progress sends STATUS.
    pub status_interval: Duration,
    /// How long to wait for a batch or a state chunk before asking someone else.
    pub fetch_timeout: Duration,
    /// How long a client waits before retransmitting to every replica.
    pub client_retransmit: Duration,
    /// Upper bound of the client's exponential retransmission back-off.
    pub client_retransmit_max: Duration,
    /// The largest operation accepted from a client.
    pub max_operation_bytes: usize,
    /// Normal-case messages for views not reached yet, kept per sender.
    pub future_messages_per_sender: usize,
    /// Bytes of state per transfer chunk.
    pub chunk_bytes: usize,
    /// Whether clients send read-only operations on the read-only path (to every
    /// replica, unordered, `2f + 1` matching replies) rather than order them.
    pub read_only_path: bool,
    /// A deliberately broken variant, for checking the checkers.
    pub mutant: Option<Mutant>,
}

impl Default for PbftOptions {
    fn default() -> Self {
        Self {
            checkpoint_interval: 128,
            window: 256,
            batch_max_requests: 512,
            batch_max_bytes: 1 << 20,
            batch_delay: Duration::from_millis(1),
            max_in_flight: 8,
            view_change_timeout: Duration::from_millis(1000),
            view_change_backoff_max: 4,
            status_interval: Duration::from_millis(250),
            fetch_timeout: Duration::from_millis(500),
            client_retransmit: Duration::from_millis(500),
            client_retransmit_max: Duration::from_secs(4),
            max_operation_bytes: 64 * 1024,
            future_messages_per_sender: 512,
            chunk_bytes: 256 * 1024,
            read_only_path: true,
            mutant: None,
        }
    }
}

/// Overrides of [`PbftOptions`] from an operator's configuration file (the
/// `[options]` table); durations are in milliseconds. Every replica of a cluster must
/// use the same `checkpoint_interval` and `window`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PbftSettings {
    /// See [`PbftOptions::checkpoint_interval`].
    pub checkpoint_interval: Option<u64>,
    /// See [`PbftOptions::window`].
    pub window: Option<u64>,
    /// See [`PbftOptions::batch_max_requests`].
    pub batch_max_requests: Option<usize>,
    /// See [`PbftOptions::batch_max_bytes`].
    pub batch_max_bytes: Option<usize>,
    /// See [`PbftOptions::batch_delay`].
    pub batch_delay_ms: Option<u64>,
    /// See [`PbftOptions::max_in_flight`].
    pub max_in_flight: Option<u64>,
    /// See [`PbftOptions::view_change_timeout`].
    pub view_change_timeout_ms: Option<u64>,
    /// See [`PbftOptions::view_change_backoff_max`].
    pub view_change_backoff_max: Option<u32>,
    /// See [`PbftOptions::status_interval`].
    pub status_interval_ms: Option<u64>,
    /// See [`PbftOptions::fetch_timeout`].
    pub fetch_timeout_ms: Option<u64>,
    /// See [`PbftOptions::client_retransmit`].
    pub client_retransmit_ms: Option<u64>,
    /// See [`PbftOptions::client_retransmit_max`].
    pub client_retransmit_max_ms: Option<u64>,
    /// See [`PbftOptions::max_operation_bytes`].
    pub max_operation_bytes: Option<usize>,
    /// See [`PbftOptions::future_messages_per_sender`].
    pub future_messages_per_sender: Option<usize>,
    /// See [`PbftOptions::chunk_bytes`].
    pub chunk_bytes: Option<usize>,
    /// See [`PbftOptions::read_only_path`].
    pub read_only_path: Option<bool>,
}

impl PbftSettings {
    /// The `[options]` table `section` read onto `base` (a protocol built on PBFT
    /// passes its own defaults), validated.
    pub fn parse_onto(section: &toml::Table, base: PbftOptions) -> Result<PbftOptions, String> {
        let settings: PbftSettings = section
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| format!("[options]: {}", e.message()))?;
        settings.apply(base).map_err(|e| e.to_string())
    }

    /// `base` with these overrides, validated.
    pub fn apply(self, base: PbftOptions) -> Result<PbftOptions, InvalidOptions> {
        let ms =
            |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let options = PbftOptions {
            checkpoint_interval: self.checkpoint_interval.unwrap_or(base.checkpoint_interval),
            window: self.window.unwrap_or(base.window),
            batch_max_requests: self.batch_max_requests.unwrap_or(base.batch_max_requests),
            batch_max_bytes: self.batch_max_bytes.unwrap_or(base.batch_max_bytes),
            batch_delay: ms(self.batch_delay_ms, base.batch_delay),
            max_in_flight: self.max_in_flight.unwrap_or(base.max_in_flight),
            view_change_timeout: ms(self.view_change_timeout_ms, base.view_change_timeout),
            view_change_backoff_max: self
                .view_change_backoff_max
                .unwrap_or(base.view_change_backoff_max),
            status_interval: ms(self.status_interval_ms, base.status_interval),
            fetch_timeout: ms(self.fetch_timeout_ms, base.fetch_timeout),
            client_retransmit: ms(self.client_retransmit_ms, base.client_retransmit),
            client_retransmit_max: ms(self.client_retransmit_max_ms, base.client_retransmit_max),
            max_operation_bytes: self.max_operation_bytes.unwrap_or(base.max_operation_bytes),
            future_messages_per_sender: self
                .future_messages_per_sender
                .unwrap_or(base.future_messages_per_sender),
            chunk_bytes: self.chunk_bytes.unwrap_or(base.chunk_bytes),
            read_only_path: self.read_only_path.unwrap_or(base.read_only_path),
            mutant: base.mutant,
        };
        options.validate()?;
        Ok(options)
    }
}

/// A problem with [`PbftOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOptions(pub String);

impl std::fmt::Display for InvalidOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid PBFT options: {}", self.0)
    }
}

impl std::error::Error for InvalidOptions {}

impl PbftOptions {
    /// Checks the options against the protocol's hard limits.
    pub fn validate(&self) -> Result<(), InvalidOptions> {
        let fail = |what: String| Err(InvalidOptions(what));
        if self.checkpoint_interval == 0 {
            return fail("checkpoint_interval must be at least 1".into());
        }
        if self.window < self.checkpoint_interval || self.window % self.checkpoint_interval != 0 {
            return fail(format!(
                "window ({}) must be a positive multiple of checkpoint_interval ({})",
                self.window, self.checkpoint_interval
            ));
        }
        if self.window > MAX_WINDOW as u64 {
            return fail(format!("window must be at most {MAX_WINDOW}"));
        }
        if self.batch_max_requests == 0 || self.batch_max_requests > MAX_BATCH_REQUESTS {
            return fail(format!(
                "batch_max_requests must be in 1..={MAX_BATCH_REQUESTS}"
            ));
        }
        if self.max_in_flight == 0 {
            return fail("max_in_flight must be at least 1".into());
        }
        if self.max_operation_bytes == 0 || self.max_operation_bytes > MAX_OPERATION_BYTES {
            return fail(format!(
                "max_operation_bytes must be in 1..={MAX_OPERATION_BYTES}"
            ));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > crate::message::MAX_CHUNK_BYTES {
            return fail("chunk_bytes out of range".into());
        }
        let timers = [
            self.view_change_timeout,
            self.status_interval,
            self.fetch_timeout,
            self.client_retransmit,
        ];
        if timers.iter().any(|t| t.is_zero()) {
            return fail("timeouts must be positive".into());
        }
        if self.view_change_backoff_max > 16 {
            return fail("view_change_backoff_max must be at most 16".into());
        }
        Ok(())
    }

    /// The view-change timeout after `attempts` consecutive failed view changes.
    pub fn view_change_timeout_after(&self, attempts: u32) -> Duration {
        self.view_change_timeout * (1u32 << attempts.min(self.view_change_backoff_max))
    }

    /// Whether `mutant` is active.
    pub(crate) fn is(&self, mutant: Mutant) -> bool {
        self.mutant == Some(mutant)
    }
}

/// Deliberately broken variants of PBFT. Each breaks one rule the protocol's safety
/// or liveness depends on; the simulator's checkers must report a violation for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// A replica commits with one commit fewer than a quorum.
    CommitQuorumMinusOne,
    /// A backup accepts a second, different PRE-PREPARE for a sequence number and
    /// view it has already accepted one for.
    AcceptConflictingPrePrepare,
    /// View changes are accepted without checking the prepared certificates in them.
    TrustViewChangeCertificates,
    /// The new primary ignores prepared certificates and fills NEW-VIEW with nulls.
    NewViewDropsPrepared,
    /// State transfer installs a snapshot without checking it against the certified digest.
    UnverifiedStateTransfer,
    /// A client accepts the first reply instead of f+1 matching ones.
    ClientTrustsFirstReply,
    /// A backup accepts the requests of a PRE-PREPARE without checking its MAC entry
    /// or the signature.
    TrustRequestsInBatch,
    /// The primary proposes a request its own MAC entry authenticates without
    /// checking the signature (the "MAC attack" of Clement et al. then works).
    PrimaryTrustsMacs,
    /// A client completes a read-only operation with `f + 1` matching answers
    /// instead of `2f + 1`.
    ReadWithoutQuorum,
    /// A restarted replica ignores the bound on the votes it sent ahead of their
    /// writes, and may vote (or, as primary, propose) twice in one view.
    ForgetLostVotes,
}

impl Mutant {
    /// All mutants with their names and descriptions.
    pub const ALL: [(Mutant, Named); 10] = [
        (
            Mutant::CommitQuorumMinusOne,
            Named {
                name: "commit-quorum-minus-one",
                description: "commit with one COMMIT fewer than a quorum (2f instead of 2f+1)",
            },
        ),
        (
            Mutant::AcceptConflictingPrePrepare,
            Named {
                name: "accept-conflicting-preprepare",
                description: "a backup accepts a second PRE-PREPARE for the same view and sequence number",
            },
        ),
        (
            Mutant::TrustViewChangeCertificates,
            Named {
                name: "trust-view-change-certificates",
                description: "prepared certificates inside VIEW-CHANGE are not verified",
            },
        ),
        (
            Mutant::NewViewDropsPrepared,
            Named {
                name: "new-view-drops-prepared",
                description: "the new primary ignores the P sets and proposes null requests only",
            },
        ),
        (
            Mutant::UnverifiedStateTransfer,
            Named {
                name: "unverified-state-transfer",
                description: "state transfer installs a snapshot without checking its digest",
            },
        ),
        (
            Mutant::ClientTrustsFirstReply,
            Named {
                name: "client-trusts-first-reply",
                description: "a client accepts the first reply instead of f+1 matching replies",
            },
        ),
        (
            Mutant::TrustRequestsInBatch,
            Named {
                name: "trust-requests-in-batch",
                description: "a backup accepts a PRE-PREPARE's requests without checking its MAC or the signature",
            },
        ),
        (
            Mutant::PrimaryTrustsMacs,
            Named {
                name: "primary-trusts-macs",
                description: "the primary proposes requests its MAC entry authenticates without checking their signature",
            },
        ),
        (
            Mutant::ReadWithoutQuorum,
            Named {
                name: "read-without-quorum",
                description: "a client completes a read-only operation with f+1 matching answers instead of 2f+1",
            },
        ),
        (
            Mutant::ForgetLostVotes,
            Named {
                name: "forget-lost-votes",
                description: "a restarted replica ignores the bound on votes it sent ahead of their writes",
            },
        ),
    ];

    /// The mutant called `name`.
    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(m, _)| *m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(PbftOptions::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_inconsistent_windows() {
        let mut o = PbftOptions {
            window: 100,
            checkpoint_interval: 64,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        o.window = 128;
        assert!(o.validate().is_ok());
        o.window = 8192;
        o.checkpoint_interval = 8192;
        assert!(o.validate().is_err());
    }

    #[test]
    fn backoff_is_capped() {
        let o = PbftOptions {
            view_change_timeout: Duration::from_millis(10),
            view_change_backoff_max: 2,
            ..Default::default()
        };
        assert_eq!(o.view_change_timeout_after(0), Duration::from_millis(10));
        assert_eq!(o.view_change_timeout_after(1), Duration::from_millis(20));
        assert_eq!(o.view_change_timeout_after(9), Duration::from_millis(40));
    }

    #[test]
    fn mutant_names_are_unique_and_resolve() {
        for (mutant, named) in Mutant::ALL {
            assert_eq!(Mutant::from_name(named.name), Some(mutant));
        }
        assert_eq!(Mutant::from_name("nope"), None);
    }
}

#[cfg(test)]
mod settings_tests {
    use crate::Pbft;
    use diffuse_core::suite::ProtocolSuite;
    use std::time::Duration;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn overrides_apply_and_bad_ones_are_refused() {
        let options =
            Pbft::configured_options(&table("max_in_flight = 2\nbatch_delay_ms = 0")).unwrap();
        assert_eq!(options.max_in_flight, 2);
        assert_eq!(options.batch_delay, Duration::ZERO);
        assert_eq!(
            Pbft::configured_options(&table("")).unwrap(),
            Pbft::default_options()
        );
        let unknown = Pbft::configured_options(&table("max_inflight = 2")).unwrap_err();
        assert!(unknown.contains("max_inflight"), "{unknown}");
        let invalid = Pbft::configured_options(&table("window = 100")).unwrap_err();
        assert!(invalid.contains("window"), "{invalid}");
        let wrong_type = Pbft::configured_options(&table("window = \"big\"")).unwrap_err();
        assert!(wrong_type.contains("[options]"), "{wrong_type}");
    }
}
