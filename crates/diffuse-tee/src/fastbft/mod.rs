//! The enclave functions of FastBFT (Liu et al., Fig. 3): secrets bound to the
//! primary's counter, split into XOR shares for the active replicas, released by each
//! replica's enclave only for a certificate over the counter value the secret is
//! bound to.
//!
//! Every enclave tracks `(c_latest, v)`: the latest counter value of the current
//! primary and the view. The primary's enclave ([`FastBftComponent::be_primary`])
//! draws a view key `k_i` per active replica and wraps it for that replica's enclave;
//! [`FastBftComponent::preprocessing`] binds a fresh secret to each of the next
//! counter values and packs, per active replica, its share and the hashes its
//! children's subtree aggregates must match; [`FastBftComponent::request_counter`]
//! certifies `(x, c, v)` for the next counter value. An active replica's enclave
//! opens its package with [`FastBftComponent::verify_counter`] only for the primary's
//! certificate over exactly that `(c, v)`, and only for `c = c_latest + 1`; a passive
//! replica's enclave follows with [`FastBftComponent::update_counter`].
//!
//! The shares form a tree ([`Tree`]) rooted at the primary: each active replica XORs
//! its share with its children's aggregates and passes the result up; the primary
//! XORs its children's aggregates into the secret.
//!
//! What is sealed, and what FastBFT's REJOIN will need, is in `docs/tee.md`.

use crate::enclave::{MAX_PEERS, SoftwareEnclave, TrustedComponent};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use diffuse_core::codec::Blob;
use diffuse_core::crypto::{Digest, KeyAgreement, PublicKey, Signable, SignatureBatch, Signed};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::OnceLock;

pub mod batch;
pub mod merkle;
mod threshold;
mod view_change;

pub use batch::{REQUEST_LABEL, SignedRequest, batch_root, prepare_digest, request_leaf};

pub use threshold::{THRESHOLD_PRIMARY_POINT, combine_threshold, threshold_point};

pub use view_change::{
    TREE_BITS, ViewAccept, ViewChangeCertificate, first_epoch, new_view_id, rejoin_digest,
    view_of_epoch,
};

/// The widest fan-out of a share tree.
pub const MAX_FAN_OUT: usize = 16;

/// The most counter values one [`FastBftComponent::preprocessing`] call prepares,
/// and the most prepared ahead of `c_latest`.
pub const MAX_PREPROCESSING: usize = 1024;

/// The largest encrypted package (a share, `(c, v)`, at most [`MAX_FAN_OUT`] child
/// hashes and the secret's hash, plus the AEAD tag).
pub const MAX_PACKAGE_BYTES: usize = 1024;

/// Why a FastBFT enclave function refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FastBftError {
    /// After an unscheduled reboot (or once sealed), the enclave certifies nothing.
    #[error("the enclave is locked")]
    Locked,
    /// The call needs a role this enclave does not have in the current view.
    #[error("the enclave is not {0} in the current view")]
    WrongRole(&'static str),
    /// The arguments are impossible (sizes, duplicates, a tree of another size).
    #[error("invalid arguments: {0}")]
    Invalid(&'static str),
    /// A peer enclave key cannot be used for key agreement (small order).
    #[error("a peer enclave key is unusable for key agreement")]
    BadPeerKey,
    /// The primary's signature does not verify.
    #[error("invalid signature")]
    BadSignature,
    /// The package or wrapped view key does not decrypt or does not parse.
    #[error("invalid encryption")]
    BadEncryption,
    /// The certificate is for another view.
    #[error("the certificate is for view {got}, the enclave is in view {expected}")]
    WrongView {
        /// The enclave's view.
        expected: u64,
        /// The certificate's view.
        got: u64,
    },
    /// The counter value is not the next one.
    #[error("invalid counter value {got}, expected {expected}")]
    WrongCounter {
        /// `c_latest + 1`.
        expected: u64,
        /// The certificate's counter value.
        got: u64,
    },
    /// The package is bound to another `(c, v)` than the certificate.
    #[error("the package is bound to another counter value or view")]
    PackageMismatch,
    /// The opened secret does not match its commitment.
    #[error("invalid secret")]
    WrongSecret,
    /// The counter cannot go higher.
    #[error("the counter is exhausted")]
    CounterExhausted,
    /// The enclave left its view ([`FastBftComponent::leave_view`]): it takes no
    /// position of that view any more.
    #[error("the enclave left its view for view {0}")]
    Leaving(u64),
    /// [`FastBftComponent::request_counter_for_batch`]: the requests at these
    /// indices of the batch are not signed by their client, or their client is not
    /// registered. Nothing was certified.
    #[error("requests {0:?} of the batch are not signed by a registered client")]
    UnsignedRequests(Vec<usize>),
    /// [`FastBftComponent::request_counter_for_batch`] before the enclave learnt
    /// the clients' keys (`SoftwareEnclave::configure_clients`).
    #[error("the enclave does not know the clients' keys")]
    ClientsNotConfigured,
}

/// A 32-byte secret or share; shares combine by XOR.
#[derive(Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Share(pub [u8; 32]);

impl Share {
    /// `self XOR other`.
    pub fn xor(&self, other: &Share) -> Share {
        let mut out = self.0;
        for (o, b) in out.iter_mut().zip(other.0.iter()) {
            *o ^= b;
        }
        Share(out)
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Share(..)")
    }
}

/// `h_c = H(s_c, c, v)`: the commitment to the secret bound to `(c, v)`.
pub fn secret_hash(secret: &Share, counter: u64, view: u64) -> Digest {
    Digest::of(
        "diffuse/tee/fastbft/secret",
        &bound_bytes(secret, counter, view),
    )
}

/// `ĥ_j = H(ŝ_j, c, v)`: the hash a subtree aggregate `ŝ_j` (the XOR of `j`'s share
/// and its descendants') must match. Bound to `(c, v)` too, so that an aggregate of
/// one counter value is never accepted for another.
///
/// Keyed BLAKE3 of `ŝ_j || c || v` under a key derived from its own context string
/// (domain-separated from [`secret_hash`] and every `Digest::of`): one BLAKE3
/// compression, as `preprocessing` computes one per active replica and counter value.
pub fn aggregate_hash(aggregate: &Share, counter: u64, view: u64) -> Digest {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| blake3::derive_key(AGGREGATE_CONTEXT, &[]));
    Digest(*blake3::keyed_hash(key, &bound_bytes(aggregate, counter, view)).as_bytes())
}

const AGGREGATE_CONTEXT: &str = "diffuse 2026 tee fastbft subtree aggregate hash";

/// `value || c || v`, big-endian.
fn bound_bytes(value: &Share, counter: u64, view: u64) -> [u8; 48] {
    let mut bytes = [0u8; 48];
    bytes[..32].copy_from_slice(&value.0);
    bytes[32..40].copy_from_slice(&counter.to_be_bytes());
    bytes[40..].copy_from_slice(&view.to_be_bytes());
    bytes
}

/// `⟨x, (c, v)⟩_σp`: the primary's enclave binds `message` to counter value `c`
/// of view `v` ([`FastBftComponent::request_counter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterCertificate {
    /// `x`, e.g. `H(M)`.
    pub message: Digest,
    /// `c`.
    pub counter: u64,
    /// `v`.
    pub view: u64,
    /// What the enclave checked before it certified `x`.
    pub kind: CertificateKind,
}

impl CounterCertificate {
    /// Whether this certifies the PREPARE of `seq` with the batch of root
    /// `batch_root` (and the checkpoint proof of digest `checkpoint`), after the
    /// enclave verified every request of that batch: the only certificate a
    /// replica takes for a PREPARE.
    pub fn certifies_prepare(
        &self,
        seq: u64,
        batch_root: &Digest,
        checkpoint: Option<&Digest>,
    ) -> bool {
        self.kind == CertificateKind::VerifiedBatch
            && self.message == prepare_digest(seq, batch_root, checkpoint)
    }
}

/// What the enclave checked before it certified a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertificateKind {
    /// Nothing: `x` is whatever digest the host asked for
    /// ([`FastBftComponent::request_counter`], `start_view`).
    Opaque,
    /// `x` is the [`prepare_digest`] of a batch every request of which the enclave
    /// verified against its registered client's key
    /// ([`FastBftComponent::request_counter_for_batch`]).
    VerifiedBatch,
}

impl Signable for CounterCertificate {
    const LABEL: &'static str = "diffuse/tee/fastbft/counter";
}

/// `⟨h_c, (c, v)⟩_σp`: the primary's enclave binds the secret with hash `h_c` to
/// `(c, v)` ([`FastBftComponent::preprocessing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretCommitment {
    /// `h_c = H(s_c, c, v)` ([`secret_hash`]).
    pub secret_hash: Digest,
    /// `c`.
    pub counter: u64,
    /// `v`.
    pub view: u64,
}

impl Signable for SecretCommitment {
    const LABEL: &'static str = "diffuse/tee/fastbft/secret-commitment";
}

/// `ω_i`: a view key wrapped by the primary's enclave for one active replica's
/// enclave, under a key from X25519 between the two enclave keys. The view and the
/// recipient are bound as associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedViewKey {
    /// The view the key is for.
    pub view: u64,
    /// The recipient enclave.
    pub recipient: PublicKey,
    /// Fresh per wrapping: the wrapping key is derived from it, so no AEAD key is
    /// ever used twice.
    pub salt: [u8; 32],
    /// The AEAD ciphertext of the key.
    pub ciphertext: Blob<64>,
}

/// `ϱ_c^i`: one active replica's share of the secret for `(c, v)`, encrypted under
/// its view key `k_i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// `c` (also inside the ciphertext; here it picks the nonce).
    pub counter: u64,
    /// `v`.
    pub view: u64,
    /// The recipient enclave.
    pub recipient: PublicKey,
    /// The AEAD ciphertext of the share, `(c, v)`, the children's hashes and `h_c`.
    pub ciphertext: Blob<MAX_PACKAGE_BYTES>,
}

/// What the primary gets for one preprocessed counter value.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `⟨h_c, (c, v)⟩_σp`.
    pub commitment: Signed<SecretCommitment>,
    /// `ĥ_j` for each of the primary's own children in the tree (in the order of
    /// [`Tree::root_children`]): how the primary checks the aggregates it receives.
    pub root_children_hashes: Vec<Digest>,
    /// `ϱ_c^i` for each active replica, in tree order.
    pub packages: Vec<Package>,
    /// In a threshold epoch: the primary's own share (its point is
    /// [`THRESHOLD_PRIMARY_POINT`]).
    pub primary_share: Option<Share>,
}

/// What [`FastBftComponent::verify_counter`] releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedShare {
    /// `s_c^i`: this replica's share.
    pub share: Share,
    /// `ĥ_j` for each child `j` of this replica, in the order of [`Tree::children`].
    pub children_hashes: Vec<Digest>,
    /// `h_c`.
    pub secret_hash: Digest,
}

/// What the sealed package holds, decoded: a fixed layout (no codec), parsed back
/// strictly by [`PackageBody::decode`]:
///
/// `share (32) || c (8, big-endian) || v (8, big-endian) || k (1) || k child hashes
/// (32 each) || h_c (32)`, with `k <= MAX_FAN_OUT` and nothing after `h_c`.
#[derive(Debug, PartialEq, Eq)]
struct PackageBody {
    share: Share,
    counter: u64,
    view: u64,
    children: Vec<Digest>,
    secret_hash: Digest,
}

/// The plaintext of a package without children.
const BODY_FIXED_BYTES: usize = 32 + 8 + 8 + 1 + 32;
/// The largest package plaintext.
const BODY_MAX_BYTES: usize = BODY_FIXED_BYTES + 32 * MAX_FAN_OUT;
/// The ChaCha20-Poly1305 tag.
const TAG_BYTES: usize = 16;
const _: () = assert!(BODY_MAX_BYTES + TAG_BYTES <= MAX_PACKAGE_BYTES);
const _: () = assert!(MAX_FAN_OUT <= u8::MAX as usize);

impl PackageBody {
    /// Writes the plaintext into `out` and returns its length; `None` if there are
    /// more than [`MAX_FAN_OUT`] children.
    fn encode(
        out: &mut [u8; BODY_MAX_BYTES],
        share: &Share,
        counter: u64,
        view: u64,
        children: &[Digest],
        secret_hash: &Digest,
    ) -> Option<usize> {
        if children.len() > MAX_FAN_OUT {
            return None;
        }
        out[..32].copy_from_slice(&share.0);
        out[32..40].copy_from_slice(&counter.to_be_bytes());
        out[40..48].copy_from_slice(&view.to_be_bytes());
        out[48] = children.len() as u8;
        let mut at = 49;
        for child in children {
            out[at..at + 32].copy_from_slice(&child.0);
            at += 32;
        }
        out[at..at + 32].copy_from_slice(&secret_hash.0);
        Some(at + 32)
    }

    /// Parses a plaintext written by [`PackageBody::encode`]; any other length or a
    /// child count over [`MAX_FAN_OUT`] is refused.
    fn decode(bytes: &[u8]) -> Result<PackageBody, FastBftError> {
        let bad = FastBftError::BadEncryption;
        let (share, rest) = bytes.split_first_chunk::<32>().ok_or(bad.clone())?;
        let (counter, rest) = rest.split_first_chunk::<8>().ok_or(bad.clone())?;
        let (view, rest) = rest.split_first_chunk::<8>().ok_or(bad.clone())?;
        let (&count, rest) = rest.split_first().ok_or(bad.clone())?;
        let count = usize::from(count);
        if count > MAX_FAN_OUT || rest.len() != 32 * count + 32 {
            return Err(bad);
        }
        let (children, secret_hash) = rest.split_at_checked(32 * count).ok_or(bad.clone())?;
        let children = children
            .chunks_exact(32)
            .map(|chunk| chunk.try_into().map(Digest))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad.clone())?;
        let secret_hash = secret_hash.try_into().map(Digest).map_err(|_| bad)?;
        Ok(PackageBody {
            share: Share(*share),
            counter: u64::from_be_bytes(*counter),
            view: u64::from_be_bytes(*view),
            children,
            secret_hash,
        })
    }
}

/// The AEAD key of packages for one active replica: ChaCha20-Poly1305 (RFC 8439)
/// under its view key.
fn package_key(view_key: &[u8; 32]) -> Result<LessSafeKey, FastBftError> {
    UnboundKey::new(&CHACHA20_POLY1305, view_key)
        .map(LessSafeKey::new)
        .map_err(|_| FastBftError::Invalid("a view key is a ChaCha20-Poly1305 key"))
}

/// Per-call scratch space of `preprocessing`, reused across its counter values.
#[derive(Default)]
struct Scratch {
    /// One XOF read per counter value: the secret, then the random shares.
    random: Vec<[u8; 32]>,
    shares: Vec<Share>,
    aggregates: Vec<Share>,
    hashes: Vec<Digest>,
}

/// The share tree of a view: `len` active replicas (positions `0..len`, in the order
/// the primary lists them) under the primary at the root, complete and balanced
/// with `fan_out` children per node: the root's children are `0..fan_out`, those of
/// position `i` are `fan_out * (i + 1) ..` (as in a heap whose index 0 is the
/// primary).
///
/// A tree read from bytes goes through [`Tree::balanced`] too, so a decoded tree
/// always has sizes within bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TreeShape", into = "TreeShape")]
pub struct Tree {
    len: usize,
    fan_out: usize,
}

/// A [`Tree`] as encoded, before its bounds are checked.
#[derive(Serialize, Deserialize)]
struct TreeShape {
    len: usize,
    fan_out: usize,
}

impl TryFrom<TreeShape> for Tree {
    type Error = FastBftError;

    fn try_from(shape: TreeShape) -> Result<Tree, FastBftError> {
        Tree::balanced(shape.len, shape.fan_out)
    }
}

impl From<Tree> for TreeShape {
    fn from(tree: Tree) -> TreeShape {
        TreeShape {
            len: tree.len,
            fan_out: tree.fan_out,
        }
    }
}

impl Tree {
    /// A balanced tree of `len` active replicas (1 to [`MAX_PEERS`]) with `fan_out`
    /// children per node (1 to [`MAX_FAN_OUT`]).
    pub fn balanced(len: usize, fan_out: usize) -> Result<Tree, FastBftError> {
        if len == 0 || len > MAX_PEERS {
            return Err(FastBftError::Invalid("a tree has 1 to MAX_PEERS members"));
        }
        if fan_out == 0 || fan_out > MAX_FAN_OUT {
            return Err(FastBftError::Invalid("the fan-out is 1 to MAX_FAN_OUT"));
        }
        Ok(Tree { len, fan_out })
    }

    /// The number of active replicas.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a tree has at least one member.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Children per node.
    pub fn fan_out(&self) -> usize {
        self.fan_out
    }

    fn clamp(&self, range: Range<usize>) -> Range<usize> {
        range.start.min(self.len)..range.end.min(self.len)
    }

    /// The primary's children.
    pub fn root_children(&self) -> Range<usize> {
        self.clamp(0..self.fan_out)
    }

    /// The children of position `i` (empty for a leaf or a position outside the
    /// tree).
    pub fn children(&self, i: usize) -> Range<usize> {
        if i >= self.len {
            return 0..0;
        }
        let start = self.fan_out.saturating_mul(i + 1);
        self.clamp(start..start.saturating_add(self.fan_out))
    }

    /// The parent of position `i`: `None` if it is the primary (or `i` is outside
    /// the tree).
    pub fn parent(&self, i: usize) -> Option<usize> {
        if i >= self.len {
            return None;
        }
        (i / self.fan_out).checked_sub(1)
    }

    /// Whether position `i` has no children.
    pub fn is_leaf(&self, i: usize) -> bool {
        self.children(i).is_empty()
    }

    /// Hops from the primary to position `i` (1 for its children).
    pub fn depth(&self, i: usize) -> usize {
        let mut depth = 1;
        let mut at = i;
        while let Some(parent) = self.parent(at) {
            depth += 1;
            at = parent;
        }
        depth
    }

    /// Whether position `d` is in the subtree under position `i` (excluding `i`).
    pub fn is_descendant(&self, d: usize, i: usize) -> bool {
        let mut at = d;
        while let Some(parent) = self.parent(at) {
            if parent == i {
                return true;
            }
            at = parent;
        }
        false
    }
}

/// The FastBFT functions of Fig. 3, as ECALLs. Every function refuses when the
/// enclave is locked, and returns a typed error, never panics, on any input.
pub trait FastBftComponent: TrustedComponent {
    /// Makes this enclave the primary of the next view: `v := v + 1`, `c_latest :=
    /// 0`, records the active replicas (their enclave keys, distinct, not this
    /// enclave's; one per position of `tree`) and draws a view key for each, returned
    /// wrapped for its enclave in the order of `actives`.
    fn be_primary(
        &mut self,
        actives: &[PublicKey],
        tree: Tree,
    ) -> Result<Vec<WrappedViewKey>, FastBftError>;

    /// The fallback (§4.5): like [`Self::be_primary`], but every configured peer is
    /// active and gets a Shamir share of each secret (a polynomial of degree `f`,
    /// the primary holding a share too), so that any `f` backups' shares with the
    /// primary's open it: no tree, and `f` silent backups cannot stop it.
    fn be_primary_threshold(
        &mut self,
        actives: &[PublicKey],
    ) -> Result<Vec<WrappedViewKey>, FastBftError>;

    /// Enters the next view under `new_primary`: `certificate` is the new primary's
    /// `⟨x, (c, v)⟩` for `c = c_latest + 1` in the current view `v`; then `v := v +
    /// 1`, `c_latest := 0`. With `view_key` (wrapped for this enclave for `v + 1`)
    /// the enclave is active, without it passive.
    fn update_view(
        &mut self,
        new_primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
        view_key: Option<&WrappedViewKey>,
    ) -> Result<(), FastBftError>;

    /// Primary only: binds a fresh secret to each of the next `m` counter values
    /// not prepared yet (at most [`MAX_PREPROCESSING`] ahead of `c_latest`). A
    /// counter value is prepared at most once per view.
    fn preprocessing(&mut self, m: usize) -> Result<Vec<Preprocessed>, FastBftError>;

    /// `c_latest := c_latest + 1` and returns `⟨x, (c_latest, v)⟩` signed, of kind
    /// [`CertificateKind::Opaque`]: never a certificate a replica takes for a
    /// PREPARE.
    fn request_counter(
        &mut self,
        message: &Digest,
    ) -> Result<Signed<CounterCertificate>, FastBftError>;

    /// The PREPARE of `seq`: verifies the signature of every request of the batch
    /// against its client's registered key (one ZIP 215 batch verification, under
    /// [`REQUEST_LABEL`]), then, like [`Self::request_counter`], certifies at the
    /// next counter value the [`prepare_digest`] of `seq`, the batch's root
    /// ([`batch_root`], computed here) and `checkpoint`, of kind
    /// [`CertificateKind::VerifiedBatch`]. If a request's client is not registered
    /// or its signature does not verify, refuses with
    /// [`FastBftError::UnsignedRequests`] naming every such request, and certifies
    /// nothing.
    fn request_counter_for_batch(
        &mut self,
        seq: u64,
        requests: &[SignedRequest<'_>],
        checkpoint: Option<&Digest>,
    ) -> Result<Signed<CounterCertificate>, FastBftError>;

    /// Active replica: checks the primary's certificate, opens `package`, checks that
    /// it is bound to the certificate's `(c, v)` and that `c = c_latest + 1`, then
    /// increments `c_latest` and releases the share.
    fn verify_counter(
        &mut self,
        certificate: &Signed<CounterCertificate>,
        package: &Package,
    ) -> Result<OpenedShare, FastBftError>;

    /// Passive replica (or an active one catching up): checks the primary's
    /// commitment, `c = c_latest + 1` and `H(s_c, c, v) = h_c`, then increments
    /// `c_latest`.
    fn update_counter(
        &mut self,
        secret: &Share,
        commitment: &Signed<SecretCommitment>,
    ) -> Result<(), FastBftError>;

    /// Any replica but the primary: checks the primary's certificate for `c =
    /// c_latest + 1` in the current view and increments `c_latest`, releasing
    /// nothing. This is how a replica steps over a counter value whose secret was
    /// never opened (a PREPARE in flight when the primary reconfigured the tree), so
    /// that it can take the next one. It keeps the invariant the shares rely on:
    /// an enclave at `c_latest` has been shown the primary's certificate of every
    /// counter value up to `c_latest` in its view.
    fn follow_counter(
        &mut self,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<(), FastBftError>;

    /// `(c_latest, v)`.
    fn fastbft_counter(&self) -> (u64, u64);

    /// The view this enclave left its own for ([`Self::leave_view`]), until it
    /// enters one.
    fn fastbft_leaving(&self) -> Option<u64>;

    /// After a restart (or a REJOIN's reset): the nonce a primary's certificate
    /// must bind ([`rejoin_digest`]) for [`Self::rejoin_at`].
    fn fastbft_rejoin_nonce(&self) -> Option<Digest>;

    /// Rejoins a view after a restart at the position of `certificate`: the
    /// certificate of `primary` (another configured peer) over
    /// [`rejoin_digest`]`(this enclave, its nonce)`, in the view it was out of or
    /// a later one. The nonce is fresh since the restart, so that position comes
    /// after every position of the view this enclave took before it: no share is
    /// ever released twice and no log can hide one. The enclave is then a passive
    /// replica of that epoch.
    fn rejoin_at(
        &mut self,
        primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<(), FastBftError>;

    /// A backup far behind its primary jumps forward to the position of
    /// `certificate` (its primary's, later in the same view), without taking the
    /// positions in between; passive from there if the epoch changed. Safe: it
    /// releases nothing for the positions it skips, and a VIEW-CHANGE of it must
    /// still list every position from its log's start (its host takes that log from
    /// the primary), so it can hide nothing it did before the jump.
    fn follow_to(
        &mut self,
        primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<(), FastBftError>;

    /// VIEW-CHANGE: certifies this enclave's position `(c_latest, v)` with the
    /// digest of the host's `log` for view `target` (above the current view, and
    /// not below a view it left for already), and from then on takes no position of
    /// the current view: no share, no step, no certificate.
    fn leave_view(
        &mut self,
        target: u64,
        log: &Digest,
    ) -> Result<Signed<ViewChangeCertificate>, FastBftError>;

    /// NEW-VIEW: makes this enclave the primary of `view` (above the current view,
    /// not below a view it left for), in the view's first epoch, with `actives` as
    /// in [`Self::be_primary`], and certifies `new_view` (the digest of the NEW-VIEW)
    /// at counter value 0 of that epoch. Returns the certificate and the wrapped view
    /// keys. A view is started at most once: afterwards the enclave is in it.
    fn start_view(
        &mut self,
        view: u64,
        new_view: &Digest,
        actives: &[PublicKey],
        tree: Tree,
    ) -> Result<(Signed<CounterCertificate>, Vec<WrappedViewKey>), FastBftError>;

    /// Vouches that the host checked the NEW-VIEW certified by `certificate` from
    /// `new_primary` (another configured peer; counter value 0 of the first epoch of
    /// a view this enclave may enter). Changes nothing in the enclave.
    fn accept_view(
        &mut self,
        new_primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<Signed<ViewAccept>, FastBftError>;

    /// Enters the view of the NEW-VIEW `certificate` from `new_primary`, with the
    /// [`ViewAccept`]s of `f` distinct configured enclaves other than the new
    /// primary's (this one's may be among them): active with `view_key`, passive
    /// without.
    fn enter_view(
        &mut self,
        new_primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
        accepts: &[(PublicKey, Signed<ViewAccept>)],
        view_key: Option<&WrappedViewKey>,
    ) -> Result<(), FastBftError>;
}

/// The FastBFT state of an enclave, sealed whole at a scheduled shutdown
/// ([`FastBftState::seal`]); after an unscheduled reboot the REJOIN's reset puts
/// the enclave out of every view it may have been in ([`FastBftState::rejoined`]).
#[derive(Default)]
pub(crate) struct FastBftState {
    counter: u64,
    view: u64,
    role: Role,
    /// The view this enclave left its own for, until it enters one.
    leaving: Option<u64>,
    /// The highest view whose NEW-VIEW this enclave voted for.
    accepted: u64,
    /// After a restart: the fresh value a primary's certificate must bind for this
    /// enclave to rejoin its view ([`FastBftComponent::rejoin_at`]).
    rejoin_nonce: Option<Digest>,
}

impl FastBftState {
    /// The highest protocol view this enclave is in or voted for: what it seals,
    /// and reports to a rebooted peer.
    pub(crate) fn known_view(&self) -> u64 {
        view_of_epoch(self.view).max(self.accepted)
    }

    /// The whole state, as a scheduled shutdown seals it: the sealed state is
    /// exact (the rollback protection refuses a stale one), so the enclave resumes
    /// where it stopped, role and view keys included, and never certifies,
    /// releases or steps over a position twice.
    pub(crate) fn seal(&self) -> SealedFastBft {
        let role = match &self.role {
            Role::None => SealedRole::None,
            Role::Primary {
                actives,
                aggregation,
                prepared,
            } => SealedRole::Primary {
                actives: actives.clone(),
                aggregation: *aggregation,
                prepared: *prepared,
            },
            Role::Active { primary, view_key } => SealedRole::Active {
                primary: *primary,
                view_key: *view_key,
            },
            Role::Passive { primary } => SealedRole::Passive { primary: *primary },
        };
        SealedFastBft {
            counter: self.counter,
            view: self.view,
            role,
            leaving: self.leaving,
            accepted: self.accepted,
            rejoin_nonce: self.rejoin_nonce,
        }
    }

    /// The state [`FastBftState::seal`] sealed.
    pub(crate) fn unsealed(sealed: SealedFastBft) -> FastBftState {
        let role = match sealed.role {
            SealedRole::None => Role::None,
            SealedRole::Primary {
                actives,
                aggregation,
                prepared,
            } => Role::Primary {
                actives,
                aggregation,
                prepared,
            },
            SealedRole::Active { primary, view_key } => Role::Active { primary, view_key },
            SealedRole::Passive { primary } => Role::Passive { primary },
        };
        FastBftState {
            counter: sealed.counter,
            view: sealed.view,
            role,
            leaving: sealed.leaving,
            accepted: sealed.accepted,
            rejoin_nonce: sealed.rejoin_nonce,
        }
    }

    /// The state after a restart, once the highest view the enclave may have
    /// taken part in is known to be at most `view`: out of `view` (and every
    /// earlier one) for good, at a position beyond any of its stream, so that it
    /// certifies nothing there again and no log of it can reach its position; it
    /// enters a later view by its NEW-VIEW. (Resuming within `view` would need a
    /// position above every share it released before the restart, which nothing
    /// it can be shown bounds.)
    pub(crate) fn rejoined(view: u64, nonce: [u8; 32]) -> FastBftState {
        let last_epoch = first_epoch(view).map_or(u64::MAX, |e| e | u64::from(u32::MAX));
        FastBftState {
            counter: 0,
            view: last_epoch,
            role: Role::None,
            leaving: Some(view.saturating_add(1)),
            accepted: view,
            rejoin_nonce: Some(Digest(nonce)),
        }
    }
}

/// [`FastBftState`] as sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SealedFastBft {
    counter: u64,
    view: u64,
    role: SealedRole,
    leaving: Option<u64>,
    accepted: u64,
    rejoin_nonce: Option<Digest>,
}

impl Default for SealedFastBft {
    fn default() -> Self {
        FastBftState::default().seal()
    }
}

/// How the shares of an epoch's secrets combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Aggregation {
    /// XOR shares, one per active replica, aggregated up the tree (§4.2).
    Tree(Tree),
    /// Shamir shares of a polynomial of degree `threshold - 1`, one per backup and
    /// one for the primary: any `threshold` of them open the secret (§4.5, the
    /// fallback).
    Threshold(usize),
}

/// [`Role`] as sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum SealedRole {
    None,
    Primary {
        actives: Vec<(PublicKey, [u8; 32])>,
        aggregation: Aggregation,
        prepared: u64,
    },
    Active {
        primary: PublicKey,
        view_key: [u8; 32],
    },
    Passive {
        primary: PublicKey,
    },
}

#[derive(Default)]
enum Role {
    /// No view entered yet.
    #[default]
    None,
    Primary {
        /// `(enclave key, view key)` in tree order.
        actives: Vec<(PublicKey, [u8; 32])>,
        aggregation: Aggregation,
        /// The highest counter value prepared in this view.
        prepared: u64,
    },
    Active {
        primary: PublicKey,
        view_key: [u8; 32],
    },
    Passive {
        primary: PublicKey,
    },
}

const VIEW_KEY_CONTEXT: &str = "diffuse 2026 tee fastbft view key wrapping";
const WRAP_AAD: &str = "diffuse/tee/fastbft/wrapped-view-key/v1";
const PACKAGE_AAD: &str = "diffuse/tee/fastbft/package/v1";

fn wrapping_key(shared: &[u8; 32], sender: &PublicKey, salt: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut hasher = blake3::Hasher::new_keyed(shared);
    hasher.update(&sender.to_bytes());
    hasher.update(salt);
    ChaCha20Poly1305::new(hasher.finalize().as_bytes().into())
}

fn wrap_aad(view: u64, sender: &PublicKey, recipient: &PublicKey) -> Vec<u8> {
    let mut aad = WRAP_AAD.as_bytes().to_vec();
    aad.extend_from_slice(&view.to_be_bytes());
    aad.extend_from_slice(&sender.to_bytes());
    aad.extend_from_slice(&recipient.to_bytes());
    aad
}

/// The associated data of a package: `PACKAGE_AAD || c || v || recipient`.
const PACKAGE_AAD_BYTES: usize = PACKAGE_AAD.len() + 8 + 8 + 32;

fn package_aad(counter: u64, view: u64, recipient: &PublicKey) -> [u8; PACKAGE_AAD_BYTES] {
    const LABEL: usize = PACKAGE_AAD.len();
    let mut aad = [0u8; PACKAGE_AAD_BYTES];
    aad[..LABEL].copy_from_slice(PACKAGE_AAD.as_bytes());
    aad[LABEL..LABEL + 8].copy_from_slice(&counter.to_be_bytes());
    aad[LABEL + 8..LABEL + 16].copy_from_slice(&view.to_be_bytes());
    aad[LABEL + 16..].copy_from_slice(&recipient.to_bytes());
    aad
}

/// The nonce of the package for counter value `c`: a view key is fresh per view and
/// recipient, and a counter value is prepared at most once per view.
fn package_nonce(counter: u64) -> ring::aead::Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&counter.to_be_bytes());
    ring::aead::Nonce::assume_unique_for_key(nonce)
}

/// Random bytes drawn inside the enclave: one platform draw seeds a BLAKE3 stream.
struct Randomness(blake3::OutputReader);

impl Randomness {
    fn new(seed: [u8; 32]) -> Randomness {
        Randomness(blake3::Hasher::new_keyed(&seed).finalize_xof())
    }

    /// Fills `out` with random 32-byte values in one read of the stream.
    fn fill(&mut self, out: &mut [[u8; 32]]) {
        self.0.fill(out.as_flattened_mut());
    }
}

impl SoftwareEnclave {
    fn fastbft_unlocked(&self) -> Result<(), FastBftError> {
        if self.is_locked() {
            Err(FastBftError::Locked)
        } else {
            Ok(())
        }
    }

    /// Unlocked and still in its view: what every step of the stream needs.
    fn fastbft_in_view(&self) -> Result<(), FastBftError> {
        self.fastbft_unlocked()?;
        match self.fastbft.leaving {
            Some(target) => Err(FastBftError::Leaving(target)),
            None => Ok(()),
        }
    }

    /// The epoch after the current one, within the same view.
    fn next_epoch(&self) -> Result<u64, FastBftError> {
        let next = self
            .fastbft
            .view
            .checked_add(1)
            .ok_or(FastBftError::CounterExhausted)?;
        if view_of_epoch(next) != view_of_epoch(self.fastbft.view) {
            return Err(FastBftError::CounterExhausted);
        }
        Ok(next)
    }

    /// Whether this enclave orders the stream of its epoch: its primary, or any
    /// enclave before the first tree of the run (the genesis NEW-TREE).
    fn may_certify(&self) -> bool {
        match self.fastbft.role {
            Role::Primary { .. } => true,
            Role::None => self.fastbft.view == 0,
            Role::Active { .. } | Role::Passive { .. } => false,
        }
    }

    /// The primary's role for `epoch` with `actives` in `tree`, and the view keys
    /// wrapped for them.
    fn primary_role(
        &self,
        epoch: u64,
        actives: &[PublicKey],
        aggregation: Aggregation,
    ) -> Result<(Role, Vec<WrappedViewKey>), FastBftError> {
        let me = self.public_key();
        let distinct: BTreeSet<[u8; 32]> = actives.iter().map(|k| k.to_bytes()).collect();
        if distinct.len() != actives.len() || distinct.contains(&me.to_bytes()) {
            return Err(FastBftError::Invalid(
                "the active replicas are distinct and exclude the primary",
            ));
        }
        match aggregation {
            Aggregation::Tree(tree) => {
                if actives.len() != tree.len() {
                    return Err(FastBftError::Invalid(
                        "one active replica per tree position",
                    ));
                }
                if let Some((peers, threshold)) = self.peer_set() {
                    // Once configured, the primary and exactly f peers are the f + 1
                    // active replicas (threshold = f + 1): fewer would let a primary
                    // open secrets with a smaller coalition.
                    if actives.len() + 1 != threshold || !distinct.iter().all(|k| peers.contains(k))
                    {
                        return Err(FastBftError::Invalid(
                            "the active replicas are the primary and f configured peers",
                        ));
                    }
                }
            }
            Aggregation::Threshold(threshold) => {
                // Every backup holds a share; any `threshold` shares with the
                // primary's open the secret. Once configured: every peer, f + 1.
                let configured = self.peer_set().is_none_or(|(peers, t)| {
                    threshold == t
                        && distinct.len() == peers.len()
                        && distinct.iter().all(|k| peers.contains(k))
                });
                if !configured || threshold < 2 || threshold > actives.len() + 1 {
                    return Err(FastBftError::Invalid(
                        "a threshold epoch shares with every configured peer, f + 1 to open",
                    ));
                }
            }
        }
        let agreement = KeyAgreement::new(self.secret_key());
        let mut keys = Vec::with_capacity(actives.len());
        let mut wrapped = Vec::with_capacity(actives.len());
        for recipient in actives {
            let shared = agreement
                .shared_key(VIEW_KEY_CONTEXT, recipient)
                .ok_or(FastBftError::BadPeerKey)?;
            let view_key = self.random_bytes();
            let salt = self.random_bytes();
            let ciphertext = wrapping_key(&shared, &me, &salt)
                .encrypt(
                    &Nonce::default(),
                    Payload {
                        msg: &view_key,
                        aad: &wrap_aad(epoch, &me, recipient),
                    },
                )
                .map_err(|_| FastBftError::Invalid("ChaCha20-Poly1305 encrypts a 32-byte key"))?;
            keys.push((*recipient, view_key));
            wrapped.push(WrappedViewKey {
                view: epoch,
                recipient: *recipient,
                salt,
                ciphertext: Blob::try_from_vec(ciphertext)
                    .map_err(|_| FastBftError::Invalid("a wrapped key is 48 bytes"))?,
            });
        }
        let role = Role::Primary {
            actives: keys,
            aggregation,
            prepared: 0,
        };
        Ok((role, wrapped))
    }

    /// The role of this enclave in `epoch` under `primary`: active with the view key
    /// in `view_key` (wrapped for this enclave and `epoch`), passive without one.
    fn role_under(
        &self,
        primary: &PublicKey,
        epoch: u64,
        view_key: Option<&WrappedViewKey>,
    ) -> Result<Role, FastBftError> {
        let me = self.public_key();
        let Some(wrapped) = view_key else {
            return Ok(Role::Passive { primary: *primary });
        };
        if wrapped.view != epoch || wrapped.recipient != me {
            return Err(FastBftError::BadEncryption);
        }
        let shared = KeyAgreement::new(self.secret_key())
            .shared_key(VIEW_KEY_CONTEXT, primary)
            .ok_or(FastBftError::BadPeerKey)?;
        let plaintext = wrapping_key(&shared, primary, &wrapped.salt)
            .decrypt(
                &Nonce::default(),
                Payload {
                    msg: &wrapped.ciphertext,
                    aad: &wrap_aad(epoch, primary, &me),
                },
            )
            .map_err(|_| FastBftError::BadEncryption)?;
        let view_key: [u8; 32] = plaintext
            .as_slice()
            .try_into()
            .map_err(|_| FastBftError::BadEncryption)?;
        Ok(Role::Active {
            primary: *primary,
            view_key,
        })
    }

    /// Verifies every request of a batch against its registered client's key, in
    /// one batch verification; refuses naming every request that fails.
    fn check_request_signatures(&self, requests: &[SignedRequest<'_>]) -> Result<(), FastBftError> {
        let clients = self
            .client_keys()
            .ok_or(FastBftError::ClientsNotConfigured)?;
        let mut bad = Vec::new();
        let mut signatures = SignatureBatch::new();
        // The index in `requests` of each signature in the batch.
        let mut checked = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            match clients.get(&request.client) {
                None => bad.push(i),
                Some(_) if !self.verifies_request_signatures() => {}
                Some(key) => {
                    signatures.push(key, REQUEST_LABEL, request.body, request.signature);
                    checked.push(i);
                }
            }
        }
        if !signatures.is_empty() {
            for (i, valid) in checked.into_iter().zip(signatures.verify()) {
                if !valid {
                    bad.push(i);
                }
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            bad.sort_unstable();
            Err(FastBftError::UnsignedRequests(bad))
        }
    }

    /// `c_latest := c_latest + 1` and `⟨x, (c_latest, v)⟩` of `kind`, signed.
    fn certify_next(
        &mut self,
        message: &Digest,
        kind: CertificateKind,
    ) -> Result<Signed<CounterCertificate>, FastBftError> {
        self.fastbft_in_view()?;
        if !self.may_certify() {
            return Err(FastBftError::WrongRole("the primary"));
        }
        let counter = self
            .fastbft
            .counter
            .checked_add(1)
            .ok_or(FastBftError::CounterExhausted)?;
        self.fastbft.counter = counter;
        Ok(Signed::sign(
            CounterCertificate {
                message: *message,
                counter,
                view: self.fastbft.view,
                kind,
            },
            self.secret_key(),
        ))
    }

    fn check_next(&self, counter: u64, view: u64) -> Result<(), FastBftError> {
        let state = &self.fastbft;
        if view != state.view {
            return Err(FastBftError::WrongView {
                expected: state.view,
                got: view,
            });
        }
        let expected = state
            .counter
            .checked_add(1)
            .ok_or(FastBftError::CounterExhausted)?;
        if counter != expected {
            return Err(FastBftError::WrongCounter {
                expected,
                got: counter,
            });
        }
        Ok(())
    }

    fn current_primary(&self) -> Option<PublicKey> {
        match &self.fastbft.role {
            Role::None => None,
            Role::Primary { .. } => Some(self.public_key()),
            Role::Active { primary, .. } | Role::Passive { primary } => Some(*primary),
        }
    }

    /// Binds a fresh secret to `(counter, view)` and seals one package per active
    /// replica under `actives`' package keys (in tree order).
    fn prepare_one(
        &self,
        counter: u64,
        view: u64,
        actives: &[(PublicKey, LessSafeKey)],
        tree: &Tree,
        randomness: &mut Randomness,
        scratch: &mut Scratch,
    ) -> Result<Preprocessed, FastBftError> {
        let len = actives.len();
        let Scratch {
            random,
            shares,
            aggregates,
            hashes,
        } = scratch;
        // One read of the stream: the secret, then the shares of all but the last
        // active replica.
        random.clear();
        random.resize(len, [0u8; 32]);
        randomness.fill(random);
        let (secret, random_shares) = random
            .split_first()
            .ok_or(FastBftError::Invalid("a tree has at least one member"))?;
        let secret = Share(*secret);
        let secret_hash = secret_hash(&secret, counter, view);
        // s = s_1 XOR ... XOR s_len: all shares random but the last.
        shares.clear();
        shares.extend(random_shares.iter().map(|bytes| Share(*bytes)));
        let last = shares.iter().fold(secret, |rest, share| rest.xor(share));
        shares.push(last);
        // Subtree aggregates, bottom-up: children have higher positions.
        aggregates.clear();
        aggregates.extend_from_slice(shares);
        for i in (0..len).rev() {
            for child in tree.children(i) {
                aggregates[i] = aggregates[i].xor(&aggregates[child]);
            }
        }
        hashes.clear();
        hashes.extend(aggregates.iter().map(|a| aggregate_hash(a, counter, view)));
        debug_assert_eq!(
            tree.root_children()
                .fold(Share::default(), |acc, j| acc.xor(&aggregates[j])),
            secret,
            "the root's children's aggregates make the secret"
        );
        let mut packages = Vec::with_capacity(len);
        let mut body = [0u8; BODY_MAX_BYTES];
        for (i, ((recipient, key), share)) in actives.iter().zip(shares.iter()).enumerate() {
            let children = hashes.get(tree.children(i)).ok_or(FastBftError::Invalid(
                "one active replica per tree position",
            ))?;
            let body_len =
                PackageBody::encode(&mut body, share, counter, view, children, &secret_hash)
                    .ok_or(FastBftError::Invalid("at most MAX_FAN_OUT children"))?;
            let mut ciphertext = Vec::with_capacity(body_len + TAG_BYTES);
            ciphertext.extend_from_slice(&body[..body_len]);
            let tag = key
                .seal_in_place_separate_tag(
                    package_nonce(counter),
                    Aad::from(package_aad(counter, view, recipient)),
                    &mut ciphertext,
                )
                .map_err(|_| FastBftError::Invalid("a package fits ChaCha20-Poly1305"))?;
            ciphertext.extend_from_slice(tag.as_ref());
            packages.push(Package {
                counter,
                view,
                recipient: *recipient,
                ciphertext: Blob::try_from_vec(ciphertext)
                    .map_err(|_| FastBftError::Invalid("a package fits MAX_PACKAGE_BYTES"))?,
            });
        }
        Ok(Preprocessed {
            commitment: Signed::sign(
                SecretCommitment {
                    secret_hash,
                    counter,
                    view,
                },
                self.secret_key(),
            ),
            root_children_hashes: hashes
                .get(tree.root_children())
                .ok_or(FastBftError::Invalid(
                    "one active replica per tree position",
                ))?
                .to_vec(),
            packages,
            primary_share: None,
        })
    }
}

impl FastBftComponent for SoftwareEnclave {
    fn be_primary(
        &mut self,
        actives: &[PublicKey],
        tree: Tree,
    ) -> Result<Vec<WrappedViewKey>, FastBftError> {
        self.fastbft_in_view()?;
        if !self.may_certify() {
            return Err(FastBftError::WrongRole("the primary"));
        }
        let epoch = self.next_epoch()?;
        let (role, wrapped) = self.primary_role(epoch, actives, Aggregation::Tree(tree))?;
        self.fastbft = FastBftState {
            counter: 0,
            view: epoch,
            role,
            leaving: None,
            accepted: self.fastbft.accepted,
            rejoin_nonce: None,
        };
        Ok(wrapped)
    }

    fn be_primary_threshold(
        &mut self,
        actives: &[PublicKey],
    ) -> Result<Vec<WrappedViewKey>, FastBftError> {
        self.fastbft_in_view()?;
        if !self.may_certify() {
            return Err(FastBftError::WrongRole("the primary"));
        }
        let threshold = self
            .peer_set()
            .map_or((actives.len() + 2) / 2, |(_, threshold)| threshold);
        let epoch = self.next_epoch()?;
        let (role, wrapped) =
            self.primary_role(epoch, actives, Aggregation::Threshold(threshold))?;
        self.fastbft = FastBftState {
            counter: 0,
            view: epoch,
            role,
            leaving: None,
            accepted: self.fastbft.accepted,
            rejoin_nonce: None,
        };
        Ok(wrapped)
    }

    fn update_view(
        &mut self,
        new_primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
        view_key: Option<&WrappedViewKey>,
    ) -> Result<(), FastBftError> {
        self.fastbft_in_view()?;
        if !certificate.verify(new_primary) {
            return Err(FastBftError::BadSignature);
        }
        self.check_next(certificate.counter, certificate.view)?;
        if self
            .current_primary()
            .is_some_and(|primary| primary != *new_primary)
        {
            return Err(FastBftError::Invalid(
                "a NEW-TREE comes from the primary of the epoch",
            ));
        }
        let epoch = self.next_epoch()?;
        let role = self.role_under(new_primary, epoch, view_key)?;
        self.fastbft = FastBftState {
            counter: 0,
            view: epoch,
            role,
            leaving: None,
            accepted: self.fastbft.accepted,
            rejoin_nonce: None,
        };
        Ok(())
    }

    fn preprocessing(&mut self, m: usize) -> Result<Vec<Preprocessed>, FastBftError> {
        self.fastbft_in_view()?;
        let (counter, view) = (self.fastbft.counter, self.fastbft.view);
        let Role::Primary {
            actives,
            aggregation,
            prepared,
        } = &self.fastbft.role
        else {
            return Err(FastBftError::WrongRole("the primary"));
        };
        let first = (*prepared).max(counter);
        let last = first
            .checked_add(m as u64)
            .ok_or(FastBftError::CounterExhausted)?;
        if m > MAX_PREPROCESSING || last - counter > MAX_PREPROCESSING as u64 {
            return Err(FastBftError::Invalid(
                "at most MAX_PREPROCESSING counter values ahead",
            ));
        }
        // Key setup once per active replica and call, not per package.
        let keys = actives
            .iter()
            .map(|(recipient, view_key)| Ok((*recipient, package_key(view_key)?)))
            .collect::<Result<Vec<_>, FastBftError>>()?;
        let mut randomness = Randomness::new(self.random_bytes());
        let mut scratch = Scratch::default();
        let batch = match aggregation {
            Aggregation::Tree(tree) => (first + 1..=last)
                .map(|c| self.prepare_one(c, view, &keys, tree, &mut randomness, &mut scratch))
                .collect::<Result<Vec<_>, FastBftError>>()?,
            Aggregation::Threshold(threshold) => (first + 1..=last)
                .map(|c| threshold::prepare_one(self, c, view, &keys, *threshold, &mut randomness))
                .collect::<Result<Vec<_>, FastBftError>>()?,
        };
        if let Role::Primary { prepared, .. } = &mut self.fastbft.role {
            *prepared = last;
        }
        Ok(batch)
    }

    fn request_counter(
        &mut self,
        message: &Digest,
    ) -> Result<Signed<CounterCertificate>, FastBftError> {
        self.certify_next(message, CertificateKind::Opaque)
    }

    fn request_counter_for_batch(
        &mut self,
        seq: u64,
        requests: &[SignedRequest<'_>],
        checkpoint: Option<&Digest>,
    ) -> Result<Signed<CounterCertificate>, FastBftError> {
        self.fastbft_in_view()?;
        if !self.may_certify() {
            return Err(FastBftError::WrongRole("the primary"));
        }
        if requests.len() > batch::MAX_BATCH_REQUESTS {
            return Err(FastBftError::Invalid("at most MAX_BATCH_REQUESTS requests"));
        }
        self.check_request_signatures(requests)?;
        let digest = prepare_digest(seq, &batch_root(requests), checkpoint);
        self.certify_next(&digest, CertificateKind::VerifiedBatch)
    }

    fn verify_counter(
        &mut self,
        certificate: &Signed<CounterCertificate>,
        package: &Package,
    ) -> Result<OpenedShare, FastBftError> {
        self.fastbft_in_view()?;
        let Role::Active { primary, view_key } = &self.fastbft.role else {
            return Err(FastBftError::WrongRole("active"));
        };
        if !certificate.verify(primary) {
            return Err(FastBftError::BadSignature);
        }
        // A package longer than the largest one sealed cannot open.
        let mut buffer = [0u8; BODY_MAX_BYTES + TAG_BYTES];
        let sealed = buffer
            .get_mut(..package.ciphertext.len())
            .ok_or(FastBftError::BadEncryption)?;
        sealed.copy_from_slice(&package.ciphertext);
        let plaintext = package_key(view_key)?
            .open_in_place(
                package_nonce(package.counter),
                Aad::from(package_aad(
                    package.counter,
                    package.view,
                    &self.public_key(),
                )),
                sealed,
            )
            .map_err(|_| FastBftError::BadEncryption)?;
        let body = PackageBody::decode(plaintext)?;
        if (body.counter, body.view) != (certificate.counter, certificate.view)
            || (package.counter, package.view) != (body.counter, body.view)
        {
            return Err(FastBftError::PackageMismatch);
        }
        self.check_next(certificate.counter, certificate.view)?;
        self.fastbft.counter = certificate.counter;
        Ok(OpenedShare {
            share: body.share,
            children_hashes: body.children,
            secret_hash: body.secret_hash,
        })
    }

    fn update_counter(
        &mut self,
        secret: &Share,
        commitment: &Signed<SecretCommitment>,
    ) -> Result<(), FastBftError> {
        self.fastbft_in_view()?;
        let primary = self
            .current_primary()
            .ok_or(FastBftError::WrongRole("in a view"))?;
        if !commitment.verify(&primary) {
            return Err(FastBftError::BadSignature);
        }
        self.check_next(commitment.counter, commitment.view)?;
        if secret_hash(secret, commitment.counter, commitment.view) != commitment.secret_hash {
            return Err(FastBftError::WrongSecret);
        }
        self.fastbft.counter = commitment.counter;
        Ok(())
    }

    fn follow_counter(
        &mut self,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<(), FastBftError> {
        self.fastbft_in_view()?;
        let primary = match &self.fastbft.role {
            Role::Active { primary, .. } | Role::Passive { primary } => *primary,
            Role::None | Role::Primary { .. } => {
                return Err(FastBftError::WrongRole("a backup"));
            }
        };
        if !certificate.verify(&primary) {
            return Err(FastBftError::BadSignature);
        }
        self.check_next(certificate.counter, certificate.view)?;
        self.fastbft.counter = certificate.counter;
        Ok(())
    }

    fn fastbft_counter(&self) -> (u64, u64) {
        (self.fastbft.counter, self.fastbft.view)
    }

    fn fastbft_leaving(&self) -> Option<u64> {
        self.fastbft.leaving
    }

    fn fastbft_rejoin_nonce(&self) -> Option<Digest> {
        self.fastbft.rejoin_nonce.filter(|_| !self.is_locked())
    }

    fn rejoin_at(
        &mut self,
        primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<(), FastBftError> {
        view_change::rejoin_at(self, primary, certificate)
    }

    fn follow_to(
        &mut self,
        primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<(), FastBftError> {
        self.fastbft_in_view()?;
        let role_primary = match &self.fastbft.role {
            Role::Active { primary, .. } | Role::Passive { primary } => *primary,
            Role::None | Role::Primary { .. } => {
                return Err(FastBftError::WrongRole("a backup"));
            }
        };
        if role_primary != *primary {
            return Err(FastBftError::Invalid(
                "the certificate is the epoch's primary's",
            ));
        }
        if !certificate.verify(primary) {
            return Err(FastBftError::BadSignature);
        }
        let (epoch, counter) = (self.fastbft.view, self.fastbft.counter);
        if view_of_epoch(certificate.view) != view_of_epoch(epoch)
            || (certificate.view, certificate.counter) <= (epoch, counter)
        {
            return Err(FastBftError::Invalid("a later position of the same view"));
        }
        if certificate.view != epoch {
            self.fastbft.role = Role::Passive { primary: *primary };
        }
        self.fastbft.view = certificate.view;
        self.fastbft.counter = certificate.counter;
        Ok(())
    }

    fn leave_view(
        &mut self,
        target: u64,
        log: &Digest,
    ) -> Result<Signed<ViewChangeCertificate>, FastBftError> {
        view_change::leave_view(self, target, log)
    }

    fn start_view(
        &mut self,
        view: u64,
        new_view: &Digest,
        actives: &[PublicKey],
        tree: Tree,
    ) -> Result<(Signed<CounterCertificate>, Vec<WrappedViewKey>), FastBftError> {
        view_change::start_view(self, view, new_view, actives, tree)
    }

    fn accept_view(
        &mut self,
        new_primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
    ) -> Result<Signed<ViewAccept>, FastBftError> {
        view_change::accept_view(self, new_primary, certificate)
    }

    fn enter_view(
        &mut self,
        new_primary: &PublicKey,
        certificate: &Signed<CounterCertificate>,
        accepts: &[(PublicKey, Signed<ViewAccept>)],
        view_key: Option<&WrappedViewKey>,
    ) -> Result<(), FastBftError> {
        view_change::enter_view(self, new_primary, certificate, accepts, view_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enclave::TrustedComponent;
    use crate::platform::SoftwarePlatform;
    use diffuse_core::codec;
    use diffuse_core::crypto::SecretKey;
    use std::sync::Arc;

    fn body(children: usize) -> Vec<u8> {
        let hashes: Vec<Digest> = (0..children).map(|i| Digest([i as u8 + 1; 32])).collect();
        let mut out = [0u8; BODY_MAX_BYTES];
        let len = PackageBody::encode(&mut out, &Share([7; 32]), 5, 1, &hashes, &Digest([9; 32]))
            .unwrap();
        out[..len].to_vec()
    }

    /// An active enclave in view 1 under `primary`, with `view_key`.
    fn active_enclave(primary: &SecretKey, view_key: [u8; 32]) -> SoftwareEnclave {
        let mut enclave = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([3; 32])));
        enclave.fastbft = FastBftState {
            counter: 0,
            view: 1,
            role: Role::Active {
                primary: primary.public(),
                view_key,
            },
            leaving: None,
            accepted: 0,
            rejoin_nonce: None,
        };
        enclave
    }

    /// `plaintext` sealed as the package for `(1, 1)` to `recipient`.
    fn seal(view_key: &[u8; 32], recipient: &PublicKey, plaintext: &[u8]) -> Package {
        let mut ciphertext = plaintext.to_vec();
        let tag = package_key(view_key)
            .unwrap()
            .seal_in_place_separate_tag(
                package_nonce(1),
                Aad::from(package_aad(1, 1, recipient)),
                &mut ciphertext,
            )
            .unwrap();
        ciphertext.extend_from_slice(tag.as_ref());
        Package {
            counter: 1,
            view: 1,
            recipient: *recipient,
            ciphertext: Blob::try_from_vec(ciphertext).unwrap(),
        }
    }

    #[test]
    fn a_package_body_round_trips_and_any_other_plaintext_is_refused() {
        for children in 0..=MAX_FAN_OUT {
            let bytes = body(children);
            assert_eq!(bytes.len(), BODY_FIXED_BYTES + 32 * children);
            let decoded = PackageBody::decode(&bytes).unwrap();
            assert_eq!(decoded.share, Share([7; 32]));
            assert_eq!((decoded.counter, decoded.view), (5, 1));
            assert_eq!(decoded.children.len(), children);
            assert_eq!(decoded.secret_hash, Digest([9; 32]));
            // Every truncation and any trailing byte.
            for len in 0..bytes.len() {
                assert_eq!(
                    PackageBody::decode(&bytes[..len]),
                    Err(FastBftError::BadEncryption)
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                PackageBody::decode(&longer),
                Err(FastBftError::BadEncryption)
            );
            // A child count that does not match the length.
            for count in [children + 1, children.wrapping_sub(1), 255] {
                let mut garbled = bytes.clone();
                garbled[48] = count as u8;
                assert_eq!(
                    PackageBody::decode(&garbled),
                    Err(FastBftError::BadEncryption),
                    "{children} children, count {count}"
                );
            }
        }
        // More than MAX_FAN_OUT children, with the length to match.
        let mut too_many = vec![0u8; BODY_FIXED_BYTES + 32 * (MAX_FAN_OUT + 1)];
        too_many[48] = (MAX_FAN_OUT + 1) as u8;
        assert_eq!(
            PackageBody::decode(&too_many),
            Err(FastBftError::BadEncryption)
        );
        let mut out = [0u8; BODY_MAX_BYTES];
        let hashes = vec![Digest::default(); MAX_FAN_OUT + 1];
        assert_eq!(
            PackageBody::encode(
                &mut out,
                &Share::default(),
                1,
                1,
                &hashes,
                &Digest::default()
            ),
            None
        );
        // Arbitrary bytes of every length: a typed error or a body, never a panic.
        for len in 0..=BODY_MAX_BYTES + 1 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let _ = PackageBody::decode(&bytes);
        }
    }

    #[test]
    fn a_well_sealed_package_with_a_garbled_plaintext_is_refused() {
        let primary = SecretKey::from_seed([1; 32]);
        let view_key = [5u8; 32];
        let mut enclave = active_enclave(&primary, view_key);
        let me = enclave.public_key();
        let certificate = Signed::sign(
            CounterCertificate {
                message: Digest::default(),
                counter: 1,
                view: 1,
                kind: CertificateKind::Opaque,
            },
            &primary,
        );
        let valid = {
            let mut out = [0u8; BODY_MAX_BYTES];
            let len = PackageBody::encode(
                &mut out,
                &Share([7; 32]),
                1,
                1,
                &[Digest([1; 32]), Digest([2; 32])],
                &Digest([9; 32]),
            )
            .unwrap();
            out[..len].to_vec()
        };
        let mut plaintexts: Vec<Vec<u8>> = (0..valid.len()).map(|l| valid[..l].to_vec()).collect();
        let mut longer = valid.clone();
        longer.push(0);
        plaintexts.push(longer);
        let mut miscounted = valid.clone();
        miscounted[48] = 3;
        plaintexts.push(miscounted);
        plaintexts.push(vec![0xff; BODY_MAX_BYTES]);
        for plaintext in &plaintexts {
            assert_eq!(
                enclave.verify_counter(&certificate, &seal(&view_key, &me, plaintext)),
                Err(FastBftError::BadEncryption),
                "plaintext of {} bytes",
                plaintext.len()
            );
        }
        // Longer than any package sealed: refused before decryption.
        let mut oversized = seal(&view_key, &me, &valid);
        oversized.ciphertext = Blob::try_from_vec(vec![0; MAX_PACKAGE_BYTES]).unwrap();
        assert_eq!(
            enclave.verify_counter(&certificate, &oversized),
            Err(FastBftError::BadEncryption)
        );
        // A body bound to another (c, v) than the certificate and the package.
        let mut other_counter = valid.clone();
        other_counter[32..40].copy_from_slice(&2u64.to_be_bytes());
        assert_eq!(
            enclave.verify_counter(&certificate, &seal(&view_key, &me, &other_counter)),
            Err(FastBftError::PackageMismatch)
        );
        assert_eq!(enclave.fastbft_counter(), (0, 1));
        let opened = enclave
            .verify_counter(&certificate, &seal(&view_key, &me, &valid))
            .unwrap();
        assert_eq!(opened.share, Share([7; 32]));
        assert_eq!(opened.children_hashes, [Digest([1; 32]), Digest([2; 32])]);
        assert_eq!(opened.secret_hash, Digest([9; 32]));
        assert_eq!(enclave.fastbft_counter(), (1, 1));
    }

    #[test]
    fn the_package_aad_keeps_the_whole_label() {
        let recipient = SecretKey::from_seed([2; 32]).public();
        let aad = package_aad(1, 2, &recipient);
        assert!(aad.starts_with(PACKAGE_AAD.as_bytes()));
        let rest = &aad[PACKAGE_AAD.len()..];
        assert_eq!(rest[..8], 1u64.to_be_bytes());
        assert_eq!(rest[8..16], 2u64.to_be_bytes());
        assert_eq!(rest[16..], recipient.to_bytes());
    }

    #[test]
    fn packages_are_rfc_8439_chacha20_poly1305() {
        // `ring` seals what `chacha20poly1305` opens, and the other way round.
        let view_key = [5u8; 32];
        let recipient = SecretKey::from_seed([2; 32]).public();
        let plaintext = body(2);
        let package = seal(&view_key, &recipient, &plaintext);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&1u64.to_be_bytes());
        let other = ChaCha20Poly1305::new(&view_key.into());
        let aad = package_aad(1, 1, &recipient);
        let opened = other
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &package.ciphertext,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(opened, plaintext);
        let mut sealed = other
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(sealed, package.ciphertext.to_vec());
        let opened = package_key(&view_key)
            .unwrap()
            .open_in_place(package_nonce(1), Aad::from(aad), &mut sealed)
            .unwrap();
        assert_eq!(opened, plaintext.as_slice());
    }

    #[test]
    fn secret_and_aggregate_hashes_are_separated_and_bound_to_c_and_v() {
        let value = Share([7; 32]);
        let hashes: BTreeSet<Digest> = [(1, 1), (2, 1), (1, 2)]
            .into_iter()
            .flat_map(|(c, v)| [secret_hash(&value, c, v), aggregate_hash(&value, c, v)])
            .chain([aggregate_hash(&Share([8; 32]), 1, 1)])
            .collect();
        assert_eq!(hashes.len(), 7);
    }

    #[test]
    fn a_decoded_tree_is_checked_like_a_built_one() {
        let tree = Tree::balanced(7, 2).unwrap();
        let bytes = codec::encode_payload(&tree);
        assert_eq!(codec::decode_payload::<Tree>(&bytes).unwrap(), tree);
        for (len, fan_out) in [(0, 2), (7, 0), (7, MAX_FAN_OUT + 1), (MAX_PEERS + 1, 2)] {
            let bytes = codec::encode_payload(&TreeShape { len, fan_out });
            assert!(
                codec::decode_payload::<Tree>(&bytes).is_err(),
                "len {len}, fan-out {fan_out}"
            );
        }
    }

    #[test]
    fn a_balanced_tree_has_one_parent_per_member_and_consistent_children() {
        for len in 1..40 {
            for fan_out in 1..5 {
                let tree = Tree::balanced(len, fan_out).unwrap();
                let mut seen = vec![0usize; len];
                for j in tree.root_children() {
                    assert_eq!(tree.parent(j), None);
                    seen[j] += 1;
                }
                for i in 0..len {
                    assert!(tree.children(i).len() <= fan_out);
                    for j in tree.children(i) {
                        assert_eq!(tree.parent(j), Some(i));
                        assert!(tree.is_descendant(j, i));
                        assert_eq!(tree.depth(j), tree.depth(i) + 1);
                        seen[j] += 1;
                    }
                }
                assert!(seen.iter().all(|s| *s == 1), "len {len} fan-out {fan_out}");
            }
        }
    }

    #[test]
    fn a_balanced_tree_is_shallow() {
        let tree = Tree::balanced(101, 2).unwrap();
        let deepest = (0..101).map(|i| tree.depth(i)).max().unwrap();
        // 2 + 4 + ... + 64 = 126 >= 101: six levels under the primary.
        assert_eq!(deepest, 6);
        assert_eq!(tree.root_children(), 0..2);
        assert_eq!(tree.children(0), 2..4);
        assert_eq!(tree.children(49), 100..101);
        assert!(tree.is_leaf(50) && tree.is_leaf(100));
        assert_eq!(tree.children(500), 0..0);
        assert_eq!(tree.parent(500), None);
    }

    #[test]
    fn impossible_trees_are_refused() {
        assert!(Tree::balanced(0, 2).is_err());
        assert!(Tree::balanced(MAX_PEERS + 1, 2).is_err());
        assert!(Tree::balanced(3, 0).is_err());
        assert!(Tree::balanced(3, MAX_FAN_OUT + 1).is_err());
        assert!(Tree::balanced(MAX_PEERS, MAX_FAN_OUT).is_ok());
    }
}
