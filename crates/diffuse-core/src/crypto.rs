//! Cryptographic primitives, each from a well-kept crate behind a small wrapper.
//!
//! - Digests: BLAKE3 (`blake3`), always with a domain-separation label.
//! - Signatures: Ed25519 (`ed25519-dalek`), verified with `verify_strict` everywhere so
//!   that every replica accepts exactly the same signatures.
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
