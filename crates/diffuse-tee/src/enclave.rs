//! The software enclave: the [`TrustedComponent`] that Diffuse's hybrid protocols
//! use, with rollback-protected sealing as in FastBFT §6.1.
//!
//! Life cycle:
//!
//! * [`SoftwareEnclave::create`]: first start. The enclave draws its key from the
//!   platform's random generator (the host cannot choose it) and never lets it out;
//!   the outside world sees only its public key, certified by an attestation
//!   [`Quote`]. [`SoftwareEnclave::configure`] then fixes, once, the peer enclaves
//!   and the number of their reports a REJOIN needs, and
//!   [`SoftwareEnclave::configure_clients`] the clients' keys, against which a
//!   FastBFT primary's enclave verifies every request it certifies.
//! * [`SoftwareEnclave::shutdown`] (scheduled): increments the platform's monotonic
//!   counter to `C` and seals the whole state for `C` with an AEAD key only enclave
//!   code on this platform can derive.
//! * [`SoftwareEnclave::resume`]: increments the platform counter and accepts the
//!   sealed state as fresh only if that yields `C + 1`, so one sealed state is
//!   accepted once. A host that restores an older sealed state (rollback), or restarts
//!   after a crash without a scheduled shutdown, finds the enclave **locked**: it
//!   certifies nothing until [`SoftwareEnclave::reset_counter`] gets reports from
//!   enough configured peers, signed over a fresh challenge (REJOIN). A locked
//!   enclave stays locked through further shutdowns and resumes.

use crate::platform::{Measurement, Platform, Quote, QuoteBody};
use crate::usig::{self, Scope, Ui};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use diffuse_core::codec::{self, Blob};
use diffuse_core::crypto::{Digest, PublicKey, SecretKey, Signable, Signed};
use diffuse_core::ids::ClientId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
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
    /// The host could not store the sealed state (its next start will be locked).
    #[error("the host cannot store the sealed state: {0}")]
    HostStorage(String),
    /// The peers were configured already, or the configuration is impossible.
    #[error("{0}")]
    Configuration(&'static str),
    /// The scope's rule refuses the message (see [`SlotRules`]).
    #[error("the enclave refuses this scope: {0}")]
    Scope(&'static str),
    /// Not enough authentic, fresh reports from distinct peers to reset the counter.
    #[error("a counter reset needs {needed} valid reports from distinct peers, got {got}")]
    NotEnoughReports {
        /// Required.
        needed: usize,
        /// Valid reports from distinct peers.
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
    /// USIG `createUI`: binds `message` to the next counter value
    /// ([`Scope::Free`]).
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, TeeError> {
        self.create_scoped_ui(Scope::Free, message)
    }
    /// `createUI` for a message about `scope`, refused if the scope's rule does not
    /// hold (see [`SlotRules`]).
    fn create_scoped_ui(&mut self, scope: Scope, message: &Digest) -> Result<Ui, TeeError>;
    /// USIG `verifyUI` for `scope`, recording inside the enclave the highest counter
    /// (and checkpoint) accepted from each configured peer: what it can later vouch
    /// for in a REJOIN.
    fn accept_ui(&mut self, signer: &PublicKey, scope: Scope, message: &Digest, ui: &Ui) -> bool;
    /// Whether `ui` from the enclave with key `signer` certifies `message` (no
    /// record kept).
    fn verify_ui(&self, signer: &PublicKey, message: &Digest, ui: &Ui) -> bool {
        usig::verify_ui(signer, message, ui)
    }
    /// The last counter value certified (0 before the first).
    fn counter(&self) -> u64;
    /// Whether the enclave refuses to certify (after an unscheduled reboot).
    fn is_locked(&self) -> bool;
}

/// What a peer's enclave reports about this enclave in a REJOIN: "the highest
/// counter of `subject` I accepted is `counter`", bound to the subject's challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterReport {
    /// The reporting enclave.
    pub reporter: PublicKey,
    /// The enclave the report is about.
    pub subject: PublicKey,
    /// The challenge the locked subject issued (reports cannot be replayed).
    pub challenge: Digest,
    /// The highest counter value of `subject` the reporter accepted.
    pub counter: u64,
    /// The highest checkpoint of `subject` the reporter accepted.
    pub checkpoint: u64,
    /// The reporter's view.
    pub view: u64,
    /// The highest FastBFT view the reporter's enclave is in or voted for.
    pub fastbft_view: u64,
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
    locked: bool,
    peers: Option<(Vec<[u8; 32]>, u64)>,
    /// The registered clients' keys, by client id.
    clients: Option<Vec<(u32, [u8; 32])>>,
    slot_rules: Option<SlotRules>,
    last_checkpoint: u64,
    seen: Vec<([u8; 32], Seen)>,
    /// FastBFT's whole state, role and view keys included (`crate::fastbft`).
    fastbft: crate::fastbft::SealedFastBft,
}

/// The rules of [`Scope::Checkpoint`] and [`Scope::Slot`], fixed once: checkpoints
/// are multiples of `checkpoint_interval` and strictly increase; a slot is at most
/// the last checkpoint plus `window`. With them, every slot certified before a
/// checkpoint `K` is at most `K - checkpoint_interval + window`, which is what lets
/// MinBFT anchor a view change at a checkpoint (`docs/protocols/minbft.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRules {
    /// Sequence numbers between checkpoints (at least 1).
    pub checkpoint_interval: u64,
    /// How far above the last checkpoint a slot may be (a positive multiple of the
    /// interval).
    pub window: u64,
}

/// What this enclave accepted from one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    counter: u64,
    checkpoint: u64,
}

/// The largest sealed state accepted.
pub const MAX_SEALED_BYTES: usize = 1024 * 1024;

/// The most peers an enclave can be configured with: with their recorded counters
/// they stay far below [`MAX_SEALED_BYTES`] (about 45 bytes each), so sealing never
/// outgrows its bound.
pub const MAX_PEERS: usize = diffuse_core::ids::MAX_REPLICAS;

/// The most clients an enclave can be configured with: about 40 sealed bytes each,
/// so that with [`MAX_PEERS`] peers the sealed state stays below
/// [`MAX_SEALED_BYTES`].
pub const MAX_CLIENTS: usize = 16_384;

/// Sealed enclave state, as the host stores it. Opaque and authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedState(pub Blob<MAX_SEALED_BYTES>);

/// The peers whose reports can reset this enclave's counter, fixed once.
#[derive(Debug, Clone)]
struct Peers {
    /// Peer enclave keys, as bytes.
    keys: BTreeSet<[u8; 32]>,
    threshold: usize,
}

/// Diffuse's software enclave.
pub struct SoftwareEnclave {
    platform: Arc<dyn Platform>,
    measurement: Measurement,
    key_seed: [u8; 32],
    key: SecretKey,
    counter: u64,
    view: u64,
    locked: bool,
    /// Sealed by [`SoftwareEnclave::seal_and_stop`]: refuses everything from then on.
    stopped: bool,
    /// While locked: the challenge reports must sign.
    challenge: Option<Digest>,
    peers: Option<Peers>,
    /// The registered clients' keys, fixed once ([`SoftwareEnclave::configure_clients`]).
    clients: Option<BTreeMap<ClientId, PublicKey>>,
    slot_rules: Option<SlotRules>,
    /// The highest checkpoint certified here.
    last_checkpoint: u64,
    /// The highest counter and checkpoint accepted from each configured peer.
    seen: BTreeMap<[u8; 32], Seen>,
    /// Test switch: without rollback protection (the `enclave-without-rollback-
    /// protection` mutant), a stale sealed state is accepted. The checkers must then
    /// catch the equivocation this allows.
    rollback_protection: bool,
    /// Test switch: REJOIN's reset takes this many reports instead of the
    /// configured threshold (a broken variant, [`Self::weaken_rejoin_for_tests`]).
    rejoin_reports: Option<usize>,
    /// Test switch: off only in the broken enclave of the `enclave-skips-request-
    /// signatures` mutant, which certifies a batch without verifying its requests.
    verify_request_signatures: bool,
    /// FastBFT's `(c_latest, v)`, role and view keys (not sealed: `docs/tee.md`).
    pub(crate) fastbft: crate::fastbft::FastBftState,
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
    /// First start: a fresh enclave with a key from the platform's random generator.
    pub fn create(platform: Arc<dyn Platform>) -> SoftwareEnclave {
        let key_seed = platform.random();
        SoftwareEnclave {
            measurement: Measurement::software_enclave_v1(),
            key: SecretKey::from_seed(key_seed),
            key_seed,
            platform,
            counter: 0,
            view: 0,
            locked: false,
            stopped: false,
            challenge: None,
            peers: None,
            clients: None,
            slot_rules: None,
            last_checkpoint: 0,
            seen: BTreeMap::new(),
            rollback_protection: true,
            rejoin_reports: None,
            verify_request_signatures: true,
            fastbft: Default::default(),
        }
    }

    /// Fixes, once, the peer enclaves (keys learnt from verified quotes) and how many
    /// of their reports a counter reset needs (`f + 1`).
    pub fn configure(&mut self, peers: Vec<PublicKey>, threshold: usize) -> Result<(), TeeError> {
        if self.peers.is_some() {
            return Err(TeeError::Configuration("the peers are configured already"));
        }
        if peers.len() > MAX_PEERS {
            return Err(TeeError::Configuration("too many peers"));
        }
        let me = self.key.public();
        let keys: BTreeSet<[u8; 32]> = peers
            .into_iter()
            .filter(|k| *k != me)
            .map(|k| k.to_bytes())
            .collect();
        if threshold == 0 || threshold > keys.len() {
            return Err(TeeError::Configuration(
                "the reset threshold must be between 1 and the number of peers",
            ));
        }
        self.peers = Some(Peers { keys, threshold });
        Ok(())
    }

    /// Fixes, once, the registered clients and their keys (from the cluster's
    /// configuration, like the peers): a FastBFT primary's enclave certifies a
    /// PREPARE only for requests signed by one of them
    /// (`FastBftComponent::request_counter_for_batch`). At most [`MAX_CLIENTS`],
    /// each id once.
    pub fn configure_clients(
        &mut self,
        clients: Vec<(ClientId, PublicKey)>,
    ) -> Result<(), TeeError> {
        if self.clients.is_some() {
            return Err(TeeError::Configuration(
                "the clients are configured already",
            ));
        }
        if clients.len() > MAX_CLIENTS {
            return Err(TeeError::Configuration("too many clients"));
        }
        let count = clients.len();
        let registry: BTreeMap<ClientId, PublicKey> = clients.into_iter().collect();
        if registry.len() != count {
            return Err(TeeError::Configuration("a client id is listed twice"));
        }
        self.clients = Some(registry);
        Ok(())
    }

    /// The registered clients' keys, once configured.
    pub(crate) fn client_keys(&self) -> Option<&BTreeMap<ClientId, PublicKey>> {
        self.clients.as_ref()
    }

    /// Whether the enclave verifies request signatures (always, but in the
    /// `enclave-skips-request-signatures` mutant).
    pub(crate) fn verifies_request_signatures(&self) -> bool {
        self.verify_request_signatures
    }

    /// Test switch, for the `enclave-skips-request-signatures` mutant: the enclave
    /// certifies a batch of registered clients' requests without verifying their
    /// signatures (unsafe: the checkers must catch a forged request).
    #[doc(hidden)]
    pub fn skip_request_signatures_for_tests(&mut self) {
        self.verify_request_signatures = false;
    }

    /// Fixes, once, the rules of [`Scope::Checkpoint`] and [`Scope::Slot`]; until then
    /// those scopes are refused.
    pub fn configure_slots(&mut self, rules: SlotRules) -> Result<(), TeeError> {
        if self.slot_rules.is_some() {
            return Err(TeeError::Configuration(
                "the slot rules are configured already",
            ));
        }
        if rules.checkpoint_interval == 0
            || rules.window == 0
            || rules.window % rules.checkpoint_interval != 0
        {
            return Err(TeeError::Configuration(
                "the window must be a positive multiple of a positive checkpoint interval",
            ));
        }
        self.slot_rules = Some(rules);
        Ok(())
    }

    /// The rules of checkpoint and slot scopes, once configured.
    pub fn slot_rules(&self) -> Option<SlotRules> {
        self.slot_rules
    }

    /// The highest checkpoint this enclave certified.
    pub fn last_checkpoint(&self) -> u64 {
        self.last_checkpoint
    }

    /// Scheduled shutdown: increments the platform counter and seals the state for
    /// that value.
    pub fn shutdown(mut self) -> SealedState {
        self.seal_and_stop()
    }

    /// [`SoftwareEnclave::shutdown`] for an enclave its host shares: seals the
    /// state, then refuses every call, so that no certificate follows the sealed
    /// counter value. Sealing a stopped enclave again yields a locked state.
    pub fn seal_and_stop(&mut self) -> SealedState {
        let platform_counter = self.platform.increment_counter();
        let body = SealedBody {
            platform_counter,
            key_seed: self.key_seed,
            counter: self.counter,
            view: self.view,
            locked: self.locked || self.stopped,
            peers: self
                .peers
                .as_ref()
                .map(|p| (p.keys.iter().copied().collect(), p.threshold as u64)),
            clients: self
                .clients
                .as_ref()
                .map(|c| c.iter().map(|(id, key)| (id.0, key.to_bytes())).collect()),
            slot_rules: self.slot_rules,
            last_checkpoint: self.last_checkpoint,
            seen: self.seen.iter().map(|(k, c)| (*k, *c)).collect(),
            fastbft: self.fastbft.seal(),
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
        self.stopped = true;
        self.challenge = None;
        let mut sealed = platform_counter.to_be_bytes().to_vec();
        sealed.extend_from_slice(&ciphertext);
        SealedState(
            Blob::try_from_vec(sealed)
                .expect("MAX_PEERS and MAX_CLIENTS keep the sealed state within its bound"),
        )
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
        let Some((counter_bytes, ciphertext)) = bytes.split_first_chunk::<8>() else {
            return Err(TeeError::BadSealedState);
        };
        let sealed_for = u64::from_be_bytes(*counter_bytes);
        let plaintext = cipher(&*platform, &measurement)
            .decrypt(
                &nonce(sealed_for),
                Payload {
                    msg: ciphertext,
                    aad: SEAL_AAD,
                },
            )
            .map_err(|_| TeeError::BadSealedState)?;
        let body: SealedBody =
            codec::decode_payload(&plaintext).map_err(|_| TeeError::BadSealedState)?;
        if body.platform_counter != sealed_for {
            return Err(TeeError::BadSealedState);
        }
        // Spend the sealed state in one step: of two concurrent resumes, only one
        // can see the increment that makes it fresh.
        let fresh = platform.increment_counter() == body.platform_counter + 1;
        let locked = body.locked || !fresh;
        let peers = body.peers.map(|(keys, threshold)| Peers {
            keys: keys.into_iter().collect(),
            threshold: threshold as usize,
        });
        let clients = match body.clients {
            None => None,
            Some(list) => Some(
                list.into_iter()
                    .map(|(id, key)| Ok((ClientId(id), PublicKey::from_bytes(&key)?)))
                    .collect::<Result<BTreeMap<_, _>, diffuse_core::crypto::InvalidKey>>()
                    .map_err(|_| TeeError::BadSealedState)?,
            ),
        };
        let challenge = locked.then(|| Digest(platform.random()));
        let fastbft = crate::fastbft::FastBftState::unsealed(body.fastbft);
        Ok(SoftwareEnclave {
            measurement,
            key: SecretKey::from_seed(body.key_seed),
            key_seed: body.key_seed,
            platform,
            counter: body.counter,
            view: body.view,
            locked,
            stopped: false,
            challenge,
            peers,
            clients,
            slot_rules: body.slot_rules,
            last_checkpoint: body.last_checkpoint,
            seen: body.seen.into_iter().collect(),
            rollback_protection: true,
            rejoin_reports: None,
            verify_request_signatures: true,
            fastbft,
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

    /// The enclave's signing key (enclave code only).
    /// The configured peers (their enclave keys) and the reset threshold `f + 1`.
    pub(crate) fn peer_set(&self) -> Option<(&BTreeSet<[u8; 32]>, usize)> {
        self.peers.as_ref().map(|p| (&p.keys, p.threshold))
    }

    pub(crate) fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    /// 32 bytes from the platform's random generator (enclave code only).
    pub(crate) fn random_bytes(&self) -> [u8; 32] {
        self.platform.random()
    }

    /// The view the enclave records.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// Records a new view (the protocol calls it when it installs one).
    pub fn set_view(&mut self, view: u64) {
        self.view = self.view.max(view);
    }

    /// While locked: the challenge peers' reports must sign.
    pub fn rejoin_challenge(&self) -> Option<Digest> {
        self.challenge.filter(|_| self.is_locked())
    }

    /// A REJOIN report on a configured peer `subject`: the highest counter and
    /// checkpoint of it this enclave accepted, bound to the subject's `challenge`.
    /// `None` if the subject is not a configured peer, or if this enclave is locked
    /// itself (what it recorded may be stale, and an under-report could let the
    /// subject repeat a counter value).
    pub fn report_counter(
        &self,
        subject: PublicKey,
        challenge: Digest,
    ) -> Option<Signed<CounterReport>> {
        if self.is_locked() || !self.peers.as_ref()?.keys.contains(&subject.to_bytes()) {
            return None;
        }
        let seen = self
            .seen
            .get(&subject.to_bytes())
            .copied()
            .unwrap_or_default();
        Some(Signed::sign(
            CounterReport {
                reporter: self.key.public(),
                subject,
                challenge,
                counter: seen.counter,
                checkpoint: seen.checkpoint,
                view: self.view,
                fastbft_view: self.fastbft.known_view(),
            },
            &self.key,
        ))
    }

    /// Test switch, for tests that the checks catch a broken enclave: REJOIN's
    /// reset accepts `reports` reports (below the configured `f + 1`, unsafe).
    #[doc(hidden)]
    pub fn weaken_rejoin_for_tests(&mut self, reports: usize) {
        self.rejoin_reports = Some(reports);
    }

    /// REJOIN after an unscheduled reboot: unlocks the enclave once it holds valid
    /// reports (configured, distinct peers; about this enclave; over its current
    /// challenge) from at least the configured threshold of peers. The counter then
    /// continues after the highest reported value: every report is a value this
    /// enclave really issued, and a lower one could repeat a counter value. An
    /// honest host passes in `at_least` the highest counter it persisted as used;
    /// raising the counter is always safe (it can only leave a gap).
    pub fn reset_counter(
        &mut self,
        reports: &[Signed<CounterReport>],
        at_least: u64,
    ) -> Result<(), TeeError> {
        let (Some(peers), Some(challenge)) = (self.peers.as_ref(), self.rejoin_challenge()) else {
            return Err(TeeError::NotEnoughReports { needed: 1, got: 0 });
        };
        let me = self.key.public();
        let mut valid: BTreeMap<[u8; 32], (u64, u64, u64, u64)> = BTreeMap::new();
        for report in reports {
            let body = &report.value;
            if peers.keys.contains(&body.reporter.to_bytes())
                && body.subject == me
                && body.challenge == challenge
                && report.verify(&body.reporter)
            {
                valid.insert(
                    body.reporter.to_bytes(),
                    (body.counter, body.checkpoint, body.view, body.fastbft_view),
                );
            }
        }
        let needed = self.rejoin_reports.unwrap_or(peers.threshold);
        if valid.len() < needed {
            return Err(TeeError::NotEnoughReports {
                needed,
                got: valid.len(),
            });
        }
        let counter = valid.values().map(|(c, _, _, _)| *c).max().unwrap_or(0);
        let checkpoint = valid.values().map(|(_, k, _, _)| *k).max().unwrap_or(0);
        let view = valid.values().map(|(_, _, v, _)| *v).max().unwrap_or(0);
        // FastBFT: of any f + 1 enclaves, one voted for (or started) every view
        // this one entered, so the highest they report bounds this enclave's own.
        let fastbft_view = valid.values().map(|(_, _, _, w)| *w).max().unwrap_or(0);
        self.fastbft = crate::fastbft::FastBftState::rejoined(
            fastbft_view.max(self.fastbft.known_view()),
            self.platform.random(),
        );
        self.counter = self.counter.max(counter).max(at_least);
        self.last_checkpoint = self.last_checkpoint.max(checkpoint);
        self.view = self.view.max(view);
        self.locked = false;
        self.challenge = None;
        Ok(())
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

    fn create_scoped_ui(&mut self, scope: Scope, message: &Digest) -> Result<Ui, TeeError> {
        if self.is_locked() {
            return Err(TeeError::Locked);
        }
        match scope {
            Scope::Free => {}
            Scope::Checkpoint(seq) => {
                let rules = self
                    .slot_rules
                    .ok_or(TeeError::Scope("slot rules are not configured"))?;
                if seq % rules.checkpoint_interval != 0 || seq <= self.last_checkpoint {
                    return Err(TeeError::Scope(
                        "a checkpoint must be a multiple of the interval above the last one",
                    ));
                }
                self.last_checkpoint = seq;
            }
            Scope::Slot(seq) => {
                let rules = self
                    .slot_rules
                    .ok_or(TeeError::Scope("slot rules are not configured"))?;
                if seq > self.last_checkpoint.saturating_add(rules.window) {
                    return Err(TeeError::Scope("the slot is above the window"));
                }
            }
        }
        self.counter += 1;
        let certificate = self.key.sign(
            usig::UI_LABEL,
            &usig::encode_payload(self.counter, scope, message),
        );
        Ok(Ui {
            counter: self.counter,
            certificate,
        })
    }

    fn accept_ui(&mut self, signer: &PublicKey, scope: Scope, message: &Digest, ui: &Ui) -> bool {
        if !usig::verify_scoped_ui(signer, scope, message, ui) {
            return false;
        }
        if self
            .peers
            .as_ref()
            .is_some_and(|p| p.keys.contains(&signer.to_bytes()))
        {
            let seen = self.seen.entry(signer.to_bytes()).or_default();
            seen.counter = seen.counter.max(ui.counter);
            if let Scope::Checkpoint(seq) = scope {
                seen.checkpoint = seen.checkpoint.max(seq);
            }
        }
        true
    }

    fn counter(&self) -> u64 {
        self.counter
    }

    fn is_locked(&self) -> bool {
        self.stopped || (self.locked && self.rollback_protection)
    }
}
