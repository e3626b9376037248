//! USIG, the Unique Sequential Identifier Generator of MinBFT (Veronese et al.):
//! the enclave binds each message digest to the next value of its counter and
//! signs the pair. It never signs two digests with one counter value, so a replica
//! that sees counter `c` from a peer knows no other message carries `c`.

use diffuse_core::crypto::{Digest, PublicKey, Signature};
use serde::{Deserialize, Serialize};

/// A unique identifier: a counter value and the enclave's certificate over it and
/// the message digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ui {
    /// The counter value bound to the message (the first is 1).
    pub counter: u64,
    /// The enclave's signature over the counter and the digest.
    pub certificate: Signature,
}

/// What a UI certificate signs.
#[derive(Serialize)]
pub(crate) struct UiPayload<'a> {
    pub(crate) counter: u64,
    pub(crate) message: &'a Digest,
}

/// The label of UI certificates.
pub(crate) const UI_LABEL: &str = "diffuse/tee/usig";

pub(crate) fn encode_payload(counter: u64, message: &Digest) -> Vec<u8> {
    diffuse_core::codec::encode_payload(&UiPayload { counter, message })
}

/// Whether `ui` certifies `message` under the enclave key `enclave` (a key learnt
/// from a verified attestation quote). Anyone can check a UI; only the enclave can
/// make one.
pub fn verify_ui(enclave: &PublicKey, message: &Digest, ui: &Ui) -> bool {
    ui.counter > 0
        && enclave.verify(
            UI_LABEL,
            &encode_payload(ui.counter, message),
            &ui.certificate,
        )
}
