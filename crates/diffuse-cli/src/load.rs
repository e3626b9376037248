//! Closed-loop load against a local cluster, shared by `diffuse demo` and `bench`:
//! runs the workload clients, ticks a callback (chaos, progress) and collects the
//! history.

use diffuse_core::ids::ClientId;
use diffuse_node::client::{AnyClientHost, KvClient};
use diffuse_node::local::LocalCluster;
use diffuse_node::workload::{self, HistoryRecord, WorkloadSpec};
use diffuse_sim::history::{Operation, Outcome};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a load run produced.
pub struct LoadRun {
    /// Every operation, in completion order.
    pub records: Vec<HistoryRecord>,
    /// Wall-clock length of the load phase.
    pub elapsed: Duration,
    /// True if Ctrl-C cut the run short.
    pub interrupted: bool,
    /// When the run started (history times are relative to it).
    pub start: Instant,
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Prints a line above the progress bar (or plainly without one).
pub fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        println!("{}", line.as_ref());
    } else {
        bar.println(line.as_ref());
    }
}

/// Clients started at once; the next wave starts [`WAVE_INTERVAL`] later.
const CLIENTS_PER_WAVE: usize = 128;

/// The time between two waves of starting clients.
const WAVE_INTERVAL: Duration = Duration::from_millis(100);

/// Runs `clients` workload clients (identities `0..clients`) for `duration`,
/// calling `tick` every 200 ms with the time elapsed.
pub async fn run(
    cluster: &mut LocalCluster,
    clients: usize,
    spec: &WorkloadSpec,
    duration: Duration,
    bar: &ProgressBar,
    mut tick: impl FnMut(&mut LocalCluster, Duration, &ProgressBar),
) -> Result<LoadRun, String> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (records_tx, mut records_rx) = mpsc::unbounded_channel();
    // Every client's configuration is read (and its cluster's attestations
    // checked) before the clock starts: at 512 clients of 103 replicas that took
    // about 15 s, and the first clients ran alone meanwhile.
    let settings = (0..clients)
        .map(|j| cluster.client(j).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    // Clients that share a key (`bench --clients-per-connection`) are hosted on
    // one connection per replica per key; the others connect on their own.
    let per_key = cluster.testnet.clients_per_key.max(1);
    let mut hosts: Vec<std::sync::Arc<AnyClientHost>> = Vec::new();
    if per_key > 1 {
        for settings in settings.iter().step_by(per_key) {
            let host = AnyClientHost::connect(settings).map_err(|e| e.to_string())?;
            hosts.push(std::sync::Arc::new(host));
        }
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (j, settings) in settings.into_iter().enumerate() {
        let wave = u32::try_from(j / CLIENTS_PER_WAVE).unwrap_or(u32::MAX);
        let (spec, stop, records) = (spec.clone(), stop_rx.clone(), records_tx.clone());
        let host = hosts.get(j / per_key).cloned();
        tasks.spawn(async move {
            tokio::time::sleep(WAVE_INTERVAL.saturating_mul(wave)).await;
            match host {
                Some(host) => {
                    let id = settings.id.0;
                    let kv = KvClient::hosted(&host, settings)?;
                    workload::run_kv_client(kv, id, spec, start, stop, records).await
                }
                None => workload::run_client(settings, spec, start, stop, records).await,
            }
        });
    }
    let mut records = Vec::new();
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    while start.elapsed() < duration {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
        while let Ok(record) = records_rx.try_recv() {
            records.push(record);
        }
        let elapsed = start.elapsed();
        let done = records.iter().filter(|r| r.result.is_some()).count();
        bar.set_position(elapsed.as_millis() as u64);
        bar.set_message(format!(
            "{done} ops, {:.0} ops/s",
            done as f64 / elapsed.as_secs_f64().max(1e-3)
        ));
        tokio::task::block_in_place(|| tick(cluster, elapsed, bar));
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(true);
    while tokio::time::timeout(Duration::from_secs(15), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    drop(records_tx);
    while let Some(record) = records_rx.recv().await {
        records.push(record);
    }
    bar.finish_and_clear();
    Ok(LoadRun {
        records,
        elapsed,
        interrupted,
        start,
    })
}

/// Latency and throughput of a run.
pub struct Summary {
    /// Operations that completed.
    pub completed: usize,
    /// Operations without a result (timeouts, cut off at the end).
    pub unfinished: usize,
    /// Of those, operations that timed out.
    pub timeouts: usize,
    /// Completed operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// The longest time without any completion, ms (how long the workload stalled).
    pub longest_stall_ms: f64,
}

/// Summarises `records` over `elapsed`.
pub fn summarise(records: &[HistoryRecord], elapsed: Duration) -> Summary {
    let mut latencies: Vec<u64> = records
        .iter()
        .filter_map(|r| r.complete_ns.map(|c| c.saturating_sub(r.invoke_ns)))
        .collect();
    latencies.sort_unstable();
    let mut completions: Vec<u64> = records.iter().filter_map(|r| r.complete_ns).collect();
    completions.sort_unstable();
    let longest_stall = completions
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0)
        .max(completions.first().copied().unwrap_or(0));
    Summary {
        completed: latencies.len(),
        unfinished: records.len() - latencies.len(),
        timeouts: records
            .iter()
            .filter(|r| r.error.as_deref() == Some("timeout"))
            .count(),
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: workload::percentile_ms(&latencies, 0.50),
        p99_ms: workload::percentile_ms(&latencies, 0.99),
        p999_ms: workload::percentile_ms(&latencies, 0.999),
        longest_stall_ms: longest_stall as f64 / 1e6,
    }
}

/// Checks the history with the simulator's linearizability checker.
pub fn check_linearizable(records: &[HistoryRecord]) -> Result<(), String> {
    let history: Vec<Operation> = records
        .iter()
        .map(|r| Operation {
            client: ClientId(r.client),
            op: r.kv_op(),
            invoke_ns: r.invoke_ns,
            outcome: match r.completion() {
                Some((at_ns, result)) => Outcome::Completed {
                    at_ns,
                    result: Ok(result),
                },
                None => Outcome::Pending,
            },
        })
        .collect();
    diffuse_sim::checkers::linearizability::check(&history).map_err(|v| format!("{v:?}"))
}

/// Writes `records` as JSON lines.
pub fn write_history(path: &std::path::Path, records: &[HistoryRecord]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for record in records {
        serde_json::to_writer(&mut file, record)?;
        file.write_all(b"\n")?;
    }
    file.flush()
}

/// Prints throughput and latency lines of a run.
pub fn print_summary(summary: &Summary) {
    println!("throughput     {:>10.0} ops/s", summary.ops_per_sec);
    println!(
        "completed      {:>10} operations ({} timed out, {} in flight at the end)",
        summary.completed,
        summary.timeouts,
        summary.unfinished - summary.timeouts
    );
    println!("latency p50    {:>10.2} ms", summary.p50_ms);
    println!("latency p99    {:>10.2} ms", summary.p99_ms);
    println!("latency p999   {:>10.2} ms", summary.p999_ms);
}
