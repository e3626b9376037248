//! `diffuse bench --compare pbft,minbft --f 1,2`: the protocols side by side in one
//! run. For each `f`, each protocol runs in turn on its smallest cluster for `f`,
//! under the same closed-loop load, and one table compares throughput, latency,
//! CPU and messages per operation.

use crate::bench::{BenchArgs, BenchCluster, Measured, measure, options_table};
use crate::runtime::smallest_cluster_for;
use crate::svg::{self, Series};
use diffuse_node::workload::WorkloadSpec;
use std::process::ExitCode;
use std::time::Duration;

/// One protocol at one `f`.
struct Row {
    protocol: String,
    f: usize,
    n: usize,
    measured: Measured,
}

/// Runs the comparison `args.compare` × `args.faults`.
pub async fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let options = options_table(&args.options)?;
    let clients = args.clients.max(1);
    let spec = WorkloadSpec {
        keys: args.keys.max(1),
        payload: args.payload,
        read_percent: args.read_percent.min(100),
    };
    let duration = Duration::from_secs(args.duration.max(1));
    // Resolve every cluster size first: a bad --f fails before anything starts.
    let mut plan = Vec::new();
    for &f in &args.faults {
        for protocol in &args.compare {
            plan.push((protocol.clone(), f, smallest_cluster_for(protocol, f)?));
        }
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let mut rows = Vec::new();
    for (protocol, f, n) in plan {
        if !args.json {
            println!(
                "{protocol}, f = {f}: {clients} clients against {n} replicas for {}s, {}-byte values",
                duration.as_secs(),
                args.payload
            );
        }
        let mut cluster =
            BenchCluster::start(&protocol, n, clients, &options, args.replica_setup()).await?;
        let warmup = Duration::from_secs(args.warmup);
        let measured = measure(&mut cluster.cluster, clients, &spec, warmup, duration).await?;
        cluster.stop(args.replica_setup());
        let Some(measured) = measured else {
            return Ok(ExitCode::from(130));
        };
        rows.push(Row {
            protocol,
            f,
            n,
            measured,
        });
    }
    let json = serde_json::json!({
        "clients": clients,
        "payload_bytes": args.payload,
        "duration_s": duration.as_secs(),
        "warmup_s": args.warmup,
        "options": args.options,
        "runs": rows.iter().map(row_json).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&json).expect("JSON values encode");
    let write = |name: &str, contents: String| {
        let path = args.out.join(name);
        std::fs::write(&path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write("compare.json", format!("{text}\n"))?;
    write("compare.csv", csv(&rows))?;
    write("compare.svg", chart(&rows, &args.compare))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json).expect("JSON values encode")
        );
    } else {
        print!("\n{}", table(&rows));
        println!(
            "results        {}/{{compare.json,compare.csv,compare.svg}}",
            args.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn row_json(row: &Row) -> serde_json::Value {
    let (m, s) = (&row.measured, &row.measured.summary);
    serde_json::json!({
        "protocol": row.protocol,
        "f": row.f,
        "n": row.n,
        "ops": s.completed,
        "timeouts": s.timeouts,
        "ops_per_sec": s.ops_per_sec,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "p999_ms": s.p999_ms,
        "cpu_us_per_op": m.cpu_us_per_op(),
        "client_cpu_us_per_op": m.client_cpu_us_per_op(),
        "messages_per_op": m.messages_per_op(),
        "bytes_per_op": m.bytes_per_op(),
    })
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// One run's fields, formatted: protocol, f, n, ops/s, p50, p99, p999 (ms), CPU
/// µs/op, msgs/op, bytes/op.
fn fields(row: &Row) -> [String; 10] {
    let (m, s) = (&row.measured, &row.measured.summary);
    [
        row.protocol.clone(),
        row.f.to_string(),
        row.n.to_string(),
        format!("{:.0}", s.ops_per_sec),
        format!("{:.2}", s.p50_ms),
        format!("{:.2}", s.p99_ms),
        format!("{:.2}", s.p999_ms),
        cell(m.cpu_us_per_op(), 0),
        cell(m.messages_per_op(), 2),
        cell(m.bytes_per_op(), 0),
    ]
}

/// A Markdown table, one row per run (it pastes into the docs as is).
fn table(rows: &[Row]) -> String {
    let mut text = String::from(
        "| protocol | f | n | ops/s | p50 ms | p99 ms | p999 ms | CPU µs/op | msgs/op | bytes/op |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        text.push_str(&format!("| {} |\n", fields(row).join(" | ")));
    }
    text
}

fn csv(rows: &[Row]) -> String {
    let mut text = String::from(
        "protocol,f,n,ops_per_sec,p50_ms,p99_ms,p999_ms,cpu_us_per_op,messages_per_op,bytes_per_op\n",
    );
    for row in rows {
        text.push_str(&format!("{}\n", fields(row).join(",")));
    }
    text
}

/// Throughput against `f`, one line per protocol.
fn chart(rows: &[Row], protocols: &[String]) -> String {
    let series: Vec<Series> = protocols
        .iter()
        .map(|protocol| Series {
            label: protocol,
            points: rows
                .iter()
                .filter(|r| &r.protocol == protocol)
                .map(|r| (r.f as f64, r.measured.summary.ops_per_sec))
                .collect(),
        })
        .collect();
    svg::line_chart(
        "Throughput against tolerated faults",
        "f (faults tolerated)",
        "operations per second",
        &series,
    )
}
