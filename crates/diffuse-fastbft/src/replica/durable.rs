//! What a FastBFT replica keeps on disk, and how it comes back from it
//! (`docs/protocols/fastbft.md`, "Restarts and REJOIN").
//!
//! At a scheduled shutdown, before its enclave seals, the replica writes the log
//! of its view (every position it took since the log's start), the view's
//! NEW-VIEW, its stable checkpoint proof and snapshot, the current tree and how
//! far it executed; nothing while it runs, since after a crash nothing on disk is
//! read. After a scheduled shutdown the enclave resumes exactly where it
//! stopped, so the log on disk reaches its position again: the replica replays it
//! (the stream's state and the batches it executed), fetches the checkpoint's
//! state from its peers, runs its batches again, and goes on. Disk contents are
//! untrusted: a log that does not reach the enclave's position, entry by entry
//! bound by the view's primary, is refused.

use super::{Committed, FastBftReplica, Out};
use crate::checkpoint::{CheckpointProof, primary_of};
use crate::message::{Position, TreeConfig};
use crate::view_log::{LogEntry, NewViewHeader, ViewLog, check_log, replay};
use diffuse_core::codec::{self, BoundedVec};
use diffuse_core::crypto::Digest;
use diffuse_core::ids::Seq;
use diffuse_core::protocol::{Recovered, WriteOp};
use diffuse_core::service::StateSnapshot;
use diffuse_tee::{FastBftComponent, view_of_epoch};
use serde::Serialize;

const BASE: &[u8] = b"fastbft/base";
const STABLE: &[u8] = b"fastbft/stable";
const TREE: &[u8] = b"fastbft/tree";
const EXECUTED: &[u8] = b"fastbft/executed";
const SNAPSHOT: &[u8] = b"fastbft/snapshot";
const LOG: &[u8] = b"fastbft/log/";
/// Every key above starts with `ALL`; `ALL_END` is the first key after them.
const ALL: &[u8] = b"fastbft/";
const ALL_END: &[u8] = b"fastbft0";

/// The key of the log entry at `at`: ordered like positions.
pub(crate) fn log_key(at: Position) -> Vec<u8> {
    let mut key = LOG.to_vec();
    key.extend_from_slice(&at.0.to_be_bytes());
    key.extend_from_slice(&at.1.to_be_bytes());
    key
}

pub(crate) fn put<T: Serialize>(key: &[u8], value: &T) -> WriteOp {
    WriteOp::Put {
        key: key.to_vec(),
        value: codec::encode_payload(value),
    }
}

/// Why a recovered state is refused.
type Refused = &'static str;

impl FastBftReplica {
    /// Everything a restart after a scheduled shutdown reads, written at that
    /// shutdown only: after a crash the enclave comes back locked and the replica
    /// rejoins without reading its disk, so writes while it runs would serve
    /// nothing (at `n = 103` they were about a sixth of a replica's CPU). The old
    /// records go first.
    pub(super) fn durable_records(&self) -> Vec<WriteOp> {
        let mut writes = vec![WriteOp::DeleteRange {
            start: ALL.to_vec(),
            end: ALL_END.to_vec(),
        }];
        if let Some(base) = self.log.base() {
            writes.push(put(BASE, base));
        }
        if let Some(proof) = &self.stable {
            writes.push(put(STABLE, proof));
            if let Some(snapshot) = self.snapshots.get(&proof.seq) {
                writes.push(put(SNAPSHOT, &(proof.seq.0, snapshot.to_record())));
            }
        }
        if let Some(epoch) = &self.epoch {
            writes.push(put(TREE, &epoch.config));
        }
        writes.push(put(EXECUTED, &self.executed.0));
        writes.extend(
            self.log
                .entries()
                .map(|(at, entry)| put(&log_key(*at), entry)),
        );
        writes
    }

    /// Comes back from the disk after a scheduled shutdown (the enclave resumed
    /// where it stopped). Returns why the disk is refused, if it is.
    pub(super) fn recover(&mut self, recovered: &Recovered, out: &mut Out) -> Result<(), Refused> {
        fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Refused> {
            codec::decode_payload(bytes).map_err(|_| "a record on disk does not decode")
        }
        let base: Option<NewViewHeader> = recovered.get(BASE).map(decode).transpose()?;
        let stable: Option<CheckpointProof> = recovered.get(STABLE).map(decode).transpose()?;
        let config: TreeConfig = recovered
            .get(TREE)
            .map(decode)
            .transpose()?
            .ok_or("no tree on disk")?;
        let executed: u64 = recovered
            .get(EXECUTED)
            .map(decode)
            .transpose()?
            .unwrap_or(0);
        let entries = recovered
            .with_prefix(LOG)
            .map(|(_, v)| decode::<LogEntry>(v))
            .collect::<Result<Vec<_>, _>>()?;
        let (counter, epoch) = self.enclave_call(|e| e.fastbft_counter());
        let view = view_of_epoch(epoch);
        if stable
            .as_ref()
            .is_some_and(|p| !p.is_valid(&self.enclave_keys, self.interval()))
        {
            return Err("the stable checkpoint on disk is not proven");
        }
        let log = ViewLog {
            view,
            base,
            checkpoint: stable.clone(),
            entries: BoundedVec::truncating(entries),
        };
        // Entries before the log's start (a truncation whose deletes were not
        // written yet) are dropped, not refused.
        let start = log.start().ok_or("the view on disk is out of range")?;
        let mut log = log;
        let kept: Vec<LogEntry> = log
            .entries
            .iter()
            .filter(|e| crate::message::position(e.cert()) > start)
            .cloned()
            .collect();
        log.entries = BoundedVec::truncating(kept);
        let rules = self.rules();
        check_log(&log, (epoch, counter), &rules)
            .map_err(|_| "the log on disk does not reach the enclave's position")?;
        let (stream, batches) = replay(&log, &rules);
        self.view = view;
        let tree = self
            .check_config(&config)
            .filter(|_| config.epoch == epoch)
            .ok_or("the tree on disk is not the enclave's epoch's")?;
        self.vc.target = self.enclave_call(|e| e.fastbft_leaving());
        self.stream = stream;
        self.epoch = Some(super::Epoch { config, tree });
        self.log = super::log::PositionLog::recovered(log);
        self.stable = stable.clone();
        // The batches it executed, run again on the checkpoint's state; those it
        // had not, kept for their COMMITs.
        let base_seq = super::stable_seq(stable.as_ref());
        for (seq, batch) in batches.range(Seq(executed).next()..) {
            self.batches.insert(*seq, batch.clone());
        }
        for seq in base_seq.0 + 1..=executed {
            let Some(batch) = batches.get(&Seq(seq)) else {
                break;
            };
            self.commits.insert(
                Seq(seq),
                Committed {
                    batch: batch.clone(),
                    batch_root: crate::message::batch_root(batch),
                    results_root: Digest::default(),
                    state: None,
                    recovered: true,
                },
            );
        }
        // Its snapshot at its stable checkpoint.
        let own: Option<(u64, Vec<u8>)> = recovered.get(SNAPSHOT).map(decode).transpose()?;
        let own = own.and_then(|(seq, record)| {
            let snapshot = StateSnapshot::from_record(&record)?;
            let proven = stable
                .as_ref()
                .is_none_or(|p| p.seq.0 != seq || p.state == snapshot.digest);
            (seq == base_seq.0 && seq <= executed && proven).then_some((Seq(seq), snapshot))
        });
        if let Some((seq, snapshot)) = own {
            if self.service.restore(&snapshot.bytes).is_err() {
                return Err("the snapshot on disk does not restore");
            }
            self.executed = seq;
            self.commits = self.commits.split_off(&seq.next());
            self.snapshots.insert(seq, snapshot);
            self.run_committed(out);
        } else if stable.is_some() {
            self.start_transfer(out);
        } else {
            self.run_committed(out);
        }
        out.observe(diffuse_core::protocol::Observation::ViewInstalled {
            view: diffuse_core::ids::View(view),
        });
        if let Some(target) = self.vc.target {
            // It had left its view: its VIEW-CHANGE again (the same position).
            self.vc.target = None;
            self.start_view_change(target, out);
        } else if primary_of(view, self.n) == self.id {
            // Its primary state (pool, batches in flight) is gone: it asks to be
            // replaced.
            self.ask_to_be_replaced(out);
        }
        Ok(())
    }
}
