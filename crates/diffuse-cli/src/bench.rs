//! `diffuse bench`: closed-loop load from real client connections against a local
//! cluster of real processes; throughput, latency percentiles, CPU per operation,
//! CSV / JSON / SVG results and an optional operation history.

use crate::load::{self, LoadRun, Summary};
use crate::runtime::block_on;
use crate::svg::{self, Series};
use clap::Args;
use diffuse_node::local::LocalCluster;
use diffuse_node::workload::WorkloadSpec;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `diffuse bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The protocol the cluster runs.
    #[arg(long, default_value = "pbft", value_parser = crate::runtime::PROTOCOLS)]
    protocol: String,
    /// Number of replicas (default: 4 for PBFT, 3 for MinBFT and FastBFT).
    #[arg(long)]
    n: Option<usize>,
    /// Concurrent closed-loop clients (started in waves of 128, 100 ms apart).
    #[arg(long, default_value_t = 16)]
    pub(crate) clients: usize,
    /// Bytes per written value.
    #[arg(long, default_value_t = 64)]
    pub(crate) payload: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Seconds of load before the measurement starts, not counted (a new cluster
    /// first connects its replicas to each other and fills its pipelines).
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup: u64,
    /// Percent of operations that are reads (the rest are puts and compare-and-swaps).
    #[arg(long, default_value_t = 40)]
    pub(crate) read_percent: u64,
    /// Keys shared by the clients.
    #[arg(long, default_value_t = 1024)]
    pub(crate) keys: usize,
    /// Clients per connection: groups of this many clients share a key and one
    /// connection per replica (a process hosting many clients), so that their
    /// requests and replies travel together; 1 gives every client connections of
    /// its own. See docs/runtime.md, "Client hosts".
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) clients_per_connection: u32,
    /// Also measure throughput against these client counts (comma-separated),
    /// each for --sweep-duration seconds, and plot it.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Seconds per point of the sweep.
    #[arg(long, default_value_t = 5)]
    sweep_duration: u64,
    /// Directory for latency.csv, latency.svg, sweep.csv, sweep.svg and summary.json.
    #[arg(long, default_value = "bench-results")]
    pub(crate) out: PathBuf,
    /// Print one JSON object (ops_per_sec, p50_ms, p99_ms, p999_ms, cpu_us_per_op, ...).
    #[arg(long)]
    pub(crate) json: bool,
    /// Record every client operation as one JSON line in this file (docs/history.md).
    #[arg(long)]
    history: Option<PathBuf>,
    /// A protocol option for every replica and client, as KEY=VALUE (repeatable),
    /// e.g. `--set max_in_flight=2 --set batch_delay_ms=0`; see docs/runtime.md.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) options: Vec<String>,
    /// Compare these protocols (comma-separated, e.g. `pbft,minbft`) in one run:
    /// each runs in turn, on its smallest cluster for each --f, under the same load,
    /// and one table compares them (compare.csv, compare.json, compare.svg).
    #[arg(long, value_delimiter = ',', value_parser = crate::runtime::PROTOCOLS,
          conflicts_with_all = ["n", "sweep", "history"])]
    pub(crate) compare: Vec<String>,
    /// With --compare: the numbers of faults to tolerate (comma-separated).
    #[arg(
        long = "f",
        value_delimiter = ',',
        default_value = "1",
        requires = "compare"
    )]
    pub(crate) faults: Vec<usize>,
    /// Measure FastBFT's enclave `preprocessing` instead of a cluster: CPU time per
    /// secret for --n replicas (default 201), f + 1 of them active.
    #[arg(long, conflicts_with_all = ["compare", "sweep", "history"])]
    preprocessing: bool,
    /// With --preprocessing: the fallback's Shamir preprocessing (every backup
    /// gets a share of a degree-f polynomial) instead of the tree's XOR shares.
    #[arg(long, requires = "preprocessing")]
    fallback: bool,
    /// Log level of the replica processes (their logs are `replica-<i>.log` in
    /// the cluster's directory; see --keep-cluster).
    #[arg(long, value_enum, default_value = "warn")]
    pub(crate) replica_log: crate::runtime::LogLevel,
    /// Keep the cluster's directory (configs, keys, databases, replica logs)
    /// instead of removing it, and print where it is.
    #[arg(long)]
    pub(crate) keep_cluster: bool,
}

/// Parses `KEY=VALUE` pairs into an `[options]` table (integers, booleans, or text).
pub(crate) fn options_table(pairs: &[String]) -> Result<toml::Table, String> {
    let mut table = toml::Table::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--set {pair}: expected KEY=VALUE"))?;
        let value = if let Ok(number) = value.parse::<i64>() {
            toml::Value::Integer(number)
        } else if let Ok(flag) = value.parse::<bool>() {
            toml::Value::Boolean(flag)
        } else {
            toml::Value::String(value.to_string())
        };
        table.insert(key.trim().to_string(), value);
    }
    Ok(table)
}

/// CPU seconds (user + system) used so far by process `pid`, from /proc (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // /proc reports clock ticks of USER_HZ, which is 100 on every Linux ABI.
    Some((utime + stime) / 100.0)
}

fn replicas_cpu(cluster: &LocalCluster) -> Option<f64> {
    (0..cluster.n())
        .map(|i| cluster.pid(i).and_then(cpu_seconds))
        .sum()
}

/// Messages and frame bytes all replicas sent so far (to peers and clients).
fn replicas_sent(cluster: &LocalCluster) -> Option<(f64, f64)> {
    (0..cluster.n())
        .map(|i| {
            let text = cluster.metrics(i)?;
            let messages: f64 = text
                .lines()
                .filter(|l| l.starts_with("diffuse_messages_out_total{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
                .sum();
            let bytes = diffuse_node::local::metric_value(&text, "diffuse_bytes_out_total")?;
            Some((messages, bytes))
        })
        .try_fold((0.0, 0.0), |(m, b), sent| {
            sent.map(|(dm, db)| (m + dm, b + db))
        })
}

/// A local cluster started for a benchmark, with the temporary directory it
/// lives in (removed on drop unless kept).
pub(crate) struct BenchCluster {
    pub(crate) cluster: LocalCluster,
    dir: Option<tempfile::TempDir>,
}

/// How a benchmark's replicas run besides the protocol's options.
#[derive(Clone, Copy)]
pub(crate) struct ReplicaSetup {
    /// Log level of each replica.
    pub(crate) log: crate::runtime::LogLevel,
    /// Keep the cluster's directory afterwards.
    pub(crate) keep: bool,
    /// Clients per shared key and connection.
    pub(crate) clients_per_connection: usize,
}

impl BenchArgs {
    pub(crate) fn replica_setup(&self) -> ReplicaSetup {
        ReplicaSetup {
            log: self.replica_log,
            keep: self.keep_cluster,
            clients_per_connection: self.clients_per_connection as usize,
        }
    }
}

impl BenchCluster {
    /// Starts `n` replicas of `protocol` with `options` and `identities` client
    /// identities, and waits until every metrics endpoint answers.
    pub(crate) async fn start(
        protocol: &str,
        n: usize,
        identities: usize,
        options: &toml::Table,
        setup: ReplicaSetup,
    ) -> Result<BenchCluster, String> {
        // Check the options here, for a clear error instead of replicas that exit.
        diffuse_node::protocols::check_options(protocol, options).map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("diffuse-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cluster = LocalCluster::prepare_hosted(
            &exe,
            dir.path(),
            protocol,
            n,
            identities,
            options.clone(),
            setup.clients_per_connection,
        )
        .map_err(|e| format!("cannot write the cluster's configuration: {e}"))?;
        cluster.set_log_level(setup.log.name());
        cluster
            .start_all()
            .map_err(|e| format!("cannot start the cluster: {e}"))?;
        for _ in 0..50 {
            if (0..n).all(|i| cluster.metrics(i).is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(BenchCluster {
            cluster,
            dir: Some(dir),
        })
    }

    /// Stops every replica cleanly, and keeps the cluster's directory if asked.
    pub(crate) fn stop(&mut self, setup: ReplicaSetup) {
        for i in 0..self.cluster.n() {
            self.cluster.stop(i);
        }
        if setup.keep
            && let Some(dir) = self.dir.take()
        {
            eprintln!("cluster kept in {}", dir.keep().display());
        }
    }
}

/// One measured load run and what the processes spent on it.
pub(crate) struct Measured {
    pub(crate) run: LoadRun,
    pub(crate) summary: Summary,
    /// CPU seconds of all replicas together.
    cpu: Option<f64>,
    /// CPU seconds of this process (the clients).
    client_cpu: Option<f64>,
    /// Messages and frame bytes the replicas sent.
    sent: Option<(f64, f64)>,
}

impl Measured {
    fn per_op(&self, total: Option<f64>, scale: f64) -> Option<f64> {
        total.map(|t| t * scale / self.summary.completed.max(1) as f64)
    }

    /// Replica CPU µs per operation (all replicas together).
    pub(crate) fn cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.cpu, 1e6)
    }

    /// Client-process CPU µs per operation.
    pub(crate) fn client_cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.client_cpu, 1e6)
    }

    /// Messages the replicas sent per operation.
    pub(crate) fn messages_per_op(&self) -> Option<f64> {
        self.per_op(self.sent.map(|(m, _)| m), 1.0)
    }

    /// Frame bytes the replicas sent per operation.
    pub(crate) fn bytes_per_op(&self) -> Option<f64> {
        self.per_op(self.sent.map(|(_, b)| b), 1.0)
    }
}

/// What the processes had spent when the measured window opened.
struct Counters {
    /// Time since the load started.
    at: Duration,
    cpu: Option<f64>,
    client_cpu: Option<f64>,
    sent: Option<(f64, f64)>,
}

impl Counters {
    fn read(cluster: &LocalCluster, at: Duration) -> Counters {
        Counters {
            at,
            cpu: replicas_cpu(cluster),
            client_cpu: cpu_seconds(std::process::id()),
            sent: replicas_sent(cluster),
        }
    }
}

/// Runs `clients` closed-loop clients for `warmup` and then `duration` more, and
/// measures the second part only: the operations invoked in it, and what the
/// processes spent meanwhile. The clients run throughout (restarting them after
/// the warm-up would start them cold again). `None` if the user interrupted it.
pub(crate) async fn measure(
    cluster: &mut LocalCluster,
    clients: usize,
    spec: &WorkloadSpec,
    warmup: Duration,
    duration: Duration,
) -> Result<Option<Measured>, String> {
    let mut opened = warmup
        .is_zero()
        .then(|| Counters::read(cluster, Duration::ZERO));
    let bar = load::progress(warmup + duration);
    let run = load::run(
        cluster,
        clients,
        spec,
        warmup + duration,
        &bar,
        |c, elapsed, _| {
            if opened.is_none() && elapsed >= warmup {
                opened = Some(Counters::read(c, elapsed));
            }
        },
    )
    .await?;
    if run.interrupted {
        return Ok(None);
    }
    let opened = opened.unwrap_or_else(|| Counters::read(cluster, run.elapsed));
    let from_ns = opened.at.as_nanos() as u64;
    let measured: Vec<_> = run
        .records
        .iter()
        .filter(|r| r.invoke_ns >= from_ns)
        .cloned()
        .collect();
    let summary = load::summarise(&measured, run.elapsed.saturating_sub(opened.at));
    let cpu = replicas_cpu(cluster)
        .zip(opened.cpu)
        .map(|(after, before)| after - before);
    let client_cpu = cpu_seconds(std::process::id())
        .zip(opened.client_cpu)
        .map(|(after, before)| after - before);
    let sent = replicas_sent(cluster)
        .zip(opened.sent)
        .map(|((m, b), (m0, b0))| (m - m0, b - b0));
    Ok(Some(Measured {
        run,
        summary,
        cpu,
        client_cpu,
        sent,
    }))
}

pub fn run(args: BenchArgs) -> ExitCode {
    if args.preprocessing {
        return crate::preprocessing::run(args.n.unwrap_or(201), args.fallback, args.json);
    }
    block_on(async {
        bench(args).await.unwrap_or_else(|error| {
            eprintln!("error: {error}");
            ExitCode::from(1)
        })
    })
}

async fn bench(mut args: BenchArgs) -> Result<ExitCode, String> {
    if !args.compare.is_empty() {
        return crate::compare::run(&args).await;
    }
    args.n = Some(crate::runtime::cluster_size(&args.protocol, args.n)?);
    let clients = args.clients.max(1);
    let identities = args
        .sweep
        .iter()
        .copied()
        .chain([clients])
        .max()
        .unwrap_or(clients);
    let options = options_table(&args.options)?;
    let mut bench_cluster = BenchCluster::start(
        &args.protocol,
        args.n(),
        identities,
        &options,
        args.replica_setup(),
    )
    .await?;
    let cluster = &mut bench_cluster.cluster;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let spec = WorkloadSpec {
        keys: args.keys.max(1),
        payload: args.payload,
        read_percent: args.read_percent.min(100),
    };
    let duration = Duration::from_secs(args.duration.max(1));
    if !args.json {
        println!(
            "{} clients against {} {} replicas (real processes on loopback) for {}s after {}s of warm-up, {}-byte values",
            clients,
            args.n(),
            args.protocol,
            duration.as_secs(),
            args.warmup,
            args.payload
        );
    }
    let warmup = Duration::from_secs(args.warmup);
    let Some(measured) = measure(cluster, clients, &spec, warmup, duration).await? else {
        return Ok(ExitCode::from(130));
    };
    let (run, summary) = (&measured.run, &measured.summary);
    write_latency_over_time(&args.out, run)?;
    let mut sweep_points = Vec::new();
    for &count in &args.sweep {
        let bar = load::progress(Duration::from_secs(args.sweep_duration.max(1)));
        let point = load::run(
            cluster,
            count.max(1),
            &spec,
            Duration::from_secs(args.sweep_duration.max(1)),
            &bar,
            |_, _, _| {},
        )
        .await?;
        if point.interrupted {
            return Ok(ExitCode::from(130));
        }
        let s = load::summarise(&point.records, point.elapsed);
        if !args.json {
            println!(
                "sweep: {count:>4} clients  {:>8.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
                s.ops_per_sec, s.p50_ms, s.p99_ms
            );
        }
        sweep_points.push((count, s));
    }
    if !sweep_points.is_empty() {
        write_sweep(&args.out, &sweep_points)?;
    }
    if let Some(path) = &args.history {
        load::write_history(path, &run.records)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let json = serde_json::json!({
        "protocol": args.protocol,
        "n": args.n(),
        "clients": clients,
        "payload_bytes": args.payload,
        "options": args.options,
        "duration_s": run.elapsed.as_secs_f64(),
        "warmup_s": args.warmup,
        "ops": summary.completed,
        "unfinished": summary.unfinished,
        "timeouts": summary.timeouts,
        "ops_per_sec": summary.ops_per_sec,
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
        "p999_ms": summary.p999_ms,
        "cpu_us_per_op": measured.cpu_us_per_op(),
        "client_cpu_us_per_op": measured.client_cpu_us_per_op(),
        "messages_per_op": measured.messages_per_op(),
        "bytes_per_op": measured.bytes_per_op(),
        "sweep": sweep_points.iter().map(|(c, s)| serde_json::json!({
            "clients": c, "ops_per_sec": s.ops_per_sec, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
        })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&json).expect("JSON values encode");
    std::fs::write(args.out.join("summary.json"), format!("{text}\n"))
        .map_err(|e| e.to_string())?;
    bench_cluster.stop(args.replica_setup());
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json).expect("JSON values encode")
        );
    } else {
        print_summary(&measured);
        println!(
            "results        {}/{{summary.json,latency.csv,latency.svg{}}}",
            args.out.display(),
            if sweep_points.is_empty() {
                ""
            } else {
                ",sweep.csv,sweep.svg"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(measured: &Measured) {
    load::print_summary(&measured.summary);
    match measured.cpu_us_per_op() {
        Some(cpu) => {
            println!("replica CPU    {cpu:>10.1} µs per operation (all replicas together)")
        }
        None => println!("replica CPU    unavailable (needs /proc)"),
    }
    if let Some(cpu) = measured.client_cpu_us_per_op() {
        println!("client CPU     {cpu:>10.1} µs per operation (this process)");
    }
    if let (Some(messages), Some(bytes)) = (measured.messages_per_op(), measured.bytes_per_op()) {
        println!("replicas sent  {messages:>10.1} messages, {bytes:.0} bytes per operation");
    }
}

/// One row per second: completions and latency percentiles of what completed in it.
fn write_latency_over_time(out: &Path, run: &LoadRun) -> Result<(), String> {
    let seconds = run.elapsed.as_secs() as usize + 1;
    let mut buckets: Vec<Vec<u64>> = vec![Vec::new(); seconds];
    for record in &run.records {
        if let Some(done) = record.complete_ns {
            let second = (done / 1_000_000_000) as usize;
            if let Some(bucket) = buckets.get_mut(second) {
                bucket.push(done - record.invoke_ns);
            }
        }
    }
    let mut csv = String::from("second,ops,p50_ms,p99_ms\n");
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for (second, bucket) in buckets.iter_mut().enumerate() {
        bucket.sort_unstable();
        let (a, b) = (
            diffuse_node::workload::percentile_ms(bucket, 0.5),
            diffuse_node::workload::percentile_ms(bucket, 0.99),
        );
        csv.push_str(&format!("{second},{},{a:.3},{b:.3}\n", bucket.len()));
        p50.push((second as f64, a));
        p99.push((second as f64, b));
    }
    std::fs::write(out.join("latency.csv"), csv).map_err(|e| e.to_string())?;
    let chart = svg::line_chart(
        "Latency over time",
        "second of the run",
        "latency (ms)",
        &[
            Series {
                label: "p50",
                points: p50,
            },
            Series {
                label: "p99",
                points: p99,
            },
        ],
    );
    std::fs::write(out.join("latency.svg"), chart).map_err(|e| e.to_string())
}

fn write_sweep(out: &Path, points: &[(usize, Summary)]) -> Result<(), String> {
    let mut csv = String::from("clients,ops_per_sec,p50_ms,p99_ms\n");
    for (clients, s) in points {
        csv.push_str(&format!(
            "{clients},{:.1},{:.3},{:.3}\n",
            s.ops_per_sec, s.p50_ms, s.p99_ms
        ));
    }
    std::fs::write(out.join("sweep.csv"), csv).map_err(|e| e.to_string())?;
    let chart = svg::line_chart(
        "Throughput against clients",
        "closed-loop clients",
        "operations per second",
        &[Series {
            label: "ops/s",
            points: points
                .iter()
                .map(|(c, s)| (*c as f64, s.ops_per_sec))
                .collect(),
        }],
    );
    std::fs::write(out.join("sweep.svg"), chart).map_err(|e| e.to_string())
}

impl BenchArgs {
    /// The cluster size, resolved by `run` (see `runtime::cluster_size`).
    fn n(&self) -> usize {
        self.n.unwrap_or_default()
    }
}
