//! What the primary's enclave checks before it certifies a PREPARE
//! ([`super::FastBftComponent::request_counter_for_batch`]): every request of the
//! batch signed by its registered client. And what it certifies: the digest of the
//! PREPARE, over the Merkle root of the batch's request leaves, computed here so
//! that the enclave and every replica (`diffuse-fastbft`, which uses these very
//! functions) compute the same bytes.
//!
//! A request's leaf binds the client id the enclave looked the key up with, the
//! encoded request body the client signed and the signature: a host that names
//! another client than the body's gets a root no replica computes (replicas take
//! the client id from the body), so its PREPARE is never taken.

use super::merkle;
use diffuse_core::crypto::{Digest, Signature};
use diffuse_core::ids::ClientId;

/// The label of client request signatures: `diffuse_pbft::message::RequestBody`'s
/// `Signable::LABEL` (FastBFT's requests are PBFT's; a test in `diffuse-fastbft`
/// checks the two agree). Fixed in the enclave, not chosen by the host, so that no
/// other kind of signature by a client passes for a request.
pub const REQUEST_LABEL: &str = "diffuse/pbft/request";

/// The most requests one certified batch holds (the Merkle tree's leaves).
pub const MAX_BATCH_REQUESTS: usize = 1 << merkle::MAX_DEPTH;

/// One request of a batch, as the host hands it to its enclave.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// The client whose registered key must verify the signature.
    pub client: ClientId,
    /// The request body as the client signed it (its canonical encoding).
    pub body: &'a [u8],
    /// The client's signature over [`REQUEST_LABEL`] and `body`.
    pub signature: &'a Signature,
}

/// The Merkle leaf of a request: `client || len(body) || body || signature`
/// under its own label.
pub fn request_leaf(client: ClientId, body: &[u8], signature: &Signature) -> Digest {
    // The key derivation from the context is the same for every leaf: done once,
    // then the keyed state is copied (a batch of 250 requests hashes thousands of
    // leaves over its life on each replica).
    static KEYED: std::sync::LazyLock<blake3::Hasher> =
        std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key(REQUEST_LEAF_CONTEXT));
    let mut hasher = KEYED.clone();
    hasher.update(&u64::from(client.0).to_be_bytes());
    hasher.update(&(body.len() as u64).to_be_bytes());
    hasher.update(body);
    hasher.update(&signature.0);
    Digest(*hasher.finalize().as_bytes())
}

const REQUEST_LEAF_CONTEXT: &str = "diffuse 2026 fastbft request leaf: client, body, signature";

/// The root over a batch's request leaves.
pub fn batch_root(requests: &[SignedRequest<'_>]) -> Digest {
    let leaves: Vec<Digest> = requests
        .iter()
        .map(|r| request_leaf(r.client, r.body, r.signature))
        .collect();
    merkle::root(&leaves)
}

/// What a PREPARE certificate binds: the batch at `seq` (its Merkle root), and the
/// digest of the checkpoint proof it carries (the first PREPARE after a checkpoint).
pub fn prepare_digest(seq: u64, batch_root: &Digest, checkpoint: Option<&Digest>) -> Digest {
    Digest::of_value("diffuse/fastbft/prepare", &(seq, batch_root, checkpoint))
}
