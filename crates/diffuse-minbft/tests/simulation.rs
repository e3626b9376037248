//! MinBFT in the simulator over many seeds, with every checker (linearizability,
//! agreement, state, liveness, blame): the normal case, network faults, view
//! changes, crashes with REJOIN, and the Byzantine behaviours.

use diffuse_minbft::MinBft;
use diffuse_sim::{FaultMix, RunConfig, run_one};

fn run_with(
    n: usize,
    seed: u64,
    mix: FaultMix,
    mutant: Option<&str>,
    trace: bool,
) -> diffuse_sim::RunReport {
    run_one::<MinBft>(&RunConfig {
        n,
        seed,
        mix,
        mutant: mutant.map(str::to_string),
        trace,
    })
    .expect("valid configuration")
}

fn run(n: usize, seed: u64, mix: FaultMix) -> diffuse_sim::RunReport {
    run_with(n, seed, mix, None, false)
}

/// A run that must pass every checker.
fn clean(n: usize, seed: u64, mix: FaultMix, trace: bool) -> diffuse_sim::RunReport {
    let report = run_with(n, seed, mix, None, trace);
    assert!(
        report.violations.is_empty(),
        "n = {n} seed {seed}: {:?}",
        report.violations
    );
    report
}

#[test]
fn minbft_orders_requests_without_faults() {
    for n in [3, 5] {
        for seed in 0..20 {
            let report = clean(n, seed, FaultMix::None, false);
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
            let report = clean(n, seed, FaultMix::Network, false);
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
            let report = clean(n, seed, FaultMix::Byzantine("forge-ui".into()), false);
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
            let report = clean(n, seed, FaultMix::Byzantine("withhold".into()), false);
            views += report.metrics.views_installed;
        }
    }
    assert!(views > 0, "no view change: the withholding went untested");
}

/// Sweep seeds where the withholding primary fell silent just after its last
/// batches committed at the favoured replica only: that replica had nothing
/// pending and never asked for a view change, so the others must take the
/// PREPAREs from it (FETCH-PREPARES). In seed 419 a new primary skipped
/// re-proposals its stable checkpoint covered (the others fetch that certificate
/// the same way); in seed 911 (n = 5) the others need the vote of a replica that
/// took a copy, which it casts when the PREPARE comes through the stream.
#[test]
fn minbft_copies_withheld_prepares_from_a_voter() {
    for (n, seed) in [(3, 5815), (3, 7344), (3, 419), (5, 911)] {
        clean(n, seed, FaultMix::Byzantine("withhold".into()), false);
    }
}

/// Correct replicas crash and restart: each comes back with a locked enclave,
/// restores its log, votes and checkpoints from disk, gets `f + 1` counter
/// reports (REJOIN), and takes part again.
#[test]
fn minbft_replicas_rejoin_after_crashes() {
    let (mut restarts, mut rejoined) = (0, 0);
    for n in [3, 5] {
        for seed in 0..20 {
            let report = clean(n, seed, FaultMix::Crash, true);
            restarts += report
                .trace
                .iter()
                .filter(|l| l.contains("RESTART"))
                .count();
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

/// Correct replicas shut down on schedule and start again: each seals its enclave
/// at shutdown and resumes it unlocked, so none needs a REJOIN.
#[test]
fn minbft_resumes_without_rejoin_after_scheduled_shutdowns() {
    let mut shutdowns = 0;
    for n in [3, 5] {
        for seed in 0..20 {
            let report = clean(n, seed, FaultMix::Restart, true);
            shutdowns += report
                .trace
                .iter()
                .filter(|l| l.ends_with(" SHUTDOWN"))
                .count();
            let rejoin = report.trace.iter().find(|l| l.contains("Rejoin("));
            assert!(rejoin.is_none(), "n = {n} seed {seed}: {rejoin:?}");
        }
    }
    assert!(shutdowns > 0, "no scheduled shutdown was tested");
}

/// Network faults, crashes and Byzantine replicas of every kind at once.
#[test]
fn minbft_survives_mixed_faults() {
    for n in [3, 5] {
        for seed in 0..15 {
            clean(n, seed, FaultMix::Mixed, false);
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

fn run_mutant(n: usize, seed: u64, mix: FaultMix, mutant: &str) -> diffuse_sim::RunReport {
    run_with(n, seed, mix, Some(mutant), false)
}

/// The rollback attack (a host restores an old sealed enclave state to certify a
/// second PREPARE under a used counter value): against protected enclaves it
/// fails, and on the same seeds, with the `enclave-without-rollback-protection`
/// mutant, it splits the replicas and the checkers report it.
#[test]
fn the_rollback_attack_fails_only_against_protected_enclaves() {
    let mut caught = 0;
    for n in [3, 5] {
        for seed in 0..10 {
            let mix = FaultMix::Byzantine("rollback".into());
            clean(n, seed, mix.clone(), false);
            let unprotected = run_mutant(n, seed, mix, "enclave-without-rollback-protection");
            if !unprotected.violations.is_empty() {
                caught += 1;
            }
        }
    }
    assert!(
        caught >= 10,
        "the unprotected enclave's rollback was caught in only {caught} of 20 runs"
    );
}

/// A primary whose host asks its enclave a second time for a slot's PREPARE: the
/// enclave gives the second PREPARE the next counter value, so replicas that
/// consume each stream in counter order take the first and reject the second as
/// a second PREPARE for the slot. On the same seeds, replicas that skip the
/// continuity check (`no-continuity-check`) accept whichever arrives first, and
/// the two halves commit different batches.
#[test]
fn a_primary_that_asks_its_enclave_twice_splits_only_replicas_without_continuity() {
    let mix = FaultMix::Byzantine("equivocate".into());
    let (mut rejected, mut split) = (0, 0);
    for n in [3, 5] {
        for seed in 0..10 {
            let report = clean(n, seed, mix.clone(), true);
            rejected += report
                .trace
                .iter()
                .filter(|l| l.contains("second-prepare-for-a-slot"))
                .count();
            if !run_mutant(n, seed, mix.clone(), "no-continuity-check")
                .violations
                .is_empty()
            {
                split += 1;
            }
        }
    }
    assert!(rejected > 0, "no replica ever saw the second PREPARE");
    assert!(
        split >= 10,
        "without the continuity check the equivocation split only {split} of 20 runs"
    );
}

/// A host that burns a counter value of its replica's enclave: no message carries
/// it, so the others hold every later message of that replica (a primary is
/// replaced by a view change), and every checker, liveness included, passes.
#[test]
fn a_skipped_counter_value_blocks_only_the_skipping_replica() {
    let mut skipped = 0;
    for n in [3, 5] {
        for seed in 0..20 {
            let report = clean(n, seed, FaultMix::Byzantine("skip-counter".into()), true);
            skipped += report
                .trace
                .iter()
                .filter(|l| l.contains("enclave-counter-taken-by-host"))
                .count();
        }
    }
    assert!(skipped > 0, "no counter value was ever skipped");
}

/// Every mutant is caught: each case names the mix that exposes it.
#[test]
fn every_mutant_is_caught() {
    use diffuse_core::suite::ProtocolSuite;
    let cases = [
        ("no-continuity-check", "equivocate"),
        ("enclave-without-rollback-protection", "rollback"),
    ];
    for named in MinBft::mutants() {
        let (mutant, mix) = cases
            .iter()
            .find(|(m, _)| *m == named.name)
            .unwrap_or_else(|| panic!("mutant {} has no detection case", named.name));
        let names = diffuse_sim::behaviour_names::<MinBft>();
        let mix = FaultMix::parse(mix, &names).expect("known mix");
        let caught = (0..20).any(|seed| {
            !run_mutant(3, seed, mix.clone(), mutant)
                .violations
                .is_empty()
        });
        assert!(caught, "mutant {mutant} survived 20 seeds");
    }
}

/// Seeds the big sweeps found: a REJOIN report for an earlier reboot's challenge
/// arriving late was blamed on its (correct) sender.
#[test]
fn late_rejoin_reports_are_not_faults() {
    for (n, seed, mix) in [
        (3, 9847, FaultMix::Crash),
        (5, 1861, FaultMix::Crash),
        (7, 406, FaultMix::Mixed),
    ] {
        clean(n, seed, mix, false);
    }
}

/// Sweep seeds where a Byzantine state-transfer source lied about the state's
/// length and the transfer, after a timeout, went on with a correct source from
/// the same offset: the correct source was blamed for the mismatch. A timeout now
/// starts the transfer over.
#[test]
fn a_lying_transfer_source_is_not_blamed_on_the_next() {
    for (seed, mix) in [
        (1341, FaultMix::Mixed),
        (7914, FaultMix::Byzantine("garbage".into())),
    ] {
        let report = run(3, seed, mix);
        assert!(
            report.violations.is_empty(),
            "seed {seed}: {:?}",
            report.violations
        );
    }
}
