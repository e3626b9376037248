//! `diffuse bench --preprocessing`: the CPU time of FastBFT's `preprocessing` in the
//! software enclave, per secret, for `n` replicas (`f = (n - 1) / 2`, `f + 1` active
//! replicas, one share and one encrypted package each). With `--fallback`: the
//! fallback's (every backup gets a Shamir share of a degree-`f` polynomial).

use diffuse_core::crypto::SecretKey;
use diffuse_tee::{FastBftComponent, Platform, SoftwareEnclave, SoftwarePlatform, Tree};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Counter values per `preprocessing` call.
const BATCH: usize = 32;
/// Measure at least this much CPU time, and at least [`MIN_SECRETS`] secrets.
const MIN_CPU_SECONDS: f64 = 1.0;
const MIN_SECRETS: usize = 1000;
/// The share tree's fan-out.
const FAN_OUT: usize = 2;

/// CPU time of the calling thread in nanoseconds, from /proc (Linux).
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Runs the measurement and prints µs per secret (or one JSON object).
pub fn run(n: usize, fallback: bool, json: bool) -> ExitCode {
    match measure(n, fallback) {
        Ok(result) => {
            if json {
                println!("{result}");
            } else {
                let number = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
                let shape = if fallback {
                    format!(
                        "{} Shamir shares, threshold {}",
                        result["active"],
                        result["f"].as_u64().unwrap_or(0) + 1
                    )
                } else {
                    format!("{} active replicas, fan-out {FAN_OUT}", result["active"])
                };
                println!(
                    "FastBFT preprocessing, n = {n} ({shape}): \
                     {:.1} µs CPU per secret ({:.1} µs wall) over {} secrets",
                    number("cpu_us_per_secret"),
                    number("wall_us_per_secret"),
                    result["secrets"]
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

fn measure(n: usize, fallback: bool) -> Result<serde_json::Value, String> {
    if !(3..=diffuse_tee::enclave::MAX_PEERS).contains(&n) {
        return Err(format!(
            "--n must be between 3 and {}",
            diffuse_tee::enclave::MAX_PEERS
        ));
    }
    let f = (n - 1) / 2;
    let active = if fallback { n - 1 } else { f + 1 };
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no OS randomness: {e}"))?;
    let platform: Arc<dyn Platform> = Arc::new(SoftwarePlatform::new(seed));
    let mut primary = SoftwareEnclave::create(platform);
    let actives: Vec<_> = (0..active)
        .map(|i| {
            let mut key = seed;
            key[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            SecretKey::from_seed(key).public()
        })
        .collect();
    if fallback {
        primary
            .be_primary_threshold(&actives)
            .map_err(|e| e.to_string())?;
    } else {
        let tree = Tree::balanced(active, FAN_OUT).map_err(|e| e.to_string())?;
        primary
            .be_primary(&actives, tree)
            .map_err(|e| e.to_string())?;
    }
    thread_cpu_ns().ok_or("cannot read /proc/thread-self/schedstat")?;
    let mut cpu = 0u64;
    let mut wall = 0f64;
    let mut secrets = 0usize;
    loop {
        // Only `preprocessing` is timed; `request_counter` (one signature per value)
        // then moves c_latest on, as the protocol does by using the values.
        let (before_cpu, before_wall) = (thread_cpu_ns().unwrap_or(0), Instant::now());
        let batch = primary.preprocessing(BATCH).map_err(|e| e.to_string())?;
        cpu += thread_cpu_ns().unwrap_or(0).saturating_sub(before_cpu);
        wall += before_wall.elapsed().as_secs_f64();
        secrets += batch.len();
        drop(batch);
        for _ in 0..BATCH {
            primary
                .request_counter(&diffuse_core::crypto::Digest::default())
                .map_err(|e| e.to_string())?;
        }
        if secrets >= MIN_SECRETS && cpu as f64 / 1e9 >= MIN_CPU_SECONDS {
            return Ok(serde_json::json!({
                "n": n,
                "f": f,
                "active": active,
                "fallback": fallback,
                "fan_out": if fallback { 0 } else { FAN_OUT },
                "secrets": secrets,
                "cpu_us_per_secret": cpu as f64 / 1e3 / secrets as f64,
                "wall_us_per_secret": wall * 1e6 / secrets as f64,
            }));
        }
    }
}
