//! Cluster membership and key files.
//!
//! A cluster is a list of replicas `0..n` and of registered clients, each with an
//! Ed25519 public key. Both files are TOML and untrusted input: parsing checks every
//! key, every id and every count, and returns a [`ConfigError`] naming the problem.

use crate::crypto::{PublicKey, SecretKey};
use crate::ids::{ClientId, MAX_REPLICAS, ReplicaId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// The largest config or key file read, in bytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
/// The most clients a cluster may register.
pub const MAX_REGISTERED_CLIENTS: usize = 100_000;

/// What is wrong with a config or key file.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("file of {0} bytes exceeds the {MAX_CONFIG_BYTES}-byte limit")]
    TooLarge(usize),
    /// The file is not valid TOML of the expected shape.
    #[error("{0}")]
    Syntax(String),
    /// A key is not valid hex of a valid Ed25519 key.
    #[error("invalid key for {0}")]
    InvalidKey(String),
    /// Replica ids must be exactly `0..n`.
    #[error("replica ids must be 0..n without gaps or repeats; found {0:?}")]
    ReplicaIds(Vec<u16>),
    /// A client id appears twice.
    #[error("client {0} is listed twice")]
    DuplicateClient(u32),
    /// A key is listed for two replicas, or for a replica and a client. (Clients
    /// may share a key: they are then one principal, see `docs/runtime.md`.)
    #[error("{0} has the key of replica {1}; every replica needs a key of its own")]
    SharedReplicaKey(String, u32),
    /// Too many or too few members.
    #[error("{0}")]
    Size(String),
    /// A key file's secret and public keys do not match.
    #[error("the secret key does not match the public key")]
    KeyMismatch,
}

/// The public keys of every member of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterKeys {
    replicas: Vec<PublicKey>,
    clients: BTreeMap<ClientId, PublicKey>,
}

impl ClusterKeys {
    /// Builds the key set; replica `i` has key `replicas[i]`.
    pub fn new(
        replicas: Vec<PublicKey>,
        clients: BTreeMap<ClientId, PublicKey>,
    ) -> Result<Self, ConfigError> {
        if replicas.is_empty() || replicas.len() > MAX_REPLICAS {
            return Err(ConfigError::Size(format!(
                "a cluster needs 1..={MAX_REPLICAS} replicas, not {}",
                replicas.len()
            )));
        }
        if clients.len() > MAX_REGISTERED_CLIENTS {
            return Err(ConfigError::Size(format!(
                "at most {MAX_REGISTERED_CLIENTS} clients, not {}",
                clients.len()
            )));
        }
        Ok(Self { replicas, clients })
    }

    /// Number of replicas.
    pub fn n(&self) -> usize {
        self.replicas.len()
    }

    /// The key of replica `id`, if it is a member.
    pub fn replica(&self, id: ReplicaId) -> Option<&PublicKey> {
        self.replicas.get(id.index())
    }

    /// The key of client `id`, if registered.
    pub fn client(&self, id: ClientId) -> Option<&PublicKey> {
        self.clients.get(&id)
    }

    /// The registered clients.
    pub fn clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.clients.keys().copied()
    }
}

/// A replica or client entry of a cluster file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    /// The member's id.
    pub id: u32,
    /// Hex Ed25519 public key.
    pub public_key: String,
    /// Network address (`host:port`), used by the node runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// The cluster file: who the replicas and clients are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Replicas, ids `0..n`.
    pub replicas: Vec<MemberEntry>,
    /// Registered clients.
    #[serde(default)]
    pub clients: Vec<MemberEntry>,
}

impl ClusterFile {
    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(text.len()));
        }
        let file: ClusterFile =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        file.keys()?;
        Ok(file)
    }

    /// The validated key set.
    pub fn keys(&self) -> Result<ClusterKeys, ConfigError> {
        let mut ids: Vec<u32> = self.replicas.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        if ids.iter().enumerate().any(|(i, id)| *id as usize != i) {
            return Err(ConfigError::ReplicaIds(
                self.replicas
                    .iter()
                    .map(|r| r.id.min(u32::from(u16::MAX)) as u16)
                    .collect(),
            ));
        }
        let mut replicas = vec![None; self.replicas.len()];
        for entry in &self.replicas {
            let key = PublicKey::from_hex(&entry.public_key)
                .map_err(|_| ConfigError::InvalidKey(format!("replica {}", entry.id)))?;
            replicas[entry.id as usize] = Some(key);
        }
        let replica_with = |key: &PublicKey, except: Option<usize>| {
            (0..replicas.len())
                .find(|&i| Some(i) != except && replicas[i].as_ref() == Some(key))
                .map(|i| i as u32)
        };
        for (i, key) in replicas.iter().enumerate() {
            if let Some(key) = key
                && let Some(other) = replica_with(key, Some(i))
            {
                return Err(ConfigError::SharedReplicaKey(format!("replica {i}"), other));
            }
        }
        let mut clients = BTreeMap::new();
        for entry in &self.clients {
            let key = PublicKey::from_hex(&entry.public_key)
                .map_err(|_| ConfigError::InvalidKey(format!("client {}", entry.id)))?;
            if let Some(replica) = replica_with(&key, None) {
                return Err(ConfigError::SharedReplicaKey(
                    format!("client {}", entry.id),
                    replica,
                ));
            }
            if clients.insert(ClientId(entry.id), key).is_some() {
                return Err(ConfigError::DuplicateClient(entry.id));
            }
        }
        ClusterKeys::new(replicas.into_iter().flatten().collect(), clients)
    }

    /// Renders the file as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("cluster files are TOML-encodable")
    }
}

/// Which kind of member a key file belongs to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A replica.
    Replica,
    /// A client.
    Client,
}

/// A member's secret key file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Replica or client.
    pub role: Role,
    /// The member's id.
    pub id: u32,
    /// Hex seed of the Ed25519 signing key. Keep this file private.
    pub secret_key: String,
    /// Hex public key, for copying into the cluster file.
    pub public_key: String,
}

impl KeyFile {
    /// A key file for `key`.
    pub fn new(role: Role, id: u32, key: &SecretKey) -> Self {
        Self {
            role,
            id,
            secret_key: key.to_hex(),
            public_key: key.public().to_hex(),
        }
    }

    /// Parses TOML text and checks that the keys match.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(text.len()));
        }
        let file: KeyFile = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        file.secret()?;
        Ok(file)
    }

    /// The signing key, checked against the public key.
    pub fn secret(&self) -> Result<SecretKey, ConfigError> {
        let secret = SecretKey::from_hex(&self.secret_key)
            .map_err(|_| ConfigError::InvalidKey("secret_key".into()))?;
        let public = PublicKey::from_hex(&self.public_key)
            .map_err(|_| ConfigError::InvalidKey("public_key".into()))?;
        if secret.public() != public {
            return Err(ConfigError::KeyMismatch);
        }
        Ok(secret)
    }

    /// Renders the file as TOML with a warning comment.
    pub fn to_toml(&self) -> String {
        format!(
            "# Diffuse key file. The secret key below must stay private.\n{}",
            toml::to_string_pretty(self).expect("key files are TOML-encodable")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed([i; 32])
    }

    fn cluster(n: u8) -> ClusterFile {
        ClusterFile {
            replicas: (0..n)
                .map(|i| MemberEntry {
                    id: u32::from(i),
                    public_key: key(i).public().to_hex(),
                    address: None,
                })
                .collect(),
            clients: vec![MemberEntry {
                id: 7,
                public_key: key(100).public().to_hex(),
                address: None,
            }],
        }
    }

    #[test]
    fn cluster_file_round_trips() {
        let file = cluster(4);
        let parsed = ClusterFile::parse(&file.to_toml()).unwrap();
        assert_eq!(parsed, file);
        let keys = parsed.keys().unwrap();
        assert_eq!(keys.n(), 4);
        assert_eq!(keys.client(ClientId(7)), Some(&key(100).public()));
        assert_eq!(keys.replica(ReplicaId(4)), None);
    }

    #[test]
    fn rejects_gaps_bad_keys_and_garbage() {
        let mut gap = cluster(4);
        gap.replicas[3].id = 9;
        assert!(matches!(
            ClusterFile::parse(&gap.to_toml()),
            Err(ConfigError::ReplicaIds(_))
        ));
        let mut bad = cluster(4);
        bad.replicas[1].public_key = "00".into();
        assert!(matches!(
            ClusterFile::parse(&bad.to_toml()),
            Err(ConfigError::InvalidKey(_))
        ));
        assert!(matches!(
            ClusterFile::parse("replicas = 3"),
            Err(ConfigError::Syntax(_))
        ));
        assert!(matches!(
            ClusterFile::parse("replicas = []"),
            Err(ConfigError::Size(_))
        ));
    }

    #[test]
    fn clients_may_share_a_key_but_not_with_a_replica() {
        let mut shared = cluster(4);
        shared.clients.push(MemberEntry {
            id: 8,
            public_key: key(100).public().to_hex(),
            address: None,
        });
        let keys = shared.keys().unwrap();
        assert_eq!(keys.client(ClientId(7)), keys.client(ClientId(8)));
        let mut client_as_replica = cluster(4);
        client_as_replica.clients[0].public_key = key(2).public().to_hex();
        assert!(matches!(
            client_as_replica.keys(),
            Err(ConfigError::SharedReplicaKey(_, 2))
        ));
        let mut two_replicas = cluster(4);
        two_replicas.replicas[3].public_key = key(1).public().to_hex();
        assert!(matches!(
            two_replicas.keys(),
            Err(ConfigError::SharedReplicaKey(_, 1 | 3))
        ));
    }

    #[test]
    fn key_file_checks_its_pair() {
        let file = KeyFile::new(Role::Replica, 2, &key(2));
        assert_eq!(KeyFile::parse(&file.to_toml()).unwrap(), file);
        let mut wrong = file.clone();
        wrong.public_key = key(3).public().to_hex();
        assert_eq!(
            KeyFile::parse(&wrong.to_toml()),
            Err(ConfigError::KeyMismatch)
        );
    }
}
