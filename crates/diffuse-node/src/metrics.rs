//! Prometheus metrics of one replica, served as text over plain HTTP.
//!
//! The endpoint is a few lines over a tokio listener rather than an HTTP stack:
//! it reads one bounded request with a deadline, answers `GET /metrics`, and closes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A message kind, the label of the per-kind counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The message kind, as `WireMessage::kind` names it.
    pub kind: &'static str,
}

/// Every metric a node exports.
pub struct NodeMetrics {
    registry: Registry,
    /// Requests executed (duplicates excluded).
    pub committed_requests: Counter,
    /// Batches executed.
    pub committed_batches: Counter,
    /// The current view.
    pub view: Gauge,
    /// The sequence number of the last stable checkpoint.
    pub stable_checkpoint: Gauge,
    /// View changes started.
    pub view_changes: Counter,
    /// State transfers completed.
    pub state_transfers: Counter,
    /// Faults observed in peers.
    pub peer_faults: Counter,
    /// Messages received, by kind.
    pub messages_in: Family<KindLabel, Counter>,
    /// Messages sent, by kind (a broadcast counts once per recipient).
    pub messages_out: Family<KindLabel, Counter>,
    /// Bytes received in frames.
    pub bytes_in: Counter,
    /// Bytes sent in frames.
    pub bytes_out: Counter,
    /// Frames that did not decode.
    pub decode_errors: Counter,
    /// Outgoing frames dropped because a peer's queue was full.
    pub send_queue_drops: Counter,
    /// Client requests relayed by replicas, dropped because the request lane,
    /// the relaying replica's share of the inbox or the byte budget was full.
    pub requests_shed: Counter,
    /// Decoded messages waiting for the protocol.
    pub inbox_depth: Gauge,
    /// Frames waiting in all outgoing queues.
    pub send_queue_depth: Gauge,
    /// Connections refused at the handshake.
    pub refused_connections: Counter,
    /// Seconds from a client's request arriving to its reply leaving.
    pub request_latency: Histogram,
    /// Seconds per durable write.
    pub persist_latency: Histogram,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let latency_buckets = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let mut metrics = NodeMetrics {
            registry: Registry::with_prefix("diffuse"),
            committed_requests: Counter::default(),
            committed_batches: Counter::default(),
            view: Gauge::default(),
            stable_checkpoint: Gauge::default(),
            view_changes: Counter::default(),
            state_transfers: Counter::default(),
            peer_faults: Counter::default(),
            messages_in: Family::default(),
            messages_out: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            decode_errors: Counter::default(),
            send_queue_drops: Counter::default(),
            requests_shed: Counter::default(),
            inbox_depth: Gauge::default(),
            send_queue_depth: Gauge::default(),
            refused_connections: Counter::default(),
            request_latency: latency_buckets(),
            persist_latency: latency_buckets(),
        };
        metrics.register_all();
        metrics
    }
}

impl NodeMetrics {
    fn register_all(&mut self) {
        let r = &mut self.registry;
        r.register(
            "committed_requests",
            "Requests executed",
            self.committed_requests.clone(),
        );
        r.register(
            "committed_batches",
            "Batches executed",
            self.committed_batches.clone(),
        );
        r.register("view", "Current view", self.view.clone());
        r.register(
            "stable_checkpoint",
            "Last stable checkpoint",
            self.stable_checkpoint.clone(),
        );
        r.register(
            "view_changes",
            "View changes started",
            self.view_changes.clone(),
        );
        r.register(
            "state_transfers",
            "State transfers completed",
            self.state_transfers.clone(),
        );
        r.register(
            "peer_faults",
            "Misbehaviour observed in peers",
            self.peer_faults.clone(),
        );
        r.register(
            "messages_in",
            "Messages received by kind",
            self.messages_in.clone(),
        );
        r.register(
            "messages_out",
            "Messages sent by kind",
            self.messages_out.clone(),
        );
        r.register("bytes_in", "Frame bytes received", self.bytes_in.clone());
        r.register("bytes_out", "Frame bytes sent", self.bytes_out.clone());
        r.register(
            "decode_errors",
            "Frames that did not decode",
            self.decode_errors.clone(),
        );
        r.register(
            "send_queue_drops",
            "Frames dropped on a full peer queue",
            self.send_queue_drops.clone(),
        );
        r.register(
            "requests_shed",
            "Relayed client requests dropped: full request lane, byte budget or sender's share",
            self.requests_shed.clone(),
        );
        r.register(
            "inbox_depth",
            "Messages waiting for the protocol",
            self.inbox_depth.clone(),
        );
        r.register(
            "send_queue_depth",
            "Frames waiting in outgoing queues",
            self.send_queue_depth.clone(),
        );
        r.register(
            "refused_connections",
            "Connections refused at the handshake",
            self.refused_connections.clone(),
        );
        r.register(
            "request_latency_seconds",
            "From a request's arrival to its reply",
            self.request_latency.clone(),
        );
        r.register(
            "persist_latency_seconds",
            "Durable write latency",
            self.persist_latency.clone(),
        );
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<NodeMetrics>) {
    // A few scrapers at a time; more wait in the listen backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut request = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while len < request.len() && !request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut request[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => len += read,
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&request[..len]);
            let (status, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET / ")
            {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Binds the metrics endpoint and serves it in the background.
pub async fn spawn_endpoint(
    address: SocketAddr,
    metrics: Arc<NodeMetrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(address).await?;
    Ok(tokio::spawn(serve(listener, metrics)))
}
