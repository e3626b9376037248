//! Writes a ready-to-run cluster directory: keys, the cluster file, and one
//! configuration per replica and per client.
//!
//! ```text
//! DIR/cluster.toml          members, public keys, replica addresses
//! DIR/replica-<i>.toml      `diffuse node --config DIR/replica-<i>.toml`
//! DIR/client-<j>.toml       `diffuse client --config DIR/client-<j>.toml ...`
//! DIR/keys/*.key            secret keys (mode 0600 on Unix)
//! DIR/data/replica-<i>/     each replica's database, created on first start
//! DIR/enclaves.toml         MinBFT, FastBFT: every replica's attested enclave
//! DIR/tee/replica-<i>/      MinBFT, FastBFT: replica i's counter store and sealed enclave
//! ```

use crate::config::{ClientConfig, NodeConfig};
use diffuse_core::config::{ClusterFile, KeyFile, MemberEntry, Role};
use diffuse_core::crypto::{PublicKey, SecretKey};
use diffuse_core::ids::ClientId;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// What to generate.
#[derive(Debug, Clone)]
pub struct TestnetSpec {
    /// The protocol the cluster runs.
    pub protocol: String,
    /// Number of replicas.
    pub n: usize,
    /// Number of client identities.
    pub clients: usize,
    /// Replica `i` listens on `replica_addresses[i]`.
    pub replica_addresses: Vec<SocketAddr>,
    /// Replica `i` serves metrics on `metrics_addresses[i]` (if given).
    pub metrics_addresses: Option<Vec<SocketAddr>>,
    /// Protocol options written into every replica and client configuration.
    pub options: toml::Table,
    /// Clients share keys in consecutive groups of this many (0 or 1: each has its
    /// own). One process can host a group on one connection per replica
    /// (`diffuse_node::client::ClientHost`).
    pub clients_per_key: usize,
}

impl TestnetSpec {
    /// Consecutive ports on one host: replicas from `port`, metrics from `metrics_port`.
    pub fn on_host(
        protocol: &str,
        n: usize,
        clients: usize,
        host: IpAddr,
        port: u16,
        metrics_port: Option<u16>,
    ) -> TestnetSpec {
        let at = |base: u16, i: usize| SocketAddr::new(host, base.saturating_add(i as u16));
        TestnetSpec {
            protocol: protocol.to_string(),
            n,
            clients,
            replica_addresses: (0..n).map(|i| at(port, i)).collect(),
            metrics_addresses: metrics_port.map(|base| (0..n).map(|i| at(base, i)).collect()),
            options: toml::Table::new(),
            clients_per_key: 1,
        }
    }
}

/// The files written.
#[derive(Debug, Clone)]
pub struct Testnet {
    /// The directory.
    pub dir: PathBuf,
    /// Replica configurations, by id.
    pub replicas: Vec<PathBuf>,
    /// Client configurations, by id.
    pub clients: Vec<PathBuf>,
    /// Clients share keys in consecutive groups of this many (see
    /// [`TestnetSpec::clients_per_key`]).
    pub clients_per_key: usize,
}

/// Where a replica's configuration lives in a testnet directory.
pub fn replica_config(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("replica-{id}.toml"))
}

/// Where a client's configuration lives in a testnet directory.
pub fn client_config(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("client-{id}.toml"))
}

fn fresh_key() -> std::io::Result<SecretKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(std::io::Error::other)?;
    Ok(SecretKey::from_seed(seed))
}

fn write_new(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
    })?;
    file.write_all(text.as_bytes())
}

/// Writes the testnet into `dir` (created if needed; existing files are never
/// overwritten).
pub fn write(dir: &Path, spec: &TestnetSpec) -> std::io::Result<Testnet> {
    if spec.n == 0 || spec.replica_addresses.len() != spec.n {
        return Err(std::io::Error::other("one address per replica is needed"));
    }
    let quorum = crate::protocols::quorum(&spec.protocol, spec.n).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir.join("keys"))?;
    let replica_keys: Vec<SecretKey> =
        (0..spec.n).map(|_| fresh_key()).collect::<Result<_, _>>()?;
    let per_key = spec.clients_per_key.max(1);
    let mut client_keys: Vec<SecretKey> = Vec::with_capacity(spec.clients);
    for i in 0..spec.clients {
        let key = match client_keys.last() {
            Some(last) if i % per_key != 0 => last.clone(),
            _ => fresh_key()?,
        };
        client_keys.push(key);
    }
    let cluster = ClusterFile {
        replicas: replica_keys
            .iter()
            .enumerate()
            .map(|(i, key)| MemberEntry {
                id: i as u32,
                public_key: key.public().to_hex(),
                address: Some(spec.replica_addresses[i].to_string()),
            })
            .collect(),
        clients: client_keys
            .iter()
            .enumerate()
            .map(|(i, key)| MemberEntry {
                id: i as u32,
                public_key: key.public().to_hex(),
                address: None,
            })
            .collect(),
    };
    write_new(&dir.join("cluster.toml"), &cluster.to_toml(), false)?;
    let hybrid = crate::protocols::is_hybrid(&spec.protocol);
    if hybrid {
        let clients: Vec<(ClientId, PublicKey)> = client_keys
            .iter()
            .enumerate()
            .map(|(i, key)| (ClientId(i as u32), key.public()))
            .collect();
        provision_enclaves(dir, spec, quorum.f(), &clients)?;
    }
    let mut testnet = Testnet {
        dir: dir.to_path_buf(),
        replicas: Vec::new(),
        clients: Vec::new(),
        clients_per_key: per_key,
    };
    for (i, key) in replica_keys.iter().enumerate() {
        let key_file = PathBuf::from(format!("keys/replica-{i}.key"));
        write_new(
            &dir.join(&key_file),
            &KeyFile::new(Role::Replica, i as u32, key).to_toml(),
            true,
        )?;
        let config = NodeConfig {
            protocol: spec.protocol.clone(),
            id: i as u32,
            listen: spec.replica_addresses[i],
            metrics: spec.metrics_addresses.as_ref().map(|m| m[i]),
            data_dir: PathBuf::from(format!("data/replica-{i}")),
            key_file,
            cluster_file: PathBuf::from("cluster.toml"),
            enclaves_file: hybrid.then(|| PathBuf::from("enclaves.toml")),
            tee_dir: hybrid.then(|| PathBuf::from(format!("tee/replica-{i}"))),
            options: spec.options.clone(),
            quick_repair: false,
        };
        let path = replica_config(dir, i);
        write_new(&path, &config.to_toml(), false)?;
        testnet.replicas.push(path);
    }
    for (i, key) in client_keys.iter().enumerate() {
        let key_file = PathBuf::from(format!("keys/client-{i}.key"));
        write_new(
            &dir.join(&key_file),
            &KeyFile::new(Role::Client, i as u32, key).to_toml(),
            true,
        )?;
        let config = ClientConfig {
            protocol: spec.protocol.clone(),
            id: i as u32,
            key_file,
            cluster_file: PathBuf::from("cluster.toml"),
            timeout_ms: 10_000,
            enclaves_file: (spec.protocol == "fastbft").then(|| PathBuf::from("enclaves.toml")),
            options: spec.options.clone(),
        };
        let path = client_config(dir, i);
        write_new(&path, &config.to_toml(), false)?;
        testnet.clients.push(path);
    }
    Ok(testnet)
}

/// Hybrid protocols: one enclave per replica in `DIR/tee/replica-<i>/`, attested in
/// `DIR/enclaves.toml`, configured with the slot rules of the cluster's options, a
/// reset threshold of `f + 1` and the keys of the cluster's `clients`.
fn provision_enclaves(
    dir: &Path,
    spec: &TestnetSpec,
    f: usize,
    clients: &[(ClientId, PublicKey)],
) -> std::io::Result<()> {
    let rules = crate::protocols::slot_rules(&spec.protocol, &spec.options)
        .map_err(std::io::Error::other)?;
    let stores: Vec<PathBuf> = (0..spec.n)
        .map(|i| crate::enclaves::store_dir(dir, i))
        .collect();
    if stores.iter().any(|s| s.exists()) {
        return Err(std::io::Error::other(format!(
            "{} exists: enclaves are never provisioned twice",
            dir.join("tee").display()
        )));
    }
    let file = crate::enclaves::provision(&stores, f + 1, rules, clients)
        .map_err(std::io::Error::other)?;
    let text = file.to_toml().map_err(std::io::Error::other)?;
    write_new(&dir.join("enclaves.toml"), &text, false)
}

/// Free TCP ports on `host` for a local cluster.
///
/// Ports handed out by the kernel for port 0 come from the ephemeral range, which
/// is also where every outgoing connection takes its source port: between this
/// call and the cluster's `bind`, a client connecting anywhere could take one.
/// So ports are drawn at random from below the ephemeral range (the kernel's
/// `ip_local_port_range`), each checked by binding it, and never handed out twice
/// by one process. Another process can still take a port in between; that is as
/// unlikely as two random draws meeting.
pub fn free_ports(host: IpAddr, count: usize) -> std::io::Result<Vec<u16>> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let (ephemeral_low, _) = ephemeral_range();
    let low: u16 = 10_000;
    let high: u16 = ephemeral_low.max(low + 1_000);
    let mut handed = HANDED_OUT
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let mut listeners = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    let mut attempts = 0usize;
    while ports.len() < count {
        attempts += 1;
        if attempts > 100 * count + 1_000 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("no {count} free ports found on {host} in {low}..{high}"),
            ));
        }
        let mut draw = [0u8; 2];
        getrandom::fill(&mut draw).map_err(std::io::Error::other)?;
        let port = low + u16::from_le_bytes(draw) % (high - low);
        if handed.contains(&port) || ports.contains(&port) {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(SocketAddr::new(host, port)) {
            listeners.push(listener);
            ports.push(port);
        }
    }
    handed.extend(ports.iter().copied());
    Ok(ports)
}

/// The kernel's ephemeral port range (Linux: `ip_local_port_range`), or the
/// IANA range where it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((49_152, 65_535))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, NodeConfig};

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let host = [127, 0, 0, 1].into();
        let first = free_ports(host, 50).unwrap();
        let second = free_ports(host, 50).unwrap();
        let (ephemeral_low, _) = ephemeral_range();
        let all: std::collections::HashSet<u16> = first.iter().chain(&second).copied().collect();
        assert_eq!(all.len(), 100, "no port is handed out twice");
        assert!(
            all.iter()
                .all(|&p| p >= 10_000 && p < ephemeral_low.max(11_000))
        );
    }

    #[test]
    fn clients_share_keys_in_groups() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = TestnetSpec::on_host("pbft", 4, 5, [127, 0, 0, 1].into(), 7100, None);
        spec.clients_per_key = 2;
        let testnet = write(dir.path(), &spec).unwrap();
        let keys: Vec<_> = testnet
            .clients
            .iter()
            .map(|path| ClientConfig::load(path).unwrap().secret.public())
            .collect();
        assert_eq!(keys[0], keys[1]);
        assert_eq!(keys[2], keys[3]);
        assert_ne!(keys[1], keys[2]);
        assert_ne!(keys[3], keys[4]);
    }

    #[test]
    fn every_written_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TestnetSpec::on_host("pbft", 4, 3, [127, 0, 0, 1].into(), 7100, Some(9100));
        let testnet = write(dir.path(), &spec).unwrap();
        for (i, path) in testnet.replicas.iter().enumerate() {
            let settings = NodeConfig::load(path).unwrap();
            assert_eq!(settings.id.index(), i);
            assert_eq!(settings.cluster.n(), 4);
            assert_eq!(settings.listen.port(), 7100 + i as u16);
        }
        for path in &testnet.clients {
            ClientConfig::load(path).unwrap();
        }
        assert!(
            write(dir.path(), &spec).is_err(),
            "existing files are never overwritten"
        );
    }

    #[test]
    fn hybrid_testnets_provision_attested_enclaves() {
        for protocol in ["minbft", "fastbft"] {
            let dir = tempfile::tempdir().unwrap();
            let spec = TestnetSpec::on_host(protocol, 3, 1, [127, 0, 0, 1].into(), 7100, None);
            let testnet = write(dir.path(), &spec).unwrap();
            for (i, path) in testnet.replicas.iter().enumerate() {
                let settings = NodeConfig::load(path).unwrap();
                let keys = crate::enclaves::EnclavesFile::load_keys(
                    settings.enclaves_file.as_ref().unwrap(),
                    3,
                )
                .unwrap();
                assert_eq!(keys.len(), 3);
                assert!(
                    settings
                        .tee_dir
                        .unwrap()
                        .ends_with(format!("tee/replica-{i}"))
                );
            }
            // FastBFT clients check the primary enclave's certificates.
            let client = ClientConfig::load(&testnet.clients[0]).unwrap();
            assert_eq!(client.enclaves_file.is_some(), protocol == "fastbft");
            let even = TestnetSpec::on_host(protocol, 4, 1, [127, 0, 0, 1].into(), 7100, None);
            let other = tempfile::tempdir().unwrap();
            assert!(
                write(other.path(), &even).is_err(),
                "{protocol} needs n = 2f + 1"
            );
            assert!(
                std::fs::read_dir(other.path()).unwrap().next().is_none(),
                "nothing is written for a cluster size the protocol refuses"
            );
        }
    }

    #[test]
    fn a_key_of_another_member_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TestnetSpec::on_host("pbft", 4, 1, [127, 0, 0, 1].into(), 7100, None);
        let testnet = write(dir.path(), &spec).unwrap();
        let text = std::fs::read_to_string(&testnet.replicas[0])
            .unwrap()
            .replace("keys/replica-0.key", "keys/replica-1.key");
        std::fs::write(&testnet.replicas[0], text).unwrap();
        let error = NodeConfig::load(&testnet.replicas[0]).unwrap_err();
        assert!(error.to_string().contains("for Replica 1"), "{error}");
    }
}
