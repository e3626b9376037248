//! Cryptographic primitives, each from a well-kept crate behind a small wrapper.
//!
//! - Digests: BLAKE3 (`blake3`), always with a domain-separation label.
//! - Signatures: Ed25519. Members' signatures are made with `ed25519-dalek` and, between
//!   replicas, verified with its `verify_strict`, everywhere the same. Client request
//!   signatures are verified under the ZIP 215 rules (`ed25519-zebra`), alone
//!   ([`PublicKey::verify_zip215`]) or in batches ([`SignatureBatch`]): under ZIP 215,
//!   and only under such a rule, a batch accepts exactly the signatures that single
//!   verification accepts, so a faulty client cannot craft a request that one replica
//!   takes and another refuses.
//! - MACs: keyed BLAKE3, truncated to 128 bits, under a key two members share: the
//!   X25519 Diffie-Hellman (`curve25519-dalek`) of their static keys, through BLAKE3's
//!   key derivation with a context string naming the key's one use ([`KeyAgreement`]).
//!
//! A signature covers `label || BLAKE3(payload)` where the payload is the canonical
//! postcard encoding of the signed value, so two message kinds can never be confused.

use crate::codec;
use ed25519_dalek::Signer as _;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A 32-byte BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes` under a domain label.
    pub fn of(label: &str, bytes: &[u8]) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(label.len() as u64).to_le_bytes());
        hasher.update(label.as_bytes());
        hasher.update(bytes);
        Digest(*hasher.finalize().as_bytes())
    }

    /// The digest of a value's canonical encoding under a domain label.
    pub fn of_value<T: Serialize + ?Sized>(label: &str, value: &T) -> Digest {
        Digest::of(label, &codec::encode_payload(value))
    }

    /// A short hex prefix, for traces.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Digest(<[u8; 32]>::deserialize(d)?))
    }
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig:{}", hex::encode(&self.0[..4]))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SigVisitor;
        impl<'de> Visitor<'de> for SigVisitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let bytes: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(bytes))
            }
        }
        d.deserialize_bytes(SigVisitor)
    }
}

#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for Signature {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Signature(u.arbitrary()?))
    }
}

/// An Ed25519 public key, checked to be a valid curve point when parsed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// Parses 32 bytes; fails if they are not a valid point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, InvalidKey> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_| InvalidKey)
    }

    /// Parses a hex string of 64 characters.
    pub fn from_hex(text: &str) -> Result<PublicKey, InvalidKey> {
        let bytes: [u8; 32] = hex::decode(text.trim())
            .map_err(|_| InvalidKey)?
            .try_into()
            .map_err(|_| InvalidKey)?;
        PublicKey::from_bytes(&bytes)
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The hex encoding.
    pub fn to_hex(&self) -> String {
        hex::encode(self.to_bytes())
    }

    /// The X25519 public key of the same key pair (the Montgomery form of the point),
    /// used as the member's static key in the transport's Noise handshake. One key
    /// pair per member keeps the cluster file to one key each; using an Ed25519 pair
    /// for X25519 as well is the construction of libsodium's
    /// `crypto_sign_ed25519_pk_to_curve25519`.
    pub fn to_x25519(&self) -> [u8; 32] {
        self.0.to_montgomery().to_bytes()
    }

    /// Verifies `signature` over `label || BLAKE3(payload)` (`verify_strict`: the rule
    /// for members' signatures).
    pub fn verify(&self, label: &str, payload: &[u8], signature: &Signature) -> bool {
        let message = signing_message(label, payload);
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(&message, &signature).is_ok()
    }

    /// Verifies `signature` over `label || BLAKE3(payload)` under the rule for client
    /// signatures: ZIP 215, and a key of small order verifies nothing. Accepts
    /// exactly what [`SignatureBatch`] accepts for the same triple.
    pub fn verify_zip215(&self, label: &str, payload: &[u8], signature: &Signature) -> bool {
        match zip215_item(self, label, payload, signature) {
            Some(item) => item.verify_single().is_ok(),
            None => false,
        }
    }

    /// Whether the key has small order (a "weak" key, for which signatures can be
    /// made without a secret).
    pub fn is_weak(&self) -> bool {
        self.0.is_weak()
    }
}

/// The ZIP 215 verification item for a triple, or `None` if the key is weak: with a
/// key of small order, `R` of small order and `s = 0` satisfy the cofactored equation
/// for every message, so such keys verify no client signature, alone or in a batch.
fn zip215_item(
    key: &PublicKey,
    label: &str,
    payload: &[u8],
    signature: &Signature,
) -> Option<ed25519_zebra::batch::Item> {
    if key.is_weak() {
        return None;
    }
    let key = ed25519_zebra::VerificationKeyBytes::from(key.to_bytes());
    let signature = ed25519_zebra::Signature::from_bytes(&signature.0);
    let message = signing_message(label, payload);
    Some(ed25519_zebra::batch::Item::from((
        key,
        signature,
        &message[..],
    )))
}

/// Batch verification of Ed25519 signatures under the rule of
/// [`PublicKey::verify_zip215`], with the same answer per signature.
///
/// [`SignatureBatch::verify`] checks the whole batch with one multiscalar
/// multiplication; if that fails, it verifies each signature alone, so one bad
/// signature costs the others nothing but time. The batch equation's random
/// coefficients (128 bits each) are drawn from BLAKE3 in XOF mode over every key,
/// signature and message in the batch: deterministic (the simulator replays runs), and
/// unpredictable to whoever chose the signatures, since any change to the batch
/// changes them all; an invalid batch passes with probability at most `2^-128` per
/// batch tried (with BLAKE3 as a random oracle), as with coefficients from a random
/// number generator.
pub struct SignatureBatch {
    /// Per signature: its item, or `None` if it fails before any arithmetic.
    items: Vec<Option<ed25519_zebra::batch::Item>>,
    /// Per signature: what names it in a [`SignatureCache`].
    entries: Vec<[u8; 32]>,
    transcript: blake3::Hasher,
}

/// The context of the BLAKE3 key derivation that seeds batch coefficients.
const BATCH_TRANSCRIPT_CONTEXT: &str =
    "diffuse 2026-11-22 ZIP 215 batch verification: coefficients from the batch transcript";

impl SignatureBatch {
    /// An empty batch.
    pub fn new() -> SignatureBatch {
        SignatureBatch {
            items: Vec::new(),
            entries: Vec::new(),
            transcript: blake3::Hasher::new_derive_key(BATCH_TRANSCRIPT_CONTEXT),
        }
    }

    /// Adds `signature` by `key` over `label || BLAKE3(payload)`; its answer is at the
    /// same index in [`SignatureBatch::verify`]'s result.
    pub fn push(&mut self, key: &PublicKey, label: &str, payload: &[u8], signature: &Signature) {
        let digest = blake3::hash(payload);
        let mut entry = blake3::Hasher::new();
        entry.update(&(label.len() as u64).to_le_bytes());
        entry.update(label.as_bytes());
        entry.update(digest.as_bytes());
        entry.update(&key.to_bytes());
        entry.update(&signature.0);
        let entry = *entry.finalize().as_bytes();
        self.transcript.update(&entry);
        self.entries.push(entry);
        self.items.push(zip215_item(key, label, payload, signature));
    }

    /// The signatures added.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no signature was added.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether each signature is valid, in the order they were added.
    pub fn verify(self) -> Vec<bool> {
        let SignatureBatch {
            items, transcript, ..
        } = self;
        verify_items(items, &transcript)
    }

    /// As [`SignatureBatch::verify`], but a signature found in `cache` counts as
    /// valid without arithmetic, and every valid one is added to it.
    pub fn verify_cached(self, cache: &SignatureCache) -> Vec<bool> {
        let SignatureBatch {
            items,
            entries,
            transcript,
        } = self;
        let known: Vec<bool> = entries.iter().map(|e| cache.contains(e)).collect();
        let unknown: Vec<_> = items
            .into_iter()
            .zip(&known)
            .filter(|(_, known)| !**known)
            .map(|(item, _)| item)
            .collect();
        // The coefficients come from the transcript of the whole batch, which
        // binds every signature still to check.
        let mut checked = verify_items(unknown, &transcript).into_iter();
        let valid: Vec<bool> = known
            .iter()
            .map(|&known| known || checked.next().unwrap_or(false))
            .collect();
        for (entry, _) in entries.iter().zip(&valid).filter(|(_, v)| **v) {
            cache.insert(*entry);
        }
        valid
    }
}

/// Checks `items` in one batch (coefficients from `transcript`), then one by one
/// if the batch fails.
fn verify_items(
    items: Vec<Option<ed25519_zebra::batch::Item>>,
    transcript: &blake3::Hasher,
) -> Vec<bool> {
    let usable = items.iter().filter(|i| i.is_some()).count();
    if usable >= 2 {
        let mut batch = ed25519_zebra::batch::Verifier::new();
        for item in items.iter().flatten() {
            batch.queue(item.clone());
        }
        let coefficients = TranscriptRng(transcript.finalize_xof());
        if batch.verify(coefficients).is_ok() {
            return items.iter().map(Option::is_some).collect();
        }
    }
    items
        .into_iter()
        .map(|item| item.is_some_and(|item| item.verify_single().is_ok()))
        .collect()
}

/// Signatures known to be valid (under [`PublicKey::verify_zip215`]), so that
/// many verifications of one signature cost one: the clients of one process (a
/// gateway serving many users, the benchmark's load generator) get the same
/// enclave certificates of a batch in each of their REPLYs. Each entry is the
/// BLAKE3 hash of the key, the label, the payload's digest and the signature, so a
/// hit is the very triple that verified. Bounded: the oldest entries go first.
pub struct SignatureCache {
    capacity: usize,
    entries: std::sync::Mutex<CacheEntries>,
}

#[derive(Default)]
struct CacheEntries {
    set: std::collections::HashSet<[u8; 32]>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl SignatureCache {
    /// A cache of at most `capacity` signatures.
    pub fn new(capacity: usize) -> SignatureCache {
        SignatureCache {
            capacity,
            entries: std::sync::Mutex::new(CacheEntries::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheEntries> {
        // The entries stay consistent whatever panicked while holding the lock.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn contains(&self, entry: &[u8; 32]) -> bool {
        self.lock().set.contains(entry)
    }

    fn insert(&self, entry: [u8; 32]) {
        let mut entries = self.lock();
        if self.capacity == 0 || !entries.set.insert(entry) {
            return;
        }
        entries.order.push_back(entry);
        while entries.order.len() > self.capacity {
            if let Some(oldest) = entries.order.pop_front() {
                entries.set.remove(&oldest);
            }
        }
    }

    /// The signatures held.
    pub fn len(&self) -> usize {
        self.lock().set.len()
    }

    /// Whether no signature is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for SignatureCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignatureCache({} of {})", self.len(), self.capacity)
    }
}

impl Default for SignatureBatch {
    fn default() -> Self {
        SignatureBatch::new()
    }
}

impl fmt::Debug for SignatureBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignatureBatch({} signatures)", self.items.len())
    }
}

/// BLAKE3's extendable output as the coefficient source of a batch verification.
struct TranscriptRng(blake3::OutputReader);

impl rand_core::TryRng for TranscriptRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0u8; 4];
        self.0.fill(&mut bytes);
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0u8; 8];
        self.0.fill(&mut bytes);
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for TranscriptRng {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pk:{}", &self.to_hex()[..8])
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <[u8; 32]>::deserialize(d)?;
        PublicKey::from_bytes(&bytes).map_err(|_| de::Error::custom("invalid Ed25519 public key"))
    }
}

/// The bytes are not a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid Ed25519 key")]
pub struct InvalidKey;

/// An Ed25519 signing key. Never serialised implicitly: key files write it on purpose.
#[derive(Clone)]
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// The key whose seed is `seed`. Callers supply the entropy: the simulator from
    /// its seeded RNG, `diffuse keygen` from the operating system.
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses the hex encoding of a seed.
    pub fn from_hex(text: &str) -> Result<SecretKey, InvalidKey> {
        let seed: [u8; 32] = hex::decode(text.trim())
            .map_err(|_| InvalidKey)?
            .try_into()
            .map_err(|_| InvalidKey)?;
        Ok(SecretKey::from_seed(seed))
    }

    /// The hex encoding of the seed.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The X25519 secret matching [`PublicKey::to_x25519`] of this key's public key.
    pub fn to_x25519(&self) -> [u8; 32] {
        self.0.to_scalar_bytes()
    }

    /// Signs `label || BLAKE3(payload)`.
    pub fn sign(&self, label: &str, payload: &[u8]) -> Signature {
        Signature(self.0.sign(&signing_message(label, payload)).to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?})", self.public())
    }
}

fn signing_message(label: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(label.len() + 33);
    message.extend_from_slice(label.as_bytes());
    message.push(0);
    message.extend_from_slice(blake3::hash(payload).as_bytes());
    message
}

/// The length of a [`Mac`]: 128 bits, so a forger's chance per try is `2^-128`.
pub const MAC_BYTES: usize = 16;

/// A message authentication code: keyed BLAKE3 truncated to [`MAC_BYTES`]. Compare
/// MACs with [`MacKey::verify`] (constant time), never with `==`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Mac(pub [u8; MAC_BYTES]);

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mac:{}", hex::encode(&self.0[..4]))
    }
}

/// A symmetric key that exactly two members share, for [`Mac`]s. Made by
/// [`KeyAgreement::mac_key`]; never serialised.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl MacKey {
    /// The MAC of `message`.
    pub fn mac(&self, message: &[u8]) -> Mac {
        let full = blake3::keyed_hash(&self.0, message);
        let mut mac = [0u8; MAC_BYTES];
        mac.copy_from_slice(&full.as_bytes()[..MAC_BYTES]);
        Mac(mac)
    }

    /// Whether `mac` is this key's MAC of `message`, compared in constant time.
    pub fn verify(&self, message: &[u8], mac: &Mac) -> bool {
        use subtle::ConstantTimeEq as _;
        self.mac(message).0.ct_eq(&mac.0).into()
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// A member's static X25519 secret (the one of its Ed25519 key pair, as the transport
/// uses it), kept to derive the keys it shares with each peer.
#[derive(Clone)]
pub struct KeyAgreement {
    scalar: [u8; 32],
    public: PublicKey,
}

impl KeyAgreement {
    /// The key agreement of `secret`'s key pair.
    pub fn new(secret: &SecretKey) -> Self {
        Self {
            scalar: secret.to_x25519(),
            public: secret.public(),
        }
    }

    /// The MAC key this member shares with `peer` for the use named by `context`:
    /// `BLAKE3-derive_key(context, X25519(mine, peer's) || lower public key || higher
    /// public key)`. Both members derive the same key; the public keys bind it to the
    /// pair and the context to one use (a hard-coded, globally unique string, as
    /// BLAKE3's KDF requires). `None` if the Diffie-Hellman output is all zero (the
    /// peer's key has small order), which would make the key public.
    pub fn mac_key(&self, context: &'static str, peer: &PublicKey) -> Option<MacKey> {
        self.shared_key(context, peer).map(MacKey)
    }

    /// The raw 32-byte key this member shares with `peer` for the use named by
    /// `context`, derived exactly as for [`KeyAgreement::mac_key`], for a use other
    /// than MACs (e.g. an AEAD key inside the trusted component). `None` for a
    /// small-order peer key.
    pub fn shared_key(&self, context: &'static str, peer: &PublicKey) -> Option<[u8; 32]> {
        use subtle::ConstantTimeEq as _;
        let shared = curve25519_dalek::montgomery::MontgomeryPoint(peer.to_x25519())
            .mul_clamped(self.scalar)
            .to_bytes();
        if bool::from(shared.ct_eq(&[0u8; 32])) {
            return None;
        }
        let (mine, theirs) = (self.public.to_bytes(), peer.to_bytes());
        let (low, high) = if mine <= theirs {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        let mut material = [0u8; 96];
        material[..32].copy_from_slice(&shared);
        material[32..64].copy_from_slice(&low);
        material[64..].copy_from_slice(&high);
        Some(blake3::derive_key(context, &material))
    }
}

impl fmt::Debug for KeyAgreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyAgreement({:?})", self.public)
    }
}

/// A value that can be signed: it names its domain-separation label.
pub trait Signable: Serialize {
    /// The label that keeps signatures over different kinds apart, e.g. `"pbft/prepare"`.
    const LABEL: &'static str;
}

/// A value with a signature over its canonical encoding.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Signed<T> {
    /// The signed value.
    pub value: T,
    /// The signature over [`Signable::LABEL`] and the value's encoding.
    pub signature: Signature,
}

impl<T: Signable> Signed<T> {
    /// Signs `value` with `key`.
    pub fn sign(value: T, key: &SecretKey) -> Signed<T> {
        let signature = key.sign(T::LABEL, &codec::encode_payload(&value));
        Signed { value, signature }
    }

    /// Whether the signature is `key`'s over this value.
    pub fn verify(&self, key: &PublicKey) -> bool {
        key.verify(
            T::LABEL,
            &codec::encode_payload(&self.value),
            &self.signature,
        )
    }

    /// Whether the signature is `key`'s over this value under the rule for client
    /// signatures ([`PublicKey::verify_zip215`]).
    pub fn verify_zip215(&self, key: &PublicKey) -> bool {
        key.verify_zip215(
            T::LABEL,
            &codec::encode_payload(&self.value),
            &self.signature,
        )
    }

    /// Adds this value's signature by `key` to `batch`
    /// ([`Signed::verify_zip215`] in a batch).
    pub fn push_to(&self, key: &PublicKey, batch: &mut SignatureBatch) {
        batch.push(
            key,
            T::LABEL,
            &codec::encode_payload(&self.value),
            &self.signature,
        );
    }
}

impl<T: fmt::Debug> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T> std::ops::Deref for Signed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Vote(u64);
    impl Signable for Vote {
        const LABEL: &'static str = "test/vote";
    }

    #[derive(Serialize)]
    struct Other(u64);
    impl Signable for Other {
        const LABEL: &'static str = "test/other";
    }

    #[test]
    fn signatures_verify_only_for_the_signer_and_the_value() {
        let alice = SecretKey::from_seed([1; 32]);
        let bob = SecretKey::from_seed([2; 32]);
        let signed = Signed::sign(Vote(7), &alice);
        assert!(signed.verify(&alice.public()));
        assert!(!signed.verify(&bob.public()));
        let tampered = Signed {
            value: Vote(8),
            signature: signed.signature,
        };
        assert!(!tampered.verify(&alice.public()));
    }

    #[test]
    fn labels_separate_domains() {
        let key = SecretKey::from_seed([3; 32]);
        let vote = Signed::sign(Vote(1), &key);
        let other = Signed {
            value: Other(1),
            signature: vote.signature,
        };
        assert!(!other.verify(&key.public()));
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let key = SecretKey::from_seed([4; 32]);
        let again = SecretKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(again.public(), key.public());
        assert_eq!(
            PublicKey::from_hex(&key.public().to_hex()).unwrap(),
            key.public()
        );
        assert!(PublicKey::from_hex("zz").is_err());
    }

    #[test]
    fn digests_depend_on_label_and_bytes() {
        assert_ne!(Digest::of("a", b"x"), Digest::of("b", b"x"));
        assert_ne!(Digest::of("a", b"x"), Digest::of("a", b"y"));
        assert_eq!(Digest::of("a", b"x"), Digest::of("a", b"x"));
    }

    const CONTEXT: &str = "diffuse tests: pairwise MAC key";

    #[test]
    fn pairwise_keys_agree_and_differ_per_pair_and_context() {
        let (a, b, c) = (
            SecretKey::from_seed([5; 32]),
            SecretKey::from_seed([6; 32]),
            SecretKey::from_seed([7; 32]),
        );
        let ab = KeyAgreement::new(&a).mac_key(CONTEXT, &b.public()).unwrap();
        let ba = KeyAgreement::new(&b).mac_key(CONTEXT, &a.public()).unwrap();
        let ac = KeyAgreement::new(&a).mac_key(CONTEXT, &c.public()).unwrap();
        let other = KeyAgreement::new(&a)
            .mac_key("diffuse tests: another use", &b.public())
            .unwrap();
        let mac = ab.mac(b"hello");
        assert!(ba.verify(b"hello", &mac));
        assert!(!ba.verify(b"hellp", &mac));
        assert!(!ac.verify(b"hello", &mac));
        assert!(!other.verify(b"hello", &mac));
        let mut flipped = mac;
        flipped.0[15] ^= 1;
        assert!(!ab.verify(b"hello", &flipped));
    }

    #[test]
    fn small_order_peer_keys_give_no_mac_key() {
        // The Edwards identity (y = 1) is a valid encoding of a point of small order:
        // its Diffie-Hellman output is zero, so it must not yield a key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = PublicKey::from_bytes(&identity).unwrap();
        let me = KeyAgreement::new(&SecretKey::from_seed([8; 32]));
        assert!(me.mac_key(CONTEXT, &weak).is_none());
    }

    #[test]
    fn mac_decoding_is_fixed_length() {
        let mac = Mac([3; MAC_BYTES]);
        let bytes = codec::encode_payload(&mac);
        assert_eq!(bytes.len(), MAC_BYTES);
        assert_eq!(codec::decode_payload::<Mac>(&bytes), Ok(mac));
        assert!(codec::decode_payload::<Mac>(&bytes[..10]).is_err());
    }

    #[test]
    fn signature_decoding_checks_length() {
        let sig = Signature([9; 64]);
        let bytes = codec::encode_payload(&sig);
        assert_eq!(codec::decode_payload::<Signature>(&bytes), Ok(sig));
        let short = codec::encode_payload(&serde_bytes_like(&[1u8; 10]));
        assert!(codec::decode_payload::<Signature>(&short).is_err());
    }

    fn serde_bytes_like(b: &[u8]) -> crate::codec::Blob<64> {
        crate::codec::Blob::try_from_vec(b.to_vec()).unwrap()
    }

    /// The ways a test breaks a signature (or its key) that ZIP 215 and `verify_strict`
    /// may judge differently, plus plain forgeries.
    #[derive(Debug, Clone, Copy)]
    enum Twist {
        /// Left as signed.
        None,
        /// Verified over another payload.
        OtherPayload,
        /// Verified with another member's key.
        OtherKey,
        /// One bit of `R` flipped.
        FlipR,
        /// One bit of `s` flipped.
        FlipS,
        /// `s + ℓ`: the same scalar, not canonically encoded.
        NonCanonicalS,
        /// `R + T` with `T` of order 8: the cofactored equation (ZIP 215) still
        /// holds, the cofactorless one (`verify_strict`) does not.
        TorsionR,
        /// A key of small order with `R` the identity and `s = 0`: satisfies the
        /// cofactored equation for any message, refused as a weak key.
        WeakKey,
    }

    const TWISTS: [Twist; 8] = [
        Twist::None,
        Twist::OtherPayload,
        Twist::OtherKey,
        Twist::FlipR,
        Twist::FlipS,
        Twist::NonCanonicalS,
        Twist::TorsionR,
        Twist::WeakKey,
    ];

    /// A (key, payload, signature) triple, twisted.
    fn triple(seed: u8, twist: Twist) -> (PublicKey, Vec<u8>, Signature) {
        use curve25519_dalek::constants::EIGHT_TORSION;
        let key = SecretKey::from_seed([seed; 32]);
        let payload = vec![seed; 1 + seed as usize % 40];
        let mut signature = key.sign("test/batch", &payload);
        let mut public = key.public();
        let mut payload_checked = payload.clone();
        match twist {
            Twist::None => {}
            Twist::OtherPayload => payload_checked.push(1),
            Twist::OtherKey => public = SecretKey::from_seed([seed ^ 0x80; 32]).public(),
            Twist::FlipR => signature.0[3] ^= 0x10,
            Twist::FlipS => signature.0[40] ^= 0x01,
            Twist::NonCanonicalS => {
                // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
                const L: [u8; 32] = [
                    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde,
                    0xf9, 0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
                ];
                let mut carry = 0u16;
                for (byte, l) in signature.0[32..].iter_mut().zip(L) {
                    let sum = u16::from(*byte) + u16::from(l) + carry;
                    *byte = sum as u8;
                    carry = sum >> 8;
                }
            }
            Twist::TorsionR => {
                // Sign by hand with the nonce point R + T: s = r + H(R + T, A, m) a.
                use curve25519_dalek::scalar::Scalar;
                use sha2::Digest as _;
                let mut clamped = key.to_x25519();
                clamped[0] &= 248;
                clamped[31] &= 127;
                clamped[31] |= 64;
                let a = Scalar::from_bytes_mod_order(clamped);
                let r = Scalar::from_bytes_mod_order([seed.wrapping_add(77); 32]);
                let big_r =
                    curve25519_dalek::constants::ED25519_BASEPOINT_POINT * r + EIGHT_TORSION[1];
                let message = signing_message("test/batch", &payload);
                let hash = sha2::Sha512::new()
                    .chain_update(big_r.compress().as_bytes())
                    .chain_update(public.to_bytes())
                    .chain_update(&message)
                    .finalize();
                let mut wide = [0u8; 64];
                wide.copy_from_slice(&hash);
                let s = r + Scalar::from_bytes_mod_order_wide(&wide) * a;
                signature.0[..32].copy_from_slice(big_r.compress().as_bytes());
                signature.0[32..].copy_from_slice(s.as_bytes());
            }
            Twist::WeakKey => {
                let mut identity = [0u8; 32];
                identity[0] = 1;
                public = PublicKey::from_bytes(&identity).unwrap();
                signature = Signature([0; 64]);
                signature.0[0] = 1;
            }
        }
        (public, payload_checked, signature)
    }

    /// Verifies triples in one batch; asserts each answer equals single verification.
    fn batch_agrees(triples: &[(PublicKey, Vec<u8>, Signature)]) -> Vec<bool> {
        let mut batch = SignatureBatch::new();
        for (key, payload, signature) in triples {
            batch.push(key, "test/batch", payload, signature);
        }
        assert_eq!(batch.len(), triples.len());
        let answers = batch.verify();
        let single: Vec<bool> = triples
            .iter()
            .map(|(key, payload, signature)| key.verify_zip215("test/batch", payload, signature))
            .collect();
        assert_eq!(answers, single, "batch and single verification disagree");
        answers
    }

    #[test]
    fn zip215_single_verification_accepts_what_it_should() {
        for twist in TWISTS {
            let (key, payload, signature) = triple(9, twist);
            let zip215 = key.verify_zip215("test/batch", &payload, &signature);
            let strict = key.verify("test/batch", &payload, &signature);
            let expected = matches!(twist, Twist::None | Twist::TorsionR);
            assert_eq!(zip215, expected, "{twist:?}");
            // The one difference with members' rule: a torsion component in R.
            assert_eq!(strict, matches!(twist, Twist::None), "{twist:?}");
        }
    }

    #[test]
    fn a_batch_with_one_bad_signature_refuses_only_that_one() {
        for twist in TWISTS {
            let mut triples: Vec<_> = (10..26).map(|seed| triple(seed, Twist::None)).collect();
            triples[7] = triple(17, twist);
            let answers = batch_agrees(&triples);
            let bad: Vec<usize> = (0..answers.len()).filter(|&i| !answers[i]).collect();
            let expected: Vec<usize> = if matches!(twist, Twist::None | Twist::TorsionR) {
                vec![]
            } else {
                vec![7]
            };
            assert_eq!(bad, expected, "{twist:?}");
        }
    }

    #[test]
    fn batches_of_zero_one_and_repeated_keys() {
        assert!(SignatureBatch::new().verify().is_empty());
        assert_eq!(batch_agrees(&[triple(3, Twist::None)]), [true]);
        assert_eq!(batch_agrees(&[triple(3, Twist::FlipS)]), [false]);
        // Two signatures by one key (coalesced in the batch equation), one of them bad.
        let key = SecretKey::from_seed([4; 32]);
        let good = (key.public(), b"a".to_vec(), key.sign("test/batch", b"a"));
        let bad = (key.public(), b"b".to_vec(), key.sign("test/batch", b"c"));
        assert_eq!(batch_agrees(&[good.clone(), bad]), [true, false]);
        assert_eq!(batch_agrees(&[good.clone(), good]), [true, true]);
    }

    #[test]
    fn a_signature_cache_remembers_valid_triples_only() {
        let key = SecretKey::from_seed([5; 32]);
        let (public, other) = (key.public(), SecretKey::from_seed([6; 32]).public());
        let good = key.sign("test/cache", b"a");
        let cache = SignatureCache::new(2);
        let check = |triples: &[(&PublicKey, &[u8], &Signature)]| {
            let mut batch = SignatureBatch::new();
            for (k, payload, signature) in triples {
                batch.push(k, "test/cache", payload, signature);
            }
            batch.verify_cached(&cache)
        };
        let bad = key.sign("test/cache", b"b");
        assert_eq!(
            check(&[(&public, b"a", &good), (&public, b"a", &bad)]),
            [true, false]
        );
        assert_eq!(cache.len(), 1, "only the valid signature is remembered");
        // The remembered signature stands for its own key, label and payload only.
        assert_eq!(check(&[(&public, b"a", &good)]), [true]);
        assert_eq!(check(&[(&public, b"c", &good)]), [false]);
        assert_eq!(check(&[(&other, b"a", &good)]), [false]);
        let mut batch = SignatureBatch::new();
        batch.push(&public, "test/other", b"a", &good);
        assert_eq!(batch.verify_cached(&cache), [false]);
        // Bounded: the oldest entry goes.
        for payload in [b"x", b"y", b"z"] {
            let signature = key.sign("test/cache", payload);
            assert_eq!(check(&[(&public, payload, &signature)]), [true]);
        }
        assert_eq!(cache.len(), 2);
    }

    proptest::proptest! {
        /// Any mix of valid and twisted signatures: the batch answers, per signature,
        /// what single verification answers.
        #[test]
        fn batch_verification_equals_single_verification(
            picks in proptest::collection::vec((0u8..200, 0usize..TWISTS.len()), 0..24)
        ) {
            let triples: Vec<_> = picks
                .iter()
                .map(|&(seed, twist)| triple(seed, TWISTS[twist]))
                .collect();
            batch_agrees(&triples);
        }
    }
}
/// Costs of the primitives on this machine, printed, not asserted:
/// `cargo test --release -p diffuse-core crypto_costs -- --ignored --nocapture`.
#[cfg(test)]
mod costs {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "a measurement, run by hand with --release"]
    fn crypto_costs() {
        const ROUNDS: u32 = 2000;
        let key = SecretKey::from_seed([1; 32]);
        let public = key.public();
        let payload = [7u8; 100];
        let time = |what: &str, mut f: Box<dyn FnMut() + '_>| {
            let start = Instant::now();
            for _ in 0..ROUNDS {
                f();
            }
            println!("{what:<40} {:?}", start.elapsed() / ROUNDS);
        };
        let signature = key.sign("costs", &payload);
        time(
            "Ed25519 sign (100-byte payload)",
            Box::new(|| {
                std::hint::black_box(key.sign("costs", &payload));
            }),
        );
        time(
            "Ed25519 verify_strict",
            Box::new(|| assert!(public.verify("costs", &payload, &signature))),
        );
        let agreement = KeyAgreement::new(&key);
        let peer = SecretKey::from_seed([2; 32]).public();
        time(
            "X25519 + BLAKE3 derive_key",
            Box::new(|| {
                std::hint::black_box(agreement.mac_key("diffuse costs: pairwise", &peer));
            }),
        );
        time(
            "Ed25519 verify, ZIP 215 (ed25519-zebra)",
            Box::new(|| assert!(public.verify_zip215("costs", &payload, &signature))),
        );
        for size in [4u32, 16, 64, 256] {
            let keys: Vec<SecretKey> = (0..size)
                .map(|i| SecretKey::from_seed([(i % 251) as u8 + 1; 32]))
                .collect();
            let signatures: Vec<Signature> =
                keys.iter().map(|k| k.sign("costs", &payload)).collect();
            let keys: Vec<PublicKey> = keys.iter().map(SecretKey::public).collect();
            let start = Instant::now();
            let rounds = (ROUNDS / size).max(10);
            for _ in 0..rounds {
                let mut batch = SignatureBatch::new();
                for (k, s) in keys.iter().zip(&signatures) {
                    batch.push(k, "costs", &payload, s);
                }
                assert!(batch.verify().iter().all(|ok| *ok));
            }
            println!(
                "{:<40} {:?}",
                format!("ZIP 215 batch of {size}, per signature"),
                start.elapsed() / (rounds * size)
            );
        }
        let mac_key = agreement.mac_key("diffuse costs: pairwise", &peer).unwrap();
        let mac = mac_key.mac(&Digest::of("costs", &payload).0);
        time(
            "BLAKE3 digest + MAC verify",
            Box::new(|| assert!(mac_key.verify(&Digest::of("costs", &payload).0, &mac))),
        );
    }
}
