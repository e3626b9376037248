//! Remembers what checking a file's contents gave, keyed by a digest of those
//! contents: a process that starts a thousand clients of one cluster (`diffuse
//! bench`) parses the cluster file and checks the enclaves' quotes once, not once
//! per client. (At `n = 103`, 1,024 clients spent about 5 s of CPU checking the
//! same 103 quotes again and again while the cluster was starting to serve them.)
//!
//! Only successes are remembered; the same bytes give the same result, so a
//! remembered one is as good as a fresh check. A few entries at most are kept.

use diffuse_core::crypto::Digest;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Entries kept per memo (one per distinct file a process uses; more are
/// checked again).
const ENTRIES: usize = 4;

/// Results of checks, by the digest of what was checked.
pub(crate) struct Memo<T> {
    label: &'static str,
    entries: Mutex<VecDeque<(Digest, T)>>,
}

impl<T: Clone> Memo<T> {
    /// An empty memo; `label` separates its digests from other memos'.
    pub(crate) const fn new(label: &'static str) -> Memo<T> {
        Memo {
            label,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// What `check` gives for `input`, remembered from an earlier call with the
    /// same input if there was one.
    pub(crate) fn get_or_check<E>(
        &self,
        input: &[u8],
        check: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let key = Digest::of(self.label, input);
        let remembered = self
            .lock()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, value)| value.clone());
        if let Some(value) = remembered {
            return Ok(value);
        }
        let value = check()?;
        let mut entries = self.lock();
        if entries.len() >= ENTRIES {
            entries.pop_front();
        }
        entries.push_back((key, value.clone()));
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Digest, T)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn the_same_input_is_checked_once_and_failures_are_not_remembered() {
        let memo = Memo::<u32>::new("test");
        let checks = Cell::new(0);
        let check = |value: u32| {
            checks.set(checks.get() + 1);
            Ok::<_, ()>(value)
        };
        assert_eq!(memo.get_or_check(b"a", || check(1)), Ok(1));
        assert_eq!(memo.get_or_check(b"a", || check(2)), Ok(1));
        assert_eq!(checks.get(), 1);
        assert_eq!(memo.get_or_check(b"b", || Err::<u32, _>("bad")), Err("bad"));
        assert_eq!(memo.get_or_check(b"b", || check(3)), Ok(3));
        assert_eq!(checks.get(), 2);
    }

    #[test]
    fn only_the_latest_entries_are_kept() {
        let memo = Memo::<usize>::new("test");
        for i in 0..=ENTRIES {
            let input = [i as u8];
            assert_eq!(memo.get_or_check(&input, || Ok::<_, ()>(i)), Ok(i));
        }
        assert_eq!(memo.get_or_check(&[0], || Ok::<_, ()>(99)), Ok(99));
        let last = [ENTRIES as u8];
        assert_eq!(memo.get_or_check(&last, || Ok::<_, ()>(99)), Ok(ENTRIES));
    }
}
