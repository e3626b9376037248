//! Configuration files of a running node and of a client.
//!
//! Both are TOML and untrusted: sizes are capped, unknown fields are refused, and
//! every problem comes back as a [`SettingsError`] naming the file. Paths inside a
//! file are relative to the file's own directory, so a testnet directory can be
//! moved as a whole.

use crate::memo::Memo;
use diffuse_core::config::{
    ClusterFile, ClusterKeys, ConfigError, KeyFile, MAX_CONFIG_BYTES, Role,
};
use diffuse_core::crypto::{Digest, SecretKey};
use diffuse_core::ids::{ClientId, ReplicaId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A file's content is invalid.
    #[error("{path}: {error}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

fn read_capped(path: &Path) -> Result<String, SettingsError> {
    let read = |error| SettingsError::Read {
        path: path.to_path_buf(),
        error,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_CONFIG_BYTES as u64 {
        return Err(invalid(path, ConfigError::TooLarge(len as usize)));
    }
    std::fs::read_to_string(path).map_err(read)
}

/// Reads at most `max` bytes of `path`; a longer file is an error (untrusted disk).
pub(crate) fn read_capped_bytes(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

/// [`read_capped_bytes`] as UTF-8 text.
pub(crate) fn read_capped_to(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_capped_bytes(path, max)?).map_err(std::io::Error::other)
}

fn invalid(path: &Path, error: impl ToString) -> SettingsError {
    SettingsError::Invalid {
        path: path.to_path_buf(),
        error: error.to_string(),
    }
}

fn relative_to(file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new(".")).join(path)
    }
}

/// The cluster as a running node sees it: members, keys and replica addresses.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The parsed cluster file.
    pub file: ClusterFile,
    /// Every member's public key.
    pub keys: Arc<ClusterKeys>,
    /// Replica `i`'s address is `addresses[i]`.
    pub addresses: Vec<SocketAddr>,
    /// A digest of the membership (keys only): mixed into every handshake and
    /// stamped on every data directory.
    pub digest: Digest,
}

impl Cluster {
    /// Reads and checks a cluster file; every replica needs an address.
    pub fn load(path: &Path) -> Result<Cluster, SettingsError> {
        /// The cluster files this process parsed already (see `memo.rs`).
        static PARSED: Memo<Cluster> = Memo::new("diffuse-cluster-file");
        let text = read_capped(path)?;
        PARSED.get_or_check(text.as_bytes(), || {
            let file = ClusterFile::parse(&text).map_err(|e| invalid(path, e))?;
            Cluster::from_file(file).map_err(|e| invalid(path, e))
        })
    }

    /// Checks a parsed cluster file.
    pub fn from_file(file: ClusterFile) -> Result<Cluster, String> {
        let keys = file.keys().map_err(|e| e.to_string())?;
        let mut replicas = file.replicas.clone();
        replicas.sort_by_key(|r| r.id);
        let addresses = replicas
            .iter()
            .map(|r| {
                let address = r
                    .address
                    .as_deref()
                    .ok_or_else(|| format!("replica {} has no address", r.id))?;
                address
                    .parse()
                    .map_err(|_| format!("replica {}: `{address}` is not host:port", r.id))
            })
            .collect::<Result<Vec<SocketAddr>, String>>()?;
        let mut members: Vec<(u8, u32, String)> = file
            .replicas
            .iter()
            .map(|r| (0, r.id, r.public_key.to_lowercase()))
            .chain(
                file.clients
                    .iter()
                    .map(|c| (1, c.id, c.public_key.to_lowercase())),
            )
            .collect();
        members.sort();
        let digest = Digest::of_value("diffuse/cluster-membership", &members);
        Ok(Cluster {
            file,
            keys: Arc::new(keys),
            addresses,
            digest,
        })
    }

    /// Number of replicas.
    pub fn n(&self) -> usize {
        self.addresses.len()
    }
}

fn load_key(path: &Path, role: Role, id: u32) -> Result<SecretKey, SettingsError> {
    let text = read_capped(path)?;
    let file = KeyFile::parse(&text).map_err(|e| invalid(path, e))?;
    if file.role != role || file.id != id {
        return Err(invalid(
            path,
            format!(
                "this key file is for {:?} {}, not {role:?} {id}",
                file.role, file.id
            ),
        ));
    }
    file.secret().map_err(|e| invalid(path, e))
}

/// `diffuse node --config FILE`: one replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The protocol the cluster runs (`pbft` or `minbft`).
    pub protocol: String,
    /// This replica's id.
    pub id: u32,
    /// Where to accept connections from replicas and clients.
    pub listen: SocketAddr,
    /// Where to serve Prometheus metrics over HTTP (none if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// This replica's key file.
    pub key_file: PathBuf,
    /// The cluster file.
    pub cluster_file: PathBuf,
    /// Hybrid protocols (MinBFT, FastBFT): the attested enclave list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enclaves_file: Option<PathBuf>,
    /// Hybrid protocols (MinBFT, FastBFT): this replica's counter store and sealed enclave
    /// state, kept apart from `data_dir` (restoring a database backup must not roll
    /// the counter back with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee_dir: Option<PathBuf>,
    /// Protocol options overriding the defaults (for PBFT: batch sizes, timeouts in
    /// milliseconds, ...; see `docs/runtime.md`). `checkpoint_interval` and `window`
    /// must be the same on every replica.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub options: toml::Table,
    /// Whether the database commits in two phases with redb's quick repair (two
    /// fsyncs per commit, but a restart after a crash needs no repair scan).
    /// Default: one-phase commits, one fsync each (`docs/runtime.md`, "Storage").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quick_repair: bool,
}

/// A node configuration with every file read and checked.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The protocol name.
    pub protocol: String,
    /// This replica.
    pub id: ReplicaId,
    /// Listening address.
    pub listen: SocketAddr,
    /// Metrics address.
    pub metrics: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Signing key.
    pub secret: SecretKey,
    /// The cluster.
    pub cluster: Cluster,
    /// The attested enclave list (hybrid protocols).
    pub enclaves_file: Option<PathBuf>,
    /// This replica's counter store (hybrid protocols).
    pub tee_dir: Option<PathBuf>,
    /// Protocol option overrides (checked when the protocol is built).
    pub options: toml::Table,
    /// See [`NodeConfig::quick_repair`].
    pub quick_repair: bool,
}

impl NodeConfig {
    /// Reads `path` and every file it names.
    pub fn load(path: &Path) -> Result<NodeSettings, SettingsError> {
        let text = read_capped(path)?;
        let config: NodeConfig = toml::from_str(&text).map_err(|e| invalid(path, e))?;
        let cluster = Cluster::load(&relative_to(path, &config.cluster_file))?;
        if config.id as usize >= cluster.n() {
            return Err(invalid(
                path,
                format!(
                    "replica {} is not in a cluster of {}",
                    config.id,
                    cluster.n()
                ),
            ));
        }
        let secret = load_key(
            &relative_to(path, &config.key_file),
            Role::Replica,
            config.id,
        )?;
        let id = ReplicaId(config.id as u16);
        if cluster.keys.replica(id) != Some(&secret.public()) {
            return Err(invalid(
                path,
                "the key file does not match the cluster file",
            ));
        }
        Ok(NodeSettings {
            protocol: config.protocol,
            id,
            listen: config.listen,
            metrics: config.metrics,
            data_dir: relative_to(path, &config.data_dir),
            secret,
            cluster,
            enclaves_file: config.enclaves_file.map(|f| relative_to(path, &f)),
            tee_dir: config.tee_dir.map(|d| relative_to(path, &d)),
            options: config.options,
            quick_repair: config.quick_repair,
        })
    }

    /// Renders the file as TOML.
    pub fn to_toml(&self) -> String {
        format!(
            "# Diffuse replica configuration: `diffuse node --config THIS_FILE`.\n{}",
            toml::to_string_pretty(self).expect("node configs are TOML-encodable")
        )
    }
}

/// `diffuse client --config FILE`: one client identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The protocol the cluster runs (`pbft`).
    pub protocol: String,
    /// This client's id (registered in the cluster file).
    pub id: u32,
    /// This client's key file.
    pub key_file: PathBuf,
    /// The cluster file.
    pub cluster_file: PathBuf,
    /// How long one operation may take before it fails with a timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// FastBFT: the attested enclave list (its clients check the primary
    /// enclave's certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enclaves_file: Option<PathBuf>,
    /// Protocol options overriding the defaults (e.g. `client_retransmit_ms`).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub options: toml::Table,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// A client configuration with every file read and checked.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The protocol name.
    pub protocol: String,
    /// This client.
    pub id: ClientId,
    /// Signing key.
    pub secret: SecretKey,
    /// The cluster.
    pub cluster: Cluster,
    /// Per-operation deadline.
    pub timeout: std::time::Duration,
    /// The attested enclave list (FastBFT).
    pub enclaves_file: Option<PathBuf>,
    /// Protocol option overrides (checked when the client is built).
    pub options: toml::Table,
}

impl ClientConfig {
    /// Reads `path` and every file it names.
    pub fn load(path: &Path) -> Result<ClientSettings, SettingsError> {
        let text = read_capped(path)?;
        let config: ClientConfig = toml::from_str(&text).map_err(|e| invalid(path, e))?;
        let cluster = Cluster::load(&relative_to(path, &config.cluster_file))?;
        let secret = load_key(
            &relative_to(path, &config.key_file),
            Role::Client,
            config.id,
        )?;
        let id = ClientId(config.id);
        if cluster.keys.client(id) != Some(&secret.public()) {
            return Err(invalid(
                path,
                format!(
                    "client {} is not registered with this key in the cluster file",
                    config.id
                ),
            ));
        }
        Ok(ClientSettings {
            protocol: config.protocol,
            id,
            secret,
            cluster,
            timeout: std::time::Duration::from_millis(config.timeout_ms.max(1)),
            enclaves_file: config.enclaves_file.map(|f| relative_to(path, &f)),
            options: config.options,
        })
    }

    /// Renders the file as TOML.
    pub fn to_toml(&self) -> String {
        format!(
            "# Diffuse client configuration: `diffuse client --config THIS_FILE ...`.\n{}",
            toml::to_string_pretty(self).expect("client configs are TOML-encodable")
        )
    }
}
