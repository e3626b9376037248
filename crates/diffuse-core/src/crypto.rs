//! Cryptographic primitives, each from a well-kept crate behind a small wrapper.
//!
//! - Digests: BLAKE3 (`blake3`), always with a domain-separation label.
//! - Signatures: Ed25519 (`ed25519-dalek`), verified with `verify_strict` everywhere so
//!   that every replica accepts exactly the same signatures.
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

    /// Verifies `signature` over `label || BLAKE3(payload)`.
    pub fn verify(&self, label: &str, payload: &[u8], signature: &Signature) -> bool {
        let message = signing_message(label, payload);
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(&message, &signature).is_ok()
    }
}

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
        let mac_key = agreement.mac_key("diffuse costs: pairwise", &peer).unwrap();
        let mac = mac_key.mac(&Digest::of("costs", &payload).0);
        time(
            "BLAKE3 digest + MAC verify",
            Box::new(|| assert!(mac_key.verify(&Digest::of("costs", &payload).0, &mac))),
        );
    }
}
