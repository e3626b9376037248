//! What a replica logs of its view's stream: every position it takes since the
//! log's start, with the content its certificate binds (`crate::view_log`). The
//! log starts at the view's NEW-VIEW (genesis in view 0) and moves up to a stable
//! checkpoint's COMMIT once one in the view is known. Every change is also a
//! durable write (`super::durable`), handed to the driver with the input's output.

use super::durable::{delete, log_key, put};
use crate::checkpoint::CheckpointProof;
use crate::message::Position;
use crate::view_log::{LogEntry, MAX_LOG_ENTRIES, NewViewHeader, ViewLog, start_of};
use diffuse_core::codec::BoundedVec;
use diffuse_core::protocol::WriteOp;
use std::collections::BTreeMap;

/// The positions of the current view taken since the log's start.
#[derive(Debug, Default)]
pub(crate) struct PositionLog {
    /// The view's NEW-VIEW (`None` in view 0).
    base: Option<NewViewHeader>,
    entries: BTreeMap<Position, LogEntry>,
    /// Writes not handed to the driver yet.
    writes: Vec<WriteOp>,
}

impl PositionLog {
    /// The log of view 0 before anything happened.
    pub(crate) fn genesis() -> PositionLog {
        PositionLog::default()
    }

    /// The log of a view just entered by its NEW-VIEW.
    pub(crate) fn entered(base: NewViewHeader) -> PositionLog {
        PositionLog {
            base: Some(base),
            ..PositionLog::default()
        }
    }

    /// A log taken whole: read back from disk, or a rejoining replica's from its
    /// primary.
    pub(crate) fn recovered(log: ViewLog) -> PositionLog {
        PositionLog {
            base: log.base,
            entries: log
                .entries
                .into_inner()
                .into_iter()
                .map(|e| (crate::message::position(e.cert()), e))
                .collect(),
            writes: Vec::new(),
        }
    }

    /// Replaces this log with `next` (another view's, or one taken whole): the
    /// old entries are deleted from disk and the new ones written.
    pub(crate) fn replace(&mut self, next: PositionLog) {
        let mut writes = std::mem::take(&mut self.writes);
        writes.extend(self.entries.keys().map(|at| delete(&log_key(*at))));
        writes.extend(next.entries.iter().map(|(at, e)| put(&log_key(*at), e)));
        *self = next;
        self.writes = writes;
    }

    /// The view's NEW-VIEW.
    pub(crate) fn base(&self) -> Option<&NewViewHeader> {
        self.base.as_ref()
    }

    /// Whether the log can take no more positions.
    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= MAX_LOG_ENTRIES
    }

    /// Records a position just taken.
    pub(crate) fn record(&mut self, entry: LogEntry) {
        let at = crate::message::position(entry.cert());
        self.writes.push(put(&log_key(at), &entry));
        self.entries.insert(at, entry);
    }

    /// Drops everything up to the log's new start for `checkpoint`, if that is in
    /// `view`.
    pub(crate) fn truncate(&mut self, view: u64, checkpoint: &CheckpointProof) {
        if let Some(start) = start_of(view, Some(checkpoint)) {
            let kept = self
                .entries
                .split_off(&(start.0, start.1.saturating_add(1)));
            let dropped = std::mem::replace(&mut self.entries, kept);
            self.writes
                .extend(dropped.keys().map(|at| delete(&log_key(*at))));
        }
    }

    /// The writes not handed to the driver yet.
    pub(crate) fn take_writes(&mut self) -> Vec<WriteOp> {
        std::mem::take(&mut self.writes)
    }

    /// The log as a VIEW-CHANGE carries it, for a replica in `view` with stable
    /// checkpoint `checkpoint`: the entries after the log's start.
    pub(crate) fn to_view_log(&self, view: u64, checkpoint: Option<&CheckpointProof>) -> ViewLog {
        let start = start_of(view, checkpoint).unwrap_or((0, 0));
        let entries: Vec<LogEntry> = self
            .entries
            .range((start.0, start.1.saturating_add(1))..)
            .map(|(_, e)| e.clone())
            .collect();
        ViewLog {
            view,
            base: self.base.clone(),
            checkpoint: checkpoint.cloned(),
            entries: BoundedVec::truncating(entries),
        }
    }
}
