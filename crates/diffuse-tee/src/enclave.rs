//! The software enclave: the [`TrustedComponent`] that Diffuse's hybrid protocols
//! use, with rollback-protected sealing as in FastBFT §6.1.
//!
//! Life cycle:
//!
//! * [`SoftwareEnclave::create`]: first start. The enclave makes its key from the
//!   entropy it is given and never lets it out; the outside world sees only its
//!   public key, certified by an attestation [`Quote`].
//! * [`SoftwareEnclave::shutdown`] (scheduled): increments the platform's monotonic
//!   counter to `C` and seals `(C, key, counter, view)` with an AEAD key only enclave
//!   code on this platform can derive.
//! * [`SoftwareEnclave::resume`]: accepts a sealed state only if the platform counter
//!   still reads `C`, then increments it at once, so that the same sealed state can
//!   never be accepted twice. A host that restores an older sealed state (rollback),
//!   or restarts after a crash without a scheduled shutdown, finds the enclave
//!   **locked**: it refuses to certify anything until [`SoftwareEnclave::reset_counter`]
//!   receives `f + 1` consistent counter reports signed by other enclaves (REJOIN).

use crate::platform::{Measurement, Platform, Quote, QuoteBody};
use crate::usig::{self, Ui};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use diffuse_core::codec::{self, Blob};
use diffuse_core::crypto::{Digest, PublicKey, SecretKey, Signable, Signed};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why the trusted component refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeeError {
    /// After an unscheduled reboot or a rollback, the enclave certifies nothing until
    /// its counter is reset.
    #[error("the enclave is locked after an unscheduled reboot; it needs a counter reset")]
    Locked,
    /// The sealed state does not decrypt or does not parse.
    #[error("the sealed state is not authentic")]
    BadSealedState,
    /// Not enough consistent, authentic counter reports to reset the counter.
    #[error("a counter reset needs {needed} consistent signed reports, got {got}")]
    NotEnoughReports {
        /// Required.
        needed: usize,
        /// Consistent and authentic reports received.
        got: usize,
    },
}

/// The functions a hybrid protocol calls on its trusted component: narrow enough
/// to be an enclave's ECALL list. (FastBFT's Fig. 3 functions extend it in the
/// FastBFT crate's own trait.)
pub trait TrustedComponent: Send {
    /// The enclave's public key (trust it only through [`TrustedComponent::attest`]).
    fn public_key(&self) -> PublicKey;
    /// A quote over the enclave key and `caller_data`, signed by the platform.
    fn attest(&self, caller_data: Digest) -> Quote;
    /// USIG `createUI`: binds `message` to the next counter value.
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, TeeError>;
    /// USIG `verifyUI`: whether `ui` from the enclave with key `signer` certifies
    /// `message`.
    fn verify_ui(&self, signer: &PublicKey, message: &Digest, ui: &Ui) -> bool {
        usig::verify_ui(signer, message, ui)
    }
    /// The last counter value certified (0 before the first).
    fn counter(&self) -> u64;
    /// Whether the enclave refuses to certify (after an unscheduled reboot).
    fn is_locked(&self) -> bool;
}

/// What a replica's enclave reports about another enclave's counter in a REJOIN:
/// "the last counter value of `subject` that I accepted, in `view`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterReport {
    /// The enclave the report is about.
    pub subject: PublicKey,
    /// The last counter value of `subject` the reporter accepted.
    pub counter: u64,
    /// The reporter's view.
    pub view: u64,
}

impl Signable for CounterReport {
    const LABEL: &'static str = "diffuse/tee/counter-report";
}

/// The state sealed at a scheduled shutdown.
#[derive(Serialize, Deserialize)]
struct SealedBody {
    /// The platform counter value this state is valid for.
    platform_counter: u64,
    key_seed: [u8; 32],
    counter: u64,
    view: u64,
}

/// The largest sealed state accepted (it is a few dozen bytes).
const MAX_SEALED_BYTES: usize = 1024;

/// Sealed enclave state, as the host stores it. Opaque and authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedState(pub Blob<MAX_SEALED_BYTES>);

/// Diffuse's software enclave.
pub struct SoftwareEnclave {
    platform: Arc<dyn Platform>,
    measurement: Measurement,
    key_seed: [u8; 32],
    key: SecretKey,
    counter: u64,
    view: u64,
    locked: bool,
    /// Test switch: without rollback protection (the `enclave-without-rollback-
    /// protection` mutant), a stale sealed state is accepted. The checkers must then
    /// catch the equivocation this allows.
    rollback_protection: bool,
}

impl std::fmt::Debug for SoftwareEnclave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareEnclave")
            .field("key", &self.key.public())
            .field("counter", &self.counter)
            .field("view", &self.view)
            .field("locked", &self.locked)
            .finish_non_exhaustive()
    }
}

fn cipher(platform: &dyn Platform, measurement: &Measurement) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(&platform.sealing_key(measurement).into())
}

/// A nonce never reused under one sealing key: the platform counter only goes up,
/// and each value seals at most one state.
fn nonce(platform_counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&platform_counter.to_be_bytes());
    nonce.into()
}

const SEAL_AAD: &[u8] = b"diffuse/tee/sealed-state/v1";

impl SoftwareEnclave {
    /// First start: a fresh enclave whose key derives from `entropy`.
    pub fn create(platform: Arc<dyn Platform>, entropy: [u8; 32]) -> SoftwareEnclave {
        let key_seed = blake3::derive_key("diffuse 2026 tee enclave key", &entropy);
        SoftwareEnclave {
            measurement: Measurement::software_enclave_v1(),
            key: SecretKey::from_seed(key_seed),
            key_seed,
            platform,
            counter: 0,
            view: 0,
            locked: false,
            rollback_protection: true,
        }
    }

    /// Turns rollback protection off (a deliberately broken enclave for mutant
    /// testing; never in a deployment).
    pub fn without_rollback_protection(mut self) -> SoftwareEnclave {
        self.rollback_protection = false;
        self
    }

    /// Scheduled shutdown: increments the platform counter and seals the state for
    /// that value. The enclave must not be used afterwards.
    pub fn shutdown(self) -> SealedState {
        let platform_counter = self.platform.increment_counter();
        let body = SealedBody {
            platform_counter,
            key_seed: self.key_seed,
            counter: self.counter,
            view: self.view,
        };
        let plaintext = codec::encode_payload(&body);
        let ciphertext = cipher(&*self.platform, &self.measurement)
            .encrypt(
                &nonce(platform_counter),
                Payload {
                    msg: &plaintext,
                    aad: SEAL_AAD,
                },
            )
            .expect("ChaCha20-Poly1305 encrypts any message of this size");
        let mut sealed = platform_counter.to_be_bytes().to_vec();
        sealed.extend_from_slice(&ciphertext);
        SealedState(Blob::try_from_vec(sealed).expect("a sealed state is a few dozen bytes"))
    }

    /// Restart from a sealed state. A state sealed by a scheduled shutdown, and not
    /// used since, restores the enclave; a stale one (rollback, or a crash since)
    /// restores its identity but leaves it locked.
    pub fn resume(
        platform: Arc<dyn Platform>,
        sealed: &SealedState,
    ) -> Result<SoftwareEnclave, TeeError> {
        let measurement = Measurement::software_enclave_v1();
        let bytes: &[u8] = &sealed.0;
        if bytes.len() < 8 {
            return Err(TeeError::BadSealedState);
        }
        let sealed_for = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        let plaintext = cipher(&*platform, &measurement)
            .decrypt(
                &nonce(sealed_for),
                Payload {
                    msg: &bytes[8..],
                    aad: SEAL_AAD,
                },
            )
            .map_err(|_| TeeError::BadSealedState)?;
        let body: SealedBody =
            codec::decode_payload(&plaintext).map_err(|_| TeeError::BadSealedState)?;
        if body.platform_counter != sealed_for {
            return Err(TeeError::BadSealedState);
        }
        let fresh = platform.counter() == body.platform_counter;
        // Spend the sealed state: from now on it is stale.
        platform.increment_counter();
        Ok(SoftwareEnclave {
            measurement,
            key: SecretKey::from_seed(body.key_seed),
            key_seed: body.key_seed,
            platform,
            counter: body.counter,
            view: body.view,
            locked: !fresh,
            rollback_protection: true,
        })
    }

    /// Like [`SoftwareEnclave::resume`], for the broken enclave of the
    /// `enclave-without-rollback-protection` mutant: a stale state is accepted.
    pub fn resume_without_rollback_protection(
        platform: Arc<dyn Platform>,
        sealed: &SealedState,
    ) -> Result<SoftwareEnclave, TeeError> {
        let mut enclave = SoftwareEnclave::resume(platform, sealed)?;
        enclave.locked = false;
        enclave.rollback_protection = false;
        Ok(enclave)
    }

    /// The view the enclave records.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// Records a new view (the protocol calls it when it installs one).
    pub fn set_view(&mut self, view: u64) {
        self.view = self.view.max(view);
    }

    /// Signs a report on another enclave's counter, for a REJOIN.
    pub fn report_counter(&self, subject: PublicKey, counter: u64) -> Signed<CounterReport> {
        Signed::sign(
            CounterReport {
                subject,
                counter,
                view: self.view,
            },
            &self.key,
        )
    }

    /// REJOIN after an unscheduled reboot: unlocks the enclave once `reports` holds
    /// at least `threshold` (f + 1) reports about this enclave, signed by distinct
    /// enclaves among `reporters`, that agree on (counter, view). The counter then
    /// continues after the reported value.
    pub fn reset_counter(
        &mut self,
        reports: &[(PublicKey, Signed<CounterReport>)],
        reporters: &[PublicKey],
        threshold: usize,
    ) -> Result<(), TeeError> {
        let me = self.key.public();
        let mut agreeing: BTreeMap<(u64, u64), Vec<PublicKey>> = BTreeMap::new();
        for (reporter, report) in reports {
            let valid = *reporter != me
                && reporters.contains(reporter)
                && report.value.subject == me
                && report.verify(reporter);
            if !valid {
                continue;
            }
            let signers = agreeing
                .entry((report.value.counter, report.value.view))
                .or_default();
            if !signers.contains(reporter) {
                signers.push(*reporter);
            }
        }
        let best = agreeing
            .iter()
            .max_by_key(|(_, signers)| signers.len())
            .map(|(value, signers)| (*value, signers.len()));
        match best {
            Some(((counter, view), got)) if got >= threshold => {
                self.counter = self.counter.max(counter);
                self.view = self.view.max(view);
                self.locked = false;
                Ok(())
            }
            other => Err(TeeError::NotEnoughReports {
                needed: threshold,
                got: other.map_or(0, |(_, got)| got),
            }),
        }
    }
}

impl TrustedComponent for SoftwareEnclave {
    fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    fn attest(&self, caller_data: Digest) -> Quote {
        self.platform.quote(QuoteBody {
            measurement: self.measurement,
            enclave_key: self.key.public(),
            caller_data,
        })
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, TeeError> {
        if self.locked && self.rollback_protection {
            return Err(TeeError::Locked);
        }
        self.counter += 1;
        let certificate = self
            .key
            .sign(usig::UI_LABEL, &usig::encode_payload(self.counter, message));
        Ok(Ui {
            counter: self.counter,
            certificate,
        })
    }

    fn counter(&self) -> u64 {
        self.counter
    }

    fn is_locked(&self) -> bool {
        self.locked && self.rollback_protection
    }
}
