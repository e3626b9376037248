//! Real processes: `diffuse node` replicas on loopback (four PBFT, three MinBFT,
//! three FastBFT),
//! every connection through a fault-injecting proxy of this test, under a
//! closed-loop key-value workload. The test kills a backup, kills the primary and
//! cuts a replica off, and afterwards checks that every acknowledged write is
//! readable and that the whole client history is linearizable.

use diffuse_core::config::ClusterFile;
use diffuse_core::ids::ClientId;
use diffuse_node::config::{ClientConfig, NodeConfig};
use diffuse_node::local::LocalCluster;
use diffuse_node::testnet::{self, TestnetSpec};
use diffuse_node::workload::{self, HistoryRecord, WorkloadSpec};
use diffuse_sim::history::{Operation, Outcome};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const CLIENTS: usize = 6;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A TCP proxy that can be cut (existing connections are aborted, new ones
/// refused) and healed.
struct Proxy {
    blocked: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(listen: SocketAddr, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).await.expect("bind proxy");
        let blocked = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (b, c) = (blocked.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Check and register under one lock, so that a cut cannot slip in
                // between and leave this connection open.
                let mut open = c.lock().unwrap();
                if b.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                open.push(task.abort_handle());
            }
        });
        Proxy {
            blocked,
            connections,
        }
    }

    fn cut(&self) {
        let mut open = self.connections.lock().unwrap();
        self.blocked.store(true, Ordering::SeqCst);
        for connection in open.drain(..) {
            connection.abort();
        }
    }

    fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

/// Writes a testnet in which every replica and every client reaches replica `j`
/// through its own proxy. Returns the proxies: `proxies[a][j]` carries traffic
/// from `a` (a replica, or `n` for the clients) to replica `j`.
async fn testnet_behind_proxies(
    dir: &Path,
    protocol: &str,
    n: usize,
) -> (LocalCluster, Vec<Vec<Option<Proxy>>>) {
    let ports = testnet::free_ports(LOCALHOST, 2 * n + (n + 1) * n).unwrap();
    let at = |port: u16| SocketAddr::new(LOCALHOST, port);
    let spec = TestnetSpec {
        protocol: protocol.into(),
        n,
        clients: CLIENTS + 1,
        replica_addresses: ports[..n].iter().map(|p| at(*p)).collect(),
        metrics_addresses: Some(ports[n..2 * n].iter().map(|p| at(*p)).collect()),
        options: Default::default(),
        clients_per_key: 1,
    };
    let written = testnet::write(dir, &spec).unwrap();
    let cluster_text = std::fs::read_to_string(dir.join("cluster.toml")).unwrap();
    let mut proxies = Vec::new();
    let mut next_port = 2 * n;
    for from in 0..=n {
        let mut file = ClusterFile::parse(&cluster_text).unwrap();
        let mut row = Vec::new();
        for to in 0..n {
            if from == to {
                row.push(None);
                continue;
            }
            let port = ports[next_port];
            next_port += 1;
            row.push(Some(
                Proxy::start(at(port), spec.replica_addresses[to]).await,
            ));
            file.replicas[to].address = Some(at(port).to_string());
        }
        proxies.push(row);
        let name = format!("cluster-via-proxies-{from}.toml");
        std::fs::write(dir.join(&name), file.to_toml()).unwrap();
        let configs: Vec<_> = if from < n {
            vec![written.replicas[from].clone()]
        } else {
            written.clients.clone()
        };
        for config in configs {
            let text = std::fs::read_to_string(&config).unwrap();
            let rewired = text.replace(
                "cluster_file = \"cluster.toml\"",
                &format!("cluster_file = \"{name}\""),
            );
            assert_ne!(text, rewired, "config names the cluster file");
            std::fs::write(&config, rewired).unwrap();
        }
    }
    // Every rewritten file still loads.
    for config in &written.replicas {
        NodeConfig::load(config).unwrap();
    }
    for config in &written.clients {
        ClientConfig::load(config).unwrap();
    }
    let metrics = spec.metrics_addresses.clone().unwrap();
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_diffuse")), written, metrics);
    cluster.set_log_level("info");
    for i in 0..n {
        cluster.restart(i).unwrap();
    }
    (cluster, proxies)
}

fn completed(log: &[HistoryRecord]) -> usize {
    log.iter().filter(|r| r.complete_ns.is_some()).count()
}

fn drain(rx: &mut mpsc::UnboundedReceiver<HistoryRecord>, log: &mut Vec<HistoryRecord>) {
    while let Ok(record) = rx.try_recv() {
        log.push(record);
    }
}

/// Waits until `count` more operations complete (or panics after `limit`).
async fn progress(
    what: &str,
    rx: &mut mpsc::UnboundedReceiver<HistoryRecord>,
    log: &mut Vec<HistoryRecord>,
    count: usize,
    limit: Duration,
) {
    drain(rx, log);
    let target = completed(log) + count;
    let deadline = Instant::now() + limit;
    while completed(log) < target {
        assert!(
            Instant::now() < deadline,
            "the workload stopped {what}: {} of {target} operations completed",
            completed(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain(rx, log);
    }
}

fn metric(cluster: &LocalCluster, i: usize, name: &str) -> f64 {
    tokio::task::block_in_place(|| cluster.metric(i, name)).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbft_replicas_survive_kills_and_partitions_without_losing_a_write() {
    survive_kills_and_partitions("pbft", 4, true).await;
}

/// MinBFT: a killed replica comes back with a locked enclave and REJOINs; the
/// primary's death changes the view; the restarted primary, far behind, must vote
/// again at once when replica 2 is cut off and it is one of the last `f + 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minbft_replicas_survive_kills_and_partitions_without_losing_a_write() {
    survive_kills_and_partitions("minbft", 3, true).await;
}

/// FastBFT: a killed backup REJOINs at a position its primary certifies for it; a
/// cleanly stopped one comes back from its disk; the primary's death changes the
/// view and the restarted primary REJOINs in the new view; a replica cut off
/// beyond what the primary keeps for FETCH answers catches up from the primary's
/// log and by state transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastbft_replicas_survive_kills_and_partitions_without_losing_a_write() {
    survive_kills_and_partitions("fastbft", 3, true).await;
}

/// Waits until replica `i` executes again (a restarted MinBFT replica consumes
/// nothing until its REJOIN unlocks its enclave).
async fn executing_again(
    cluster: &LocalCluster,
    i: usize,
    rx: &mut mpsc::UnboundedReceiver<HistoryRecord>,
    log: &mut Vec<HistoryRecord>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let start = metric(cluster, i, "diffuse_committed_batches_total");
    while metric(cluster, i, "diffuse_committed_batches_total") <= start.max(0.0) {
        assert!(
            Instant::now() < deadline,
            "replica {i} did not take part again\n{}",
            diagnosis(cluster, i)
        );
        progress(
            "while a replica rejoins",
            rx,
            log,
            20,
            Duration::from_secs(60),
        )
        .await;
    }
}

/// What a failed wait on replica `i` prints: the cluster's progress metrics and the
/// end of the replica's log, so that a rare failure can be understood from CI's
/// output alone.
fn diagnosis(cluster: &LocalCluster, i: usize) -> String {
    let mut text = String::new();
    for r in 0..cluster.n() {
        text += &format!(
            "replica {r}: view {} stable checkpoint {} committed batches {}\n",
            metric(cluster, r, "diffuse_view"),
            metric(cluster, r, "diffuse_stable_checkpoint"),
            metric(cluster, r, "diffuse_committed_batches_total"),
        );
    }
    let log = std::fs::read_to_string(cluster.log_path(i)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    text += &format!("last lines of replica {i}'s log:\n");
    for line in &lines[lines.len().saturating_sub(60)..] {
        text += line;
        text.push('\n');
    }
    text
}

async fn survive_kills_and_partitions(protocol: &str, n: usize, partition: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, proxies) = testnet_behind_proxies(dir.path(), protocol, n).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut log = Vec::new();
    let start = Instant::now();
    let spec = WorkloadSpec {
        keys: 16,
        payload: 16,
        read_percent: 40,
    };
    let mut clients = Vec::new();
    for j in 0..CLIENTS {
        let settings = cluster.client(j).unwrap();
        clients.push(tokio::spawn(workload::run_client(
            settings,
            spec.clone(),
            start,
            stop_rx.clone(),
            tx.clone(),
        )));
    }
    let minute = Duration::from_secs(60);
    progress("at the start", &mut rx, &mut log, 200, minute).await;

    // 1. Kill a backup: the others go on; restarted, it takes part again.
    let backup = n - 1;
    tokio::task::block_in_place(|| cluster.kill(backup));
    progress("with a backup down", &mut rx, &mut log, 300, minute).await;
    tokio::task::block_in_place(|| cluster.restart(backup)).unwrap();
    progress("after the backup restarted", &mut rx, &mut log, 300, minute).await;
    executing_again(&cluster, backup, &mut rx, &mut log).await;
    const REJOINS_SENT: &str = "diffuse_messages_out_total{kind=\"rejoin\"}";
    if protocol != "pbft" {
        assert!(
            metric(&cluster, backup, REJOINS_SENT) > 0.0,
            "a hybrid replica killed with SIGKILL comes back locked and REJOINs"
        );
    }

    // 1b. Stop the backup cleanly and start it again: MinBFT's enclave sealed its
    //     state at the shutdown, so it resumes with no REJOIN.
    tokio::task::block_in_place(|| cluster.stop(backup));
    progress("with a backup stopped", &mut rx, &mut log, 100, minute).await;
    tokio::task::block_in_place(|| cluster.restart(backup)).unwrap();
    executing_again(&cluster, backup, &mut rx, &mut log).await;
    assert!(
        metric(&cluster, backup, REJOINS_SENT) <= 0.0,
        "a cleanly stopped replica needs no REJOIN"
    );

    // 2. Kill the primary: a view change on real timers, and the workload resumes.
    let view = metric(&cluster, 1, "diffuse_view");
    assert_eq!(view, 0.0, "no view change before the primary fails");
    tokio::task::block_in_place(|| cluster.kill(0));
    progress("after the primary died", &mut rx, &mut log, 300, minute).await;
    // Let the others go more than a window (256) past the dead primary's last
    // checkpoint: it restarts far behind, catches up by state transfer, and must
    // vote again at once when the next step leaves it and one other replica alone.
    let stable = metric(&cluster, 1, "diffuse_stable_checkpoint");
    while metric(&cluster, 1, "diffuse_stable_checkpoint") < stable + 3.0 * 128.0 {
        progress("with the primary down", &mut rx, &mut log, 50, minute).await;
    }
    let view = metric(&cluster, 1, "diffuse_view");
    assert!(
        view >= 1.0,
        "a view change installed a new primary (view {view})"
    );
    tokio::task::block_in_place(|| cluster.restart(0)).unwrap();
    executing_again(&cluster, 0, &mut rx, &mut log).await;

    if partition {
        // 3. Cut replica 2 off (both directions, clients too) while the others go far
        //    past its window, then heal: it must catch up by state transfer.
        let isolated = 2;
        for (from, row) in proxies.iter().enumerate() {
            for (to, proxy) in row.iter().enumerate() {
                if let Some(proxy) = proxy
                    && (from == isolated || to == isolated)
                {
                    proxy.cut();
                }
            }
        }
        let before = metric(&cluster, 1, "diffuse_stable_checkpoint");
        // Default options: checkpoints every 128, window 256. Peers keep up to 4,096
        // messages queued for a disconnected replica, so a cut can be bridged by the
        // queued messages alone, without state transfer, unless it is long enough.
        // PBFT sends each peer about three messages per sequence number: 16
        // checkpoints (2,048) are enough. MinBFT sends about one (the PREPARE or the
        // COMMIT): go 40 checkpoints (5,120) ahead. A FastBFT primary answers FETCHes
        // from its last 4,096 stream messages: 40 checkpoints are past them too.
        let (checkpoints, limit) = if protocol == "pbft" {
            (16.0, 90)
        } else {
            (40.0, 240)
        };
        let deadline = Instant::now() + Duration::from_secs(limit);
        while metric(&cluster, 1, "diffuse_stable_checkpoint") < before + checkpoints * 128.0 {
            assert!(
                Instant::now() < deadline,
                "the majority stopped making progress"
            );
            progress("with replica 2 cut off", &mut rx, &mut log, 50, minute).await;
        }
        let transfers_before = metric(&cluster, isolated, "diffuse_state_transfers_total");
        for row in &proxies {
            for proxy in row.iter().flatten() {
                proxy.heal();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let transfers = metric(&cluster, isolated, "diffuse_state_transfers_total");
            let caught_up = metric(&cluster, isolated, "diffuse_stable_checkpoint")
                >= metric(&cluster, 1, "diffuse_stable_checkpoint") - 128.0;
            if transfers > transfers_before && caught_up {
                break;
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(cluster.log_path(isolated)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "replica 2 did not catch up by state transfer (transfers {transfers}, checkpoint {} vs {}, executed {} vs {}); its log ends:\n{}",
                    metric(&cluster, isolated, "diffuse_stable_checkpoint"),
                    metric(&cluster, 1, "diffuse_stable_checkpoint"),
                    metric(&cluster, isolated, "diffuse_committed_batches_total"),
                    metric(&cluster, 1, "diffuse_committed_batches_total"),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            progress("after healing", &mut rx, &mut log, 20, minute).await;
        }
    }

    // 4. Stop, read every key back, and check the whole history.
    let _ = stop_tx.send(true);
    for client in clients {
        client.await.unwrap().unwrap();
    }
    drop(tx);
    while let Some(record) = rx.recv().await {
        log.push(record);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = cluster.client(CLIENTS).unwrap();
    workload::read_back(reader, &spec, start, &tx)
        .await
        .unwrap();
    drop(tx);
    while let Some(record) = rx.recv().await {
        log.push(record);
    }
    let history: Vec<Operation> = log
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
    let acknowledged_writes = log
        .iter()
        .filter(|r| r.op != "get" && r.complete_ns.is_some())
        .count();
    assert!(
        acknowledged_writes > 500,
        "the workload wrote ({acknowledged_writes})"
    );
    if let Err(violation) = diffuse_sim::checkers::linearizability::check(&history) {
        panic!("the real-process history is not linearizable: {violation:?}");
    }
}
