//! The platform under an enclave: what real hardware provides and the host cannot
//! forge or roll back: an attestation key that signs quotes, a sealing key per
//! enclave measurement, and a monotonic counter.
//!
//! [`SoftwarePlatform`] models it in software. In the simulator the host (possibly
//! Byzantine) holds only a handle to the platform: it can ask for quotes and
//! increments, never rewrite the counter or read the keys. Behind a real TEE, SGX's
//! quoting enclave, sealing keys and monotonic counters (or TDX / SEV equivalents)
//! take its place.

use diffuse_core::crypto::{Digest, PublicKey, SecretKey, Signable, Signed};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// The identity of enclave code (SGX: MRENCLAVE): a digest of what runs inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Measurement(pub Digest);

impl Measurement {
    /// The measurement of Diffuse's software enclave, version 1.
    pub fn software_enclave_v1() -> Measurement {
        Measurement(Digest::of(
            "diffuse/tee/measurement",
            b"software-enclave-v1",
        ))
    }
}

/// What a quote vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteBody {
    /// The code running in the enclave.
    pub measurement: Measurement,
    /// The enclave's own signing key, generated inside it.
    pub enclave_key: PublicKey,
    /// Data the enclave's caller bound to the quote (e.g. the replica id and cluster).
    pub caller_data: Digest,
}

impl Signable for QuoteBody {
    const LABEL: &'static str = "diffuse/tee/quote";
}

/// An attestation quote: the platform's signature over a [`QuoteBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// The signed body.
    pub body: Signed<QuoteBody>,
    /// The platform key that signed it.
    pub platform: PublicKey,
}

/// Why a quote is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    /// The platform key is not one the cluster trusts.
    #[error("the quote comes from an untrusted platform")]
    UntrustedPlatform,
    /// The signature does not verify.
    #[error("the quote's signature is invalid")]
    BadSignature,
    /// The enclave runs other code than expected.
    #[error("the enclave's measurement is not the expected one")]
    WrongMeasurement,
    /// The quote was made for another purpose.
    #[error("the quote binds other caller data")]
    WrongCallerData,
}

/// Checks `quote` against the platforms and the measurement the cluster trusts,
/// and the caller data the verifier expects. Returns the enclave key to trust.
pub fn verify_quote(
    quote: &Quote,
    trusted_platforms: &[PublicKey],
    measurement: &Measurement,
    caller_data: &Digest,
) -> Result<PublicKey, QuoteError> {
    if !trusted_platforms.contains(&quote.platform) {
        return Err(QuoteError::UntrustedPlatform);
    }
    if !quote.body.verify(&quote.platform) {
        return Err(QuoteError::BadSignature);
    }
    let body = &quote.body.value;
    if body.measurement != *measurement {
        return Err(QuoteError::WrongMeasurement);
    }
    if body.caller_data != *caller_data {
        return Err(QuoteError::WrongCallerData);
    }
    Ok(body.enclave_key)
}

/// The hardware services an enclave relies on.
pub trait Platform: Send + Sync {
    /// The platform's attestation public key.
    fn attestation_key(&self) -> PublicKey;
    /// Signs a quote for an enclave (only enclave code calls this).
    fn quote(&self, body: QuoteBody) -> Quote;
    /// The sealing key of enclaves with `measurement` on this platform.
    fn sealing_key(&self, measurement: &Measurement) -> [u8; 32];
    /// 32 bytes from the hardware random number generator (only enclave code calls
    /// this; the host cannot choose them).
    fn random(&self) -> [u8; 32];
    /// The monotonic counter's value.
    fn counter(&self) -> u64;
    /// Increments the monotonic counter and returns the new value.
    fn increment_counter(&self) -> u64;
}

/// A platform modelled in software: keys derived from a seed, a counter in memory
/// that only ever goes up.
pub struct SoftwarePlatform {
    attestation: SecretKey,
    sealing_root: [u8; 32],
    counter: Mutex<u64>,
    /// The random generator: a key and the number of outputs drawn so far.
    random: Mutex<([u8; 32], u64)>,
}

impl SoftwarePlatform {
    /// A platform whose secrets derive from `seed` (from the simulator's RNG, or
    /// from the operating system in a real deployment).
    pub fn new(seed: [u8; 32]) -> SoftwarePlatform {
        let attestation = SecretKey::from_seed(blake3::derive_key(
            "diffuse 2026 tee platform attestation key",
            &seed,
        ));
        let sealing_root = blake3::derive_key("diffuse 2026 tee platform sealing root", &seed);
        let random_key = blake3::derive_key("diffuse 2026 tee platform random", &seed);
        SoftwarePlatform {
            attestation,
            sealing_root,
            counter: Mutex::new(0),
            random: Mutex::new((random_key, 0)),
        }
    }

    /// A platform whose monotonic counter already stands at `value` (a runtime
    /// restoring the counter from its counter store).
    pub fn with_counter(seed: [u8; 32], value: u64) -> SoftwarePlatform {
        let platform = SoftwarePlatform::new(seed);
        *platform.counter.lock().unwrap_or_else(|p| p.into_inner()) = value;
        // A restarted platform must not repeat the random outputs of an earlier run.
        let mut material = seed.to_vec();
        material.extend_from_slice(&value.to_be_bytes());
        platform.random.lock().unwrap_or_else(|p| p.into_inner()).0 =
            blake3::derive_key("diffuse 2026 tee platform random", &material);
        platform
    }
}

impl Platform for SoftwarePlatform {
    fn attestation_key(&self) -> PublicKey {
        self.attestation.public()
    }

    fn quote(&self, body: QuoteBody) -> Quote {
        Quote {
            body: Signed::sign(body, &self.attestation),
            platform: self.attestation.public(),
        }
    }

    fn sealing_key(&self, measurement: &Measurement) -> [u8; 32] {
        let mut material = self.sealing_root.to_vec();
        material.extend_from_slice(&measurement.0.0);
        blake3::derive_key("diffuse 2026 tee sealing key", &material)
    }

    fn random(&self) -> [u8; 32] {
        let mut state = self.random.lock().unwrap_or_else(|p| p.into_inner());
        state.1 += 1;
        *blake3::keyed_hash(&state.0, &state.1.to_be_bytes()).as_bytes()
    }

    fn counter(&self) -> u64 {
        *self.counter.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn increment_counter(&self) -> u64 {
        let mut counter = self.counter.lock().unwrap_or_else(|p| p.into_inner());
        *counter += 1;
        *counter
    }
}
