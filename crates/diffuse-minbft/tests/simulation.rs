//! MinBFT in the simulator over many seeds, with every checker (linearizability,
//! agreement, state, liveness, blame): the normal case, network faults, view
//! changes, crashes with REJOIN, and the Byzantine behaviours.

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

/// Loss and partitions make replicas suspect the primary: view changes happen, and
/// none breaks a checker.
#[test]
fn minbft_changes_views_under_network_faults() {
    let mut views = 0;
    for seed in 100..130 {
        let report = run(3, seed, FaultMix::Network);
        assert!(
            report.violations.is_empty(),
            "seed {seed}: {:?}",
            report.violations
        );
        views += report.metrics.views_installed;
    }
    assert!(
        views > 0,
        "no view change in 30 runs: the view change went untested"
    );
}

/// A replica that alters certified messages under their UI, replays old ones,
/// claims other senders and forges checkpoint certificates: every lie is
/// rejected and blamed on it, and nothing else breaks.
#[test]
fn minbft_rejects_forged_certificates() {
    for n in [3, 5] {
        for seed in 0..20 {
            let report = run(n, seed, FaultMix::Byzantine("forge-ui".into()));
            assert!(
                report.violations.is_empty(),
                "n = {n} seed {seed}: {:?}",
                report.violations
            );
            assert!(report.metrics.faults_detected > 0, "n = {n} seed {seed}");
        }
    }
}

/// Replicas that send their certified messages to one correct replica only and
/// then fall silent: the excluded replicas fetch the stable certificate when a
/// stream stalls beyond their window, get copies of the VIEW-CHANGEs a NEW-VIEW
/// names from the new primary, and acknowledge views they enter by proof, so
/// every checker, liveness included, passes.
#[test]
fn minbft_stays_live_when_replicas_withhold() {
    let mut views = 0;
    for n in [3, 5] {
        for seed in 0..20 {
            let report = run(n, seed, FaultMix::Byzantine("withhold".into()));
            assert!(
                report.violations.is_empty(),
                "n = {n} seed {seed}: {:?}",
                report.violations
            );
            views += report.metrics.views_installed;
        }
    }
    assert!(views > 0, "no view change: the withholding went untested");
}

fn run_traced(n: usize, seed: u64, mix: FaultMix) -> diffuse_sim::RunReport {
    run_one::<MinBft>(&RunConfig {
        n,
        seed,
        mix,
        mutant: None,
        trace: true,
    })
    .expect("valid configuration")
}

/// Correct replicas crash and restart: each comes back with a locked enclave,
/// restores its log, votes and checkpoints from disk, gets `f + 1` counter
/// reports (REJOIN), and takes part again.
#[test]
fn minbft_replicas_rejoin_after_crashes() {
    let (mut restarts, mut rejoined) = (0, 0);
    for n in [3, 5] {
        for seed in 0..20 {
            let report = run_traced(n, seed, FaultMix::Crash);
            assert!(
                report.violations.is_empty(),
                "n = {n} seed {seed}: {:?}",
                report.violations
            );
            restarts += report.trace.iter().filter(|l| l.contains("RESTART")).count();
            rejoined += report
                .trace
                .iter()
                .filter(|l| l.contains("RejoinReport("))
                .count();
        }
    }
    assert!(
        restarts > 0 && rejoined > 0,
        "restarts {restarts}, rejoin reports {rejoined}: recovery went untested"
    );
}

/// Network faults, crashes and Byzantine replicas of every kind at once.
#[test]
fn minbft_survives_mixed_faults() {
    for n in [3, 5] {
        for seed in 0..15 {
            let report = run(n, seed, FaultMix::Mixed);
            assert!(
                report.violations.is_empty(),
                "n = {n} seed {seed}: {:?}",
                report.violations
            );
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
