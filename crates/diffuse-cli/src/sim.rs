//! `diffuse sim`: sweeps of the deterministic simulator.

use clap::Args;
use diffuse_core::suite::ProtocolSuite;
use diffuse_sim::{
    FaultMix, RunConfig, SweepConfig, Tolerance, behaviour_names, liveness_bound_ns, run_one, sweep,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::process::ExitCode;

/// Arguments of `diffuse sim`.
#[derive(Args)]
#[command(
    after_help = "Run `diffuse sim --list` to see the fault mixes, behaviours and mutants of each protocol."
)]
pub struct SimArgs {
    /// The protocol to simulate.
    #[arg(long, default_value = "pbft", value_parser = ["pbft", "minbft", "fastbft"])]
    protocol: String,
    /// Number of replicas (default: the smallest cluster that tolerates one fault,
    /// 4 for PBFT and 3 for MinBFT).
    #[arg(long)]
    n: Option<usize>,
    /// Number of seeds to run (seed i runs fault mix i modulo the number of mixes).
    #[arg(long, default_value_t = 200)]
    seeds: u64,
    /// First seed of the sweep.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Fault mixes, comma-separated, or `all` to cycle through every mix, or `none`.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Run a deliberately broken variant of the protocol (see --list).
    #[arg(long)]
    mutant: Option<String>,
    /// Run only this seed (and print its failures in full).
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print a readable trace of every event of the run.
    #[arg(long, requires = "seed")]
    trace: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// List fault mixes, Byzantine behaviours and mutants, then exit.
    #[arg(long)]
    list: bool,
}

pub fn run(args: SimArgs) -> ExitCode {
    match args.protocol.as_str() {
        "pbft" => run_protocol::<diffuse_pbft::Pbft>(args),
        "minbft" => run_protocol::<diffuse_minbft::MinBft>(args),
        "fastbft" => run_protocol::<diffuse_fastbft::FastBft>(args),
        other => {
            eprintln!("error: unknown protocol {other}");
            ExitCode::from(2)
        }
    }
}

fn run_protocol<P: ProtocolSuite>(mut args: SimArgs) -> ExitCode {
    args.n = args.n.or_else(smallest_cluster::<P>);
    let behaviours = behaviour_names::<P>();
    if args.list {
        print_list::<P>(&behaviours);
        return ExitCode::SUCCESS;
    }
    let mixes = match parse_mixes(&args.faults, &behaviours, Tolerance::of::<P>()) {
        Ok(mixes) => mixes,
        Err(unknown) => {
            eprintln!("error: unknown fault mix {unknown:?}; run `diffuse sim --list`");
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = args.seed {
        return run_single::<P>(&args, seed, &mixes);
    }
    let config = SweepConfig {
        n: args.n.unwrap_or_default(),
        first_seed: args.first_seed,
        seeds: args.seeds,
        mixes,
        mutant: args.mutant.clone(),
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        stop_after_failures: None,
    };
    let bar = ProgressBar::new(args.seeds);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {pos}/{len} seeds [{elapsed_precise}] {wide_bar} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = match sweep::<P>(&config, &|done| bar.set_position(done)) {
        Ok(report) => report,
        Err(error) => {
            bar.finish_and_clear();
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    bar.finish_and_clear();
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
        for failure in report.failures.iter().take(10) {
            println!(
                "\nseed {} ({}) failed: {}",
                failure.seed, failure.mix, failure.scenario
            );
            for violation in failure.violations.iter().take(3) {
                println!("  {violation}");
            }
            println!("  replay: {}", replay_command(&args, failure.seed));
        }
        if report.failures.len() > 10 {
            println!(
                "\n... and {} more failing seeds",
                report.failures.len() - 10
            );
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run_single<P: ProtocolSuite>(args: &SimArgs, seed: u64, mixes: &[FaultMix]) -> ExitCode {
    let config = RunConfig {
        n: args.n.unwrap_or_default(),
        seed,
        mix: mixes[(seed % mixes.len() as u64) as usize].clone(),
        mutant: args.mutant.clone(),
        trace: args.trace,
    };
    let report = match run_one::<P>(&config) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    for line in &report.trace {
        println!("{line}");
    }
    if args.json {
        let json = serde_json::json!({
            "seed": seed,
            "faults": report.mix,
            "scenario": report.scenario,
            "runs": 1,
            "violations": report.violations.len(),
            "violation_details": report.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            "ops": report.metrics.completed_ops,
            "msgs_per_op": report.metrics.messages as f64 / report.metrics.completed_ops.max(1) as f64,
            "bytes_per_op": report.metrics.bytes as f64 / report.metrics.completed_ops.max(1) as f64,
        });
        println!("{json}");
    } else {
        let m = &report.metrics;
        println!(
            "seed {seed} ({}): {}\n{} ops, {} messages ({:.1}/op), {} bytes ({:.0}/op), {} views installed, {} state transfers, ended at {:.3} s virtual",
            report.mix,
            report.scenario,
            m.completed_ops,
            m.messages,
            m.messages as f64 / m.completed_ops.max(1) as f64,
            m.bytes,
            m.bytes as f64 / m.completed_ops.max(1) as f64,
            m.views_installed,
            m.state_transfers,
            m.end_ns as f64 / 1e9,
        );
        if report.violations.is_empty() {
            println!("no violations");
        }
        for violation in &report.violations {
            println!("VIOLATION {violation}");
        }
    }
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn replay_command(args: &SimArgs, seed: u64) -> String {
    let mutant = args
        .mutant
        .as_deref()
        .map(|m| format!(" --mutant {m}"))
        .unwrap_or_default();
    format!(
        "diffuse sim --protocol {} --n {} --faults {}{mutant} --seed {seed} --trace",
        args.protocol,
        args.n.unwrap_or_default(),
        args.faults
    )
}

/// The smallest number of replicas with which `P` tolerates one fault.
fn smallest_cluster<P: ProtocolSuite>() -> Option<usize> {
    (1..=16).find(|&n| P::quorum(n).is_ok_and(|quorum| quorum.f() >= 1))
}

/// The mixes named in `text` (`all`: every mix the protocol can be judged under).
fn parse_mixes(
    text: &str,
    behaviours: &[&str],
    tolerance: Tolerance,
) -> Result<Vec<FaultMix>, String> {
    if text == "all" {
        let mut mixes = FaultMix::all(behaviours);
        mixes.retain(|mix| mix.applies_to(tolerance));
        return Ok(mixes);
    }
    text.split(',')
        .map(|name| {
            FaultMix::parse(name.trim(), behaviours)
                .filter(|mix| mix.applies_to(tolerance))
                .ok_or_else(|| name.to_string())
        })
        .collect()
}

fn print_list<P: ProtocolSuite>(behaviours: &[&str]) {
    println!("protocol {}", P::NAME);
    println!("\nfault mixes (--faults; `all` cycles through them in this order):");
    println!("  {:<28} clean network, random delays only", "none");
    println!(
        "  {:<28} loss, duplication, reordering, delay spikes, partitions that heal",
        "network"
    );
    if P::SURVIVES_RESTARTS {
        println!(
            "  {:<28} network faults plus crash and restart of correct replicas",
            "crash"
        );
        println!(
            "  {:<28} network faults plus scheduled restarts (clean shutdown, then start)",
            "restart"
        );
    }
    for named in diffuse_sim::behaviours::GENERIC_BEHAVIOURS
        .iter()
        .chain(P::behaviours())
    {
        println!(
            "  {:<28} up to f Byzantine replicas that {}",
            named.name, named.description
        );
    }
    for named in P::client_behaviours() {
        println!(
            "  {:<28} one Byzantine client: {}",
            named.name, named.description
        );
    }
    println!(
        "  {:<28} network faults, crashes, and up to f Byzantine replicas of random kinds{}",
        "mixed",
        if P::client_behaviours().is_empty() {
            ""
        } else {
            ", and in half the runs a Byzantine client"
        }
    );
    let _ = behaviours;
    println!("\nmutants (--mutant):");
    for named in P::mutants() {
        println!("  {:<32} {}", named.name, named.description);
    }
    println!(
        "\nliveness bound after GST: {} s + {} s per tolerated fault",
        liveness_bound_ns(0) / 1_000_000_000,
        (liveness_bound_ns(1) - liveness_bound_ns(0)) / 1_000_000_000
    );
}
