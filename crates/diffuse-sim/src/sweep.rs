//! Many seeds, on every core, aggregated into one report.

use crate::checkers::{Checker, Violation};
use crate::metrics::{Metrics, percentile};
use crate::scenario::FaultMix;
use crate::world::{RunConfig, RunReport, SetupError, Simulation};
use diffuse_core::suite::ProtocolSuite;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A sweep over seeds.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// Number of replicas.
    pub n: usize,
    /// The first seed.
    pub first_seed: u64,
    /// How many seeds.
    pub seeds: u64,
    /// The fault mixes; seed `s` runs mix `s % mixes.len()`.
    pub mixes: Vec<FaultMix>,
    /// A mutant to run instead of the real protocol.
    pub mutant: Option<String>,
    /// Worker threads.
    pub threads: usize,
    /// Stop early after this many failing runs.
    pub stop_after_failures: Option<usize>,
}

impl SweepConfig {
    /// The mix seed `seed` runs.
    pub fn mix_for(&self, seed: u64) -> FaultMix {
        self.mixes[(seed % self.mixes.len() as u64) as usize].clone()
    }
}

/// Runs one seed. A panic anywhere in the run becomes a [`Checker::Panic`] violation.
pub fn run_one<P: ProtocolSuite>(config: &RunConfig) -> Result<RunReport, SetupError> {
    let simulation = Simulation::<P>::new(config)?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| simulation.run(config)));
    Ok(outcome.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        RunReport {
            seed: config.seed,
            mix: config.mix.name().to_string(),
            violations: vec![Violation {
                checker: Checker::Panic,
                detail: message,
            }],
            metrics: Metrics::default(),
            trace: Vec::new(),
            scenario: String::new(),
        }
    }))
}

/// A failing run.
#[derive(Debug, Clone)]
pub struct FailedRun {
    /// Its seed.
    pub seed: u64,
    /// Its fault mix.
    pub mix: String,
    /// What the checkers found.
    pub violations: Vec<Violation>,
    /// Its scenario.
    pub scenario: String,
}

/// Totals for one fault mix (or for the whole sweep).
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// Runs.
    pub runs: u64,
    /// Runs with at least one violation.
    pub failed: u64,
    /// Violations per checker.
    pub violations: BTreeMap<Checker, u64>,
    /// Completed client operations.
    pub ops: u64,
    /// Messages sent.
    pub messages: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Per message kind: messages and bytes.
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Latencies of completed operations (nanoseconds), sorted on finish.
    pub latencies_ns: Vec<u64>,
    /// Views installed at correct replicas.
    pub views_installed: u64,
    /// State transfers at correct replicas.
    pub state_transfers: u64,
    /// Faults detected by correct replicas.
    pub faults_detected: u64,
    /// Frames that did not decode.
    pub rejected_frames: u64,
}

impl Totals {
    fn add(&mut self, metrics: &Metrics, violations: &[Violation]) {
        self.runs += 1;
        if !violations.is_empty() {
            self.failed += 1;
        }
        for v in violations {
            *self.violations.entry(v.checker).or_default() += 1;
        }
        self.ops += metrics.completed_ops;
        self.messages += metrics.messages;
        self.bytes += metrics.bytes;
        for (kind, (m, b)) in &metrics.by_kind {
            let entry = self.by_kind.entry(kind).or_default();
            entry.0 += m;
            entry.1 += b;
        }
        self.latencies_ns.extend_from_slice(&metrics.latencies_ns);
        self.views_installed += metrics.views_installed;
        self.state_transfers += metrics.state_transfers;
        self.faults_detected += metrics.faults_detected;
        self.rejected_frames += metrics.rejected_frames;
    }

    /// Messages per completed operation.
    pub fn msgs_per_op(&self) -> f64 {
        self.messages as f64 / self.ops.max(1) as f64
    }

    /// Bytes per completed operation.
    pub fn bytes_per_op(&self) -> f64 {
        self.bytes as f64 / self.ops.max(1) as f64
    }

    /// A latency percentile in milliseconds (latencies must be sorted).
    pub fn latency_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_ns, p) as f64 / 1e6
    }

    /// Total violations.
    pub fn violation_count(&self) -> u64 {
        self.violations.values().sum()
    }
}

/// The outcome of a sweep.
#[derive(Debug, Clone)]
pub struct SweepReport {
    /// Protocol name.
    pub protocol: &'static str,
    /// Replicas.
    pub n: usize,
    /// Faults tolerated.
    pub f: usize,
    /// The mutant, if any.
    pub mutant: Option<String>,
    /// Totals per fault mix, in the order of the sweep's mixes.
    pub per_mix: Vec<(String, Totals)>,
    /// Totals over all runs.
    pub total: Totals,
    /// The failing runs, by seed.
    pub failures: Vec<FailedRun>,
}

/// Runs `config.seeds` seeds of protocol `P` on `config.threads` threads.
/// `progress` is called with the number of runs finished so far.
pub fn sweep<P: ProtocolSuite>(
    config: &SweepConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SweepReport, SetupError> {
    let quorum = P::quorum(config.n).map_err(|e| SetupError(e.to_string()))?;
    if config.mixes.is_empty() {
        return Err(SetupError("no fault mix to run".into()));
    }
    // Fail fast on a bad mutant or behaviour name, before spawning threads.
    let probe = RunConfig {
        n: config.n,
        seed: config.first_seed,
        mix: config.mix_for(config.first_seed),
        mutant: config.mutant.clone(),
        trace: false,
    };
    Simulation::<P>::new(&probe)?;

    let next = AtomicU64::new(0);
    let finished = AtomicU64::new(0);
    let failures_seen = AtomicUsize::new(0);
    let results: Mutex<Vec<RunReport>> = Mutex::new(Vec::new());
    let setup_error: Mutex<Option<SetupError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..config.threads.max(1) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= config.seeds {
                        return;
                    }
                    if config
                        .stop_after_failures
                        .is_some_and(|limit| failures_seen.load(Ordering::Relaxed) >= limit)
                    {
                        return;
                    }
                    let seed = config.first_seed + index;
                    let run = RunConfig {
                        n: config.n,
                        seed,
                        mix: config.mix_for(seed),
                        mutant: config.mutant.clone(),
                        trace: false,
                    };
                    match run_one::<P>(&run) {
                        Ok(mut report) => {
                            if !report.violations.is_empty() {
                                failures_seen.fetch_add(1, Ordering::Relaxed);
                            }
                            report.trace.clear();
                            results
                                .lock()
                                .expect("no thread panics while holding it")
                                .push(report);
                        }
                        Err(error) => {
                            *setup_error
                                .lock()
                                .expect("no thread panics while holding it") = Some(error);
                            return;
                        }
                    }
                    progress(finished.fetch_add(1, Ordering::Relaxed) + 1);
                }
            });
        }
    });
    if let Some(error) = setup_error.into_inner().expect("threads joined") {
        return Err(error);
    }
    let mut runs = results.into_inner().expect("threads joined");
    runs.sort_by_key(|r| r.seed);
    Ok(aggregate::<P>(config, quorum.f(), runs))
}

fn aggregate<P: ProtocolSuite>(
    config: &SweepConfig,
    f: usize,
    runs: Vec<RunReport>,
) -> SweepReport {
    let mut per_mix: Vec<(String, Totals)> = Vec::new();
    for mix in &config.mixes {
        if !per_mix.iter().any(|(name, _)| name == mix.name()) {
            per_mix.push((mix.name().to_string(), Totals::default()));
        }
    }
    let mut total = Totals::default();
    let mut failures = Vec::new();
    for run in runs {
        total.add(&run.metrics, &run.violations);
        if let Some((_, totals)) = per_mix.iter_mut().find(|(name, _)| *name == run.mix) {
            totals.add(&run.metrics, &run.violations);
        }
        if !run.violations.is_empty() {
            failures.push(FailedRun {
                seed: run.seed,
                mix: run.mix,
                violations: run.violations,
                scenario: run.scenario,
            });
        }
    }
    total.latencies_ns.sort_unstable();
    for (_, totals) in &mut per_mix {
        totals.latencies_ns.sort_unstable();
    }
    SweepReport {
        protocol: P::NAME,
        n: config.n,
        f,
        mutant: config.mutant.clone(),
        per_mix,
        total,
        failures,
    }
}

impl SweepReport {
    /// Whether every run passed every checker.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mutant = self
            .mutant
            .as_deref()
            .map(|m| format!(", mutant {m}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{} with n = {} (f = {}){}: {} runs\n\n",
            self.protocol, self.n, self.f, mutant, self.total.runs
        ));
        out.push_str(&format!(
            "{:<20} {:>6} {:>10} {:>8} {:>9} {:>10} {:>9} {:>9} {:>6} {:>6}\n",
            "faults",
            "runs",
            "violations",
            "ops",
            "msgs/op",
            "bytes/op",
            "p50 ms",
            "p99 ms",
            "views",
            "xfers"
        ));
        let row = |name: &str, t: &Totals| {
            format!(
                "{:<20} {:>6} {:>10} {:>8} {:>9.1} {:>10.0} {:>9.1} {:>9.1} {:>6} {:>6}\n",
                name,
                t.runs,
                t.violation_count(),
                t.ops,
                t.msgs_per_op(),
                t.bytes_per_op(),
                t.latency_ms(50.0),
                t.latency_ms(99.0),
                t.views_installed,
                t.state_transfers,
            )
        };
        for (name, totals) in &self.per_mix {
            if totals.runs > 0 {
                out.push_str(&row(name, totals));
            }
        }
        if self.per_mix.iter().filter(|(_, t)| t.runs > 0).count() > 1 {
            out.push_str(&row("all", &self.total));
        }
        out.push_str("\nviolations by checker:");
        for checker in Checker::ALL {
            let count = self.total.violations.get(&checker).copied().unwrap_or(0);
            out.push_str(&format!(" {} {}", checker.name(), count));
        }
        out.push('\n');
        out
    }

    /// The machine-readable summary.
    pub fn to_json(&self) -> serde_json::Value {
        let by_checker: serde_json::Map<String, serde_json::Value> = Checker::ALL
            .iter()
            .map(|c| {
                (
                    c.name().to_string(),
                    json!(self.total.violations.get(c).copied().unwrap_or(0)),
                )
            })
            .collect();
        let by_kind: serde_json::Map<String, serde_json::Value> = self
            .total
            .by_kind
            .iter()
            .map(|(kind, (m, b))| {
                let ops = self.total.ops.max(1) as f64;
                (
                    kind.to_string(),
                    json!({"messages": m, "bytes": b, "msgs_per_op": *m as f64 / ops, "bytes_per_op": *b as f64 / ops}),
                )
            })
            .collect();
        let per_mix: serde_json::Map<String, serde_json::Value> = self
            .per_mix
            .iter()
            .filter(|(_, t)| t.runs > 0)
            .map(|(name, t)| {
                (
                    name.clone(),
                    json!({
                        "runs": t.runs,
                        "violations": t.violation_count(),
                        "ops": t.ops,
                        "msgs_per_op": t.msgs_per_op(),
                        "bytes_per_op": t.bytes_per_op(),
                    }),
                )
            })
            .collect();
        json!({
            "protocol": self.protocol,
            "n": self.n,
            "f": self.f,
            "mutant": self.mutant,
            "runs": self.total.runs,
            "violations": self.total.violation_count(),
            "failed_runs": self.total.failed,
            "violations_by_checker": by_checker,
            "failed_seeds": self.failures.iter().map(|f| f.seed).collect::<Vec<_>>(),
            "ops": self.total.ops,
            "msgs_per_op": self.total.msgs_per_op(),
            "bytes_per_op": self.total.bytes_per_op(),
            "latency_ms": {
                "p50": self.total.latency_ms(50.0),
                "p99": self.total.latency_ms(99.0),
                "max": self.total.latency_ms(100.0),
            },
            "views_installed": self.total.views_installed,
            "state_transfers": self.total.state_transfers,
            "faults_detected": self.total.faults_detected,
            "rejected_frames": self.total.rejected_frames,
            "messages_by_kind": by_kind,
            "per_mix": per_mix,
        })
    }
}
