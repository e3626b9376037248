//! Client request authentication with MAC authenticators.
//!
//! A client shares a key with each replica: BLAKE3's key derivation over the X25519
//! Diffie-Hellman of their static keys (the Ed25519 keys of the cluster file, as the
//! transport uses them), under [`REQUEST_MAC_CONTEXT`]. Each request carries one MAC
//! per replica over [`RequestBody::mac_digest`] besides the client's signature. Only the
//! client and replica `i` know the key of entry `i`, so a valid entry proves to replica
//! `i`, and to no one else, that the client sent this body: a faulty primary that
//! relays the request cannot forge it, and cannot use it to convince anybody.
//!
//! Who checks what, and why that keeps safety and liveness with Byzantine clients and
//! primaries, is in `docs/protocols/pbft.md` ("Request authentication"). In short: a
//! backup accepts a request inside a PRE-PREPARE if its own entry verifies, and checks
//! the signature only if it does not; the primary (and any replica a request reaches
//! directly) checks the signature, so that it proposes only requests every correct
//! backup will accept.

use crate::message::{Authenticator, ReadRequest, Request, RequestBody};
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{Digest, KeyAgreement, Mac, MacKey, SecretKey};
use diffuse_core::ids::{ClientId, ReplicaId};
use std::collections::BTreeMap;
use std::fmt;

/// The BLAKE3 key-derivation context of the client-replica request MAC keys: fixed,
/// and used for nothing else.
pub const REQUEST_MAC_CONTEXT: &str =
    "diffuse 2026-11-22 pbft client request authenticator: client-replica MAC key";

/// Why a request's authenticator does not authenticate it to a replica. Not proof of
/// anything against the sender: the replica then falls back on the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacError {
    /// The authenticator has `len` entries, not one per replica (`n`).
    WrongLength {
        /// Entries found.
        len: usize,
        /// Replicas in the cluster.
        n: usize,
    },
    /// The client is not registered.
    UnknownClient,
    /// The client and this replica share no key (the client's key has small order).
    NoSharedKey,
    /// This replica's entry does not verify.
    Mismatch,
}

impl fmt::Display for MacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MacError::WrongLength { len, n } => {
                write!(f, "authenticator has {len} entries for {n} replicas")
            }
            MacError::UnknownClient => f.write_str("request from an unregistered client"),
            MacError::NoSharedKey => f.write_str("no MAC key shared with the client"),
            MacError::Mismatch => f.write_str("the MAC entry does not verify"),
        }
    }
}

impl std::error::Error for MacError {}

/// A client's side: the key it shares with each replica, derived once.
#[derive(Debug, Clone)]
pub struct RequestAuthenticator {
    keys: Vec<Option<MacKey>>,
}

impl RequestAuthenticator {
    /// Derives the keys `secret` shares with each replica of `keys`.
    pub fn new(secret: &SecretKey, keys: &ClusterKeys) -> Self {
        let agreement = KeyAgreement::new(secret);
        let keys = (0..keys.n())
            .map(|i| {
                let replica = u16::try_from(i).ok().map(ReplicaId)?;
                agreement.mac_key(REQUEST_MAC_CONTEXT, keys.replica(replica)?)
            })
            .collect();
        Self { keys }
    }

    /// The authenticator of a read-only request: one MAC per replica over
    /// [`ReadRequest::mac_digest`].
    pub fn authenticate_read(&self, read: &ReadRequest) -> Authenticator {
        self.macs(&read.mac_digest())
    }

    fn macs(&self, digest: &Digest) -> Authenticator {
        Authenticator::truncating(
            self.keys
                .iter()
                .map(|key| key.as_ref().map_or_else(Mac::default, |k| k.mac(&digest.0)))
                .collect(),
        )
    }

    /// The authenticator of `body`: one MAC per replica (an all-zero entry for a
    /// replica with which no key is shared; it then checks the signature).
    pub fn authenticate(&self, body: &RequestBody) -> Authenticator {
        self.macs(&body.mac_digest())
    }
}

/// A replica's side: the key it shares with each client, derived the first time the
/// client's request needs it and kept. Only registered clients get an entry, so the
/// cache is bounded by the cluster file's client list.
#[derive(Debug, Clone)]
pub struct MacVerifier {
    me: ReplicaId,
    agreement: KeyAgreement,
    keys: BTreeMap<ClientId, Option<MacKey>>,
}

impl MacVerifier {
    /// The verifier of replica `me`, whose signing key is `secret`.
    pub fn new(me: ReplicaId, secret: &SecretKey) -> Self {
        Self {
            me,
            agreement: KeyAgreement::new(secret),
            keys: BTreeMap::new(),
        }
    }

    /// Whether this replica's entry of `request`'s authenticator is the client's MAC
    /// of the body. Never panics, whatever the request holds.
    pub fn verify(&mut self, request: &Request, cluster: &ClusterKeys) -> Result<(), MacError> {
        let n = cluster.n();
        let len = request.authenticator.len();
        if len != n {
            return Err(MacError::WrongLength { len, n });
        }
        let entry = request
            .authenticator
            .get(self.me.index())
            .ok_or(MacError::WrongLength { len, n })?;
        self.verify_entry(request, entry, cluster)
    }

    /// Whether this replica's entry of a read's authenticator is the client's MAC
    /// of the read.
    pub fn verify_read(
        &mut self,
        read: &ReadRequest,
        cluster: &ClusterKeys,
    ) -> Result<(), MacError> {
        let n = cluster.n();
        let len = read.authenticator.len();
        let entry = match read.authenticator.get(self.me.index()) {
            Some(entry) if len == n => entry,
            _ => return Err(MacError::WrongLength { len, n }),
        };
        self.verify_digest(read.body.client, &read.mac_digest(), entry, cluster)
    }

    /// Whether `entry` is the client's MAC of `request`'s body for this replica
    /// (for protocols that hand each replica its own entry only).
    pub fn verify_entry(
        &mut self,
        request: &Request,
        entry: &Mac,
        cluster: &ClusterKeys,
    ) -> Result<(), MacError> {
        self.verify_digest(request.client, &request.mac_digest(), entry, cluster)
    }

    fn verify_digest(
        &mut self,
        client: ClientId,
        digest: &Digest,
        entry: &Mac,
        cluster: &ClusterKeys,
    ) -> Result<(), MacError> {
        let key = match self.keys.get(&client) {
            Some(key) => key,
            None => {
                let public = cluster.client(client).ok_or(MacError::UnknownClient)?;
                let key = self.agreement.mac_key(REQUEST_MAC_CONTEXT, public);
                self.keys.entry(client).or_insert(key)
            }
        };
        let key = key.as_ref().ok_or(MacError::NoSharedKey)?;
        if key.verify(&digest.0, entry) {
            Ok(())
        } else {
            Err(MacError::Mismatch)
        }
    }

    /// Number of clients whose key is cached.
    pub fn cached_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffuse_core::codec::Blob;

    fn cluster(n: usize) -> (Vec<SecretKey>, SecretKey, ClusterKeys) {
        let replicas: Vec<SecretKey> = (0..n)
            .map(|i| SecretKey::from_seed([i as u8 + 1; 32]))
            .collect();
        let client = SecretKey::from_seed([99; 32]);
        let keys = ClusterKeys::new(
            replicas.iter().map(SecretKey::public).collect(),
            [(ClientId(7), client.public())].into_iter().collect(),
        )
        .unwrap();
        (replicas, client, keys)
    }

    fn request(client: &SecretKey, keys: &ClusterKeys) -> Request {
        let body = RequestBody {
            client: ClientId(7),
            timestamp: 3,
            operation: Blob::try_from_vec(b"op".to_vec()).unwrap(),
        };
        let authenticator = RequestAuthenticator::new(client, keys).authenticate(&body);
        Request {
            authenticator,
            ..Request::signed_only(body, client)
        }
    }

    #[test]
    fn every_replica_verifies_its_own_entry() {
        let (replicas, client, keys) = cluster(4);
        let request = request(&client, &keys);
        for (i, secret) in replicas.iter().enumerate() {
            let mut verifier = MacVerifier::new(ReplicaId(i as u16), secret);
            assert_eq!(verifier.verify(&request, &keys), Ok(()));
            assert_eq!(verifier.cached_keys(), 1);
        }
    }

    #[test]
    fn another_entry_a_changed_body_or_a_short_authenticator_fail() {
        let (replicas, client, keys) = cluster(4);
        let good = request(&client, &keys);
        let mut verifier = MacVerifier::new(ReplicaId(1), &replicas[1]);
        // Replica 1 given replica 2's entry.
        let mut swapped = good.clone();
        let mut entries = swapped.authenticator.to_vec();
        entries.swap(1, 2);
        swapped.authenticator = Authenticator::truncating(entries);
        assert_eq!(verifier.verify(&swapped, &keys), Err(MacError::Mismatch));
        // The same MACs over another timestamp.
        let mut changed = good.clone();
        changed.signed.value.timestamp += 1;
        assert_eq!(verifier.verify(&changed, &keys), Err(MacError::Mismatch));
        // Too few and too many entries.
        for len in [0, 3, 5, 256] {
            let mut odd = good.clone();
            odd.authenticator = Authenticator::truncating(vec![Mac::default(); len]);
            assert_eq!(
                verifier.verify(&odd, &keys),
                Err(MacError::WrongLength { len, n: 4 })
            );
        }
    }

    #[test]
    fn unregistered_clients_are_not_cached() {
        let (replicas, client, keys) = cluster(4);
        let mut request = request(&client, &keys);
        request.signed.value.client = ClientId(8);
        let mut verifier = MacVerifier::new(ReplicaId(0), &replicas[0]);
        assert_eq!(
            verifier.verify(&request, &keys),
            Err(MacError::UnknownClient)
        );
        assert_eq!(verifier.cached_keys(), 0);
    }

    proptest::proptest! {
        /// Whatever a request holds (any client id, any number of entries, any bytes),
        /// checking its authenticator returns an answer and never panics.
        #[test]
        fn arbitrary_requests_never_panic_the_verifier(
            seed in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            use arbitrary::{Arbitrary, Unstructured};
            let (replicas, _, keys) = cluster(4);
            let mut verifier = MacVerifier::new(ReplicaId(3), &replicas[3]);
            if let Ok(request) = Request::arbitrary(&mut Unstructured::new(&seed)) {
                let _ = verifier.verify(&request, &keys);
            }
            proptest::prop_assert!(verifier.cached_keys() <= 1);
        }
    }

    #[test]
    fn a_client_key_of_small_order_gives_no_key_but_no_panic() {
        let (replicas, client, _) = cluster(4);
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = diffuse_core::crypto::PublicKey::from_bytes(&identity).unwrap();
        let keys = ClusterKeys::new(
            replicas.iter().map(SecretKey::public).collect(),
            [(ClientId(7), weak)].into_iter().collect(),
        )
        .unwrap();
        let request = request(&client, &keys);
        let mut verifier = MacVerifier::new(ReplicaId(0), &replicas[0]);
        assert_eq!(verifier.verify(&request, &keys), Err(MacError::NoSharedKey));
    }
}
