//! `diffuse demo`: a local cluster of real processes under a key-value workload,
//! with no setup. With `--chaos` it kills a backup and then the primary mid-run and
//! shows the cluster recover, then proves that no acknowledged write was lost.

use crate::load::{self, say};
use crate::runtime::block_on;
use clap::Args;
use diffuse_node::local::LocalCluster;
use diffuse_node::workload::{self, WorkloadSpec};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `diffuse demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// The protocol the cluster runs.
    #[arg(long, default_value = "pbft", value_parser = crate::runtime::PROTOCOLS)]
    protocol: String,
    /// Number of replicas (default: 4 for PBFT, 3 for MinBFT and FastBFT).
    #[arg(long)]
    n: Option<usize>,
    /// Concurrent clients (each with one operation outstanding).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of workload.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Kill (SIGKILL) and restart a backup, then the primary, during the run.
    #[arg(long)]
    chaos: bool,
    /// Keys shared by the clients.
    #[arg(long, default_value_t = 64)]
    keys: usize,
    /// Write every client operation to this file as JSON lines (docs/history.md).
    #[arg(long)]
    history: Option<PathBuf>,
    /// Keep the cluster directory (keys, configs, databases, logs) instead of
    /// deleting it.
    #[arg(long)]
    keep: bool,
}

/// The chaos schedule: what happens at which fraction of the run.
struct Chaos {
    backup: usize,
    primary: Option<usize>,
    view_before: u64,
    step: usize,
    killed_primary_at: Option<Duration>,
}

impl Chaos {
    fn tick(
        &mut self,
        cluster: &mut LocalCluster,
        elapsed: Duration,
        total: Duration,
        bar: &indicatif::ProgressBar,
    ) {
        let at = |fraction: f64| total.mul_f64(fraction);
        match self.step {
            0 if elapsed >= at(0.2) => {
                cluster.kill(self.backup);
                say(
                    bar,
                    format!(
                        "[{:>5.1}s] chaos: killed backup replica {} with SIGKILL",
                        elapsed.as_secs_f64(),
                        self.backup
                    ),
                );
                self.step += 1;
            }
            1 if elapsed >= at(0.4) => {
                match cluster.restart(self.backup) {
                    Ok(()) => say(
                        bar,
                        format!(
                            "[{:>5.1}s] chaos: restarted replica {} from its database; it catches up",
                            elapsed.as_secs_f64(),
                            self.backup
                        ),
                    ),
                    Err(error) => say(
                        bar,
                        format!("error: cannot restart replica {}: {error}", self.backup),
                    ),
                }
                self.step += 1;
            }
            2 if elapsed >= at(0.55) => {
                self.view_before = cluster.view().unwrap_or(0);
                let primary = (self.view_before % cluster.n() as u64) as usize;
                cluster.kill(primary);
                self.primary = Some(primary);
                self.killed_primary_at = Some(elapsed);
                say(
                    bar,
                    format!(
                        "[{:>5.1}s] chaos: killed replica {primary}, the primary of view {}, with SIGKILL",
                        elapsed.as_secs_f64(),
                        self.view_before
                    ),
                );
                self.step += 1;
            }
            3 => {
                if let Some(view) = cluster.view().filter(|v| *v > self.view_before) {
                    let waited = elapsed - self.killed_primary_at.unwrap_or_default();
                    say(
                        bar,
                        format!(
                            "[{:>5.1}s] view change: view {view} installed {:.1}s after the primary died; the workload resumes",
                            elapsed.as_secs_f64(),
                            waited.as_secs_f64()
                        ),
                    );
                    self.step += 1;
                }
            }
            4 if elapsed >= at(0.8) => {
                if let Some(primary) = self.primary {
                    match cluster.restart(primary) {
                        Ok(()) => say(
                            bar,
                            format!(
                                "[{:>5.1}s] chaos: restarted replica {primary}; it rejoins as a backup",
                                elapsed.as_secs_f64()
                            ),
                        ),
                        Err(error) => say(
                            bar,
                            format!("error: cannot restart replica {primary}: {error}"),
                        ),
                    }
                }
                self.step += 1;
            }
            _ => {}
        }
    }
}

pub fn run(mut args: DemoArgs) -> ExitCode {
    match crate::runtime::cluster_size(&args.protocol, args.n) {
        Ok(n) => args.n = Some(n),
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    }
    if args.chaos && !diffuse_node::protocols::survives_chaos(&args.protocol) {
        eprintln!(
            "error: --chaos kills and restarts replicas, the primary among them; {} has no \
             view change and no REJOIN yet (docs/protocols/{}.md), so it cannot recover",
            args.protocol, args.protocol
        );
        return ExitCode::from(2);
    }
    block_on(demo(args))
}

async fn demo(args: DemoArgs) -> ExitCode {
    let dir = match tempfile::Builder::new().prefix("diffuse-demo-").tempdir() {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("error: cannot create a temporary directory: {error}");
            return ExitCode::from(1);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("error: cannot find the diffuse binary: {error}");
            return ExitCode::from(1);
        }
    };
    // One more client identity than workers: it reads everything back at the end.
    let mut cluster =
        match LocalCluster::start(&exe, dir.path(), &args.protocol, args.n(), args.clients + 1) {
            Ok(cluster) => cluster,
            Err(error) => {
                eprintln!("error: cannot start the cluster: {error}");
                return ExitCode::from(1);
            }
        };
    println!(
        "Started {} {} replicas as child processes on loopback (Noise-authenticated TCP, redb storage) in {}",
        args.n(),
        args.protocol,
        dir.path().display()
    );
    for _ in 0..50 {
        if (0..args.n()).all(|i| cluster.metrics(i).is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let duration = Duration::from_secs(args.duration.max(1));
    println!(
        "Running {} closed-loop clients for {}s over {} shared keys{}",
        args.clients,
        duration.as_secs(),
        args.keys,
        if args.chaos { ", with chaos" } else { "" }
    );
    let spec = WorkloadSpec {
        keys: args.keys.max(1),
        ..WorkloadSpec::default()
    };
    let bar = load::progress(duration);
    let mut chaos = args.chaos.then(|| Chaos {
        backup: args.n() - 1,
        primary: None,
        view_before: 0,
        step: 0,
        killed_primary_at: None,
    });
    let run = load::run(
        &mut cluster,
        args.clients,
        &spec,
        duration,
        &bar,
        |cluster, elapsed, bar| {
            if let Some(chaos) = chaos.as_mut() {
                chaos.tick(cluster, elapsed, duration, bar);
            }
        },
    )
    .await;
    let mut run = match run {
        Ok(run) => run,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(1);
        }
    };
    if run.interrupted {
        println!("Interrupted: stopping the cluster.");
        return ExitCode::from(130);
    }
    let summary = load::summarise(&run.records, run.elapsed);
    println!();
    load::print_summary(&summary);
    println!("longest stall  {:>10.0} ms", summary.longest_stall_ms);

    // Read every key back through a fresh client and check the whole history.
    let reader = match cluster.client(args.clients) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(1);
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Ctrl-C now stops the demo (the load phase installed tokio's SIGINT handler).
    let read = tokio::select! {
        read = workload::read_back(reader, &spec, run.start, &tx) => read,
        _ = tokio::signal::ctrl_c() => {
            println!("Interrupted: stopping the cluster.");
            return ExitCode::from(130);
        }
    };
    drop(tx);
    while let Some(record) = rx.recv().await {
        run.records.push(record);
    }
    let mut ok = true;
    match read {
        Ok(keys) => println!("read back      {keys:>10} keys through a fresh client"),
        Err(error) => {
            println!("read back      failed: {error}");
            ok = false;
        }
    }
    if let Some(path) = &args.history {
        match load::write_history(path, &run.records) {
            Ok(()) => println!("history        {}", path.display()),
            Err(error) => eprintln!("error: cannot write {}: {error}", path.display()),
        }
    }
    match load::check_linearizable(&run.records) {
        Ok(()) => println!(
            "checked        every acknowledged write is still readable: the {} operations and the final reads are linearizable",
            run.records.len()
        ),
        Err(violation) => {
            println!("VIOLATION      the history is not linearizable: {violation}");
            ok = false;
        }
    }
    for i in 0..args.n() {
        let view = cluster.metric(i, "diffuse_view").unwrap_or(-1.0);
        let checkpoint = cluster
            .metric(i, "diffuse_stable_checkpoint")
            .unwrap_or(-1.0);
        let transfers = cluster
            .metric(i, "diffuse_state_transfers_total")
            .unwrap_or(0.0);
        println!(
            "replica {i}      view {view}, stable checkpoint {checkpoint}, state transfers {transfers}"
        );
    }
    for i in 0..args.n() {
        cluster.stop(i);
    }
    if args.keep {
        let kept = dir.keep();
        println!("kept the cluster directory {}", kept.display());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

impl DemoArgs {
    /// The cluster size, resolved by `run` (see `runtime::cluster_size`).
    fn n(&self) -> usize {
        self.n.unwrap_or_default()
    }
}
