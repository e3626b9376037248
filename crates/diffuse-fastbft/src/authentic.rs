//! Request authentication: the primary's **enclave** checks the client signature
//! of every request of a batch before it certifies its PREPARE
//! (`diffuse_tee::FastBftComponent::request_counter_for_batch`: one ZIP 215 batch
//! verification against the client keys the enclave was configured with once, like
//! its peers), and certifies it with a certificate of the verified-batch kind,
//! which plain `request_counter` never issues
//! ([`crate::message::certifies_prepare`]). Replicas take a PREPARE only with
//! such a certificate, and check no signature themselves: no public-key operation
//! per request on the tree.
//!
//! Why this is sound. The enclave is trusted: a Byzantine host can hand it any
//! batch, but it certifies one only if every request is signed by the registered
//! client the host names, and it computes the batch's Merkle root itself, from
//! leaves that bind that client id, the signed body and the signature
//! (`diffuse_tee::fastbft::request_leaf`). A replica computes the root from the
//! requests it received, taking the client id from each body: a host that named
//! another client than the body's, or certified other bytes, gets a root no
//! replica computes, so its PREPARE is never taken. So an enclave-certified
//! PREPARE proves that its requests are authentic, to any replica, at any time.
//!
//! That keeps what the view change needs. An earlier version accepted a request
//! on a MAC entry for the active replica and checked the signature only when the
//! entry failed. That does not survive a view change with `n = 2f + 1`: a MAC
//! convinces one replica only, so a faulty client and a faulty primary could get a
//! batch committed whose signatures no one else can check, and the decision of the
//! next view (which every replica computes alike from the same evidence,
//! `crate::view_log`) could not tell it from a batch the faulty primary made up.
//! With the enclave's check, whether a PREPARE counts is again the same question
//! at every replica and in the decision ("is its certificate of the verified-batch
//! kind"), and it is deterministic. A decided batch that a new primary PREPAREs
//! again goes through its own enclave's check too, and passes it. Clients send no
//! MAC authenticator.
//!
//! The primary's host checks no signature of a client's own request on arrival:
//! its enclave checks them all in one batch verification, and names the requests
//! that fail, which the host drops before asking again
//! (`FastBftReplica::send_prepare`). It checks a request another replica forwards,
//! so that a faulty replica cannot fill the pending queue with forgeries.

use crate::message::SharedBatch;
use diffuse_core::codec::BoundedVec;
use diffuse_pbft::message::{Authenticator, Batch, Request};
use std::sync::Arc;

/// `batch` with every authenticator removed: what replicas log and pass on
/// (the same batch, shared, if it has none).
pub fn without_authenticators(batch: &SharedBatch) -> SharedBatch {
    if batch.requests.iter().all(|r| r.authenticator.is_empty()) {
        return batch.clone();
    }
    let requests = batch.requests.iter().map(|request| Request {
        signed: request.signed.clone(),
        authenticator: Authenticator::new(),
    });
    Arc::new(Batch {
        requests: BoundedVec::truncating(requests.collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Prepare, batch_root, certify_prepare, request_leaf};
    use crate::view_log::{Rules, StreamState};
    use diffuse_core::codec::Blob;
    use diffuse_core::crypto::{SecretKey, Signable, Signed};
    use diffuse_core::ids::{ClientId, Seq};
    use diffuse_pbft::message::RequestBody;
    use diffuse_tee::{
        FastBftComponent, FastBftError, SoftwareEnclave, SoftwarePlatform, Tree, TrustedComponent,
    };
    use std::sync::Arc;

    fn request(client: &SecretKey, id: u32, timestamp: u64) -> Request {
        let body = RequestBody {
            client: ClientId(id),
            timestamp,
            operation: Blob::try_from_vec(vec![1, 2, 3]).unwrap(),
        };
        Request {
            signed: Signed::sign(body, client),
            authenticator: Authenticator::new(),
        }
    }

    fn batch(requests: Vec<Request>) -> Batch {
        Batch {
            requests: BoundedVec::truncating(requests),
        }
    }

    /// A primary's enclave in its first epoch, with client 0 registered.
    fn primary(client: &SecretKey) -> SoftwareEnclave {
        let mut enclave = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([1; 32])));
        enclave
            .configure_clients(vec![(ClientId(0), client.public())])
            .unwrap();
        let peer = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([2; 32])));
        enclave
            .be_primary(&[peer.public_key()], Tree::balanced(1, 1).unwrap())
            .unwrap();
        enclave
    }

    #[test]
    fn the_enclave_checks_requests_under_the_request_label() {
        assert_eq!(diffuse_tee::REQUEST_LABEL, RequestBody::LABEL);
    }

    #[test]
    fn a_prepare_counts_only_with_an_enclave_verified_certificate() {
        let client = SecretKey::from_seed([99; 32]);
        let mut enclave = primary(&client);
        let good = batch(vec![request(&client, 0, 1), request(&client, 0, 2)]);
        let cert = certify_prepare(&mut enclave, Seq(1), &good, None).unwrap();
        let keys = [enclave.public_key()];
        let rules = Rules {
            enclave_keys: &keys,
            interval: 16,
            drop_last_decided: false,
        };
        let prepare = Prepare {
            seq: Seq(1),
            batch: good.clone().into(),
            checkpoint: None,
            cert,
        };
        assert!(
            StreamState::default()
                .accept_prepare(&prepare, &rules)
                .is_ok()
        );
        // The same digest through plain request_counter: never taken.
        let digest = diffuse_tee::fastbft::prepare_digest(1, &batch_root(&good), None);
        let opaque = Prepare {
            cert: enclave.request_counter(&digest).unwrap(),
            ..prepare
        };
        assert_eq!(
            StreamState::default().accept_prepare(&opaque, &rules),
            Err(crate::view_log::Invalid(crate::view_log::MISMATCH))
        );
    }

    #[test]
    fn a_forged_or_stranger_request_is_named_and_nothing_is_certified() {
        let client = SecretKey::from_seed([99; 32]);
        let mut enclave = primary(&client);
        let mut forged = request(&client, 0, 3);
        forged.signed = Signed::sign(forged.signed.value.clone(), &SecretKey::from_seed([5; 32]));
        let mut stranger = request(&client, 0, 4);
        stranger.signed.value.client = ClientId(7);
        let spoiled = batch(vec![request(&client, 0, 2), forged, stranger]);
        assert_eq!(
            certify_prepare(&mut enclave, Seq(1), &spoiled, None),
            Err(FastBftError::UnsignedRequests(vec![1, 2]))
        );
        assert_eq!(enclave.fastbft_counter().0, 0, "no counter value taken");
    }

    #[test]
    fn the_leaf_is_the_enclaves_and_binds_the_client_named_in_the_body() {
        let client = SecretKey::from_seed([99; 32]);
        let r = request(&client, 0, 1);
        let body = diffuse_core::codec::encode_payload(&r.signed.value);
        assert_eq!(
            request_leaf(&r.signed),
            diffuse_tee::fastbft::request_leaf(ClientId(0), &body, &r.signed.signature)
        );
        assert_ne!(
            request_leaf(&r.signed),
            diffuse_tee::fastbft::request_leaf(ClientId(1), &body, &r.signed.signature)
        );
    }

    #[test]
    fn trimming_keeps_the_bodies_and_so_the_batch_root() {
        let client = SecretKey::from_seed([99; 32]);
        let mut with_macs = request(&client, 0, 1);
        with_macs.authenticator =
            Authenticator::truncating(vec![diffuse_core::crypto::Mac([7; 16])]);
        let full = batch(vec![with_macs, request(&client, 0, 2)]);
        let root = batch_root(&full);
        let trimmed = without_authenticators(&Arc::new(full));
        assert_eq!(batch_root(&trimmed), root);
        assert!(trimmed.requests.iter().all(|r| r.authenticator.is_empty()));
        let again = without_authenticators(&trimmed);
        assert!(
            Arc::ptr_eq(&again, &trimmed),
            "a trimmed batch is shared, not copied"
        );
    }
}
