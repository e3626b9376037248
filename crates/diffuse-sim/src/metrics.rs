//! What a run measures: messages and bytes per kind, completed operations, latency.

use std::collections::BTreeMap;

/// Counters of one run.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Frames put on the network (lost ones included).
    pub messages: u64,
    /// Bytes put on the network.
    pub bytes: u64,
    /// Messages and bytes per message kind.
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Frames that did not decode at their receiver.
    pub rejected_frames: u64,
    /// Client operations completed.
    pub completed_ops: u64,
    /// Requests executed by correct replicas (summed over replicas).
    pub executed_requests: u64,
    /// Latency of each completed operation, in virtual nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// View installations observed at correct replicas.
    pub views_installed: u64,
    /// Highest view installed.
    pub max_view: u64,
    /// State transfers completed at correct replicas.
    pub state_transfers: u64,
    /// Faults correct replicas detected and reported.
    pub faults_detected: u64,
    /// Virtual time at the end of the run.
    pub end_ns: u64,
    /// Events processed.
    pub events: u64,
}

impl Metrics {
    /// Counts one frame of `kind`.
    pub fn record_send(&mut self, kind: &'static str, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
        let entry = self.by_kind.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += bytes as u64;
    }
}

/// The `p`-th percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_small_sets() {
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[5], 99.0), 5);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51);
        assert_eq!(percentile(&v, 100.0), 100);
    }

    #[test]
    fn counts_per_kind() {
        let mut m = Metrics::default();
        m.record_send("a", 10);
        m.record_send("a", 5);
        m.record_send("b", 1);
        assert_eq!((m.messages, m.bytes), (3, 16));
        assert_eq!(m.by_kind["a"], (2, 15));
    }
}
