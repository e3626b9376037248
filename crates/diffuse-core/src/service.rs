//! Exactly-once execution in front of the [`Application`].
//!
//! Clients number their requests with increasing timestamps. The service remembers,
//! per client, the last timestamp executed and its result: a request with an older
//! timestamp is never executed again, and a retransmission of the last one gets the
//! cached reply. The reply cache is part of the replicated state, so it is inside
//! every checkpoint and every state transfer.

use crate::app::{AppError, Application};
use crate::codec::{self, Blob, BoundedVec};
use crate::crypto::Digest;
use crate::ids::ClientId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The largest application snapshot accepted from a peer, in bytes.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;
/// The largest operation result kept in the reply cache, in bytes.
pub const MAX_RESULT_BYTES: usize = 1 << 20;
/// The most clients one snapshot may describe.
pub const MAX_CLIENTS: usize = 1 << 20;

/// What the service remembers about one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClientRecord {
    client: ClientId,
    last_timestamp: u64,
    last_result: Blob<MAX_RESULT_BYTES>,
}

/// The encoded state of a service: application snapshot plus reply cache.
#[derive(Debug, Serialize, Deserialize)]
struct ServiceSnapshot {
    app: Blob<MAX_SNAPSHOT_BYTES>,
    clients: BoundedVec<ClientRecord, MAX_CLIENTS>,
}

/// A snapshot of the replicated state taken at a checkpoint.
#[derive(Debug, Clone)]
pub struct StateSnapshot {
    /// Digest of `bytes`: what replicas sign in their checkpoint votes.
    pub digest: Digest,
    /// The application's own digest, for the simulator's state checker.
    pub app_digest: Digest,
    /// The canonical encoding, served to replicas that need state transfer.
    pub bytes: std::sync::Arc<Vec<u8>>,
}

/// The digest label of replicated-state snapshots.
pub const STATE_LABEL: &str = "diffuse/state";

/// A snapshot as a replica persists it.
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    state: Digest,
    app: Digest,
    bytes: Blob<MAX_SNAPSHOT_BYTES>,
}

impl StateSnapshot {
    /// The snapshot's durable encoding (for a replica's checkpoint records).
    pub fn to_record(&self) -> Vec<u8> {
        codec::encode_payload(&SnapshotRecord {
            state: self.digest,
            app: self.app_digest,
            bytes: Blob::try_from_vec(self.bytes.to_vec()).unwrap_or_default(),
        })
    }

    /// Reads back [`StateSnapshot::to_record`]; `None` if the bytes do not parse or
    /// do not match their digest (untrusted disk).
    pub fn from_record(record: &[u8]) -> Option<StateSnapshot> {
        let record: SnapshotRecord = codec::decode_payload(record).ok()?;
        (Digest::of(STATE_LABEL, &record.bytes) == record.state).then(|| StateSnapshot {
            digest: record.state,
            app_digest: record.app,
            bytes: std::sync::Arc::new(record.bytes.into_inner()),
        })
    }
}

/// An application behind a per-client reply cache.
pub struct ReplicatedService {
    app: Box<dyn Application>,
    clients: BTreeMap<ClientId, (u64, Vec<u8>)>,
}

/// The outcome of offering a request to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// The request was new and ran; here is its result.
    Executed(Vec<u8>),
    /// The request was already executed (same or older timestamp): nothing ran.
    Stale,
}

impl ReplicatedService {
    /// Wraps an application with an empty reply cache.
    pub fn new(app: Box<dyn Application>) -> Self {
        Self {
            app,
            clients: BTreeMap::new(),
        }
    }

    /// Executes the request unless its timestamp is not newer than the client's last.
    pub fn execute(&mut self, client: ClientId, timestamp: u64, operation: &[u8]) -> Execution {
        if timestamp <= self.last_timestamp(client) {
            return Execution::Stale;
        }
        let mut result = self.app.execute(operation);
        result.truncate(MAX_RESULT_BYTES);
        self.clients.insert(client, (timestamp, result.clone()));
        Execution::Executed(result)
    }

    /// The result of a read-only operation on the current state (`None` if the
    /// application says it may write), truncated as `execute` truncates.
    pub fn query(&self, operation: &[u8]) -> Option<Vec<u8>> {
        let mut result = self.app.query(operation)?;
        result.truncate(MAX_RESULT_BYTES);
        Some(result)
    }

    /// The last timestamp executed for `client` (0 if none).
    pub fn last_timestamp(&self, client: ClientId) -> u64 {
        self.clients.get(&client).map_or(0, |(t, _)| *t)
    }

    /// The cached reply for `client`'s last executed request.
    pub fn cached_reply(&self, client: ClientId) -> Option<(u64, &[u8])> {
        self.clients.get(&client).map(|(t, r)| (*t, r.as_slice()))
    }

    /// The application's digest.
    pub fn app_digest(&self) -> Digest {
        self.app.digest()
    }

    /// Snapshots the whole replicated state.
    pub fn snapshot(&self) -> StateSnapshot {
        let encoded = ServiceSnapshot {
            app: Blob::try_from_vec(self.app.snapshot()).unwrap_or_default(),
            clients: BoundedVec::truncating(
                self.clients
                    .iter()
                    .map(|(client, (t, r))| ClientRecord {
                        client: *client,
                        last_timestamp: *t,
                        last_result: Blob::try_from_vec(r.clone()).unwrap_or_default(),
                    })
                    .collect(),
            ),
        };
        let bytes = codec::encode_payload(&encoded);
        StateSnapshot {
            digest: Digest::of(STATE_LABEL, &bytes),
            app_digest: self.app.digest(),
            bytes: std::sync::Arc::new(bytes),
        }
    }

    /// Replaces the state with a snapshot (bytes possibly from a peer).
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), AppError> {
        let snapshot: ServiceSnapshot =
            codec::decode_payload(bytes).map_err(|e| AppError(format!("service snapshot: {e}")))?;
        let mut clients = BTreeMap::new();
        for record in snapshot.clients.into_inner() {
            if clients
                .insert(
                    record.client,
                    (record.last_timestamp, record.last_result.into_inner()),
                )
                .is_some()
            {
                return Err(AppError(format!("client {} listed twice", record.client)));
            }
        }
        self.app.restore(&snapshot.app)?;
        self.clients = clients;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends each operation to a log; the result is the log length.
    #[derive(Default)]
    struct Log(Vec<Vec<u8>>);

    impl Application for Log {
        fn execute(&mut self, op: &[u8]) -> Vec<u8> {
            self.0.push(op.to_vec());
            vec![self.0.len() as u8]
        }
        fn digest(&self) -> Digest {
            Digest::of_value("log", &self.0)
        }
        fn snapshot(&self) -> Vec<u8> {
            codec::encode_payload(&self.0)
        }
        fn restore(&mut self, s: &[u8]) -> Result<(), AppError> {
            self.0 = codec::decode_payload(s).map_err(|e| AppError(e.to_string()))?;
            Ok(())
        }
    }

    #[test]
    fn executes_each_timestamp_once() {
        let mut s = ReplicatedService::new(Box::new(Log::default()));
        let c = ClientId(1);
        assert_eq!(s.execute(c, 1, b"a"), Execution::Executed(vec![1]));
        assert_eq!(s.execute(c, 1, b"a"), Execution::Stale);
        assert_eq!(s.execute(c, 0, b"b"), Execution::Stale);
        assert_eq!(s.cached_reply(c), Some((1, &[1u8][..])));
        assert_eq!(s.execute(c, 5, b"c"), Execution::Executed(vec![2]));
        assert_eq!(
            s.execute(ClientId(2), 1, b"d"),
            Execution::Executed(vec![3])
        );
    }

    #[test]
    fn snapshot_restores_app_and_reply_cache() {
        let mut a = ReplicatedService::new(Box::new(Log::default()));
        a.execute(ClientId(1), 3, b"x");
        let snap = a.snapshot();
        let mut b = ReplicatedService::new(Box::new(Log::default()));
        b.restore(&snap.bytes).unwrap();
        assert_eq!(b.snapshot().digest, snap.digest);
        assert_eq!(b.execute(ClientId(1), 3, b"x"), Execution::Stale);
    }

    #[test]
    fn garbage_snapshot_is_an_error_and_changes_nothing() {
        let mut s = ReplicatedService::new(Box::new(Log::default()));
        s.execute(ClientId(1), 1, b"x");
        let before = s.snapshot().digest;
        assert!(s.restore(&[0xff, 0xff, 0xff]).is_err());
        assert_eq!(s.snapshot().digest, before);
    }
}
