//! A precise wake-up for the replica loop's timers.
//!
//! tokio's timers round a deadline up to the next tick of its millisecond wheel:
//! on this machine a 1 ms sleep takes 2.1 ms on average and a 100 µs one 1.2 ms,
//! so a batching delay of 1 ms cost a lightly loaded cluster more than 2 ms per
//! write. The alarm is one thread that sleeps on a condition variable (a futex
//! with a timeout: tens of microseconds late, not a millisecond) until the
//! earliest deadline, then wakes the loop.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::Notify;

/// One replica loop's alarm clock. Stops its thread when dropped.
pub struct Alarm {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    rang: Notify,
}

struct State {
    deadline: Option<Instant>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: two plain fields.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Alarm {
    /// Starts the alarm's thread, disarmed.
    pub fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                deadline: None,
                stop: false,
            }),
            changed: Condvar::new(),
            rang: Notify::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("diffuse-alarm".into())
                .spawn(move || ring_at_deadlines(&shared))?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Sets the deadline, replacing the previous one; `None` disarms. Cheap when
    /// the deadline does not change.
    pub fn set(&self, deadline: Option<Instant>) {
        let mut state = self.shared.lock();
        if state.deadline != deadline {
            state.deadline = deadline;
            self.shared.changed.notify_one();
        }
    }

    /// Completes once the alarm has rung since the last call returned (at once if
    /// it rang meanwhile). A ring may be stale: the caller checks its deadlines.
    pub async fn rung(&self) {
        self.shared.rang.notified().await;
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn ring_at_deadlines(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        state = match state.deadline {
            None => shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    state.deadline = None;
                    shared.rang.notify_one();
                    state
                } else {
                    shared
                        .changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn rings_after_its_deadline_and_a_new_deadline_replaces_the_old() {
        let alarm = Alarm::start().unwrap();
        let start = Instant::now();
        alarm.set(Some(start + Duration::from_secs(3600)));
        alarm.set(Some(start + Duration::from_millis(5)));
        alarm.rung().await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(5),
            "rang early: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(60), "the first deadline won");
    }

    #[tokio::test]
    async fn a_disarmed_alarm_stays_silent() {
        let alarm = Alarm::start().unwrap();
        alarm.set(Some(Instant::now() + Duration::from_millis(20)));
        alarm.set(None);
        let silent = tokio::time::timeout(Duration::from_millis(100), alarm.rung()).await;
        assert!(silent.is_err(), "rang while disarmed");
    }
}
