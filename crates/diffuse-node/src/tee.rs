//! The software enclave's platform for real processes: its secrets and its
//! monotonic counter kept in a counter store next to (not inside) the replica's
//! database.
//!
//! The store is a directory with two files: `platform.seed` (the platform's
//! attestation, sealing and random-generator root, created once from operating-system
//! randomness, mode 0600) and `counter` (the monotonic counter). Every increment is
//! written to a temporary file, fsynced and renamed over `counter` before it is
//! acknowledged, so the counter never goes back across crashes.
//!
//! What this models and what it does not: a host that edits or restores these files
//! can roll the counter back, which real hardware (an SGX or TPM monotonic counter, or
//! a distributed counter such as ROTE) prevents. Keeping the store separate from the
//! database means an operator restoring a database backup does not silently roll
//! the counter back with it. See `docs/tee.md`.

use diffuse_tee::{Measurement, Platform, Quote, QuoteBody, SoftwarePlatform};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A [`Platform`] whose counter and secrets persist in a counter store directory.
pub struct FilePlatform {
    dir: PathBuf,
    inner: SoftwarePlatform,
    /// Serialises increments so that the file only ever grows.
    write: Mutex<()>,
}

/// Why the counter store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CounterStoreError {
    /// A file cannot be read or written.
    #[error("counter store {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("counter store {0}: corrupt")]
    Corrupt(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CounterStoreError + '_ {
    move |error| CounterStoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

pub(crate) fn write_durably(
    path: &Path,
    bytes: &[u8],
    private: bool,
) -> Result<(), CounterStoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let fresh = path.with_extension("writing");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut file = options.open(&fresh).map_err(io(&fresh))?;
        file.write_all(bytes).map_err(io(&fresh))?;
        file.sync_all().map_err(io(&fresh))?;
    }
    std::fs::rename(&fresh, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl FilePlatform {
    /// Opens the counter store in `dir`, creating it (with a fresh seed from the
    /// operating system) on first use.
    pub fn open(dir: &Path) -> Result<FilePlatform, CounterStoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let seed_path = dir.join("platform.seed");
        let counter_path = dir.join("counter");
        if !seed_path.exists() {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|e| io(&seed_path)(std::io::Error::other(e.to_string())))?;
            write_durably(&seed_path, &seed, true)?;
            write_durably(&counter_path, b"0", false)?;
        }
        let seed: [u8; 32] = std::fs::read(&seed_path)
            .map_err(io(&seed_path))?
            .try_into()
            .map_err(|_| CounterStoreError::Corrupt(seed_path.clone()))?;
        let text = std::fs::read_to_string(&counter_path).map_err(io(&counter_path))?;
        let counter: u64 = text
            .trim()
            .parse()
            .map_err(|_| CounterStoreError::Corrupt(counter_path.clone()))?;
        Ok(FilePlatform {
            dir: dir.to_path_buf(),
            inner: SoftwarePlatform::with_counter(seed, counter),
            write: Mutex::new(()),
        })
    }
}

impl Platform for FilePlatform {
    fn attestation_key(&self) -> diffuse_core::crypto::PublicKey {
        self.inner.attestation_key()
    }

    fn quote(&self, body: QuoteBody) -> Quote {
        self.inner.quote(body)
    }

    fn sealing_key(&self, measurement: &Measurement) -> [u8; 32] {
        self.inner.sealing_key(measurement)
    }

    fn random(&self) -> [u8; 32] {
        self.inner.random()
    }

    fn counter(&self) -> u64 {
        self.inner.counter()
    }

    /// Increments durably. If the store cannot be written the process stops: an
    /// enclave must never act on a counter value that a crash could take back.
    fn increment_counter(&self) -> u64 {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let next = self.inner.counter() + 1;
        let path = self.dir.join("counter");
        if let Err(error) = write_durably(&path, next.to_string().as_bytes(), false) {
            tracing::error!(%error, "the monotonic counter cannot be persisted; stopping");
            std::process::abort();
        }
        self.inner.increment_counter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffuse_tee::{SoftwareEnclave, TrustedComponent};
    use std::sync::Arc;

    #[test]
    fn the_counter_and_the_enclave_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = {
            let platform = Arc::new(FilePlatform::open(dir.path()).unwrap());
            let mut enclave = SoftwareEnclave::create(platform);
            enclave
                .create_ui(&diffuse_core::crypto::Digest::of("t", b"m"))
                .unwrap();
            enclave.shutdown()
        };
        let platform = Arc::new(FilePlatform::open(dir.path()).unwrap());
        assert_eq!(platform.counter(), 1, "the shutdown's increment persisted");
        let mut enclave = SoftwareEnclave::resume(platform.clone(), &sealed).unwrap();
        assert!(!enclave.is_locked());
        let ui = enclave
            .create_ui(&diffuse_core::crypto::Digest::of("t", b"n"))
            .unwrap();
        assert_eq!(ui.counter, 2);
        // A second resume of the same sealed state (a crash and a restart) is stale.
        drop(enclave);
        let again = FilePlatform::open(dir.path()).unwrap();
        let rebooted = SoftwareEnclave::resume(Arc::new(again), &sealed).unwrap();
        assert!(rebooted.is_locked());
    }

    #[test]
    fn a_corrupt_store_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(FilePlatform::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("counter"), "not a number").unwrap();
        assert!(matches!(
            FilePlatform::open(dir.path()),
            Err(CounterStoreError::Corrupt(_))
        ));
    }
}
