//! Request authentication on the tree, without a public-key operation per request.
//!
//! A client's request carries a MAC authenticator: one MAC per replica, under the
//! key the client shares with that replica (PBFT's, `diffuse_pbft::auth`). The
//! primary checks the client's signature, so it proposes only requests every
//! correct active replica accepts, and hands each active replica a PREPARE whose
//! requests carry that replica's entry only ([`for_active`]): a PREPARE's bytes do
//! not grow with `n`. An active replica accepts a request on its own MAC entry and
//! checks the signature only when the entry does not verify ([`RequestCheck`]), so a
//! client that spoils MACs costs time, never liveness. Every active replica has to
//! release its share for the secret to open, so a request a correct active replica
//! has not authenticated never commits. Passive replicas execute on the opened
//! secrets and get no authenticator at all ([`without_authenticators`]).

use diffuse_core::codec::BoundedVec;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::{SecretKey, SignatureBatch};
use diffuse_core::ids::ReplicaId;
use diffuse_pbft::auth::MacVerifier;
use diffuse_pbft::message::{Authenticator, Batch, Request};

/// `batch` as active replica `replica` gets it: each request with its own MAC
/// entry only (none if the client sent no entry for it).
pub fn for_active(batch: &Batch, replica: ReplicaId) -> Batch {
    let requests = batch.requests.iter().map(|request| Request {
        signed: request.signed.clone(),
        authenticator: request
            .authenticator
            .get(replica.index())
            .map(|entry| Authenticator::truncating(vec![*entry]))
            .unwrap_or_default(),
    });
    Batch {
        requests: BoundedVec::truncating(requests.collect()),
    }
}

/// `batch` with every authenticator removed (for replicas that do not check
/// requests: passive ones, and re-COMMITs of batches already authenticated).
pub fn without_authenticators(batch: &Batch) -> Batch {
    let requests = batch.requests.iter().map(|request| Request {
        signed: request.signed.clone(),
        authenticator: Authenticator::new(),
    });
    Batch {
        requests: BoundedVec::truncating(requests.collect()),
    }
}

/// An active replica's check of the requests of a PREPARE.
#[derive(Debug, Clone)]
pub struct RequestCheck {
    macs: MacVerifier,
    /// Requests whose signature had to be checked (their MAC entry did not verify).
    pub signature_checks: u64,
}

impl RequestCheck {
    /// The check of replica `me`, whose signing key is `secret`.
    pub fn new(me: ReplicaId, secret: &SecretKey) -> RequestCheck {
        RequestCheck {
            macs: MacVerifier::new(me, secret),
            signature_checks: 0,
        }
    }

    /// Whether every request of `batch` comes from a registered client of `keys`:
    /// by its single MAC entry for this replica, or else by its signature (all
    /// such signatures checked in one batch).
    pub fn all_authentic(&mut self, batch: &Batch, keys: &ClusterKeys) -> bool {
        let mut signatures = SignatureBatch::new();
        for request in batch.requests.iter() {
            let Some(key) = keys.client(request.client) else {
                return false;
            };
            let by_mac = match &request.authenticator[..] {
                [entry] => self.macs.verify_entry(request, entry, keys).is_ok(),
                _ => false,
            };
            if !by_mac {
                request.push_signature(key, &mut signatures);
            }
        }
        self.signature_checks += signatures.len() as u64;
        signatures.verify().into_iter().all(|valid| valid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffuse_core::codec::Blob;
    use diffuse_core::ids::ClientId;
    use diffuse_pbft::auth::RequestAuthenticator;
    use diffuse_pbft::message::RequestBody;

    fn cluster() -> (Vec<SecretKey>, SecretKey, ClusterKeys) {
        let replicas: Vec<SecretKey> = (0..3)
            .map(|i| SecretKey::from_seed([i as u8 + 1; 32]))
            .collect();
        let client = SecretKey::from_seed([99; 32]);
        let keys = ClusterKeys::new(
            replicas.iter().map(|k| k.public()).collect(),
            [(ClientId(0), client.public())].into(),
        )
        .unwrap();
        (replicas, client, keys)
    }

    fn request(client: &SecretKey, keys: &ClusterKeys, timestamp: u64) -> Request {
        let body = RequestBody {
            client: ClientId(0),
            timestamp,
            operation: Blob::try_from_vec(vec![1, 2, 3]).unwrap(),
        };
        let authenticator = RequestAuthenticator::new(client, keys).authenticate(&body);
        Request {
            signed: diffuse_core::crypto::Signed::sign(body, client),
            authenticator,
        }
    }

    fn batch(requests: Vec<Request>) -> Batch {
        Batch {
            requests: BoundedVec::truncating(requests),
        }
    }

    #[test]
    fn an_active_accepts_its_own_entry_without_a_signature_check() {
        let (replicas, client, keys) = cluster();
        let full = batch(vec![request(&client, &keys, 1), request(&client, &keys, 2)]);
        let mut check = RequestCheck::new(ReplicaId(1), &replicas[1]);
        assert!(check.all_authentic(&for_active(&full, ReplicaId(1)), &keys));
        assert_eq!(check.signature_checks, 0);
        // Another replica's entry does not verify here: the signature does.
        assert!(check.all_authentic(&for_active(&full, ReplicaId(2)), &keys));
        assert_eq!(check.signature_checks, 2);
        assert!(check.all_authentic(&without_authenticators(&full), &keys));
        assert_eq!(check.signature_checks, 4);
    }

    #[test]
    fn a_bad_signature_without_a_valid_entry_is_refused() {
        let (replicas, client, keys) = cluster();
        let mut forged = request(&client, &keys, 1);
        forged.signed =
            diffuse_core::crypto::Signed::sign(forged.signed.value.clone(), &replicas[0]);
        let mut check = RequestCheck::new(ReplicaId(1), &replicas[1]);
        // Its MAC entry still vouches for the body to replica 1 (the client made it).
        assert!(check.all_authentic(
            &for_active(&batch(vec![forged.clone()]), ReplicaId(1)),
            &keys
        ));
        // Without the entry, the forged signature is caught, and spoils the batch.
        let both = batch(vec![request(&client, &keys, 2), forged]);
        assert!(!check.all_authentic(&without_authenticators(&both), &keys));
        // So is an unknown client.
        let mut stranger = request(&client, &keys, 3);
        stranger.signed.value.client = ClientId(7);
        assert!(!check.all_authentic(&batch(vec![stranger]), &keys));
    }

    #[test]
    fn trimming_keeps_the_bodies_and_so_the_batch_root() {
        let (_, client, keys) = cluster();
        let full = batch(vec![request(&client, &keys, 1), request(&client, &keys, 2)]);
        let root = crate::message::batch_root(&full);
        assert_eq!(
            crate::message::batch_root(&for_active(&full, ReplicaId(2))),
            root
        );
        assert_eq!(
            crate::message::batch_root(&without_authenticators(&full)),
            root
        );
        assert!(
            for_active(&full, ReplicaId(9))
                .requests
                .iter()
                .all(|r| r.authenticator.is_empty())
        );
    }
}
