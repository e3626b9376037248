//! Authenticated, encrypted channels over TCP: a Noise `IK` handshake with the static
//! keys of the cluster file, then length-prefixed frames.
//!
//! Why Noise (the `snow` crate) rather than TLS: every member already has a key pair
//! in the cluster file, and Noise authenticates exactly those keys with no
//! certificates, no custom verifier and one round trip. The initiator knows whom it
//! dials (`IK`: the responder's static key is pinned); the responder learns the
//! initiator's static key inside the encrypted first message and refuses any key
//! that is not a member of the cluster.
//!
//! On the wire every Noise message is `u16` length + ciphertext (Noise caps a message
//! at 65,535 bytes). The decrypted byte stream carries application frames as `u32`
//! length + payload, so a frame may span several Noise messages. A frame longer than
//! the configured maximum is refused before any of it is buffered.

use diffuse_core::crypto::{PublicKey, SecretKey};
use snow::StatelessTransportState;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The Noise protocol name: X25519, ChaCha20-Poly1305, BLAKE2s.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Noise's limit on one message, ciphertext included.
const NOISE_MAX_MESSAGE: usize = 65_535;
/// The AEAD tag added to every transport message.
const TAG_BYTES: usize = 16;
/// The most plaintext bytes carried by one Noise message.
const CHUNK_BYTES: usize = NOISE_MAX_MESSAGE - TAG_BYTES;
/// How long a handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes a reader takes from its socket at a time: small Noise messages that arrive
/// together (a burst of agreement messages, or of replies) cost one `read` system
/// call, not two each (the length, then the message).
const READ_BUFFER_BYTES: usize = 8 << 10;

/// Why a channel failed. Every variant closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The Noise handshake or a decryption failed (wrong key, tampering, replay).
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// The peer's static key is not a member of the cluster.
    #[error("the peer's key is not in the cluster file")]
    UnknownPeer,
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A frame announced more bytes than allowed.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// The prologue both sides mix into the handshake: a different protocol version or
/// cluster makes the handshake fail instead of mixing clusters.
pub fn prologue(cluster_digest: &[u8; 32]) -> Vec<u8> {
    let mut prologue = b"diffuse/1 ".to_vec();
    prologue.extend_from_slice(cluster_digest);
    prologue
}

fn builder<'a>(local: &'a [u8; 32], prologue: &'a [u8]) -> Result<snow::Builder<'a>, ChannelError> {
    let params = NOISE_PARAMS.parse().map_err(ChannelError::Noise)?;
    Ok(snow::Builder::new(params)
        .local_private_key(local)?
        .prologue(prologue)?)
}

async fn write_noise<W: AsyncWrite + Unpin>(writer: &mut W, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("a Noise message exceeds 65,535 bytes"))?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(message).await
}

async fn read_noise<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    reader.read_exact(&mut len).await?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    reader.read_exact(buf).await?;
    Ok(())
}

/// Dials side: authenticates the responder as `remote`, proves to be `local`.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    local: &SecretKey,
    remote: &PublicKey,
    prologue: &[u8],
    max_frame: usize,
) -> Result<
    (
        FrameReader<tokio::io::ReadHalf<S>>,
        FrameWriter<tokio::io::WriteHalf<S>>,
    ),
    ChannelError,
> {
    let secret = local.to_x25519();
    let remote_x = remote.to_x25519();
    let handshake = async {
        let mut state = builder(&secret, prologue)?
            .remote_public_key(&remote_x)?
            .build_initiator()?;
        let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
        let len = state.write_message(&[], &mut buf)?;
        write_noise(&mut stream, &buf[..len]).await?;
        let mut incoming = Vec::new();
        read_noise(&mut stream, &mut incoming).await?;
        state.read_message(&incoming, &mut buf)?;
        Ok::<_, ChannelError>(state.into_stateless_transport_mode()?)
    };
    let transport = within_deadline(handshake).await?;
    Ok(split(stream, transport, max_frame))
}

/// Accepting side: learns who the initiator is and admits it only if `admit`
/// recognises its X25519 static key. Returns what `admit` returned.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin, P>(
    mut stream: S,
    local: &SecretKey,
    prologue: &[u8],
    max_frame: usize,
    admit: impl FnOnce(&[u8; 32]) -> Option<P>,
) -> Result<
    (
        P,
        FrameReader<tokio::io::ReadHalf<S>>,
        FrameWriter<tokio::io::WriteHalf<S>>,
    ),
    ChannelError,
> {
    let secret = local.to_x25519();
    let handshake = async {
        let mut state = builder(&secret, prologue)?.build_responder()?;
        let mut incoming = Vec::new();
        read_noise(&mut stream, &mut incoming).await?;
        // Sized by what arrived, not the maximum: strangers cost little memory.
        let mut buf = vec![0u8; incoming.len().max(256)];
        state.read_message(&incoming, &mut buf)?;
        let remote: [u8; 32] = state
            .get_remote_static()
            .and_then(|key| key.try_into().ok())
            .ok_or(ChannelError::UnknownPeer)?;
        let peer = admit(&remote).ok_or(ChannelError::UnknownPeer)?;
        let len = state.write_message(&[], &mut buf)?;
        write_noise(&mut stream, &buf[..len]).await?;
        Ok::<_, ChannelError>((peer, state.into_stateless_transport_mode()?))
    };
    let (peer, transport) = within_deadline(handshake).await?;
    let (reader, writer) = split(stream, transport, max_frame);
    Ok((peer, reader, writer))
}

/// Runs a handshake under [`HANDSHAKE_TIMEOUT`].
async fn within_deadline<T>(
    handshake: impl std::future::Future<Output = Result<T, ChannelError>>,
) -> Result<T, ChannelError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ChannelError::HandshakeTimeout)?
}

fn split<S: AsyncRead + AsyncWrite>(
    stream: S,
    transport: StatelessTransportState,
    max_frame: usize,
) -> (
    FrameReader<tokio::io::ReadHalf<S>>,
    FrameWriter<tokio::io::WriteHalf<S>>,
) {
    let transport = Arc::new(transport);
    let (read, write) = tokio::io::split(stream);
    (
        FrameReader {
            inner: tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, read),
            transport: transport.clone(),
            nonce: 0,
            plain: Vec::new(),
            consumed: 0,
            max_frame,
            cipher: Vec::new(),
        },
        FrameWriter {
            inner: tokio::io::BufWriter::new(write),
            transport,
            nonce: 0,
            cipher: vec![0u8; NOISE_MAX_MESSAGE],
            max_frame,
        },
    )
}

/// The receiving half of a channel: yields whole, authenticated frames.
pub struct FrameReader<R> {
    inner: tokio::io::BufReader<R>,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    /// Decrypted bytes; `plain[consumed..]` are not yet returned.
    plain: Vec<u8>,
    consumed: usize,
    max_frame: usize,
    cipher: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Lowers (or raises) the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The next frame. Fails on a closed socket, a frame above the limit, or any
    /// ciphertext that does not authenticate (Noise nonces also reject replays).
    pub async fn read_frame(&mut self) -> Result<Vec<u8>, ChannelError> {
        loop {
            let pending = &self.plain[self.consumed..];
            if let [a, b, c, d, ..] = *pending {
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > self.max_frame {
                    return Err(ChannelError::FrameTooLarge {
                        len,
                        max: self.max_frame,
                    });
                }
                if pending.len() >= 4 + len {
                    let frame = pending[4..4 + len].to_vec();
                    self.consumed += 4 + len;
                    // Do not keep a large frame's buffer for the connection's life.
                    if self.plain.capacity() > 4 * CHUNK_BYTES
                        && self.plain.len() - self.consumed < CHUNK_BYTES
                    {
                        self.plain.drain(..self.consumed);
                        self.consumed = 0;
                        self.plain.shrink_to(2 * CHUNK_BYTES);
                    }
                    return Ok(frame);
                }
            }
            self.decrypt_next().await?;
        }
    }

    async fn decrypt_next(&mut self) -> Result<(), ChannelError> {
        // Drop what was consumed, so the buffer never exceeds one frame plus a chunk.
        self.plain.drain(..self.consumed);
        self.consumed = 0;
        read_noise(&mut self.inner, &mut self.cipher).await?;
        let start = self.plain.len();
        self.plain.resize(start + self.cipher.len(), 0);
        let len =
            self.transport
                .read_message(self.nonce, &self.cipher, &mut self.plain[start..])?;
        self.nonce += 1;
        self.plain.truncate(start + len);
        Ok(())
    }
}

/// The sending half of a channel.
pub struct FrameWriter<W> {
    inner: tokio::io::BufWriter<W>,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    cipher: Vec<u8>,
    max_frame: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Encrypts and sends one frame, without flushing.
    pub async fn write_frame(&mut self, frame: &[u8]) -> Result<(), ChannelError> {
        self.write_frames(&[frame]).await
    }

    /// Encrypts and sends several frames, without flushing: their length-prefixed
    /// bytes are encrypted together, so small frames share Noise messages (one AEAD
    /// operation and one length prefix per 65,519 bytes, not per frame). The reader
    /// cannot tell the difference: frames may span Noise messages anyway.
    pub async fn write_frames(&mut self, frames: &[impl AsRef<[u8]>]) -> Result<(), ChannelError> {
        let mut total = 0;
        for frame in frames {
            let len = frame.as_ref().len();
            if len > self.max_frame {
                return Err(ChannelError::FrameTooLarge {
                    len,
                    max: self.max_frame,
                });
            }
            total += 4 + len;
        }
        let mut plain = Vec::with_capacity(total);
        for frame in frames {
            let frame = frame.as_ref();
            plain.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            plain.extend_from_slice(frame);
        }
        for chunk in plain.chunks(CHUNK_BYTES) {
            let len = self
                .transport
                .write_message(self.nonce, chunk, &mut self.cipher)?;
            self.nonce += 1;
            write_noise(&mut self.inner, &self.cipher[..len]).await?;
        }
        Ok(())
    }

    /// Pushes buffered bytes to the socket.
    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        self.inner.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed([i; 32])
    }

    async fn pair(
        responder_knows: PublicKey,
        initiator_key: SecretKey,
        max_frame: usize,
    ) -> Result<
        (
            FrameWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
            FrameReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        ),
        ChannelError,
    > {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = key(1);
        let server_public = server.public();
        let prologue = prologue(&[7; 32]);
        let accept = {
            let prologue = prologue.clone();
            tokio::spawn(async move {
                let known = responder_knows.to_x25519();
                respond(b, &server, &prologue, max_frame, |k| {
                    (*k == known).then_some(())
                })
                .await
                .map(|(_, reader, _)| reader)
            })
        };
        let (_, writer) = initiate(a, &initiator_key, &server_public, &prologue, max_frame).await?;
        let reader = accept.await.expect("task")?;
        Ok((writer, reader))
    }

    #[tokio::test]
    async fn frames_of_any_size_cross_intact() {
        let (mut writer, mut reader) = pair(key(2).public(), key(2), 1 << 20).await.unwrap();
        let frames: Vec<Vec<u8>> = [0usize, 1, 100, CHUNK_BYTES - 4, CHUNK_BYTES, 200_000]
            .iter()
            .map(|&len| (0..len).map(|i| (i % 251) as u8).collect())
            .collect();
        for frame in &frames {
            writer.write_frame(frame).await.unwrap();
        }
        writer.flush().await.unwrap();
        for frame in &frames {
            assert_eq!(&reader.read_frame().await.unwrap(), frame);
        }
    }

    #[tokio::test]
    async fn frames_written_together_cross_intact_and_in_order() {
        let (mut writer, mut reader) = pair(key(2).public(), key(2), 1 << 20).await.unwrap();
        let frames: Vec<Vec<u8>> = [3usize, 0, 70_000, 1, CHUNK_BYTES, 10]
            .iter()
            .enumerate()
            .map(|(k, &len)| (0..len).map(|i| ((i + k) % 251) as u8).collect())
            .collect();
        writer.write_frames(&frames[..2]).await.unwrap();
        writer.write_frames(&frames[2..]).await.unwrap();
        writer.flush().await.unwrap();
        for frame in &frames {
            assert_eq!(&reader.read_frame().await.unwrap(), frame);
        }
        writer.max_frame = 100;
        assert!(matches!(
            writer.write_frames(&[vec![0u8; 10], vec![0u8; 101]]).await,
            Err(ChannelError::FrameTooLarge { len: 101, max: 100 })
        ));
    }

    #[tokio::test]
    async fn unknown_initiators_are_refused() {
        let refused = pair(key(2).public(), key(3), 1024).await;
        assert!(
            refused.is_err(),
            "a key outside the cluster must be refused"
        );
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_buffering() {
        let (mut writer, mut reader) = pair(key(2).public(), key(2), 1 << 20).await.unwrap();
        writer.max_frame = usize::MAX;
        reader.max_frame = 1000;
        writer.write_frame(&[0u8; 5000]).await.unwrap();
        writer.flush().await.unwrap();
        assert!(matches!(
            reader.read_frame().await,
            Err(ChannelError::FrameTooLarge {
                len: 5000,
                max: 1000
            })
        ));
    }

    #[tokio::test]
    async fn a_different_cluster_cannot_connect() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = key(1);
        let public = server.public();
        let client = key(2);
        let known = client.public().to_x25519();
        let accept = tokio::spawn(async move {
            respond(b, &server, &prologue(&[1; 32]), 1024, |k| {
                (*k == known).then_some(())
            })
            .await
            .is_ok()
        });
        let dialed = initiate(a, &client, &public, &prologue(&[2; 32]), 1024).await;
        assert!(dialed.is_err(), "the initiator must see the handshake fail");
        assert!(
            !accept.await.unwrap(),
            "the responder must refuse the handshake"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Arbitrary bytes in place of a handshake never panic the responder and are
        /// refused.
        #[test]
        fn arbitrary_bytes_never_panic_the_responder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (mut a, b) = tokio::io::duplex(4096);
                let server = key(1);
                let accept = tokio::spawn(async move {
                    respond(b, &server, &prologue(&[7; 32]), 1024, |_| Some(())).await.is_ok()
                });
                use tokio::io::AsyncWriteExt;
                let _ = a.write_all(&bytes).await;
                drop(a);
                let accepted = accept.await.expect("the responder must not panic");
                assert!(!accepted, "garbage must not complete a handshake");
            });
        }
    }
}
