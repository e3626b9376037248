//! A closed-loop key-value workload against a running cluster, recording every
//! operation in the history format of `docs/history.md`.
//!
//! Each client runs one operation at a time, as fast as the cluster answers, over a
//! key space shared by all clients (so that the history says something about
//! linearizability). Values are unique, so a read identifies the write it saw.

use crate::client::{ClientError, KvClient};
use crate::config::ClientSettings;
use diffuse_apps::kv::MAX_VALUE_BYTES;
use diffuse_apps::{KvOp, KvResult};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One client operation as recorded in a history file (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The client id.
    pub client: u32,
    /// `put`, `get`, `cas` or `delete`.
    pub op: String,
    /// The key (UTF-8).
    pub key: String,
    /// The value written by a `put`, or the new value of a `cas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// For a `cas`: the value expected (`null`: the key must be absent).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub expected: Option<Option<String>>,
    /// Invocation time, nanoseconds since the start of the run.
    pub invoke_ns: u64,
    /// Completion time, nanoseconds since the start of the run; `null` if no result
    /// came back (the operation may or may not have taken effect).
    pub complete_ns: Option<u64>,
    /// The result, when one came back: `{"ok":true}` for a put, `{"value":..}`
    /// for a get, `{"swapped":..,"previous":..}` for a cas, `{"existed":..}` for a
    /// delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RecordResult>,
    /// Why no result came back (e.g. `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result field of a [`HistoryRecord`]. Untagged: the variants are tried in
/// order, those with required fields first, so `{"value": null}` is a get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RecordResult {
    /// A cas.
    Swapped {
        /// Whether the new value was stored.
        swapped: bool,
        /// The value found.
        previous: Option<String>,
    },
    /// A delete.
    Deleted {
        /// Whether the key was present.
        existed: bool,
    },
    /// A put was stored.
    Ok {
        /// Always true.
        ok: bool,
    },
    /// A get read this value (`null`: absent).
    Value {
        /// The value.
        value: Option<String>,
    },
}

/// A field that is present (possibly `null`) deserialises to `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl HistoryRecord {
    /// The operation this record describes.
    pub fn kv_op(&self) -> KvOp {
        let key = self.key.as_bytes();
        let value = self.value.as_deref().unwrap_or_default().as_bytes();
        match self.op.as_str() {
            "put" => KvOp::put(key, value),
            "cas" => KvOp::cas(
                key,
                self.expected
                    .clone()
                    .flatten()
                    .as_deref()
                    .map(str::as_bytes),
                value,
            ),
            "delete" => KvOp::delete(key),
            _ => KvOp::get(key),
        }
    }

    /// When the result came back and what it was; `None` for an operation without
    /// a result (it may or may not have taken effect).
    pub fn completion(&self) -> Option<(u64, KvResult)> {
        Some((self.complete_ns?, self.kv_result()?))
    }

    /// The typed result, if one came back.
    pub fn kv_result(&self) -> Option<KvResult> {
        use diffuse_core::codec::Blob;
        // Values in a history came from the cluster, so they are within the limit.
        let blob = |s: &Option<String>| -> Option<Blob<MAX_VALUE_BYTES>> {
            s.as_deref()
                .map(|s| Blob::try_from_vec(s.as_bytes().to_vec()).unwrap_or_default())
        };
        Some(match self.result.as_ref()? {
            RecordResult::Ok { .. } => KvResult::Done,
            RecordResult::Value { value } => KvResult::Value(blob(value)),
            RecordResult::Swapped { swapped, previous } => KvResult::Swapped {
                swapped: *swapped,
                previous: blob(previous),
            },
            RecordResult::Deleted { existed } => KvResult::Deleted { existed: *existed },
        })
    }
}

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Keys shared by all clients.
    pub keys: usize,
    /// Bytes per written value (at least enough to make values unique).
    pub payload: usize,
    /// Percent of operations that are reads; the rest are puts and compare-and-swaps.
    pub read_percent: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            keys: 64,
            payload: 32,
            read_percent: 40,
        }
    }
}

/// A small deterministic generator for choosing operations (not for keys or
/// anything secret).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// The key named `index`.
pub fn key_name(index: usize) -> String {
    format!("key-{index:04}")
}

fn unique_value(client: u32, seq: u64, payload: usize) -> String {
    let mut value = format!("c{client}-{seq}-");
    while value.len() < payload {
        value.push('x');
    }
    value
}

/// An operation chosen before it runs.
enum Planned {
    Get,
    Put(String),
    /// Expected value, new value.
    Cas(Option<String>, String),
}

async fn execute(kv: &mut KvClient, key: &str, op: &Planned) -> Result<RecordResult, ClientError> {
    let key = key.as_bytes();
    Ok(match op {
        Planned::Get => RecordResult::Value {
            value: kv.get(key).await?.map(|v| text(&v)),
        },
        Planned::Put(value) => {
            kv.put(key, value.as_bytes()).await?;
            RecordResult::Ok { ok: true }
        }
        Planned::Cas(expected, value) => {
            let (swapped, previous) = kv
                .cas(
                    key,
                    expected.as_deref().map(str::as_bytes),
                    value.as_bytes(),
                )
                .await?;
            RecordResult::Swapped {
                swapped,
                previous: previous.map(|p| text(&p)),
            }
        }
    })
}

/// Runs one client of the workload until `stop` turns true, sending every finished
/// record to `records`.
pub async fn run_client(
    settings: ClientSettings,
    spec: WorkloadSpec,
    start: Instant,
    stop: watch::Receiver<bool>,
    records: mpsc::UnboundedSender<HistoryRecord>,
) -> Result<(), ClientError> {
    let client = settings.id.0;
    let kv = KvClient::connect(settings).await?;
    run_kv_client(kv, client, spec, start, stop, records).await
}

/// [`run_client`] with a client already made (e.g. hosted, see
/// [`crate::client::KvClient::hosted`]) whose id is `client`.
pub async fn run_kv_client(
    mut kv: KvClient,
    client: u32,
    spec: WorkloadSpec,
    start: Instant,
    mut stop: watch::Receiver<bool>,
    records: mpsc::UnboundedSender<HistoryRecord>,
) -> Result<(), ClientError> {
    let read_percent = spec.read_percent.min(100);
    let mut rng = SplitMix(u64::from(client).wrapping_mul(0x1234_5678_9ABC_DEF1) ^ 1);
    let mut last_seen: Vec<Option<String>> = vec![None; spec.keys.max(1)];
    let mut seq = 0u64;
    while !*stop.borrow() {
        seq += 1;
        let k = rng.below(spec.keys.max(1) as u64) as usize;
        let key = key_name(k);
        let roll = rng.below(100);
        let mut record = HistoryRecord {
            client,
            op: String::new(),
            key: key.clone(),
            value: None,
            expected: None,
            invoke_ns: start.elapsed().as_nanos() as u64,
            complete_ns: None,
            result: None,
            error: None,
        };
        let op = if roll < read_percent {
            Planned::Get
        } else if roll < read_percent + (100 - read_percent) * 3 / 4 {
            Planned::Put(unique_value(client, seq, spec.payload))
        } else {
            Planned::Cas(
                last_seen[k].clone(),
                unique_value(client, seq, spec.payload),
            )
        };
        match &op {
            Planned::Get => record.op = "get".into(),
            Planned::Put(value) => {
                record.op = "put".into();
                record.value = Some(value.clone());
            }
            Planned::Cas(expected, value) => {
                record.op = "cas".into();
                record.value = Some(value.clone());
                record.expected = Some(expected.clone());
            }
        }
        let outcome = tokio::select! {
            outcome = execute(&mut kv, &key, &op) => outcome,
            // An operation cut short by the end of the run stays pending.
            _ = stop.wait_for(|stopped| *stopped) => Err(ClientError::Invalid("stopped".into())),
        };
        if let Ok(result) = &outcome {
            last_seen[k] = match (result, &op) {
                (RecordResult::Value { value }, _) => value.clone(),
                (RecordResult::Ok { .. }, Planned::Put(value)) => Some(value.clone()),
                (RecordResult::Swapped { swapped: true, .. }, Planned::Cas(_, value)) => {
                    Some(value.clone())
                }
                (RecordResult::Swapped { previous, .. }, _) => previous.clone(),
                _ => last_seen[k].clone(),
            };
        }
        match outcome {
            Ok(result) => {
                record.complete_ns = Some(start.elapsed().as_nanos() as u64);
                record.result = Some(result);
            }
            Err(ClientError::Timeout(_)) => record.error = Some("timeout".into()),
            Err(ClientError::Invalid(reason)) if reason == "stopped" => {
                record.error = Some("stopped".into());
            }
            Err(error) => record.error = Some(error.to_string()),
        }
        if records.send(record).is_err() {
            break;
        }
    }
    Ok(())
}

/// Reads every key once with a fresh client and records the reads, so that the
/// history ends with the final state (a lost acknowledged write then shows up as
/// a linearizability violation).
pub async fn read_back(
    settings: ClientSettings,
    spec: &WorkloadSpec,
    start: Instant,
    records: &mpsc::UnboundedSender<HistoryRecord>,
) -> Result<usize, ClientError> {
    let client = settings.id.0;
    let mut kv = KvClient::connect(settings).await?;
    for k in 0..spec.keys {
        let key = key_name(k);
        let invoke_ns = start.elapsed().as_nanos() as u64;
        let value = kv.get(key.as_bytes()).await?;
        let _ = records.send(HistoryRecord {
            client,
            op: "get".into(),
            key,
            value: None,
            expected: None,
            invoke_ns,
            complete_ns: Some(start.elapsed().as_nanos() as u64),
            result: Some(RecordResult::Value {
                value: value.map(|v| text(&v)),
            }),
            error: None,
        });
    }
    Ok(spec.keys)
}

/// Latency percentiles of completed operations, in milliseconds.
pub fn percentile_ms(sorted_ns: &[u64], quantile: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_ns.len() as f64 - 1.0) * quantile).round() as usize;
    sorted_ns[rank.min(sorted_ns.len() - 1)] as f64 / 1e6
}

/// A pause that ends early when `stop` turns true.
pub async fn pause(stop: &mut watch::Receiver<bool>, duration: Duration) {
    let _ = tokio::time::timeout(duration, stop.wait_for(|stopped| *stopped)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json_lines() {
        let record = HistoryRecord {
            client: 3,
            op: "cas".into(),
            key: key_name(7),
            value: Some("new".into()),
            expected: Some(None),
            invoke_ns: 10,
            complete_ns: Some(20),
            result: Some(RecordResult::Swapped {
                swapped: true,
                previous: None,
            }),
            error: None,
        };
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(
            line,
            r#"{"client":3,"op":"cas","key":"key-0007","value":"new","expected":null,"invoke_ns":10,"complete_ns":20,"result":{"swapped":true,"previous":null}}"#
        );
        assert_eq!(
            serde_json::from_str::<HistoryRecord>(&line).unwrap(),
            record
        );
        assert_eq!(record.kv_op(), KvOp::cas(b"key-0007", None, b"new"));
        assert_eq!(
            record.kv_result(),
            Some(KvResult::Swapped {
                swapped: true,
                previous: None
            })
        );
    }
}
