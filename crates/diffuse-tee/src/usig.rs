//! USIG, the Unique Sequential Identifier Generator of MinBFT (Veronese et al.):
//! the enclave binds each message digest to the next value of its counter and
//! signs the pair. It never signs two digests with one counter value, so a replica
//! that sees counter `c` from a peer knows no other message carries `c`.
//!
//! Diffuse adds a [`Scope`] to each identifier: what the message is about, checked
//! by the enclave itself against rules fixed at configuration (see
//! `docs/protocols/minbft.md`). Plain USIG use is [`Scope::Free`].

use diffuse_core::crypto::{Digest, PublicKey, Signature};
use serde::{Deserialize, Serialize};

/// What a certified message is about, as far as the enclave enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Scope {
    /// No rule: plain USIG.
    Free,
    /// A checkpoint at this sequence number: a multiple of the checkpoint interval,
    /// above every checkpoint certified before.
    Checkpoint(u64),
    /// A vote or proposal for this sequence number: at most the last certified
    /// checkpoint plus the window.
    Slot(u64),
}

/// A unique identifier: a counter value and the enclave's certificate over it, the
/// scope and the message digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Ui {
    /// The counter value bound to the message (the first is 1).
    pub counter: u64,
    /// The enclave's signature over the counter, the scope and the digest.
    pub certificate: Signature,
}

/// What a UI certificate signs.
#[derive(Serialize)]
pub(crate) struct UiPayload<'a> {
    pub(crate) counter: u64,
    pub(crate) scope: Scope,
    pub(crate) message: &'a Digest,
}

/// The label of UI certificates.
pub(crate) const UI_LABEL: &str = "diffuse/tee/usig/v2";

pub(crate) fn encode_payload(counter: u64, scope: Scope, message: &Digest) -> Vec<u8> {
    diffuse_core::codec::encode_payload(&UiPayload {
        counter,
        scope,
        message,
    })
}

/// Whether `ui` certifies `message` in `scope` under the enclave key `enclave` (a
/// key learnt from a verified attestation quote). Anyone can check a UI; only the
/// enclave can make one.
pub fn verify_scoped_ui(enclave: &PublicKey, scope: Scope, message: &Digest, ui: &Ui) -> bool {
    ui.counter > 0
        && enclave.verify(
            UI_LABEL,
            &encode_payload(ui.counter, scope, message),
            &ui.certificate,
        )
}

/// Whether `ui` certifies `message` with [`Scope::Free`] (plain USIG `verifyUI`).
pub fn verify_ui(enclave: &PublicKey, message: &Digest, ui: &Ui) -> bool {
    verify_scoped_ui(enclave, Scope::Free, message, ui)
}
