//! The wire codec: a versioned envelope around a `postcard` encoding, with hard limits.
//!
//! Every frame is `[version: u8][postcard payload]`. Decoding checks the frame size
//! before looking at the payload, rejects unknown versions and trailing bytes, and
//! returns a typed [`DecodeError`]; it never panics. Every variable-length field of a
//! message is a [`BoundedVec`] or a [`Blob`] with a compile-time maximum, checked
//! against the length prefix before anything is allocated, so an attacker's length
//! prefix never sizes an allocation.

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use thiserror::Error;

/// The wire format version this build speaks. 2: PBFT's (and MinBFT's) client
/// requests carry an authenticator besides the signed body. 3: FastBFT's view
/// change, checkpoint, REJOIN and fallback messages. 4: FastBFT's certificates
/// carry their kind (a PREPARE's is enclave-verified), and a request's Merkle leaf
/// binds its client id.
pub const WIRE_VERSION: u8 = 4;

/// The largest frame any Diffuse endpoint accepts, in bytes.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame had no bytes at all.
    #[error("empty frame")]
    Empty,
    /// The frame is larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The envelope's version byte is not one this build speaks.
    #[error("unsupported wire version {found} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The payload does not decode as the expected message type, or a length
    /// exceeds the field's bound.
    #[error("malformed payload: {0}")]
    Malformed(postcard::Error),
    /// The payload decoded but bytes were left over.
    #[error("{count} trailing bytes after the payload")]
    TrailingBytes {
        /// Number of bytes left over.
        count: usize,
    },
}

/// A message type that travels on the wire.
pub trait WireMessage:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
    /// A short, stable name of the message's kind, used in traces and metrics.
    fn kind(&self) -> &'static str;

    /// Whether this message carries a client's request, whoever sends it (the
    /// client, or a replica relaying it). A runtime queues these behind the
    /// replicas' agreement messages and may shed those a replica relays when it is
    /// overloaded: a lost request is sent again (the client retransmits, a
    /// backup relays or forwards what it watches each period), while a late
    /// agreement message costs the whole cluster a timeout. A protocol must
    /// therefore treat a relayed request as a message the network may lose.
    fn is_client_request(&self) -> bool {
        false
    }

    /// The client a message between a client and the replicas is from or for (a
    /// request, a read, a reply), `None` for the others. One connection may speak
    /// for several clients that share a key (one process hosting them); the
    /// runtime tells them apart, and routes their replies, by this.
    fn client(&self) -> Option<crate::ids::ClientId> {
        None
    }
}

/// Encodes `message` into a versioned frame.
pub fn encode<M: Serialize + ?Sized>(message: &M) -> Vec<u8> {
    let mut frame = vec![WIRE_VERSION];
    // postcard's serializer only fails for types serde cannot express (maps with
    // unknown length), which Diffuse's message types never contain.
    frame = postcard::to_extend(message, frame).expect("message types are postcard-encodable");
    frame
}

/// Decodes a versioned frame of at most [`MAX_FRAME_BYTES`].
pub fn decode<M: DeserializeOwned>(frame: &[u8]) -> Result<M, DecodeError> {
    decode_with_limit(frame, MAX_FRAME_BYTES)
}

/// Decodes a versioned frame of at most `max_bytes`.
pub fn decode_with_limit<M: DeserializeOwned>(
    frame: &[u8],
    max_bytes: usize,
) -> Result<M, DecodeError> {
    if frame.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            len: frame.len(),
            max: max_bytes,
        });
    }
    let (&version, payload) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    decode_payload(payload)
}

/// Encodes a value without the envelope, e.g. as the bytes a signature covers.
pub fn encode_payload<M: Serialize + ?Sized>(message: &M) -> Vec<u8> {
    postcard::to_stdvec(message).expect("message types are postcard-encodable")
}

/// Decodes a value encoded by [`encode_payload`], rejecting trailing bytes.
pub fn decode_payload<M: DeserializeOwned>(payload: &[u8]) -> Result<M, DecodeError> {
    let (message, rest) = postcard::take_from_bytes(payload).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    Ok(message)
}

/// A `Vec` with at most `MAX` elements, enforced while decoding.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoundedVec<T, const MAX: usize>(Vec<T>);

impl<T, const MAX: usize> Default for BoundedVec<T, MAX> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T, const MAX: usize> BoundedVec<T, MAX> {
    /// The empty vector.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Wraps `items`, or hands them back if there are more than `MAX`.
    pub fn try_from_vec(items: Vec<T>) -> Result<Self, Vec<T>> {
        if items.len() > MAX {
            Err(items)
        } else {
            Ok(Self(items))
        }
    }

    /// Wraps `items`, keeping only the first `MAX`.
    pub fn truncating(mut items: Vec<T>) -> Self {
        items.truncate(MAX);
        Self(items)
    }

    /// Appends `item`; returns it back if the vector is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.0.len() >= MAX {
            return Err(item);
        }
        self.0.push(item);
        Ok(())
    }

    /// The inner vector.
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }

    /// The maximum number of elements.
    pub const fn max_len() -> usize {
        MAX
    }
}

impl<T, const MAX: usize> Deref for BoundedVec<T, MAX> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: fmt::Debug, const MAX: usize> fmt::Debug for BoundedVec<T, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, const MAX: usize> Serialize for BoundedVec<T, MAX> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for BoundedVec<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BoundedVisitor<T, const MAX: usize>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for BoundedVisitor<T, MAX> {
            type Value = BoundedVec<T, MAX>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {MAX} elements")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                // The hint is bounded by MAX, never by the attacker alone.
                let mut items = Vec::with_capacity(hint.min(MAX));
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX {
                        return Err(de::Error::invalid_length(MAX + 1, &self));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }

        deserializer.deserialize_seq(BoundedVisitor::<T, MAX>(PhantomData))
    }
}

#[cfg(feature = "arbitrary")]
impl<'a, T: arbitrary::Arbitrary<'a>, const MAX: usize> arbitrary::Arbitrary<'a>
    for BoundedVec<T, MAX>
{
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = u.int_in_range(0..=MAX.min(8))?;
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            items.push(T::arbitrary(u)?);
        }
        Ok(BoundedVec(items))
    }
}

/// A byte string of at most `MAX` bytes, enforced while decoding, encoded compactly.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Blob<const MAX: usize>(Vec<u8>);

impl<const MAX: usize> Blob<MAX> {
    /// Wraps `bytes`, or hands them back if longer than `MAX`.
    pub fn try_from_vec(bytes: Vec<u8>) -> Result<Self, Vec<u8>> {
        if bytes.len() > MAX {
            Err(bytes)
        } else {
            Ok(Self(bytes))
        }
    }

    /// The inner bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }

    /// The maximum length.
    pub const fn max_len() -> usize {
        MAX
    }
}

impl<const MAX: usize> Deref for Blob<MAX> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<const MAX: usize> fmt::Debug for Blob<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= 16 {
            write!(f, "0x{}", hex::encode(&self.0))
        } else {
            write!(
                f,
                "0x{}..({} bytes)",
                hex::encode(&self.0[..8]),
                self.0.len()
            )
        }
    }
}

impl<const MAX: usize> Serialize for Blob<MAX> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Blob<MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BlobVisitor<const MAX: usize>;

        impl<const MAX: usize> BlobVisitor<MAX> {
            fn check<E: de::Error>(&self, len: usize) -> Result<(), E> {
                if len > MAX {
                    return Err(E::invalid_length(len, self));
                }
                Ok(())
            }
        }

        impl<'de, const MAX: usize> Visitor<'de> for BlobVisitor<MAX> {
            type Value = Blob<MAX>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of at most {MAX} bytes")
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                self.check(v.len())?;
                Ok(Blob(v.to_vec()))
            }

            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                self.check(v.len())?;
                Ok(Blob(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                self.check(hint)?;
                let mut bytes = Vec::with_capacity(hint);
                while let Some(b) = seq.next_element::<u8>()? {
                    self.check(bytes.len() + 1)?;
                    bytes.push(b);
                }
                Ok(Blob(bytes))
            }
        }

        deserializer.deserialize_byte_buf(BlobVisitor::<MAX>)
    }
}

#[cfg(feature = "arbitrary")]
impl<'a, const MAX: usize> arbitrary::Arbitrary<'a> for Blob<MAX> {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = u.int_in_range(0..=MAX.min(64))?;
        Ok(Blob(u.bytes(len)?.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        items: BoundedVec<u32, 4>,
        blob: Blob<8>,
    }

    #[test]
    fn round_trips_through_the_envelope() {
        let sample = Sample {
            items: BoundedVec::try_from_vec(vec![1, 2, 3]).unwrap(),
            blob: Blob::try_from_vec(b"abc".to_vec()).unwrap(),
        };
        let frame = encode(&sample);
        assert_eq!(frame[0], WIRE_VERSION);
        assert_eq!(decode::<Sample>(&frame), Ok(sample));
    }

    #[test]
    fn rejects_collections_over_their_bound() {
        let over = (
            BoundedVec::<u32, 8>::try_from_vec(vec![0; 5]).unwrap(),
            Blob::<8>::default(),
        );
        assert!(matches!(
            decode::<Sample>(&encode(&over)),
            Err(DecodeError::Malformed(_))
        ));
        let long_blob = (
            BoundedVec::<u32, 4>::new(),
            Blob::<16>::try_from_vec(vec![7; 9]).unwrap(),
        );
        assert!(matches!(
            decode::<Sample>(&encode(&long_blob)),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A length prefix claiming u32::MAX elements, followed by nothing.
        let mut frame = vec![WIRE_VERSION];
        frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode::<BoundedVec<u64, 1_000_000>>(&frame).is_err());
        assert!(decode::<Blob<{ usize::MAX }>>(&frame).is_err());
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert_eq!(decode::<u8>(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode::<u8>(&[9, 1]),
            Err(DecodeError::UnsupportedVersion { found: 9 })
        );
        assert_eq!(
            decode::<u8>(&[WIRE_VERSION, 1, 2]),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
        assert_eq!(
            decode_with_limit::<u8>(&[WIRE_VERSION, 1, 2], 2),
            Err(DecodeError::TooLarge { len: 3, max: 2 })
        );
    }

    #[test]
    fn push_respects_the_bound() {
        let mut v = BoundedVec::<u8, 1>::new();
        assert_eq!(v.push(1), Ok(()));
        assert_eq!(v.push(2), Err(2));
        assert_eq!(BoundedVec::<u8, 2>::truncating(vec![1, 2, 3]).len(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Sample>(&bytes);
            let _ = decode_payload::<BoundedVec<Blob<4>, 3>>(&bytes);
        }
    }
}
