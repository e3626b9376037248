//! A protocol's timers on the real clock: one deadline per timer kind, as the
//! sans-IO interface defines (setting a timer replaces the running one).

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// The running timers of one protocol instance.
#[derive(Debug)]
pub struct Timers<T> {
    deadlines: BTreeMap<T, Instant>,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Self {
            deadlines: BTreeMap::new(),
        }
    }
}

impl<T: Copy + Ord> Timers<T> {
    /// Starts `timer`, replacing it if it runs.
    pub fn set(&mut self, timer: T, after: Duration, now: Instant) {
        self.deadlines.insert(timer, now + after);
    }

    /// Stops `timer` if it runs.
    pub fn cancel(&mut self, timer: T) {
        self.deadlines.remove(&timer);
    }

    /// The earliest deadline, if any timer runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }

    /// Removes and returns the timers due at `now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<T> {
        let mut due: Vec<(Instant, T)> = self
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(timer, deadline)| (*deadline, *timer))
            .collect();
        due.sort();
        for (_, timer) in &due {
            self.deadlines.remove(timer);
        }
        due.into_iter().map(|(_, timer)| timer).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_replaces_and_expiry_is_in_deadline_order() {
        let start = Instant::now();
        let mut timers = Timers::default();
        timers.set('a', Duration::from_millis(30), start);
        timers.set('b', Duration::from_millis(10), start);
        timers.set('a', Duration::from_millis(20), start);
        timers.set('c', Duration::from_millis(50), start);
        timers.cancel('c');
        assert_eq!(
            timers.next_deadline(),
            Some(start + Duration::from_millis(10))
        );
        assert_eq!(
            timers.expired(start + Duration::from_millis(5)),
            Vec::<char>::new()
        );
        assert_eq!(
            timers.expired(start + Duration::from_millis(40)),
            vec!['b', 'a']
        );
        assert_eq!(timers.next_deadline(), None);
    }
}
