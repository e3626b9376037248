//! The trusted component of Diffuse's hybrid protocols (MinBFT, FastBFT).
//!
//! A trusted component can crash but never lie: with one per replica, `n = 2f + 1`
//! replicas suffice. There is no SGX here, so Diffuse ships a **software enclave**
//! behind the [`TrustedComponent`] interface, which a real enclave can replace:
//!
//! * [`platform`]: what hardware provides: attestation quotes, sealing keys, a
//!   monotonic counter. [`SoftwarePlatform`] models it.
//! * [`usig`]: MinBFT's USIG, unique sequential identifiers (`create_ui`,
//!   `verify_ui`).
//! * [`enclave`]: [`SoftwareEnclave`], with the rollback protection of FastBFT §6.1
//!   (sealed state bound to the monotonic counter; locked after an unscheduled
//!   reboot until `f + 1` consistent counter reports reset it).
//! * [`fastbft`]: FastBFT's enclave functions (Fig. 3: `be_primary`, `update_view`,
//!   `preprocessing`, `request_counter`, `verify_counter`, `update_counter`), the
//!   share [`Tree`], and `request_counter_for_batch`, which certifies a PREPARE only
//!   after verifying every client signature of its batch.
//!
//! What the software enclave only models is written down in `docs/tee.md`.

pub mod enclave;
pub mod fastbft;
pub mod platform;
pub mod usig;

pub use enclave::{
    CounterReport, MAX_CLIENTS, MAX_SEALED_BYTES, SealedState, SlotRules, SoftwareEnclave,
    TeeError, TrustedComponent,
};
pub use fastbft::{
    CertificateKind, CounterCertificate, FastBftComponent, FastBftError, OpenedShare, Package,
    Preprocessed, SecretCommitment, Share, THRESHOLD_PRIMARY_POINT, Tree, ViewAccept,
    ViewChangeCertificate, WrappedViewKey, aggregate_hash, combine_threshold, first_epoch,
    new_view_id, rejoin_digest, secret_hash, threshold_point, view_of_epoch,
};
pub use fastbft::{REQUEST_LABEL, SignedRequest};
pub use platform::{
    Measurement, Platform, Quote, QuoteBody, QuoteError, SoftwarePlatform, verify_quote,
};
pub use usig::{Scope, Ui, verify_scoped_ui, verify_ui};
