//! `request_counter_for_batch`: the primary's enclave certifies a PREPARE only
//! after verifying every request of its batch against its registered client's key,
//! and a plain `request_counter` never yields a certificate of that kind.

use diffuse_core::codec;
use diffuse_core::crypto::{Digest, PublicKey, SecretKey, Signature};
use diffuse_core::ids::ClientId;
use diffuse_tee::fastbft::{batch_root, prepare_digest};
use diffuse_tee::{
    CertificateKind, FastBftComponent, FastBftError, MAX_CLIENTS, REQUEST_LABEL, SignedRequest,
    SoftwareEnclave, SoftwarePlatform, TeeError, Tree, TrustedComponent,
};
use std::sync::Arc;

/// A client's request as the host holds it: the encoded body and the signature.
struct Owned {
    client: ClientId,
    body: Vec<u8>,
    signature: Signature,
}

impl Owned {
    fn new(client: u32, key: &SecretKey, text: &str) -> Owned {
        let body = codec::encode_payload(&(client, text.to_string()));
        let signature = key.sign(REQUEST_LABEL, &body);
        Owned {
            client: ClientId(client),
            body,
            signature,
        }
    }

    fn view(&self) -> SignedRequest<'_> {
        SignedRequest {
            client: self.client,
            body: &self.body,
            signature: &self.signature,
        }
    }
}

fn client_key(i: u32) -> SecretKey {
    SecretKey::from_seed([i as u8 + 10; 32])
}

fn registry(count: u32) -> Vec<(ClientId, PublicKey)> {
    (0..count)
        .map(|i| (ClientId(i), client_key(i).public()))
        .collect()
}

/// A primary enclave of a fresh epoch with clients `0..3` registered.
fn primary(seed: u8) -> (SoftwareEnclave, Arc<SoftwarePlatform>) {
    let platform = Arc::new(SoftwarePlatform::new([seed; 32]));
    let mut enclave = SoftwareEnclave::create(platform.clone());
    enclave.configure_clients(registry(3)).unwrap();
    let peer = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([seed + 1; 32])));
    enclave
        .be_primary(&[peer.public_key()], Tree::balanced(1, 1).unwrap())
        .unwrap();
    (enclave, platform)
}

fn views(requests: &[Owned]) -> Vec<SignedRequest<'_>> {
    requests.iter().map(Owned::view).collect()
}

#[test]
fn a_signed_batch_is_certified_as_verified_over_its_prepare_digest() {
    let (mut enclave, _) = primary(1);
    let requests = vec![
        Owned::new(0, &client_key(0), "put a 1"),
        Owned::new(1, &client_key(1), "get a"),
        Owned::new(2, &client_key(2), "put b 2"),
    ];
    let checkpoint = Digest::of("test", b"proof");
    let cert = enclave
        .request_counter_for_batch(7, &views(&requests), Some(&checkpoint))
        .unwrap();
    assert!(cert.verify(&enclave.public_key()));
    assert_eq!(cert.kind, CertificateKind::VerifiedBatch);
    assert_eq!(cert.counter, 1);
    let root = batch_root(&views(&requests));
    assert_eq!(cert.message, prepare_digest(7, &root, Some(&checkpoint)));
    assert!(cert.certifies_prepare(7, &root, Some(&checkpoint)));
    assert!(!cert.certifies_prepare(8, &root, Some(&checkpoint)));
    assert!(!cert.certifies_prepare(7, &root, None));
    // The empty (null) batch needs no signature.
    let empty = enclave.request_counter_for_batch(8, &[], None).unwrap();
    assert_eq!(empty.counter, 2);
    assert!(empty.certifies_prepare(8, &batch_root(&[]), None));
}

#[test]
fn a_bad_signature_is_refused_with_its_index_and_nothing_is_certified() {
    let (mut enclave, _) = primary(3);
    let mut requests = vec![
        Owned::new(0, &client_key(0), "put a 1"),
        // Signed by another client's key.
        Owned::new(1, &client_key(2), "put a 2"),
        Owned::new(2, &client_key(2), "put b 2"),
        Owned::new(0, &client_key(0), "put c 3"),
    ];
    // A body altered after signing.
    requests[3].body.push(0);
    assert_eq!(
        enclave.request_counter_for_batch(1, &views(&requests), None),
        Err(FastBftError::UnsignedRequests(vec![1, 3]))
    );
    // Nothing took the counter value: the good rest is certified at 1.
    requests.remove(3);
    requests.remove(1);
    let cert = enclave
        .request_counter_for_batch(1, &views(&requests), None)
        .unwrap();
    assert_eq!(cert.counter, 1);
}

#[test]
fn a_request_is_verified_under_the_client_the_host_names_and_the_leaf_binds_it() {
    let (mut enclave, _) = primary(5);
    // Client 1's genuine request, presented as client 2's: refused.
    let mut lying = Owned::new(1, &client_key(1), "put a 1");
    lying.client = ClientId(2);
    assert_eq!(
        enclave.request_counter_for_batch(1, &[lying.view()], None),
        Err(FastBftError::UnsignedRequests(vec![0]))
    );
    // Under the right client it passes; the leaf differs from the one under
    // another client id, so a host that lied about the id would get another root.
    let honest = Owned::new(1, &client_key(1), "put a 1");
    assert_ne!(batch_root(&[honest.view()]), batch_root(&[lying.view()]));
    assert!(
        enclave
            .request_counter_for_batch(1, &[honest.view()], None)
            .is_ok()
    );
}

#[test]
fn an_unregistered_client_is_refused() {
    let (mut enclave, _) = primary(7);
    let stranger = client_key(9);
    let requests = vec![
        Owned::new(0, &client_key(0), "put a 1"),
        Owned::new(9, &stranger, "put a 2"),
    ];
    assert_eq!(
        enclave.request_counter_for_batch(1, &views(&requests), None),
        Err(FastBftError::UnsignedRequests(vec![1]))
    );
    // An enclave that was never told the clients certifies no batch at all.
    let platform = Arc::new(SoftwarePlatform::new([40; 32]));
    let mut blank = SoftwareEnclave::create(platform);
    let peer = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([41; 32])));
    blank
        .be_primary(&[peer.public_key()], Tree::balanced(1, 1).unwrap())
        .unwrap();
    assert_eq!(
        blank.request_counter_for_batch(1, &[], None),
        Err(FastBftError::ClientsNotConfigured)
    );
}

#[test]
fn a_plain_counter_certificate_never_certifies_a_prepare() {
    let (mut enclave, _) = primary(9);
    let requests = vec![Owned::new(0, &client_key(0), "put a 1")];
    let root = batch_root(&views(&requests));
    // The host asks for the PREPARE digest itself, skipping the check.
    let cert = enclave
        .request_counter(&prepare_digest(1, &root, None))
        .unwrap();
    assert_eq!(cert.kind, CertificateKind::Opaque);
    assert_eq!(cert.message, prepare_digest(1, &root, None));
    assert!(!cert.certifies_prepare(1, &root, None));
    // Changing the kind breaks the signature.
    let mut relabelled = cert.clone();
    relabelled.value.kind = CertificateKind::VerifiedBatch;
    assert!(relabelled.certifies_prepare(1, &root, None));
    assert!(!relabelled.verify(&enclave.public_key()));
}

#[test]
fn only_the_primary_certifies_a_batch() {
    let mut genesis = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([50; 32])));
    let mut backup = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([51; 32])));
    backup.configure_clients(registry(3)).unwrap();
    let new_tree = genesis.request_counter(&Digest::default()).unwrap();
    backup
        .update_view(&genesis.public_key(), &new_tree, None)
        .unwrap();
    assert_eq!(
        backup.request_counter_for_batch(1, &[], None),
        Err(FastBftError::WrongRole("the primary"))
    );
}

#[test]
fn the_clients_are_configured_once_within_bounds_and_survive_sealing() {
    let platform = Arc::new(SoftwarePlatform::new([60; 32]));
    let mut enclave = SoftwareEnclave::create(platform.clone());
    let mut twice = registry(2);
    twice.push((ClientId(0), client_key(5).public()));
    assert!(matches!(
        enclave.configure_clients(twice),
        Err(TeeError::Configuration(_))
    ));
    let too_many: Vec<(ClientId, PublicKey)> = (0..=MAX_CLIENTS as u32)
        .map(|i| (ClientId(i), client_key(0).public()))
        .collect();
    assert!(matches!(
        enclave.configure_clients(too_many),
        Err(TeeError::Configuration(_))
    ));
    enclave.configure_clients(registry(3)).unwrap();
    assert!(matches!(
        enclave.configure_clients(registry(1)),
        Err(TeeError::Configuration(_))
    ));
    // Sealed and resumed, it still knows (and only knows) the same clients.
    let sealed = enclave.shutdown();
    let mut resumed = SoftwareEnclave::resume(platform, &sealed).unwrap();
    assert!(matches!(
        resumed.configure_clients(registry(1)),
        Err(TeeError::Configuration(_))
    ));
    let peer = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([61; 32])));
    resumed
        .be_primary(&[peer.public_key()], Tree::balanced(1, 1).unwrap())
        .unwrap();
    let good = Owned::new(2, &client_key(2), "put a 1");
    let stranger = Owned::new(3, &client_key(3), "put a 1");
    assert!(
        resumed
            .request_counter_for_batch(1, &[good.view()], None)
            .is_ok()
    );
    assert_eq!(
        resumed.request_counter_for_batch(2, &[stranger.view()], None),
        Err(FastBftError::UnsignedRequests(vec![0]))
    );
}

#[test]
fn the_largest_configuration_seals_within_its_bound() {
    let platform = Arc::new(SoftwarePlatform::new([70; 32]));
    let mut enclave = SoftwareEnclave::create(platform.clone());
    let peers: Vec<PublicKey> = (0..diffuse_tee::enclave::MAX_PEERS)
        .map(|i| {
            let mut seed = [1u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            SecretKey::from_seed(seed).public()
        })
        .collect();
    enclave.configure(peers, 2).unwrap();
    let key = client_key(0).public();
    let clients: Vec<(ClientId, PublicKey)> = (0..MAX_CLIENTS as u32)
        .map(|i| (ClientId(i), key))
        .collect();
    enclave.configure_clients(clients).unwrap();
    let sealed = enclave.shutdown();
    assert!(SoftwareEnclave::resume(platform, &sealed).is_ok());
}

#[test]
fn the_mutant_enclave_certifies_a_forged_request_of_a_registered_client() {
    let (mut enclave, _) = primary(80);
    enclave.skip_request_signatures_for_tests();
    let forged = Owned::new(1, &client_key(2), "put a forged");
    let stranger = Owned::new(9, &client_key(9), "put a forged");
    assert!(
        enclave
            .request_counter_for_batch(1, &[forged.view()], None)
            .is_ok()
    );
    // It still refuses clients it does not know.
    assert_eq!(
        enclave.request_counter_for_batch(2, &[stranger.view()], None),
        Err(FastBftError::UnsignedRequests(vec![0]))
    );
}
