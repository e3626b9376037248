//! The enclaves of a hybrid (MinBFT) cluster on real machines: provisioning by
//! `diffuse testnet`, the attested enclave list every replica checks, and booting a
//! replica's enclave from its counter store.
//!
//! ```text
//! DIR/enclaves.toml            every replica's platform key and attestation quote
//! DIR/tee/replica-<i>/         replica i's counter store (see `tee`) and `sealed`,
//!                              its enclave's sealed state
//! ```
//!
//! A quote binds the enclave key to the software enclave's measurement and to the
//! replica id; a replica trusts an enclave key only through a quote signed by the
//! platform key listed for that replica (the operator's trust decision, like the
//! public keys in `cluster.toml`).

use crate::memo::Memo;
use crate::tee::{CounterStoreError, FilePlatform};
use diffuse_core::codec;
use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_core::ids::{ClientId, ReplicaId};
use diffuse_minbft::tee_host::{Booted, EnclaveProvider};
use diffuse_tee::{
    MAX_SEALED_BYTES, Measurement, Quote, SealedState, SlotRules, SoftwareEnclave, TeeError,
    TrustedComponent, verify_quote,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest enclaves file read.
const MAX_ENCLAVES_FILE_BYTES: u64 = 1 << 20;

/// The file name of a sealed enclave state in its counter store directory.
const SEALED_FILE: &str = "sealed";

/// What a quote's caller data binds: the replica the enclave belongs to.
fn caller_data(id: ReplicaId) -> Digest {
    Digest::of("diffuse/minbft/enclave-of-replica", &id.0.to_be_bytes())
}

/// `enclaves.toml`: one entry per replica, by id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnclavesFile {
    /// The replicas' enclaves, in id order.
    pub enclave: Vec<EnclaveEntry>,
}

/// One replica's enclave.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnclaveEntry {
    /// The replica id.
    pub id: u32,
    /// The platform (attestation) key trusted for this replica, hex.
    pub platform_key: String,
    /// The enclave's attestation quote, hex of its canonical encoding.
    pub quote: String,
}

/// Why the enclaves cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EnclaveSetupError {
    /// A file cannot be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The enclaves file is malformed or does not check out.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The counter store.
    #[error(transparent)]
    CounterStore(#[from] CounterStoreError),
    /// The enclave refused.
    #[error("enclave: {0}")]
    Tee(#[from] TeeError),
}

fn invalid(path: &Path, why: impl ToString) -> EnclaveSetupError {
    EnclaveSetupError::Invalid {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Where replica `id`'s counter store lives in a testnet directory.
pub fn store_dir(dir: &Path, id: usize) -> PathBuf {
    dir.join("tee").join(format!("replica-{id}"))
}

/// Creates one enclave per counter store in `stores` (by replica id), configures
/// each with every enclave key, `reset_threshold`, `rules` and the registered
/// `clients`' keys (a FastBFT primary's enclave verifies every request against
/// them; the cluster's clients are fixed here, like its replicas), seals each with
/// a scheduled shutdown, and returns the enclaves file that attests them.
pub fn provision(
    stores: &[PathBuf],
    reset_threshold: usize,
    rules: SlotRules,
    clients: &[(ClientId, PublicKey)],
) -> Result<EnclavesFile, EnclaveSetupError> {
    let mut platforms = Vec::new();
    let mut enclaves = Vec::new();
    for dir in stores {
        let platform = Arc::new(FilePlatform::open(dir)?);
        enclaves.push(SoftwareEnclave::create(platform.clone()));
        platforms.push(platform);
    }
    let keys: Vec<PublicKey> = enclaves.iter().map(|e| e.public_key()).collect();
    let mut entries = Vec::new();
    for (i, (mut enclave, dir)) in enclaves.into_iter().zip(stores).enumerate() {
        let id = ReplicaId(i as u16);
        let quote = enclave.attest(caller_data(id));
        enclave.configure(keys.clone(), reset_threshold)?;
        enclave.configure_slots(rules)?;
        enclave.configure_clients(clients.to_vec())?;
        let sealed = enclave.shutdown();
        crate::tee::write_durably(&dir.join(SEALED_FILE), &sealed.0, true)?;
        entries.push(EnclaveEntry {
            id: i as u32,
            platform_key: quote.platform.to_hex(),
            quote: hex::encode(codec::encode_payload(&quote)),
        });
    }
    Ok(EnclavesFile { enclave: entries })
}

impl EnclavesFile {
    /// The TOML text.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Reads `path` and checks every quote: the enclave keys to trust, by replica.
    /// (Checked once per process for the same contents: see `memo.rs`.)
    pub fn load_keys(path: &Path, n: usize) -> Result<Vec<PublicKey>, EnclaveSetupError> {
        let text =
            crate::config::read_capped_to(path, MAX_ENCLAVES_FILE_BYTES).map_err(|error| {
                EnclaveSetupError::Io {
                    path: path.to_path_buf(),
                    error,
                }
            })?;
        let mut input = (n as u64).to_le_bytes().to_vec();
        input.extend_from_slice(text.as_bytes());
        CHECKED.get_or_check(&input, || Self::check_keys(path, &text, n))
    }

    /// Parses `text` (read from `path`) and checks every quote.
    fn check_keys(path: &Path, text: &str, n: usize) -> Result<Vec<PublicKey>, EnclaveSetupError> {
        let file: EnclavesFile = toml::from_str(text).map_err(|e| invalid(path, e))?;
        if file.enclave.len() != n {
            return Err(invalid(path, format!("{n} enclaves expected")));
        }
        let measurement = Measurement::software_enclave_v1();
        let mut keys = Vec::new();
        for (i, entry) in file.enclave.iter().enumerate() {
            if entry.id as usize != i {
                return Err(invalid(path, "enclaves must be listed in id order"));
            }
            let platform = PublicKey::from_hex(&entry.platform_key)
                .map_err(|_| invalid(path, format!("enclave {i}: bad platform key")))?;
            let bytes = hex::decode(entry.quote.trim())
                .map_err(|_| invalid(path, format!("enclave {i}: quote is not hex")))?;
            let quote: Quote = codec::decode_payload(&bytes)
                .map_err(|_| invalid(path, format!("enclave {i}: quote does not parse")))?;
            let key = verify_quote(
                &quote,
                &[platform],
                &measurement,
                &caller_data(ReplicaId(i as u16)),
            )
            .map_err(|e| invalid(path, format!("enclave {i}: {e}")))?;
            keys.push(key);
        }
        Ok(keys)
    }
}

/// The enclave lists this process checked already.
static CHECKED: Memo<Vec<PublicKey>> = Memo::new("diffuse-enclaves-file");

/// A replica's enclave on this machine: its counter store and sealed state, and
/// every replica's attested enclave key.
pub struct DiskEnclave {
    id: ReplicaId,
    store: PathBuf,
    enclave_keys: Vec<PublicKey>,
}

impl DiskEnclave {
    /// Replica `id`'s enclave in counter store `store`.
    pub fn new(id: ReplicaId, store: PathBuf, enclave_keys: Vec<PublicKey>) -> DiskEnclave {
        DiskEnclave {
            id,
            store,
            enclave_keys,
        }
    }
}

impl EnclaveProvider for DiskEnclave {
    /// Resumes the enclave from the sealed state. Each resume spends it (the
    /// platform counter moves on), so a restart after a crash, or of a copied
    /// state, comes up locked and REJOINs.
    fn boot(&self) -> Result<Booted, TeeError> {
        let unavailable = |_| TeeError::Configuration("the enclave's store cannot be read");
        let platform = Arc::new(FilePlatform::open(&self.store).map_err(unavailable)?);
        let path = self.store.join(SEALED_FILE);
        let bytes = crate::config::read_capped_bytes(&path, MAX_SEALED_BYTES as u64)
            .map_err(|_| TeeError::BadSealedState)?;
        let blob = codec::Blob::try_from_vec(bytes).map_err(|_| TeeError::BadSealedState)?;
        let enclave = SoftwareEnclave::resume(platform, &SealedState(blob))?;
        if self.enclave_keys.get(self.id.index()) != Some(&enclave.public_key()) {
            return Err(TeeError::Configuration(
                "this enclave is not the one enclaves.toml attests for this replica",
            ));
        }
        if enclave.is_locked() {
            tracing::warn!(
                replica = self.id.0,
                "the enclave's sealed state is stale (no scheduled shutdown since it last \
                 started): it certifies nothing until f + 1 peers' reports reset it (REJOIN)"
            );
        } else {
            tracing::info!(
                replica = self.id.0,
                "the enclave resumed from its sealed state"
            );
        }
        Ok(Booted {
            enclave,
            enclave_keys: self.enclave_keys.clone(),
        })
    }

    /// Replaces the sealed state on disk (written to a temporary file, fsynced and
    /// renamed, so a crash leaves the old or the new state, never half of one).
    fn store_sealed(&self, sealed: SealedState) -> Result<(), TeeError> {
        crate::tee::write_durably(&self.store.join(SEALED_FILE), &sealed.0, true)
            .map_err(|e| TeeError::HostStorage(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisioned_enclaves_attest_and_resume_unlocked_only_after_sealing() {
        let dir = tempfile::tempdir().unwrap();
        let stores: Vec<PathBuf> = (0..3).map(|i| store_dir(dir.path(), i)).collect();
        let rules = SlotRules {
            checkpoint_interval: 4,
            window: 8,
        };
        let file = provision(&stores, 2, rules, &[]).unwrap();
        let path = dir.path().join("enclaves.toml");
        std::fs::write(&path, file.to_toml().unwrap()).unwrap();
        let keys = EnclavesFile::load_keys(&path, 3).unwrap();
        let provider = DiskEnclave::new(ReplicaId(1), stores[1].clone(), keys.clone());
        let booted = provider.boot().unwrap();
        assert!(!booted.enclave.is_locked(), "first boot after provisioning");
        assert_eq!(booted.enclave.public_key(), keys[1]);
        provider.store_sealed(booted.enclave.shutdown()).unwrap();
        let resumed = provider.boot().unwrap();
        assert!(
            !resumed.enclave.is_locked(),
            "a scheduled shutdown's sealed state resumes unlocked"
        );
        drop(resumed);
        let again = provider.boot().unwrap();
        assert!(
            again.enclave.is_locked(),
            "a restart without sealing REJOINs"
        );
        let wrong = DiskEnclave::new(ReplicaId(0), stores[1].clone(), keys);
        assert!(
            wrong.boot().is_err(),
            "another replica's enclave is refused"
        );
    }

    #[test]
    fn a_tampered_quote_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stores: Vec<PathBuf> = (0..3).map(|i| store_dir(dir.path(), i)).collect();
        let rules = SlotRules {
            checkpoint_interval: 4,
            window: 8,
        };
        let mut file = provision(&stores, 2, rules, &[]).unwrap();
        file.enclave.swap(0, 1);
        file.enclave[0].id = 0;
        file.enclave[1].id = 1;
        let path = dir.path().join("enclaves.toml");
        std::fs::write(&path, file.to_toml().unwrap()).unwrap();
        let error = EnclavesFile::load_keys(&path, 3).unwrap_err();
        assert!(error.to_string().contains("enclave 0"), "{error}");
    }
}
