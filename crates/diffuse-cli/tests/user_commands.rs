//! The documented workflow, as a user runs it: `diffuse testnet`, four
//! `diffuse node` processes, `diffuse client` operations, then SIGTERM for a clean
//! stop.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_diffuse");

/// One test of this file at a time: each runs `diffuse testnet` or `bench` in a
/// process of its own, which draws free ports without knowing the others' draws,
/// and two clusters drawing the same port made a node fail with "Address already
/// in use" (seen once in CI).
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn diffuse(args: &[&str]) -> Output {
    Command::new(EXE).args(args).output().expect("run diffuse")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Stops the nodes even when an assertion fails.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn client(dir: &Path, args: &[&str]) -> Output {
    let config = dir.join("client-0.toml");
    let mut all = vec!["client", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    diffuse(&all)
}

#[test]
fn testnet_node_client_and_a_clean_stop() {
    let _one = one_cluster_at_a_time();
    user_workflow("pbft", 4);
}

/// The same workflow for FastBFT: its clients check the primary enclave's
/// certificates against the attested enclave list `diffuse testnet` writes.
#[test]
fn fastbft_testnet_node_client_and_a_clean_stop() {
    let _one = one_cluster_at_a_time();
    user_workflow("fastbft", 3);
}

fn user_workflow(protocol: &str, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("net");
    let ports = diffuse_node::testnet::free_ports([127, 0, 0, 1].into(), 2 * n).unwrap();
    // Consecutive ports are not guaranteed free; use explicit addresses instead.
    let addresses: Vec<String> = ports[..n]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let made = diffuse(&[
        "testnet",
        "--protocol",
        protocol,
        "--n",
        &n.to_string(),
        "--clients",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--addresses",
        &addresses.join(","),
        "--metrics-port",
        &ports[n].to_string(),
    ]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(text(&made.stdout).contains("diffuse node --config"));

    let mut nodes = Nodes(Vec::new());
    for i in 0..n {
        let config = out.join(format!("replica-{i}.toml"));
        let log = std::fs::File::create(out.join(format!("node-{i}.log"))).unwrap();
        nodes.0.push(
            Command::new(EXE)
                .args(["node", "--config", config.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    let put = client(&out, &["put", "greeting", "hello"]);
    assert!(put.status.success(), "{}", text(&put.stderr));
    assert_eq!(text(&put.stdout).trim(), "ok");
    let get = client(&out, &["get", "greeting"]);
    assert_eq!(text(&get.stdout).trim(), "hello");
    let cas = client(&out, &["cas", "greeting", "hello", "bye"]);
    assert!(
        text(&cas.stdout).starts_with("swapped"),
        "{}",
        text(&cas.stdout)
    );
    let stale = client(&out, &["cas", "greeting", "hello", "again"]);
    assert!(text(&stale.stdout).starts_with("not swapped"));
    assert_eq!(stale.status.code(), Some(1));
    let absent = client(&out, &["get", "nothing"]);
    assert_eq!(absent.status.code(), Some(1), "a missing key exits with 1");
    let deleted = client(&out, &["delete", "greeting"]);
    assert_eq!(text(&deleted.stdout).trim(), "deleted");

    // SIGTERM: every node stops by itself, successfully, and says so.
    for child in &nodes.0 {
        // The shell's built-in `kill`: no extra tool needed.
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", child.id())])
            .status()
            .unwrap();
        assert!(sent.success());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, child) in nodes.0.iter_mut().enumerate() {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "replica {i} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(out.join(format!("node-{i}.log"))).unwrap();
        assert!(status.success(), "replica {i} exited with {status}: {log}");
        assert!(log.contains("shut down"), "replica {i} log: {log}");
    }

    if protocol == "fastbft" {
        // A restarted FastBFT replica comes back into its view from its disk (its
        // enclave resumes where it stopped), and says so.
        let config = out.join("replica-1.toml");
        let log_path = out.join("restart-1.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let restarted = Nodes(vec![
            Command::new(EXE)
                .args(["node", "--config", config.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let said = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("view installed") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(said.contains("view installed view=0"), "log: {said}");
        drop(restarted);
    }

    // A broken configuration is a clear error, not a panic.
    let broken = out.join("broken.toml");
    std::fs::write(&broken, format!("protocol = \"{protocol}\"\nid = 9\n")).unwrap();
    let refused = diffuse(&["node", "--config", broken.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("broken.toml"),
        "{}",
        text(&refused.stderr)
    );
}

/// `diffuse bench --compare`: every protocol, each on its smallest cluster for
/// `f = 1`, measured in one run and reported in one JSON object.
#[test]
fn bench_compares_protocols_in_one_run() {
    let _one = one_cluster_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = [
        "bench",
        "--compare",
        "pbft,minbft,fastbft",
        "--clients",
        "2",
        "--duration",
        "1",
        "--json",
        "--out",
        out,
    ];
    let output = diffuse(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let runs: Vec<(String, u64, u64)> = json["runs"]
        .as_array()
        .expect("a list of runs")
        .iter()
        .map(|run| {
            (
                run["protocol"].as_str().unwrap().to_string(),
                run["n"].as_u64().unwrap(),
                run["ops"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!((runs[0].0.as_str(), runs[0].1), ("pbft", 4));
    assert_eq!((runs[1].0.as_str(), runs[1].1), ("minbft", 3));
    assert_eq!((runs[2].0.as_str(), runs[2].1), ("fastbft", 3));
    assert!(runs.iter().all(|(_, _, ops)| *ops > 0), "{runs:?}");
    for file in ["compare.json", "compare.csv", "compare.svg"] {
        assert!(dir.path().join(file).exists(), "{file} written");
    }
}

/// `diffuse bench --clients-per-connection`: clients hosted two groups of four on
/// shared connections, every one of them served (reads and writes), none timing out.
#[test]
fn bench_hosts_clients_on_shared_connections() {
    let _one = one_cluster_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let history = dir.path().join("history.jsonl");
    let args = [
        "bench",
        "--clients",
        "8",
        "--clients-per-connection",
        "4",
        "--duration",
        "2",
        "--json",
        "--out",
        out,
        "--history",
        history.to_str().unwrap(),
    ];
    let output = diffuse(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["timeouts"].as_u64(), Some(0), "{json}");
    let mut served = std::collections::BTreeMap::<u64, (usize, usize)>::new();
    for line in std::fs::read_to_string(&history).unwrap().lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if record["result"].is_null() {
            continue;
        }
        let counts = served
            .entry(record["client"].as_u64().unwrap())
            .or_default();
        if record["op"] == "get" {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    assert_eq!(
        served.len(),
        8,
        "every hosted client completed something: {served:?}"
    );
    assert!(
        served
            .values()
            .all(|(reads, writes)| *reads > 0 && *writes > 0),
        "every hosted client read and wrote: {served:?}"
    );
}
