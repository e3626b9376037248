//! The protocols the runtime runs, by name: the one place that says what differs
//! between them (fault model, options, whether replicas need enclaves).

use diffuse_core::quorum::QuorumSystem;
use diffuse_core::suite::ProtocolSuite;
use diffuse_fastbft::FastBft;
use diffuse_minbft::MinBft;
use diffuse_pbft::Pbft;

/// Every protocol name the runtime commands accept.
pub const NAMES: [&str; 3] = ["pbft", "minbft", "fastbft"];

/// Why a protocol name or its options cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not built in.
    #[error("unknown protocol `{0}` (available: pbft, minbft, fastbft)")]
    Unknown(String),
    /// The cluster size or the options do not suit the protocol.
    #[error("{0}")]
    Invalid(String),
}

/// The quorum system of `protocol` at `n` replicas.
pub fn quorum(protocol: &str, n: usize) -> Result<QuorumSystem, ProtocolError> {
    let result = match protocol {
        "pbft" => Pbft::quorum(n),
        "minbft" => MinBft::quorum(n),
        "fastbft" => FastBft::quorum(n),
        other => return Err(ProtocolError::Unknown(other.to_string())),
    };
    result.map_err(|e| ProtocolError::Invalid(format!("{protocol} with n = {n}: {e}")))
}

/// Checks `options` (a configuration's `[options]`) against `protocol`.
pub fn check_options(protocol: &str, options: &toml::Table) -> Result<(), ProtocolError> {
    let result = match protocol {
        "pbft" => Pbft::configured_options(options).map(|_| ()),
        "minbft" => MinBft::configured_options(options).map(|_| ()),
        "fastbft" => FastBft::configured_options(options).map(|_| ()),
        other => return Err(ProtocolError::Unknown(other.to_string())),
    };
    result.map_err(ProtocolError::Invalid)
}

/// Whether every replica of `protocol` runs a trusted component (and so needs
/// `enclaves.toml` and a counter store).
pub fn is_hybrid(protocol: &str) -> bool {
    matches!(protocol, "minbft" | "fastbft")
}

/// Whether a cluster of `protocol` recovers from a killed and restarted replica,
/// the primary among them (what `diffuse demo --chaos` does).
pub fn survives_chaos(protocol: &str) -> bool {
    fn suite<S: ProtocolSuite>() -> bool {
        S::SURVIVES_RESTARTS && S::REPLACES_PRIMARY
    }
    match protocol {
        "pbft" => suite::<Pbft>(),
        "minbft" => suite::<MinBft>(),
        "fastbft" => suite::<FastBft>(),
        _ => false,
    }
}

/// The slot rules the enclaves of a hybrid `protocol` are provisioned with.
pub fn slot_rules(
    protocol: &str,
    options: &toml::Table,
) -> Result<diffuse_tee::SlotRules, ProtocolError> {
    let base = match protocol {
        "minbft" => MinBft::configured_options(options).map(|o| o.base),
        "fastbft" => FastBft::configured_options(options).map(|o| o.base),
        other => return Err(ProtocolError::Unknown(other.to_string())),
    }
    .map_err(ProtocolError::Invalid)?;
    Ok(diffuse_tee::SlotRules {
        checkpoint_interval: base.checkpoint_interval,
        window: base.window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_quorum_system_and_default_options() {
        for name in NAMES {
            let n = if is_hybrid(name) { 3 } else { 4 };
            assert_eq!(quorum(name, n).unwrap().f(), 1, "{name}");
            check_options(name, &toml::Table::new()).unwrap();
        }
        assert_eq!(
            quorum("raft", 3),
            Err(ProtocolError::Unknown("raft".into()))
        );
        assert!(matches!(
            quorum("fastbft", 4),
            Err(ProtocolError::Invalid(_))
        ));
        assert!(survives_chaos("pbft") && survives_chaos("minbft") && survives_chaos("fastbft"));
        let unknown = ProtocolError::Unknown("raft".into()).to_string();
        assert!(NAMES.iter().all(|name| unknown.contains(name)), "{unknown}");
    }
}
