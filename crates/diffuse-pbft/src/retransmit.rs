//! The client's retransmission timeout, adapted to how fast the cluster answers.
//!
//! A retransmission goes to every replica, and makes the backups watch the request
//! and suspect the primary if it stays unexecuted. With a fixed timeout, a cluster
//! whose normal latency is above it (103 replicas on two cores answer in about half
//! a second) turns every request into `n` messages and every backup into a
//! watcher, and the extra load slows it further: at `n = 103` a 500 ms timeout took
//! FastBFT from hundreds of operations per second to about twenty.
//!
//! Clients are sans-IO and have no clock, so the timeout learns from outcomes only,
//! as TCP's keeps its back-off (RFC 6298, 5.5): a request that needed a
//! retransmission doubles the base timeout for the next ones, up to
//! `client_retransmit_max`; a request answered before its timer fired takes an
//! eighth of the excess over `client_retransmit` back. A faulty primary therefore
//! costs the next requests a longer wait before they turn to the backups, never more
//! than `client_retransmit_max`: the bound the exponential back-off of a single
//! request already had.
//!
//! The first retransmission goes to the primary alone (a lost message, or a slow
//! primary, costs the cluster nothing more); from the second on, to every replica,
//! so that the backups watch the request and replace a primary that ignores it.

use crate::options::PbftOptions;
use std::time::Duration;

/// The base retransmission timeout and its back-off (see the module's doc).
#[derive(Debug, Clone)]
pub struct RetransmitTimeout {
    /// The delay before the first retransmission of the next request.
    base: Duration,
    min: Duration,
    max: Duration,
}

impl RetransmitTimeout {
    /// Starts at `client_retransmit`, the fastest it ever gets.
    pub fn new(options: &PbftOptions) -> RetransmitTimeout {
        let min = options.client_retransmit;
        RetransmitTimeout {
            base: min,
            min,
            max: options.client_retransmit_max.max(min),
        }
    }

    /// The delay before the next retransmission of a request sent
    /// `retransmissions` times already: the base, doubled per retransmission, at
    /// most `client_retransmit_max`.
    pub fn delay(&self, retransmissions: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << retransmissions.min(16))
            .min(self.max)
    }

    /// A request completed after `retransmissions` retransmissions.
    pub fn completed(&mut self, retransmissions: u32) {
        self.base = if retransmissions > 0 {
            self.base.saturating_mul(2).min(self.max)
        } else {
            self.min + (self.base - self.min) * 7 / 8
        };
    }

    /// Whether the `retransmissions`-th retransmission of a request (from 1) goes
    /// to every replica rather than to the primary alone.
    pub fn to_every_replica(retransmissions: u32) -> bool {
        retransmissions >= 2
    }

    /// The delay before the first retransmission of the next request.
    pub fn base(&self) -> Duration {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> RetransmitTimeout {
        RetransmitTimeout::new(&PbftOptions {
            client_retransmit: Duration::from_millis(100),
            client_retransmit_max: Duration::from_millis(1000),
            ..PbftOptions::default()
        })
    }

    #[test]
    fn a_single_request_backs_off_to_the_maximum() {
        let t = timeout();
        let delays: Vec<u128> = (0..6).map(|r| t.delay(r).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(t.delay(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn slow_answers_raise_the_base_and_fast_ones_bring_it_back() {
        let mut t = timeout();
        t.completed(1);
        assert_eq!(t.base(), Duration::from_millis(200));
        t.completed(3);
        assert_eq!(t.base(), Duration::from_millis(400));
        for _ in 0..4 {
            t.completed(1);
        }
        assert_eq!(
            t.base(),
            Duration::from_millis(1000),
            "capped at the maximum"
        );
        t.completed(0);
        assert_eq!(t.base(), Duration::from_micros(100_000 + 900_000 * 7 / 8));
        for _ in 0..200 {
            t.completed(0);
        }
        assert!(t.base() < Duration::from_millis(101));
        assert!(
            t.base() >= Duration::from_millis(100),
            "never below the minimum"
        );
        assert_eq!(t.delay(0), t.base());
    }
}
