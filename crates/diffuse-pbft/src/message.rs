//! PBFT's wire messages.
//!
//! Messages that other replicas must be able to forward inside certificates are
//! signed: client requests, pre-prepares (as a signed [`Proposal`]), prepares,
//! checkpoint votes and view changes. Commits, replies, status and transfer messages
//! are only ever judged by their direct recipient, so the authenticated channel is
//! their authentication. A NEW-VIEW is self-certifying (signed view changes and
//! signed proposals) and needs no signature of its own. Client requests carry, besides
//! the signature, an authenticator of per-replica MACs (see [`crate::auth`]).

use diffuse_core::codec::{Blob, BoundedVec, WireMessage};
use diffuse_core::crypto::{Digest, Mac, PublicKey, SecretKey, Signable, SignatureBatch, Signed};
use diffuse_core::ids::{ClientId, MAX_REPLICAS, ReplicaId, Seq, View};
use diffuse_core::service::MAX_RESULT_BYTES;
use serde::{Deserialize, Serialize};

/// Hard cap on an operation's size; options may set a lower limit.
pub const MAX_OPERATION_BYTES: usize = 1 << 20;
/// Hard cap on the requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 4096;
/// Hard cap on the log window `L` (sequence numbers between checkpoints).
pub const MAX_WINDOW: usize = 4096;
/// The most state bytes in one transfer chunk.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// The signed part of a client request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct RequestBody {
    /// The requesting client.
    pub client: ClientId,
    /// Per-client, strictly increasing request number.
    pub timestamp: u64,
    /// The operation for the application.
    pub operation: Blob<MAX_OPERATION_BYTES>,
}

impl Signable for RequestBody {
    const LABEL: &'static str = "diffuse/pbft/request";
}

impl RequestBody {
    /// What every MAC of a request's authenticator covers.
    pub fn mac_digest(&self) -> Digest {
        Digest::of_value("diffuse/pbft/request-mac", self)
    }
}

/// One MAC per replica, entry `i` for replica `i`, each under the key the client
/// shares with that replica (see [`crate::auth`]). At most [`MAX_REPLICAS`] entries on
/// the wire; a replica uses its entry only if there are exactly `n`.
pub type Authenticator = BoundedVec<Mac, MAX_REPLICAS>;

/// A client request: the body with the client's signature, which any replica can
/// check (and so the proof that travels, e.g. to a new primary), and an authenticator,
/// with which each replica checks the request alone at a fraction of the cost. See
/// `docs/protocols/pbft.md`, "Request authentication", for who checks what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Request {
    /// The body and the client's signature over it.
    pub signed: Signed<RequestBody>,
    /// The client's MACs of the body, one per replica; not covered by the signature.
    pub authenticator: Authenticator,
}

/// A read-only request (Castro and Liskov, §5.1.3): sent to every replica, never
/// ordered, answered by each from its current state. The body is not signed: a
/// read changes nothing and convinces no one but the replica it is for, which
/// checks its own MAC entry, over [`ReadRequest::mac_digest`] (a context no
/// ordered request uses, so that neither can pass for the other).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct ReadRequest {
    /// The client, a timestamp the client uses for this read only, and the operation.
    pub body: RequestBody,
    /// The client's MACs of the body, one per replica.
    pub authenticator: Authenticator,
}

impl ReadRequest {
    /// What every MAC of a read's authenticator covers.
    pub fn mac_digest(&self) -> Digest {
        Digest::of_value("diffuse/pbft/read-mac", &self.body)
    }
}

impl Request {
    /// A request signed with `key`, without an authenticator: every replica falls
    /// back on the signature.
    pub fn signed_only(body: RequestBody, key: &SecretKey) -> Request {
        Request {
            signed: Signed::sign(body, key),
            authenticator: Authenticator::new(),
        }
    }

    /// Whether the client's signature (with public key `key`) is valid, under the
    /// rule for client signatures (ZIP 215, see [`diffuse_core::crypto`]), the one
    /// rule for requests everywhere, alone or in a batch.
    pub fn signature_is_valid(&self, key: &PublicKey) -> bool {
        self.signed.verify_zip215(key)
    }

    /// Adds the client's signature (with public key `key`) to `batch`: the batch
    /// answers what [`Request::signature_is_valid`] answers.
    pub fn push_signature(&self, key: &PublicKey, batch: &mut SignatureBatch) {
        self.signed.push_to(key, batch);
    }
}

impl std::ops::Deref for Request {
    type Target = RequestBody;
    fn deref(&self) -> &RequestBody {
        &self.signed.value
    }
}

/// An ordered batch of requests: the unit PBFT agrees on. The empty batch is the
/// null request that fills gaps after a view change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Batch {
    /// The requests, executed in this order.
    pub requests: BoundedVec<Request, MAX_BATCH_REQUESTS>,
}

impl Batch {
    /// The digest a pre-prepare binds to.
    pub fn digest(&self) -> Digest {
        Digest::of_value("diffuse/pbft/batch", self)
    }
}

/// The primary's assignment of a batch digest to a sequence number in a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Proposal {
    /// The view.
    pub view: View,
    /// The sequence number.
    pub seq: Seq,
    /// The batch digest.
    pub digest: Digest,
}

impl Signable for Proposal {
    const LABEL: &'static str = "diffuse/pbft/pre-prepare";
}

/// PRE-PREPARE: a signed proposal with the batch it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct PrePrepare {
    /// The primary's signed proposal.
    pub proposal: Signed<Proposal>,
    /// The batch whose digest the proposal names.
    pub batch: Batch,
}

/// A PREPARE vote: the sender accepted the proposal `(view, seq, digest)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct PrepareVote {
    /// The view.
    pub view: View,
    /// The sequence number.
    pub seq: Seq,
    /// The batch digest.
    pub digest: Digest,
    /// The voter.
    pub replica: ReplicaId,
}

impl Signable for PrepareVote {
    const LABEL: &'static str = "diffuse/pbft/prepare";
}

/// COMMIT: the sender has a prepared certificate for `(view, seq, digest)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Commit {
    /// The view.
    pub view: View,
    /// The sequence number.
    pub seq: Seq,
    /// The batch digest.
    pub digest: Digest,
    /// The sender (must match the authenticated channel).
    pub replica: ReplicaId,
}

/// A CHECKPOINT vote: the sender's state digest after executing `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct CheckpointVote {
    /// The checkpoint's sequence number (a multiple of the checkpoint interval).
    pub seq: Seq,
    /// Digest of the replicated state after executing `seq`.
    pub state: Digest,
    /// The voter.
    pub replica: ReplicaId,
}

impl Signable for CheckpointVote {
    const LABEL: &'static str = "diffuse/pbft/checkpoint";
}

/// A stable-checkpoint certificate: a quorum of matching signed checkpoint votes.
/// The genesis checkpoint (sequence 0) has no votes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct CheckpointCert {
    /// The checkpoint's sequence number.
    pub seq: Seq,
    /// The certified state digest.
    pub state: Digest,
    /// The votes.
    pub votes: BoundedVec<Signed<CheckpointVote>, MAX_REPLICAS>,
}

/// A prepared certificate: the primary's proposal and a quorum's matching prepares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct PreparedCert {
    /// The signed proposal.
    pub proposal: Signed<Proposal>,
    /// Prepares from distinct backups, matching the proposal.
    pub prepares: BoundedVec<Signed<PrepareVote>, MAX_REPLICAS>,
}

/// The signed body of a VIEW-CHANGE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct ViewChangeBody {
    /// The view the sender moves to.
    pub new_view: View,
    /// The sender.
    pub replica: ReplicaId,
    /// The sender's stable checkpoint (the `C` set).
    pub stable: CheckpointCert,
    /// For each sequence number above the checkpoint, the prepared certificate of the
    /// highest view in which the sender prepared (the `P` set), in ascending order.
    pub prepared: BoundedVec<PreparedCert, MAX_WINDOW>,
}

impl Signable for ViewChangeBody {
    const LABEL: &'static str = "diffuse/pbft/view-change";
}

/// VIEW-CHANGE.
pub type ViewChange = Signed<ViewChangeBody>;

/// NEW-VIEW: the view changes the new primary chose (`V`) and its proposals (`O`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct NewView {
    /// The new view.
    pub view: View,
    /// A quorum of view changes for `view`.
    pub view_changes: BoundedVec<ViewChange, MAX_REPLICAS>,
    /// One proposal per sequence number between the chosen checkpoint and the
    /// highest prepared sequence number, in ascending order.
    pub proposals: BoundedVec<Signed<Proposal>, MAX_WINDOW>,
}

/// REPLY to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Reply {
    /// The replica's view, so the client learns the primary.
    pub view: View,
    /// The client.
    pub client: ClientId,
    /// The request's timestamp.
    pub timestamp: u64,
    /// The replying replica (must match the authenticated channel).
    pub replica: ReplicaId,
    /// The operation's result.
    pub result: Blob<MAX_RESULT_BYTES>,
}

/// STATUS: sent by a replica that is not making progress, so that peers resend what
/// it is missing (lost messages are otherwise never retransmitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct Status {
    /// The sender's view (or the view it is changing to).
    pub view: View,
    /// Whether the sender operates normally in `view` (false: changing view).
    pub view_active: bool,
    /// The last sequence number the sender executed.
    pub last_executed: Seq,
    /// The sender's stable checkpoint.
    pub stable: Seq,
}

/// Asks for the batch with `digest` at `seq` (e.g. named by a NEW-VIEW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct FetchBatch {
    /// The sequence number.
    pub seq: Seq,
    /// The digest wanted.
    pub digest: Digest,
}

/// A batch sent in answer to [`FetchBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct BatchData {
    /// The sequence number.
    pub seq: Seq,
    /// The batch.
    pub batch: Batch,
}

/// Asks for the state of checkpoint `seq`, from byte `offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct FetchState {
    /// The checkpoint.
    pub seq: Seq,
    /// First byte wanted.
    pub offset: u64,
}

/// A piece of a checkpoint's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub struct StateChunk {
    /// The checkpoint.
    pub seq: Seq,
    /// Total length of the state in bytes.
    pub total_len: u64,
    /// Offset of `data`.
    pub offset: u64,
    /// The bytes.
    pub data: Blob<MAX_CHUNK_BYTES>,
}

/// Every PBFT message, replica-to-replica and client-to-replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
pub enum Message {
    /// Client to replicas (or forwarded by a backup to the primary).
    Request(Request),
    /// Replica to client.
    Reply(Reply),
    /// Primary to backups (or relayed by any replica to one that missed it).
    PrePrepare(PrePrepare),
    /// Backup to all.
    Prepare(Signed<PrepareVote>),
    /// Replica to all.
    Commit(Commit),
    /// Replica to all, every checkpoint interval.
    Checkpoint(Signed<CheckpointVote>),
    /// A stable-checkpoint certificate, sent to a replica that is behind.
    CheckpointCert(CheckpointCert),
    /// Replica to all, when it suspects the primary.
    ViewChange(ViewChange),
    /// New primary to all.
    NewView(NewView),
    /// A replica that is not making progress, to all.
    Status(Status),
    /// Asks peers for a batch body.
    FetchBatch(FetchBatch),
    /// A batch body.
    BatchData(BatchData),
    /// Asks a peer for checkpoint state.
    FetchState(FetchState),
    /// Checkpoint state.
    StateChunk(StateChunk),
    /// Client to every replica: a read-only request, answered with a REPLY.
    Read(ReadRequest),
}

impl WireMessage for Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Request(_) => "request",
            Message::Reply(_) => "reply",
            Message::PrePrepare(_) => "pre-prepare",
            Message::Prepare(_) => "prepare",
            Message::Commit(_) => "commit",
            Message::Checkpoint(_) => "checkpoint",
            Message::CheckpointCert(_) => "checkpoint-cert",
            Message::ViewChange(_) => "view-change",
            Message::NewView(_) => "new-view",
            Message::Status(_) => "status",
            Message::FetchBatch(_) => "fetch-batch",
            Message::BatchData(_) => "batch-data",
            Message::FetchState(_) => "fetch-state",
            Message::StateChunk(_) => "state-chunk",
            Message::Read(_) => "read",
        }
    }

    fn is_client_request(&self) -> bool {
        matches!(self, Message::Request(_) | Message::Read(_))
    }

    fn client(&self) -> Option<ClientId> {
        match self {
            Message::Request(request) => Some(request.client),
            Message::Read(read) => Some(read.body.client),
            Message::Reply(reply) => Some(reply.client),
            _ => None,
        }
    }
}

impl Message {
    /// The view and sequence number of a normal-case message (PRE-PREPARE, PREPARE,
    /// COMMIT), for buffering those a replica cannot take yet.
    pub fn normal_case_slot(&self) -> Option<(View, Seq)> {
        match self {
            Message::PrePrepare(pp) => Some((pp.proposal.view, pp.proposal.seq)),
            Message::Prepare(p) => Some((p.view, p.seq)),
            Message::Commit(c) => Some((c.view, c.seq)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::{Arbitrary, Unstructured};
    use diffuse_core::codec::{decode, encode};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every message kind survives encode/decode unchanged.
        #[test]
        fn every_message_round_trips(seed in proptest::collection::vec(any::<u8>(), 64..4096)) {
            let mut u = Unstructured::new(&seed);
            if let Ok(message) = Message::arbitrary(&mut u) {
                let frame = encode(&message);
                prop_assert_eq!(decode::<Message>(&frame), Ok(message));
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<Message>(&bytes);
            let mut framed = vec![diffuse_core::codec::WIRE_VERSION];
            framed.extend_from_slice(&bytes);
            let _ = decode::<Message>(&framed);
        }
    }

    #[test]
    fn every_kind_is_generated_and_round_trips() {
        // Deterministically build one message of each kind from fixed bytes, so the
        // round trip is checked for all fifteen variants on every run.
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0u32..20_000 {
            let bytes: Vec<u8> = (0..512u32)
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 3) as u8)
                .collect();
            if let Ok(message) = Message::arbitrary(&mut Unstructured::new(&bytes)) {
                assert_eq!(decode::<Message>(&encode(&message)), Ok(message.clone()));
                seen.insert(message.kind());
            }
            if seen.len() == 15 {
                return;
            }
        }
        panic!("only generated {seen:?}");
    }

    #[test]
    fn empty_batch_has_a_fixed_digest() {
        assert_eq!(Batch::default().digest(), Batch::default().digest());
        assert_ne!(Batch::default().digest(), Digest::default());
    }
}
