//! MinBFT in the simulator: what works so far (the normal case and checkpoints) over
//! many seeds, with the linearizability, agreement and liveness checkers.

use diffuse_minbft::MinBft;
use diffuse_sim::{FaultMix, RunConfig, run_one};

fn run(n: usize, seed: u64, mix: FaultMix) -> diffuse_sim::RunReport {
    run_one::<MinBft>(&RunConfig {
        n,
        seed,
        mix,
        mutant: None,
        trace: false,
    })
    .expect("valid configuration")
}

#[test]
fn minbft_orders_requests_without_faults() {
    for n in [3, 5] {
        for seed in 0..20 {
            let report = run(n, seed, FaultMix::None);
            assert!(
                report.violations.is_empty(),
                "n = {n} seed {seed}: {:?}",
                report.violations
            );
            assert!(report.metrics.completed_ops > 0, "n = {n} seed {seed}");
        }
    }
}

/// Loss, duplication, reordering and partitions: receivers fetch what they missed,
/// and one that fell behind a sender's collected log catches up by state transfer
/// and re-anchors the stream (seed 1 at n = 3 needed both before they existed).
#[test]
fn minbft_survives_network_faults() {
    for n in [3, 5] {
        for seed in 0..20 {
            let report = run(n, seed, FaultMix::Network);
            assert!(
                report.violations.is_empty(),
                "n = {n} seed {seed}: {:?}",
                report.violations
            );
            assert!(report.metrics.completed_ops > 0, "n = {n} seed {seed}");
        }
    }
}

#[test]
fn an_even_number_of_replicas_is_refused() {
    use diffuse_core::suite::ProtocolSuite;
    assert!(MinBft::quorum(3).is_ok() && MinBft::quorum(5).is_ok());
    for n in [2, 4, 6] {
        assert!(MinBft::quorum(n).is_err(), "n = {n}");
    }
}
