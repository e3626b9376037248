//! FastBFT's wire messages (`docs/protocols/fastbft.md`, "Messages").
//!
//! Every certificate is the primary's enclave's `⟨x, (c, e)⟩` over a digest that
//! names what it orders (`diffuse_tee::fastbft::prepare_digest`, [`commit_digest`],
//! [`new_tree_digest`]); `e` is the enclave view, which FastBFT calls the *epoch*: it
//! changes whenever the primary rebuilds the tree. An [`Opened`] secret proves that
//! every active replica's enclave released its share for that certificate.

use crate::checkpoint::CheckpointProof;
use crate::merkle::{self, Path};
use crate::view_log::{NewView, RejoinEntry, ViewChange, ViewLog};
use diffuse_core::codec::{self, Blob, BoundedVec, WireMessage};
use diffuse_core::crypto::{Digest, PublicKey, Signed};
use diffuse_core::ids::{ClientId, MAX_REPLICAS, ReplicaId, Seq};
use diffuse_core::service::MAX_RESULT_BYTES;
use diffuse_pbft::message::{Batch, Request, RequestBody};
use diffuse_tee::fastbft::{MAX_PREPROCESSING, Package};
use diffuse_tee::{
    CounterCertificate, FastBftComponent, FastBftError, SecretCommitment, Share, SignedRequest,
    WrappedViewKey, secret_hash,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A batch shared, not copied, between the messages that carry it and a
/// replica's log, stream and execution queue: at `n = 103` copies of each batch
/// were most of an active replica's allocations. On the wire it is the batch.
pub type SharedBatch = Arc<Batch>;

/// The primary's enclave certificate of one counter value.
pub type Cert = Signed<CounterCertificate>;

/// A stream position: `(epoch, counter)`.
pub type Position = (u64, u64);

/// The position a certificate takes.
pub fn position(cert: &Cert) -> Position {
    (cert.view, cert.counter)
}

/// Whether `cert` certifies the PREPARE of `seq` with the batch of root
/// `batch_root` and the checkpoint proof of digest `checkpoint`: over their
/// prepare digest, and of the kind only the enclave's
/// `request_counter_for_batch` issues, after it verified every request of the
/// batch (`crate::authentic`). Nothing else is ever taken for a PREPARE.
pub fn certifies_prepare(
    cert: &Cert,
    seq: Seq,
    batch_root: &Digest,
    checkpoint: Option<&Digest>,
) -> bool {
    cert.certifies_prepare(seq.0, batch_root, checkpoint)
}

/// Has `enclave` certify the PREPARE of `batch` at `seq` (with the checkpoint proof
/// of digest `checkpoint`): it verifies every request's signature against its
/// client's registered key first, and names those that fail.
pub fn certify_prepare<E: FastBftComponent + ?Sized>(
    enclave: &mut E,
    seq: Seq,
    batch: &Batch,
    checkpoint: Option<&Digest>,
) -> Result<Cert, FastBftError> {
    let bodies: Vec<Vec<u8>> = batch
        .requests
        .iter()
        .map(|r| codec::encode_payload(&r.signed.value))
        .collect();
    let requests: Vec<SignedRequest<'_>> = batch
        .requests
        .iter()
        .zip(&bodies)
        .map(|(r, body)| SignedRequest {
            client: r.signed.value.client,
            body,
            signature: &r.signed.signature,
        })
        .collect();
    enclave.request_counter_for_batch(seq.0, &requests, checkpoint)
}

/// What a COMMIT certificate binds: the batch at `seq`, its results, and at a
/// checkpoint the digest of the replicated state after it.
pub fn commit_digest(
    seq: Seq,
    batch_root: &Digest,
    results_root: &Digest,
    state: Option<&Digest>,
) -> Digest {
    Digest::of_value(
        "diffuse/fastbft/commit",
        &(seq.0, batch_root, results_root, state),
    )
}

/// What a NEW-TREE certificate binds: the next epoch's tree.
pub fn new_tree_digest(config: &TreeConfig) -> Digest {
    Digest::of_value("diffuse/fastbft/new-tree", config)
}

/// The Merkle leaf of a request: its client, its body and the client's signature
/// (`diffuse_tee::fastbft::request_leaf`, the enclave's), so that a certificate
/// binds the very bytes the primary's enclave verified, under the client the body
/// names.
pub fn request_leaf(request: &Signed<RequestBody>) -> Digest {
    diffuse_tee::fastbft::request_leaf(
        request.value.client,
        &codec::encode_payload(&request.value),
        &request.signature,
    )
}

/// The Merkle leaf of a request's result (`None`: a stale duplicate, not run).
pub fn result_leaf(client: ClientId, timestamp: u64, result: Option<&[u8]>) -> Digest {
    Digest::of_value(
        "diffuse/fastbft/result-leaf",
        &(client.0, timestamp, result),
    )
}

/// The root over a batch's requests.
pub fn batch_root(batch: &Batch) -> Digest {
    let leaves: Vec<Digest> = batch
        .requests
        .iter()
        .map(|r| request_leaf(&r.signed))
        .collect();
    merkle::root(&leaves)
}

/// A secret opened by the tree, with the primary's commitment to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// `⟨h_c, (c, e)⟩` signed by the primary's enclave.
    pub commitment: Signed<SecretCommitment>,
    /// `s_c`.
    pub secret: Share,
}

impl Opened {
    /// Whether this opens the secret of `cert`'s counter value, committed by the
    /// enclave with key `primary`.
    pub fn opens(&self, cert: &Cert, primary: &PublicKey) -> bool {
        self.matches(cert) && self.commitment.verify(primary)
    }

    /// [`Opened::opens`] but for the commitment's signature, which the caller
    /// checks (the client, in one batch with the others).
    pub fn matches(&self, cert: &Cert) -> bool {
        (self.commitment.counter, self.commitment.view) == (cert.counter, cert.view)
            && secret_hash(&self.secret, cert.counter, cert.view) == self.commitment.secret_hash
    }
}

/// The active replicas of an epoch besides the primary (`f` of them: with the
/// primary at the root they are the paper's `f + 1`), in tree order, and the
/// tree's fan-out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeConfig {
    /// The epoch this configuration starts.
    pub epoch: u64,
    /// The active replicas: position `i` of the share tree is `actives[i]`.
    pub actives: BoundedVec<ReplicaId, MAX_REPLICAS>,
    /// Children per node.
    pub fan_out: u16,
    /// The fallback (§4.5): every backup is active and holds a Shamir share, no
    /// tree; the primary needs any `f` backups' shares with its own.
    pub fallback: bool,
}

/// PREPARE: the batch at `seq`, bound to the next counter value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// The batch's sequence number.
    pub seq: Seq,
    /// The requests.
    pub batch: SharedBatch,
    /// The proof of the checkpoint at `seq - 1`, on the first PREPARE after it.
    pub checkpoint: Option<Box<CheckpointProof>>,
    /// `⟨prepare_digest(seq, root, checkpoint), (c, e)⟩`, of the verified-batch
    /// kind ([`certifies_prepare`]).
    pub cert: Cert,
}

impl Prepare {
    /// The digest of the carried checkpoint proof.
    pub fn checkpoint_digest(&self) -> Option<Digest> {
        self.checkpoint.as_ref().map(|p| p.digest())
    }
}

/// COMMIT: the PREPARE's secret opened, the results, and the next counter value
/// bound to them. Carries the batch when it re-commits a batch prepared in an
/// earlier epoch (the new actives may never have seen it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The batch's sequence number.
    pub seq: Seq,
    /// The Merkle root of the batch.
    pub batch_root: Digest,
    /// The Merkle root of the results.
    pub results_root: Digest,
    /// At a checkpoint: the digest of the replicated state after `seq`.
    pub state: Option<Digest>,
    /// The digest of the checkpoint proof the PREPARE carried (its certificate
    /// binds it).
    pub prepare_checkpoint: Option<Digest>,
    /// The PREPARE's certificate.
    pub prepare_cert: Cert,
    /// Its secret, opened.
    pub prepared: Opened,
    /// The batch, when re-committed in a later epoch.
    pub batch: Option<SharedBatch>,
    /// `⟨commit_digest(seq, root, results, state), (c, e)⟩`.
    pub cert: Cert,
}

/// REPLY to the passive replicas (and to any replica catching up): a batch, both
/// opened secrets and the results root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The batch's sequence number.
    pub seq: Seq,
    /// The requests.
    pub batch: SharedBatch,
    /// The checkpoint proof the PREPARE carried.
    pub checkpoint: Option<Box<CheckpointProof>>,
    /// The Merkle root of the results.
    pub results_root: Digest,
    /// At a checkpoint: the digest of the state after `seq`.
    pub state: Option<Digest>,
    /// The PREPARE's certificate and opened secret.
    pub prepare_cert: Cert,
    /// The PREPARE's secret.
    pub prepared: Opened,
    /// The COMMIT's certificate.
    pub commit_cert: Cert,
    /// The COMMIT's secret (the reply phase).
    pub replied: Opened,
}

/// REPLY to a client: its result, the paths that tie request and result to the
/// certified roots, and both opened secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReply {
    /// The client.
    pub client: ClientId,
    /// The request's timestamp.
    pub timestamp: u64,
    /// The result.
    pub result: Blob<MAX_RESULT_BYTES>,
    /// The batch's sequence number.
    pub seq: Seq,
    /// The request's index in the batch.
    pub index: u32,
    /// The batch's size.
    pub len: u32,
    /// The request's Merkle path to the batch root.
    pub request_path: Path,
    /// The result's Merkle path to the results root.
    pub result_path: Path,
    /// The batch root.
    pub batch_root: Digest,
    /// The results root.
    pub results_root: Digest,
    /// The digest of the checkpoint proof the PREPARE carried.
    pub checkpoint: Option<Digest>,
    /// At a checkpoint: the digest of the state after `seq`.
    pub state: Option<Digest>,
    /// The PREPARE's certificate.
    pub prepare_cert: Cert,
    /// Its opened secret.
    pub prepared: Opened,
    /// The COMMIT's certificate.
    pub commit_cert: Cert,
    /// Its opened secret.
    pub replied: Opened,
}

/// A subtree aggregate `ŝ_j` on its way up the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareUp {
    /// The epoch.
    pub epoch: u64,
    /// The counter value whose secret it is part of.
    pub counter: u64,
    /// The XOR of the sender's share and its children's aggregates.
    pub aggregate: Share,
}

/// SUSPECT: the sender's child `accused` sent no valid aggregate for `counter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspect {
    /// The epoch.
    pub epoch: u64,
    /// The counter value of the round.
    pub counter: u64,
    /// The child the sender suspects.
    pub accused: ReplicaId,
}

/// NEW-TREE: the primary ends an epoch with a certificate over the next tree, and
/// hands the new view keys to the new active replicas' enclaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTree {
    /// The next epoch's tree.
    pub config: TreeConfig,
    /// `⟨new_tree_digest(config), (c, e)⟩`: the last counter value of epoch `e`.
    pub cert: Cert,
    /// The view keys, wrapped for the active replicas' enclaves, in tree order.
    pub keys: BoundedVec<WrappedViewKey, MAX_REPLICAS>,
}

/// Preprocessed packages for one active replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packages {
    /// The epoch.
    pub epoch: u64,
    /// `ϱ_c^i` for consecutive counter values.
    pub packages: BoundedVec<Package, MAX_PREPROCESSING>,
}

/// FETCH: the sender's enclave is at `counter - 1` in `epoch` and is missing what
/// comes next (stream messages, or its packages if `packages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    /// The epoch.
    pub epoch: u64,
    /// The first counter value missing.
    pub counter: u64,
    /// The sender is an active replica without the package for `counter`.
    pub packages: bool,
}

/// REQ-VIEW-CHANGE: the sender wants view `view`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReqViewChange {
    /// The view asked for.
    pub view: u64,
    /// Sent by the primary of `view - 1` asking to be replaced (it restarted and
    /// cannot lead its view again): enough on its own. Any other request, even
    /// the same replica's from before it led the view, counts as one of `f + 1`.
    pub replace_me: bool,
}

/// A replica's vote that it checked the NEW-VIEW of `view`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// The voter (its enclave signed the vote).
    pub replica: ReplicaId,
    /// The view.
    pub view: u64,
    /// The vote, from the sender's enclave.
    pub accept: Signed<diffuse_tee::ViewAccept>,
}

/// Everything FastBFT sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A client request.
    Request(Request),
    /// PREPARE.
    Prepare(Prepare),
    /// An aggregate up the tree.
    Share(ShareUp),
    /// COMMIT.
    Commit(Commit),
    /// REPLY to passive replicas.
    Update(Update),
    /// REPLY to a client.
    Reply(ClientReply),
    /// SUSPECT.
    Suspect(Suspect),
    /// NEW-TREE.
    NewTree(NewTree),
    /// Preprocessed packages.
    Packages(Packages),
    /// FETCH.
    Fetch(Fetch),
    /// REQ-VIEW-CHANGE.
    ReqViewChange(ReqViewChange),
    /// VIEW-CHANGE, to the new primary.
    ViewChange(Box<ViewChange>),
    /// NEW-VIEW.
    NewView(Box<NewView>),
    /// A vote for a NEW-VIEW.
    Accept(Accept),
    /// A replica behind a stable checkpoint asks for its state.
    FetchState(diffuse_pbft::message::FetchState),
    /// A piece of a checkpoint's state.
    StateChunk(diffuse_pbft::message::StateChunk),
    /// A restarted replica with a locked enclave asks for reports on it, over
    /// its enclave's challenge.
    Rejoin(Digest),
    /// A peer's enclave's report for a REJOIN.
    RejoinReport(Box<Signed<diffuse_tee::CounterReport>>),
    /// A restarted replica asks the primary for a position to rejoin at, over
    /// its enclave's nonce.
    RejoinRequest(Digest),
    /// The primary's position where a restarted replica rejoins (a stream
    /// position every replica takes).
    Rejoined(RejoinEntry),
    /// What a rejoining replica needs: the primary's log up to its rejoin
    /// position, the current tree, and the UPDATEs above the log's checkpoint.
    RejoinState(Box<RejoinState>),
}

/// The primary's answer to a rejoining replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinState {
    /// The primary's log, ending at the rejoin position.
    pub log: ViewLog,
    /// The current epoch's tree.
    pub config: TreeConfig,
    /// The UPDATEs of the batches replied above the log's checkpoint.
    pub updates: BoundedVec<Update, { diffuse_pbft::message::MAX_WINDOW }>,
}

impl WireMessage for Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Request(_) => "request",
            Message::Prepare(_) => "prepare",
            Message::Share(_) => "share",
            Message::Commit(_) => "commit",
            Message::Update(_) => "update",
            Message::Reply(_) => "reply",
            Message::Suspect(_) => "suspect",
            Message::NewTree(_) => "new-tree",
            Message::Packages(_) => "packages",
            Message::Fetch(_) => "fetch",
            Message::ReqViewChange(_) => "req-view-change",
            Message::ViewChange(_) => "view-change",
            Message::NewView(_) => "new-view",
            Message::Accept(_) => "accept",
            Message::FetchState(_) => "fetch-state",
            Message::StateChunk(_) => "state-chunk",
            Message::Rejoin(_) => "rejoin",
            Message::RejoinReport(_) => "rejoin-report",
            Message::RejoinRequest(_) => "rejoin-request",
            Message::Rejoined(_) => "rejoined",
            Message::RejoinState(_) => "rejoin-state",
        }
    }

    fn is_client_request(&self) -> bool {
        matches!(self, Message::Request(_))
    }

    fn client(&self) -> Option<ClientId> {
        match self {
            Message::Request(request) => Some(request.client),
            Message::Reply(reply) => Some(reply.client),
            _ => None,
        }
    }
}
