//! What a replica logs of its view's stream: every position it takes since the
//! log's start, with the content its certificate binds (`crate::view_log`). The
//! log starts at the view's NEW-VIEW (genesis in view 0) and moves up to a stable
//! checkpoint's COMMIT once one in the view is known. It is written to disk only
//! at a scheduled shutdown (`super::durable`).

use crate::checkpoint::CheckpointProof;
use crate::message::Position;
use crate::view_log::{LogEntry, MAX_LOG_ENTRIES, NewViewHeader, ViewLog, start_of};
use diffuse_core::codec::BoundedVec;
use std::collections::BTreeMap;

/// The positions of the current view taken since the log's start.
#[derive(Debug, Default)]
pub(crate) struct PositionLog {
    /// The view's NEW-VIEW (`None` in view 0).
    base: Option<NewViewHeader>,
    entries: BTreeMap<Position, LogEntry>,
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
        }
    }

    /// Replaces this log with `next` (another view's, or one taken whole).
    pub(crate) fn replace(&mut self, next: PositionLog) {
        *self = next;
    }

    /// The positions taken, in order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&Position, &LogEntry)> {
        self.entries.iter()
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
        self.entries.insert(at, entry);
    }

    /// Drops everything up to the log's new start for `checkpoint`, if that is in
    /// `view`.
    pub(crate) fn truncate(&mut self, view: u64, checkpoint: &CheckpointProof) {
        if let Some(start) = start_of(view, Some(checkpoint)) {
            let kept = self
                .entries
                .split_off(&(start.0, start.1.saturating_add(1)));
            self.entries = kept;
        }
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
