//! Where a MinBFT replica gets its enclave from: the machine around the replica.
//!
//! The enclave lives in the replica's process, but its platform (monotonic counter,
//! sealing key) and its sealed state on disk outlive a crash of that process. A
//! [`TeeHost`] models that machine: the simulator uses [`TeeHost::simulated`], which
//! creates one platform and enclave per replica on first use and keeps them across
//! the replica's crashes, where the replica's own code cannot rewrite them.
//!
//! The replica reaches its enclave through an [`EnclaveHandle`], as a process calls
//! into a real enclave: the enclave belongs to the machine, and the host can call it
//! too. A Byzantine host does ([`TeeHost::call_live_enclave`]): it can ask for more
//! certificates than the protocol sends, but never for two with one counter value.

use diffuse_core::crypto::PublicKey;
use diffuse_core::ids::{ClientId, ReplicaId};
use diffuse_tee::{
    Platform, SealedState, SlotRules, SoftwareEnclave, SoftwarePlatform, TeeError, TrustedComponent,
};
use std::collections::BTreeMap;
use std::sync::MutexGuard;
use std::sync::{Arc, Mutex};

/// Every registered client's key, as [`TeeHost::boot`] configures the enclaves
/// with them.
pub fn client_keys(keys: &diffuse_core::config::ClusterKeys) -> Vec<(ClientId, PublicKey)> {
    keys.clients()
        .filter_map(|c| keys.client(c).map(|key| (c, *key)))
        .collect()
}

/// One replica's machine: its platform and the sealed state on its disk.
struct Machine {
    platform: Arc<dyn Platform>,
    /// The state sealed at the last scheduled shutdown.
    sealed: SealedState,
    /// The first state ever sealed, which a Byzantine host keeps to roll back to.
    first_sealed: SealedState,
    /// The enclave running now, between a boot and the next shutdown or crash.
    live: Option<EnclaveHandle>,
}

/// A running enclave, shared by the replica and the machine hosting it. Each
/// [`EnclaveHandle::call`] is one entry into the enclave (an ECALL on real
/// hardware); the enclave's own checks decide what it certifies, whoever calls.
#[derive(Clone)]
pub struct EnclaveHandle(Arc<Mutex<SoftwareEnclave>>);

impl EnclaveHandle {
    fn new(enclave: SoftwareEnclave) -> EnclaveHandle {
        EnclaveHandle(Arc::new(Mutex::new(enclave)))
    }

    fn lock(&self) -> MutexGuard<'_, SoftwareEnclave> {
        // The enclave's state is consistent after every call, so a caller that
        // panicked mid-call on another thread leaves nothing half-done behind.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `call` inside the enclave.
    pub fn call<R>(&self, call: impl FnOnce(&mut SoftwareEnclave) -> R) -> R {
        call(&mut self.lock())
    }

    /// Whether `self` and `other` reach the same enclave.
    pub fn same_as(&self, other: &EnclaveHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for EnclaveHandle {
    /// Does not enter the enclave: formatting inside a `call` must not deadlock.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnclaveHandle").finish_non_exhaustive()
    }
}

struct Cluster {
    machines: BTreeMap<ReplicaId, Machine>,
    /// Every replica's enclave key, as an attested cluster config would list them.
    enclave_keys: Vec<PublicKey>,
}

/// The machines of a cluster's replicas, shared by every replica built with the same
/// options (cloning shares it).
#[derive(Clone)]
pub struct TeeHost {
    seed: [u8; 32],
    cluster: Arc<Mutex<Option<Cluster>>>,
    /// Off only for the `enclave-without-rollback-protection` mutant.
    rollback_protection: bool,
    /// Off only for the `enclave-skips-request-signatures` mutant (FastBFT).
    request_signatures: bool,
    /// A real machine's enclave (the runtime's), used instead of simulated ones.
    provider: Option<Arc<dyn EnclaveProvider>>,
    /// A client's view on a real machine: the attested enclave keys only.
    attested: Option<Arc<[PublicKey]>>,
}

/// Where a replica's enclave comes from on a real machine: the runtime implements
/// it over its counter store and sealed-state file (`diffuse-node`'s `tee`), so
/// that this crate stays free of I/O.
pub trait EnclaveProvider: Send + Sync {
    /// Resumes the replica's enclave from its sealed state (locked if that state
    /// is stale), with every replica's attested enclave key.
    fn boot(&self) -> Result<Booted, TeeError>;

    /// Stores the state the enclave sealed at a scheduled shutdown, durably, where
    /// the next [`EnclaveProvider::boot`] reads it.
    fn store_sealed(&self, sealed: SealedState) -> Result<(), TeeError>;
}

impl std::fmt::Debug for TeeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeHost").finish_non_exhaustive()
    }
}

/// What a replica gets at boot.
pub struct Booted<E = SoftwareEnclave> {
    /// Its enclave: unlocked after a scheduled shutdown or on first boot, locked after
    /// an unscheduled reboot.
    pub enclave: E,
    /// Every replica's enclave key, by replica index.
    pub enclave_keys: Vec<PublicKey>,
}

impl TeeHost {
    /// Simulated machines whose platforms derive from `seed`.
    pub fn simulated(seed: [u8; 32]) -> TeeHost {
        TeeHost {
            seed,
            cluster: Arc::new(Mutex::new(None)),
            rollback_protection: true,
            request_signatures: true,
            provider: None,
            attested: None,
        }
    }

    /// A real machine: the replica's enclave comes from `provider`.
    pub fn provided(provider: Arc<dyn EnclaveProvider>) -> TeeHost {
        TeeHost {
            provider: Some(provider),
            ..TeeHost::simulated([0; 32])
        }
    }

    /// A client on a real machine: it runs no enclave and knows every replica's
    /// enclave key from the attested enclave list (`enclaves.toml`).
    pub fn attested(enclave_keys: Vec<PublicKey>) -> TeeHost {
        TeeHost {
            attested: Some(enclave_keys.into()),
            ..TeeHost::simulated([0; 32])
        }
    }

    /// The same machines with enclaves that accept a stale sealed state (the
    /// `enclave-without-rollback-protection` mutant): a rollback then lets a host
    /// certify two messages under one counter value, which the checkers must catch.
    pub fn without_rollback_protection(mut self) -> TeeHost {
        self.rollback_protection = false;
        self
    }

    /// The same machines with enclaves that certify a FastBFT batch without
    /// verifying its requests' signatures (the `enclave-skips-request-signatures`
    /// mutant): a host can then have a request no client sent ordered, which the
    /// checkers must catch.
    pub fn without_request_signatures(mut self) -> TeeHost {
        self.request_signatures = false;
        self
    }

    fn resume(
        &self,
        platform: Arc<dyn Platform>,
        sealed: &SealedState,
    ) -> Result<SoftwareEnclave, TeeError> {
        let mut enclave = if self.rollback_protection {
            SoftwareEnclave::resume(platform, sealed)?
        } else {
            SoftwareEnclave::resume_without_rollback_protection(platform, sealed)?
        };
        if !self.request_signatures {
            enclave.skip_request_signatures_for_tests();
        }
        Ok(enclave)
    }

    /// The rollback attack, as a Byzantine host runs it: a second copy of `id`'s
    /// enclave started from the oldest sealed state the host kept. A protected
    /// enclave comes up locked (the platform counter moved on) and certifies nothing.
    pub fn roll_back(&self, id: ReplicaId) -> Result<SoftwareEnclave, TeeError> {
        let guard = self.machines();
        let machine = guard
            .as_ref()
            .and_then(|c| c.machines.get(&id))
            .ok_or(TeeError::Configuration("no machine for this replica"))?;
        self.resume(machine.platform.clone(), &machine.first_sealed)
    }

    /// Runs `call` on the enclave replica `id` runs now, as its host can: `None`
    /// if it runs none (crashed, shut down, or on a real machine, where no other
    /// code shares the process).
    pub fn call_live_enclave<R>(
        &self,
        id: ReplicaId,
        call: impl FnOnce(&mut SoftwareEnclave) -> R,
    ) -> Option<R> {
        let live = self
            .machines()
            .as_ref()
            .and_then(|c| c.machines.get(&id))
            .and_then(|m| m.live.clone())?;
        Some(live.call(call))
    }

    /// Every replica's enclave key: the attested ones given to
    /// [`TeeHost::attested`], else the simulated cluster's once its first replica
    /// has booted; `None` before, and for a replica on a real machine (which gets
    /// them at boot).
    pub fn enclave_keys(&self) -> Option<Vec<PublicKey>> {
        if let Some(keys) = &self.attested {
            return Some(keys.to_vec());
        }
        self.machines().as_ref().map(|c| c.enclave_keys.clone())
    }

    /// Replica `id`'s enclave key (see [`TeeHost::enclave_keys`]).
    pub fn enclave_key(&self, id: ReplicaId) -> Option<PublicKey> {
        if let Some(keys) = &self.attested {
            return keys.get(id.index()).copied();
        }
        self.machines()
            .as_ref()
            .and_then(|c| c.enclave_keys.get(id.index()).copied())
    }

    fn machines(&self) -> MutexGuard<'_, Option<Cluster>> {
        self.cluster
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Boots replica `id` of `n`: on the first boot of the cluster, creates every
    /// machine and enclave (as `diffuse testnet` does before any replica starts),
    /// configures each with its peers, `reset_threshold`, `rules` and the
    /// registered `clients`' keys, and seals it with a scheduled shutdown. Then
    /// resumes `id`'s enclave from its sealed state. A boot replaces the enclave
    /// the replica ran before (a crash abandons it).
    pub fn boot(
        &self,
        id: ReplicaId,
        n: usize,
        reset_threshold: usize,
        rules: SlotRules,
        clients: &[(ClientId, PublicKey)],
    ) -> Result<Booted<EnclaveHandle>, TeeError> {
        if let Some(provider) = &self.provider {
            let booted = provider.boot()?;
            return Ok(Booted {
                enclave: EnclaveHandle::new(booted.enclave),
                enclave_keys: booted.enclave_keys,
            });
        }
        let mut guard = self.machines();
        if guard.is_none() {
            *guard = Some(self.create_cluster(n, reset_threshold, rules, clients)?);
        }
        let cluster = guard.as_mut().expect("created above");
        let machine = cluster
            .machines
            .get_mut(&id)
            .ok_or(TeeError::Configuration("no machine for this replica"))?;
        let enclave = EnclaveHandle::new(self.resume(machine.platform.clone(), &machine.sealed)?);
        machine.live = Some(enclave.clone());
        Ok(Booted {
            enclave,
            enclave_keys: cluster.enclave_keys.clone(),
        })
    }

    /// A scheduled shutdown of `id`'s enclave: the enclave seals its state, which
    /// replaces the old sealed state, and stops. Whoever still holds a handle to it
    /// afterwards finds it locked.
    pub fn shutdown(&self, id: ReplicaId, enclave: EnclaveHandle) -> Result<(), TeeError> {
        let sealed = enclave.call(SoftwareEnclave::seal_and_stop);
        if let Some(provider) = &self.provider {
            return provider.store_sealed(sealed);
        }
        let mut guard = self.machines();
        let machine = guard
            .as_mut()
            .and_then(|c| c.machines.get_mut(&id))
            .ok_or(TeeError::Configuration("no machine for this replica"))?;
        if machine.live.as_ref().is_some_and(|l| l.same_as(&enclave)) {
            machine.live = None;
        }
        machine.sealed = sealed;
        Ok(())
    }

    fn create_cluster(
        &self,
        n: usize,
        reset_threshold: usize,
        rules: SlotRules,
        clients: &[(ClientId, PublicKey)],
    ) -> Result<Cluster, TeeError> {
        let platforms: Vec<Arc<dyn Platform>> = (0..n)
            .map(|i| {
                let mut seed = self.seed;
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                Arc::new(SoftwarePlatform::new(seed)) as Arc<dyn Platform>
            })
            .collect();
        let mut enclaves: Vec<SoftwareEnclave> = platforms
            .iter()
            .map(|p| SoftwareEnclave::create(p.clone()))
            .collect();
        let enclave_keys: Vec<PublicKey> = enclaves.iter().map(|e| e.public_key()).collect();
        let mut machines = BTreeMap::new();
        for (i, (mut enclave, platform)) in enclaves.drain(..).zip(platforms).enumerate() {
            enclave.configure(enclave_keys.clone(), reset_threshold)?;
            enclave.configure_slots(rules)?;
            enclave.configure_clients(clients.to_vec())?;
            let sealed = enclave.shutdown();
            machines.insert(
                ReplicaId(i as u16),
                Machine {
                    platform,
                    first_sealed: sealed.clone(),
                    sealed,
                    live: None,
                },
            );
        }
        Ok(Cluster {
            machines,
            enclave_keys,
        })
    }
}
