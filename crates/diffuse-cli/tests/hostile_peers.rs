//! Hostile peers against a real replica process: garbage bytes, a silent connection
//! (slowloris), a key outside the cluster, a frame over the limit, a replayed
//! handshake, and too many connections from one peer. Each is refused with a logged reason, and the replica keeps serving.

use diffuse_core::crypto::SecretKey;
use diffuse_node::client::KvClient;
use diffuse_node::config::NodeConfig;
use diffuse_node::local::LocalCluster;
use diffuse_node::noise;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes the connection; fails if it stays open.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_the_replica_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_diffuse"));
    let mut cluster = LocalCluster::start(exe, dir.path(), "pbft", 4, 2).unwrap();
    // Restart replica 0 at once, to log at `info`. This also SIGKILLs it while it
    // may still be creating its database, which must not leave it unable to start.
    cluster.set_log_level("info");
    cluster.restart(0).unwrap();
    let settings = NodeConfig::load(&cluster.testnet.replicas[0]).unwrap();
    let target = settings.cluster.addresses[0];
    let replica_key = *settings.cluster.keys.replica(settings.id).unwrap();
    let prologue = noise::prologue(&settings.cluster.digest.0);
    let client_key = cluster.client(1).unwrap().secret;

    let mut listening = false;
    for _ in 0..100 {
        if TcpStream::connect(target).await.is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        listening,
        "replica 0 did not start: {}",
        std::fs::read_to_string(cluster.log_path(0)).unwrap_or_default()
    );

    // The cluster works before the attacks.
    let mut kv = KvClient::connect(cluster.client(0).unwrap()).await.unwrap();
    kv.put(b"before", b"1").await.unwrap();
    let rss_before = cluster.pid(0).and_then(rss_kib);

    // Garbage bytes instead of a handshake.
    let mut garbage = TcpStream::connect(target).await.unwrap();
    let bytes: Vec<u8> = (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = garbage.write_all(&bytes).await;
    assert!(
        closed_within(&mut garbage, Duration::from_secs(10)).await,
        "garbage"
    );

    // A peer that connects and sends nothing: dropped at the handshake deadline.
    let mut silent = TcpStream::connect(target).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "slowloris"
    );

    // A key that is not in the cluster file.
    let stranger = SecretKey::from_seed([42; 32]);
    let stream = TcpStream::connect(target).await.unwrap();
    let refused = noise::initiate(stream, &stranger, &replica_key, &prologue, 1 << 20).await;
    assert!(refused.is_err(), "a stranger's handshake must fail");

    // A registered client that sends a frame over the 32 MiB limit.
    let stream = TcpStream::connect(target).await.unwrap();
    let (mut reader, mut writer) =
        noise::initiate(stream, &client_key, &replica_key, &prologue, usize::MAX)
            .await
            .unwrap();
    let huge = vec![0u8; diffuse_core::codec::MAX_FRAME_BYTES + 1];
    let sent = async {
        writer.write_frame(&huge).await?;
        writer.flush().await
    };
    let _ = sent.await;
    let answer = tokio::time::timeout(Duration::from_secs(10), reader.read_frame()).await;
    assert!(
        matches!(answer, Ok(Err(_))),
        "the oversized frame must close the connection"
    );

    // A replayed first handshake message: the replica answers, but the session keys
    // depend on its fresh ephemeral key, so the replayer cannot send anything valid.
    let params = noise::NOISE_PARAMS.parse().unwrap();
    let secret = client_key.to_x25519();
    let remote = replica_key.to_x25519();
    let mut initiator = snow::Builder::new(params)
        .local_private_key(&secret)
        .unwrap()
        .remote_public_key(&remote)
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut first = vec![0u8; 1024];
    let len = initiator.write_message(&[], &mut first).unwrap();
    first.truncate(len);
    for _ in 0..2 {
        let mut replay = TcpStream::connect(target).await.unwrap();
        replay
            .write_all(&(first.len() as u16).to_be_bytes())
            .await
            .unwrap();
        replay.write_all(&first).await.unwrap();
        // Then a forged transport message: it cannot authenticate.
        let forged = [7u8; 64];
        replay
            .write_all(&(forged.len() as u16).to_be_bytes())
            .await
            .unwrap();
        replay.write_all(&forged).await.unwrap();
        assert!(
            closed_within(&mut replay, Duration::from_secs(10)).await,
            "replay"
        );
    }

    // One peer cannot hold more than four connections (each may buffer a frame).
    // A connection counts once it has carried an authenticated frame (the empty
    // hello every dialer sends).
    let mut held = Vec::new();
    for _ in 0..4 {
        let stream = TcpStream::connect(target).await.unwrap();
        let (reader, mut writer) =
            noise::initiate(stream, &client_key, &replica_key, &prologue, 1 << 20)
                .await
                .unwrap();
        writer.write_frame(&[]).await.unwrap();
        writer.flush().await.unwrap();
        held.push((reader, writer));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stream = TcpStream::connect(target).await.unwrap();
    let (mut fifth, mut fifth_writer) =
        noise::initiate(stream, &client_key, &replica_key, &prologue, 1 << 20)
            .await
            .unwrap();
    fifth_writer.write_frame(&[]).await.unwrap();
    fifth_writer.flush().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), fifth.read_frame()).await;
    assert!(matches!(answer, Ok(Err(_))), "a fifth connection is closed");
    drop(held);

    // The replica still serves, counted every refusal, logged why, and its memory
    // did not grow with the attacks.
    kv.put(b"after", b"2").await.unwrap();
    assert_eq!(kv.get(b"before").await.unwrap(), Some(b"1".to_vec()));
    let refused = cluster
        .metric(0, "diffuse_refused_connections_total")
        .unwrap();
    assert!(refused >= 3.0, "refused connections counted: {refused}");
    let log = std::fs::read_to_string(cluster.log_path(0)).unwrap();
    assert!(log.contains("connection refused"), "refusals are logged");
    assert!(
        log.contains("invalid input"),
        "closed channels are logged with a reason"
    );
    if let (Some(before), Some(after)) = (rss_before, cluster.pid(0).and_then(rss_kib)) {
        assert!(
            after < before + 128 * 1024,
            "memory grew from {before} KiB to {after} KiB"
        );
    }
}
