//! Request authentication: every active replica checks the client signature of
//! every request of a PREPARE before it releases its share (one ZIP 215 batch
//! verification per PREPARE, `crate::view_log::all_signed`), as the paper has it
//! ("each replica verifies any signature received as input").
//!
//! An earlier version accepted a request on a MAC entry for the active replica and
//! checked the signature only when the entry failed. That does not survive a view
//! change with `n = 2f + 1`: a MAC convinces one replica only, so a faulty client
//! and a faulty primary could get a batch committed whose signatures no one else
//! can check, and the decision of the next view (which every replica computes
//! alike from the same evidence, `crate::view_log`) could not tell it from a batch
//! the faulty primary made up. With signatures, whether a PREPARE counts is the
//! same question at every replica. Clients therefore send no MAC authenticator.

use diffuse_core::codec::BoundedVec;
use diffuse_pbft::message::{Authenticator, Batch, Request};

/// `batch` with every authenticator removed: what replicas log and pass on.
pub fn without_authenticators(batch: &Batch) -> Batch {
    if batch.requests.iter().all(|r| r.authenticator.is_empty()) {
        return batch.clone();
    }
    let requests = batch.requests.iter().map(|request| Request {
        signed: request.signed.clone(),
        authenticator: Authenticator::new(),
    });
    Batch {
        requests: BoundedVec::truncating(requests.collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view_log::all_signed;
    use diffuse_core::codec::Blob;
    use diffuse_core::config::ClusterKeys;
    use diffuse_core::crypto::SecretKey;
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
    fn a_bad_signature_spoils_the_batch_whatever_the_macs_say() {
        let (replicas, client, keys) = cluster();
        let good = batch(vec![request(&client, &keys, 1), request(&client, &keys, 2)]);
        assert!(all_signed(&good, &keys));
        let mut forged = request(&client, &keys, 3);
        forged.signed =
            diffuse_core::crypto::Signed::sign(forged.signed.value.clone(), &replicas[0]);
        // Its MAC entries are still the client's own.
        let both = batch(vec![request(&client, &keys, 2), forged]);
        assert!(!all_signed(&both, &keys));
        // So is an unknown client.
        let mut stranger = request(&client, &keys, 4);
        stranger.signed.value.client = ClientId(7);
        assert!(!all_signed(&batch(vec![stranger]), &keys));
    }

    #[test]
    fn trimming_keeps_the_bodies_and_so_the_batch_root() {
        let (_, client, keys) = cluster();
        let full = batch(vec![request(&client, &keys, 1), request(&client, &keys, 2)]);
        let root = crate::message::batch_root(&full);
        let trimmed = without_authenticators(&full);
        assert_eq!(crate::message::batch_root(&trimmed), root);
        assert!(trimmed.requests.iter().all(|r| r.authenticator.is_empty()));
    }
}
