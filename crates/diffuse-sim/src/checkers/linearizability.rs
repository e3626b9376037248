//! Linearizability checking for histories of the replicated key-value store.
//!
//! A history is linearizable if every completed operation can be given a single
//! instant between its invocation and its completion at which it takes effect,
//! such that executing the operations one by one in the order of those instants
//! on a sequential [`KvStore`](diffuse_apps::KvStore) yields exactly the results
//! the clients saw. An operation that never completed (`Pending`) may take effect
//! at any instant after its invocation, or never, and its result is unconstrained.
//!
//! # Per-key checking
//!
//! Every [`KvOp`] touches exactly one key, and the operations on different keys
//! commute, so the store is a collection of independent registers. Linearizability
//! is *local* (Herlihy and Wing, 1990): a history is linearizable if and only if
//! its restriction to each object is. [`check`] therefore splits the history by key
//! and checks each key on its own, which keeps every search small.
//!
//! # Search
//!
//! Per key, the checker runs the Wing–Gong search with Lowe's memoization:
//!
//! * Operations are sorted by invocation time. Operation `a` must precede `b` when
//!   `a` completed no later than `b` was invoked and strictly before `b` completed
//!   (an invocation at the very instant of a completion comes after it; an
//!   operation that takes no time at all may still be ordered either way with
//!   another operation that completes at the same instant).
//! * At each step the candidates are the not-yet-linearized operations with no
//!   unlinearized predecessor: with `m` the earliest completion among the
//!   unlinearized completed operations, those invoked before `m`, plus those that
//!   complete at `m` themselves. The search tries each candidate against the
//!   model (a key's value, or absent), recursing on a match and backtracking
//!   otherwise. It succeeds once every completed operation is linearized; pending
//!   operations left over simply never took effect.
//! * A configuration is the set of linearized operations (bitsets) and the
//!   model's value. Reaching a configuration a second time cannot succeed where the
//!   first visit failed, so visited configurations are cached and pruned (Lowe).
//!   The cache also prunes a configuration that differs from a visited one only by
//!   having *more* pending operations linearized: any way to finish it also
//!   finishes the visited one, whose extra pending operations never take effect.
//!   Pending operations never expire, so without this each of them would double
//!   the state space for the rest of the history.
//! * Pending operations with identical effects are interchangeable; only the
//!   earliest-invoked one of them is tried at each step. Pending reads have no
//!   effect at all and are ignored.
//! * Each key's search is bounded by a step budget, reported as a violation when
//!   exhausted, so a pathological history can never hang a simulation.
//!
//! Values are interned to small integers before the search, so the model state is
//! a `u32` and applying an operation is a few comparisons. The search is
//! depth-first and its order depends only on the history, so the verdict and the
//! explanation are deterministic.

use crate::history::{Operation, Outcome};
use diffuse_apps::{KvOp, KvResult};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Search steps (attempts to linearize an operation) allowed per key.
const SEARCH_BUDGET: u64 = 2_000_000;
/// Sets of linearized pending operations remembered per set of linearized
/// completed operations and value.
const MAX_PENDING_SETS: usize = 64;
/// Bytes of a key or value shown in an explanation.
const MAX_SHOWN_BYTES: usize = 32;
/// Operations listed in an explanation.
const MAX_LISTED_OPS: usize = 8;
/// Characters of an explanation shown by `Display`.
const MAX_DISPLAY_CHARS: usize = 2000;

/// A history that no sequential order explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearizabilityViolation {
    /// The key whose operations are not linearizable.
    pub key: Vec<u8>,
    /// What went wrong, with the operations involved.
    pub explanation: String,
}

impl fmt::Display for LinearizabilityViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keep it on one line whatever the explanation holds.
        let explanation: String = self
            .explanation
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_DISPLAY_CHARS)
            .collect();
        let ellipsis = if self.explanation.chars().count() > MAX_DISPLAY_CHARS {
            "…"
        } else {
            ""
        };
        write!(
            f,
            "linearizability violation on key {}: {explanation}{ellipsis}",
            show_bytes(&self.key)
        )
    }
}

impl std::error::Error for LinearizabilityViolation {}

/// Checks a whole history, key by key.
///
/// Returns the first violation found, keys taken in byte order. Malformed
/// operations (completed before invoked, undecodable or error results, results of
/// the wrong kind) are violations by themselves. Exhausting the per-key search
/// budget is also reported as a violation, with an explanation saying so.
pub fn check(history: &[Operation]) -> Result<(), LinearizabilityViolation> {
    check_with_budget(history, SEARCH_BUDGET)
}

/// [`check`] with an explicit per-key step budget.
fn check_with_budget(history: &[Operation], budget: u64) -> Result<(), LinearizabilityViolation> {
    for op in history {
        validate(op)?;
    }
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.op.key()).or_default().push(op);
    }
    for (key, mut ops) in by_key {
        // Stable: equal invocation times keep their order in the history.
        ops.sort_by_key(|op| op.invoke_ns);
        check_key(key, &ops, budget)?;
    }
    Ok(())
}

/// Rejects operations that no execution can explain on their own.
fn validate(op: &Operation) -> Result<(), LinearizabilityViolation> {
    let Outcome::Completed { at_ns, result } = &op.outcome else {
        return Ok(());
    };
    let problem = if *at_ns < op.invoke_ns {
        "operation completed before it was invoked"
    } else {
        match (&op.op, result) {
            (_, Err(_)) => "result did not decode",
            (_, Ok(KvResult::Error(_))) => {
                "operation returned an error, which the workload never provokes"
            }
            (
                KvOp::Cas { expected, .. },
                Ok(KvResult::Swapped {
                    swapped: true,
                    previous,
                }),
            ) if expected.as_deref() != previous.as_deref() => {
                "compare-and-swap reports success but found a value other than the expected one"
            }
            (KvOp::Put { .. }, Ok(KvResult::Done))
            | (KvOp::Get { .. }, Ok(KvResult::Value(_)))
            | (KvOp::Cas { .. }, Ok(KvResult::Swapped { .. }))
            | (KvOp::Delete { .. }, Ok(KvResult::Deleted { .. })) => return Ok(()),
            _ => "result is of the wrong kind for the operation",
        }
    };
    Err(LinearizabilityViolation {
        key: op.op.key().to_vec(),
        explanation: format!("{problem}: {}", describe(op)),
    })
}

/// An operation compiled against interned values (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Store a value.
    Put(u32),
    /// A completed read that saw this value.
    Get(u32),
    /// Compare-and-swap, with the result (`swapped`, `previous`) if completed.
    Cas {
        expected: u32,
        new: u32,
        result: Option<(bool, u32)>,
    },
    /// Delete, with `existed` if completed.
    Delete(Option<bool>),
}

impl Step {
    /// The model's value after the step, or `None` if the step's result does not
    /// match the model in `state`.
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Step::Put(value) => Some(value),
            Step::Get(seen) => (seen == state).then_some(state),
            Step::Cas {
                expected,
                new,
                result,
            } => {
                let matches = state == expected;
                match result {
                    Some((swapped, previous)) if swapped != matches || previous != state => None,
                    _ => Some(if matches { new } else { state }),
                }
            }
            Step::Delete(existed) => match existed {
                Some(existed) if existed != (state != 0) => None,
                _ => Some(0),
            },
        }
    }
}

/// Interns values: 0 is "absent", `n > 0` is `values[n - 1]`.
#[derive(Default)]
struct Interner<'a> {
    ids: BTreeMap<&'a [u8], u32>,
    values: Vec<&'a [u8]>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, value: Option<&'a [u8]>) -> u32 {
        let Some(value) = value else { return 0 };
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        self.values.push(value);
        // More distinct values than `u32` holds is impossible in memory; saturate.
        let id = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.ids.insert(value, id);
        id
    }

    fn show(&self, id: u32) -> String {
        match id.checked_sub(1).and_then(|i| self.values.get(i as usize)) {
            Some(value) => show_bytes(value),
            None => "absent".to_owned(),
        }
    }
}

/// Checks the operations on one key, sorted by invocation time.
fn check_key(key: &[u8], ops: &[&Operation], budget: u64) -> Result<(), LinearizabilityViolation> {
    let violation = |explanation: String| LinearizabilityViolation {
        key: key.to_vec(),
        explanation,
    };
    // Pending reads have no effect and no result to explain.
    let ops: Vec<&Operation> = ops
        .iter()
        .copied()
        .filter(|op| !(op.completed_at().is_none() && matches!(op.op, KvOp::Get { .. })))
        .collect();

    // Intern every written value first: any observed value with a larger id was
    // never written by anyone.
    let mut interner = Interner::default();
    for op in &ops {
        match &op.op {
            KvOp::Put { value, .. } => {
                interner.id(Some(value));
            }
            KvOp::Cas { new, .. } => {
                interner.id(Some(new));
            }
            KvOp::Get { .. } | KvOp::Delete { .. } => {}
        }
    }
    let written = u32::try_from(interner.values.len()).unwrap_or(u32::MAX);

    let mut search = Search {
        steps: Vec::with_capacity(ops.len()),
        invoke: Vec::with_capacity(ops.len()),
        complete: Vec::with_capacity(ops.len()),
    };
    for op in &ops {
        let result = match &op.outcome {
            Outcome::Completed { result: Ok(r), .. } => Some(r),
            // Undecodable results were rejected by `validate`.
            Outcome::Completed { result: Err(_), .. } | Outcome::Pending => None,
        };
        let step = match (&op.op, result) {
            (KvOp::Put { value, .. }, _) => Step::Put(interner.id(Some(value))),
            (KvOp::Get { .. }, Some(KvResult::Value(seen))) => {
                Step::Get(interner.id(seen.as_deref()))
            }
            (KvOp::Cas { expected, new, .. }, result) => Step::Cas {
                expected: interner.id(expected.as_deref()),
                new: interner.id(Some(new)),
                result: match result {
                    Some(KvResult::Swapped { swapped, previous }) => {
                        Some((*swapped, interner.id(previous.as_deref())))
                    }
                    _ => None,
                },
            },
            (KvOp::Delete { .. }, result) => Step::Delete(match result {
                Some(KvResult::Deleted { existed }) => Some(*existed),
                _ => None,
            }),
            // A completed get always has a `Value` result after `validate`, and
            // pending gets were dropped; be defensive anyway.
            (KvOp::Get { .. }, _) => {
                return Err(violation(format!(
                    "read without a readable result: {}",
                    describe(op)
                )));
            }
        };
        let observed = match step {
            Step::Get(seen) => seen,
            Step::Cas {
                result: Some((_, previous)),
                ..
            } => previous,
            _ => 0,
        };
        if observed > written {
            return Err(violation(format!(
                "observed {}, which no operation on this key ever wrote: {}",
                interner.show(observed),
                describe(op)
            )));
        }
        search.steps.push(step);
        search.invoke.push(op.invoke_ns);
        search.complete.push(op.completed_at());
    }

    let list = |ids: &[usize], state: u32| -> String {
        let mut listed: Vec<String> = ids
            .iter()
            .take(MAX_LISTED_OPS)
            .map(|&i| {
                let fits = search.steps[i].apply(state).is_some();
                let note = if fits {
                    ""
                } else {
                    " (result impossible here)"
                };
                format!("{}{note}", describe(ops[i]))
            })
            .collect();
        if ids.len() > MAX_LISTED_OPS {
            listed.push(format!("and {} more", ids.len() - MAX_LISTED_OPS));
        }
        listed.join("; ")
    };
    match search.run(budget) {
        Verdict::Linearizable => Ok(()),
        Verdict::Stuck(deepest) => Err(violation(format!(
            "no sequential order explains the {} operations on this key: at best {} of {} \
             completed operations can be ordered, leaving the key {}, and no continuation \
             works from there; the next operation would be one of: {}",
            ops.len(),
            deepest.done,
            search.completed_count(),
            interner.show(deepest.state),
            list(&deepest.candidates, deepest.state)
        ))),
        Verdict::BudgetExhausted(deepest) => Err(violation(format!(
            "search budget of {budget} steps exhausted on the {} operations of this key, so \
             linearizability is undecided (at best {} of {} completed operations ordered, \
             leaving the key {}); next candidates: {}",
            ops.len(),
            deepest.done,
            search.completed_count(),
            interner.show(deepest.state),
            list(&deepest.candidates, deepest.state)
        ))),
    }
}

/// The outcome of one key's search.
enum Verdict {
    Linearizable,
    /// No linearization exists; the furthest configuration reached.
    Stuck(Deepest),
    /// The budget ran out; the furthest configuration reached.
    BudgetExhausted(Deepest),
}

/// The configuration with the most completed operations linearized.
struct Deepest {
    done: usize,
    state: u32,
    candidates: Vec<usize>,
}

/// One key's operations, indexed in invocation order.
struct Search {
    steps: Vec<Step>,
    invoke: Vec<u64>,
    /// Completion times; `None` for pending operations.
    complete: Vec<Option<u64>>,
}

/// Where the search stands at a node.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    /// The model's value.
    state: u32,
    /// Completed operations linearized so far.
    done: usize,
    /// Index into `Order::by_invoke` below which every operation is linearized.
    invoke_cursor: usize,
    /// Index into `Order::by_completion` below which every operation is
    /// linearized.
    completion_cursor: usize,
}

/// A node of the depth-first search.
struct Frame {
    /// The operation linearized to get here (`None` at the root).
    via: Option<usize>,
    at: Position,
    /// Operations that may be linearized next, in the order they are tried.
    candidates: Vec<usize>,
    /// The next candidate to try.
    next: usize,
}

/// Fixed indexes over the operations, built once per search.
struct Order {
    /// Completed operations by invocation time.
    by_invoke: Vec<usize>,
    /// Completed operations by completion time.
    by_completion: Vec<usize>,
    /// Pending operations by invocation time.
    pending: Vec<usize>,
    /// For each operation, its position in `pending` if it is pending.
    pending_position: Vec<Option<usize>>,
}

/// The current configuration, split for memoization.
struct Config {
    /// Bits of the linearized completed operations (by operation index),
    /// followed by one word holding the model's value.
    completed: Vec<u64>,
    /// Bits of the linearized pending operations (by position in `pending`).
    pending: Vec<u64>,
}

impl Config {
    fn is_linearized(&self, order: &Order, op: usize) -> bool {
        match order.pending_position.get(op).copied().flatten() {
            Some(position) => bit(&self.pending, position),
            None => bit(&self.completed, op),
        }
    }

    fn set(&mut self, order: &Order, op: usize, value: bool) {
        match order.pending_position.get(op).copied().flatten() {
            Some(position) => set_bit(&mut self.pending, position, value),
            None => set_bit(&mut self.completed, op, value),
        }
    }
}

/// Visited configurations: for each set of linearized completed operations and
/// model value, the minimal sets of linearized pending operations seen with them
/// (flattened, `pending.len()` words each).
///
/// A configuration is *subsumed* by a visited one with the same completed
/// operations and value and a subset of its pending operations: whatever
/// completes the former also completes the latter (the extra pending operations
/// just never take effect), so it cannot succeed where the visited one failed.
/// Without pending operations this is Lowe's exact-match cache.
#[derive(Default)]
struct Visited {
    map: HashMap<Box<[u64]>, Vec<u64>, BuildHasherDefault<FxHasher>>,
}

impl Visited {
    /// Records `config`; returns whether it was new (not subsumed).
    ///
    /// At most [`MAX_PENDING_SETS`] sets are kept per entry, bounding the work per
    /// visit; forgetting a visited configuration only costs pruning, never
    /// soundness.
    fn visit(&mut self, config: &Config) -> bool {
        let pending = &config.pending[..];
        let Some(entries) = self.map.get_mut(&config.completed[..]) else {
            self.map.insert(
                config.completed.clone().into_boxed_slice(),
                pending.to_vec(),
            );
            return true;
        };
        if pending.is_empty() {
            return false;
        }
        if entries
            .chunks_exact(pending.len())
            .any(|entry| is_subset(entry, pending))
        {
            return false;
        }
        // Keep the entries minimal: drop those the new one subsumes.
        let mut kept = Vec::with_capacity(entries.len() + pending.len());
        for entry in entries.chunks_exact(pending.len()) {
            if !is_subset(pending, entry) {
                kept.extend_from_slice(entry);
            }
        }
        if kept.len() < MAX_PENDING_SETS * pending.len() {
            kept.extend_from_slice(pending);
        }
        *entries = kept;
        true
    }
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small.iter().zip(large).all(|(s, l)| s & !l == 0)
}

impl Search {
    fn completed_count(&self) -> usize {
        self.complete.iter().filter(|c| c.is_some()).count()
    }

    fn run(&self, budget: u64) -> Verdict {
        let n = self.steps.len();
        let by_invoke: Vec<usize> = (0..n).filter(|&i| self.complete[i].is_some()).collect();
        let mut by_completion = by_invoke.clone();
        by_completion.sort_by_key(|&i| (self.complete[i], i));
        let pending: Vec<usize> = (0..n).filter(|&i| self.complete[i].is_none()).collect();
        let mut pending_position = vec![None; n];
        for (position, &i) in pending.iter().enumerate() {
            pending_position[i] = Some(position);
        }
        let order = Order {
            by_invoke,
            by_completion,
            pending_position,
            pending,
        };

        let words = n.div_ceil(64);
        let mut config = Config {
            completed: vec![0; words + 1],
            pending: vec![0; order.pending.len().div_ceil(64)],
        };
        let mut visited = Visited::default();

        let Some(root) = self.enter(&order, &config, None, Position::default()) else {
            return Verdict::Linearizable;
        };
        let mut deepest = Deepest {
            done: 0,
            state: 0,
            candidates: root.candidates.clone(),
        };
        let mut stack = vec![root];
        let mut steps: u64 = 0;
        while let Some(frame) = stack.last_mut() {
            let Some(&op) = frame.candidates.get(frame.next) else {
                if let Some(via) = stack.pop().and_then(|f| f.via) {
                    config.set(&order, via, false);
                }
                continue;
            };
            frame.next += 1;
            steps += 1;
            if steps > budget {
                return Verdict::BudgetExhausted(deepest);
            }
            let Some(state) = self.steps[op].apply(frame.at.state) else {
                continue;
            };
            config.set(&order, op, true);
            config.completed[words] = u64::from(state);
            if !visited.visit(&config) {
                config.set(&order, op, false);
                continue;
            }
            let at = Position {
                state,
                done: frame.at.done + usize::from(self.complete[op].is_some()),
                ..frame.at
            };
            let Some(child) = self.enter(&order, &config, Some(op), at) else {
                return Verdict::Linearizable;
            };
            if child.at.done > deepest.done {
                deepest = Deepest {
                    done: child.at.done,
                    state,
                    candidates: child.candidates.clone(),
                };
            }
            stack.push(child);
        }
        Verdict::Stuck(deepest)
    }

    /// The frame for a configuration, or `None` if every completed operation is
    /// linearized (success).
    fn enter(
        &self,
        order: &Order,
        config: &Config,
        via: Option<usize>,
        mut at: Position,
    ) -> Option<Frame> {
        while let Some(&i) = order.by_completion.get(at.completion_cursor) {
            if !bit(&config.completed, i) {
                break;
            }
            at.completion_cursor += 1;
        }
        let &first = order.by_completion.get(at.completion_cursor)?;
        // The earliest completion among the unlinearized completed operations.
        let deadline = self.complete[first].unwrap_or(u64::MAX);
        while let Some(&i) = order.by_invoke.get(at.invoke_cursor) {
            if !bit(&config.completed, i) {
                break;
            }
            at.invoke_cursor += 1;
        }
        let mut candidates = Vec::new();
        for &i in order.by_invoke.get(at.invoke_cursor..).unwrap_or_default() {
            let invoked = self.invoke[i];
            if invoked > deadline {
                break;
            }
            if !bit(&config.completed, i)
                && (invoked < deadline || self.complete[i] == Some(deadline))
            {
                candidates.push(i);
            }
        }
        // Pending operations last; of identical ones, only the earliest invoked.
        let completed_candidates = candidates.len();
        for &i in &order.pending {
            if self.invoke[i] >= deadline {
                break;
            }
            let duplicate = candidates[completed_candidates..]
                .iter()
                .any(|&j| self.steps[j] == self.steps[i]);
            if !config.is_linearized(order, i) && !duplicate {
                candidates.push(i);
            }
        }
        Some(Frame {
            via,
            at,
            candidates,
            next: 0,
        })
    }
}

fn bit(set: &[u64], i: usize) -> bool {
    set.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
}

fn set_bit(set: &mut [u64], i: usize, value: bool) {
    if let Some(w) = set.get_mut(i / 64) {
        if value {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// FxHash: a fast, deterministic hasher for the cache of visited configurations.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Bytes as a quoted, escaped, lossy UTF-8 string, truncated.
fn show_bytes(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_SHOWN_BYTES)];
    let text = format!("{:?}", String::from_utf8_lossy(shown));
    if shown.len() < bytes.len() {
        format!("{text}…({} bytes)", bytes.len())
    } else {
        text
    }
}

fn show_value(value: Option<&[u8]>) -> String {
    value.map_or_else(|| "absent".to_owned(), show_bytes)
}

/// One operation as `client op [invoke..complete] -> result`.
fn describe(op: &Operation) -> String {
    let what = match &op.op {
        KvOp::Put { value, .. } => format!("put({})", show_bytes(value)),
        KvOp::Get { .. } => "get".to_owned(),
        KvOp::Cas { expected, new, .. } => format!(
            "cas({} -> {})",
            show_value(expected.as_deref()),
            show_bytes(new)
        ),
        KvOp::Delete { .. } => "delete".to_owned(),
    };
    let (until, result) = match &op.outcome {
        Outcome::Pending => ("pending".to_owned(), "?".to_owned()),
        Outcome::Completed { at_ns, result } => (
            format!("{at_ns}ns"),
            match result {
                Ok(KvResult::Done) => "done".to_owned(),
                Ok(KvResult::Value(value)) => show_value(value.as_deref()),
                Ok(KvResult::Swapped { swapped, previous }) => format!(
                    "{} (found {})",
                    if *swapped { "swapped" } else { "not swapped" },
                    show_value(previous.as_deref())
                ),
                Ok(KvResult::Deleted { existed }) => {
                    if *existed { "existed" } else { "did not exist" }.to_owned()
                }
                Ok(KvResult::Error(message)) => format!("error {}", show_bytes(message)),
                Err(bytes) => format!("undecodable ({} bytes)", bytes.len()),
            },
        ),
    };
    format!(
        "{} {what} [{}ns..{until}] -> {result}",
        op.client, op.invoke_ns
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffuse_apps::KvStore;
    use diffuse_apps::kv::Value;
    use diffuse_core::ids::ClientId;

    fn val(v: &str) -> Value {
        Value::try_from_vec(v.as_bytes().to_vec()).unwrap()
    }

    fn done(client: u32, op: KvOp, invoke_ns: u64, at_ns: u64, result: KvResult) -> Operation {
        Operation {
            client: ClientId(client),
            op,
            invoke_ns,
            outcome: Outcome::Completed {
                at_ns,
                result: Ok(result),
            },
        }
    }

    fn pending(client: u32, op: KvOp, invoke_ns: u64) -> Operation {
        Operation {
            client: ClientId(client),
            op,
            invoke_ns,
            outcome: Outcome::Pending,
        }
    }

    fn put(c: u32, k: &str, v: &str, i: u64, a: u64) -> Operation {
        done(
            c,
            KvOp::put(k.as_bytes(), v.as_bytes()),
            i,
            a,
            KvResult::Done,
        )
    }

    fn get(c: u32, k: &str, seen: Option<&str>, i: u64, a: u64) -> Operation {
        done(
            c,
            KvOp::get(k.as_bytes()),
            i,
            a,
            KvResult::Value(seen.map(val)),
        )
    }

    fn cas(
        c: u32,
        k: &str,
        expected: Option<&str>,
        new: &str,
        (i, a): (u64, u64),
        swapped: bool,
        previous: Option<&str>,
    ) -> Operation {
        done(
            c,
            KvOp::cas(k.as_bytes(), expected.map(str::as_bytes), new.as_bytes()),
            i,
            a,
            KvResult::Swapped {
                swapped,
                previous: previous.map(val),
            },
        )
    }

    fn del(c: u32, k: &str, existed: bool, i: u64, a: u64) -> Operation {
        done(
            c,
            KvOp::delete(k.as_bytes()),
            i,
            a,
            KvResult::Deleted { existed },
        )
    }

    fn assert_violation(history: &[Operation], key: &str, needle: &str) {
        let err = check(history).expect_err("history should not be linearizable");
        assert_eq!(err.key, key.as_bytes());
        let line = err.to_string();
        assert!(line.contains(needle), "{needle:?} not in: {line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn empty_history_passes() {
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn sequential_history_passes() {
        let h = [
            get(1, "k", None, 0, 1),
            put(1, "k", "a", 2, 3),
            get(2, "k", Some("a"), 4, 5),
            put(3, "j", "x", 4, 5),
            cas(1, "k", Some("a"), "b", (6, 7), true, Some("a")),
            cas(2, "k", Some("a"), "c", (8, 9), false, Some("b")),
            del(1, "k", true, 10, 11),
            get(2, "k", None, 12, 13),
            get(2, "j", Some("x"), 14, 15),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_after_completed_put_fails() {
        let h = [
            put(1, "k", "a", 0, 10),
            put(1, "k", "b", 20, 30),
            get(2, "k", Some("a"), 40, 50),
        ];
        assert_violation(&h, "k", "no sequential order");
        // The same read overlapping the second put is fine.
        let h = [
            put(1, "k", "a", 0, 10),
            put(1, "k", "b", 20, 30),
            get(2, "k", Some("a"), 25, 50),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn concurrent_put_and_get_pass_in_either_order() {
        for seen in [None, Some("a")] {
            let h = [put(1, "k", "a", 0, 100), get(2, "k", seen, 10, 20)];
            assert_eq!(check(&h), Ok(()), "read saw {seen:?}");
        }
        // Once the put has completed, the old value is gone.
        let h = [put(1, "k", "a", 0, 100), get(2, "k", None, 101, 120)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn read_of_value_never_written_fails() {
        let h = [put(1, "k", "a", 0, 10), get(2, "k", Some("zzz"), 5, 20)];
        assert_violation(&h, "k", "ever wrote");
        // A value written only to another key does not count.
        let h = [put(1, "j", "zzz", 0, 10), get(2, "k", Some("zzz"), 20, 30)];
        assert_violation(&h, "k", "ever wrote");
    }

    #[test]
    fn cas_semantics() {
        // Succeeds on an absent key when expecting absence.
        assert_eq!(check(&[cas(1, "k", None, "a", (0, 1), true, None)]), Ok(()));
        // Cannot fail when the expected value is there.
        assert!(check(&[cas(1, "k", None, "a", (0, 1), false, None)]).is_err());
        // Fails, reporting what it found, and leaves the value alone.
        let h = [
            put(1, "k", "a", 0, 1),
            cas(1, "k", Some("b"), "c", (2, 3), false, Some("a")),
            get(1, "k", Some("a"), 4, 5),
        ];
        assert_eq!(check(&h), Ok(()));
        // A failed cas must not install its value.
        let h = [
            put(1, "k", "a", 0, 1),
            cas(1, "k", Some("b"), "c", (2, 3), false, Some("a")),
            get(1, "k", Some("c"), 4, 5),
        ];
        assert!(check(&h).is_err());
        // A successful cas installs its value.
        let h = [
            put(1, "k", "a", 0, 1),
            cas(1, "k", Some("a"), "c", (2, 3), true, Some("a")),
            get(1, "k", Some("c"), 4, 5),
        ];
        assert_eq!(check(&h), Ok(()));
        // Wrong `previous` on a failed cas.
        let h = [
            put(1, "k", "a", 0, 1),
            put(1, "k", "b", 2, 3),
            cas(2, "k", Some("x"), "c", (4, 5), false, Some("a")),
        ];
        assert!(check(&h).is_err());
        // Success with a `previous` that differs from `expected` is self-contradictory.
        let h = [
            put(1, "k", "a", 0, 1),
            cas(1, "k", Some("b"), "c", (2, 3), true, Some("a")),
        ];
        assert_violation(&h, "k", "other than the expected one");
        // Two concurrent cas from absent: exactly one can win.
        let one_wins = [
            cas(1, "k", None, "a", (0, 10), true, None),
            cas(2, "k", None, "b", (0, 10), false, Some("a")),
        ];
        assert_eq!(check(&one_wins), Ok(()));
        let both_win = [
            cas(1, "k", None, "a", (0, 10), true, None),
            cas(2, "k", None, "b", (0, 10), true, None),
        ];
        assert!(check(&both_win).is_err());
    }

    #[test]
    fn delete_and_existed() {
        assert_eq!(check(&[del(1, "k", false, 0, 1)]), Ok(()));
        assert!(check(&[del(1, "k", true, 0, 1)]).is_err());
        let h = [
            put(1, "k", "a", 0, 1),
            del(1, "k", true, 2, 3),
            get(1, "k", None, 4, 5),
            del(1, "k", false, 6, 7),
        ];
        assert_eq!(check(&h), Ok(()));
        let h = [put(1, "k", "a", 0, 1), del(1, "k", false, 2, 3)];
        assert_violation(&h, "k", "did not exist");
        let h = [
            put(1, "k", "a", 0, 1),
            del(1, "k", true, 2, 3),
            get(1, "k", Some("a"), 4, 5),
        ];
        assert!(check(&h).is_err());
        // Two concurrent deletes of a present key: only one finds it.
        let h = [
            put(1, "k", "a", 0, 1),
            del(1, "k", true, 2, 10),
            del(2, "k", true, 2, 10),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn pending_operations() {
        // A pending put whose effect is observed later.
        let h = [
            pending(1, KvOp::put(b"k", b"a"), 0),
            get(2, "k", None, 5, 10),
            get(2, "k", Some("a"), 1000, 1010),
        ];
        assert_eq!(check(&h), Ok(()));
        // A pending put never observed.
        let h = [
            put(2, "k", "b", 0, 3),
            pending(1, KvOp::put(b"k", b"a"), 5),
            get(2, "k", Some("b"), 10, 20),
            get(2, "k", Some("b"), 30, 40),
        ];
        assert_eq!(check(&h), Ok(()));
        // A pending put cannot take effect before it was invoked.
        let h = [
            get(2, "k", Some("a"), 0, 10),
            pending(1, KvOp::put(b"k", b"a"), 20),
        ];
        assert!(check(&h).is_err());
        // Nor take effect twice: a -> b -> a needs a second write of "a".
        let h = [
            pending(1, KvOp::put(b"k", b"a"), 0),
            get(2, "k", Some("a"), 10, 20),
            put(2, "k", "b", 30, 40),
            get(2, "k", Some("a"), 50, 60),
        ];
        assert!(check(&h).is_err());
        // A pending delete and cas, and a pending read that constrains nothing.
        let h = [
            put(1, "k", "a", 0, 1),
            pending(2, KvOp::delete(b"k"), 2),
            pending(3, KvOp::cas(b"k", None, b"z"), 3),
            pending(4, KvOp::get(b"k"), 4),
            get(1, "k", Some("z"), 50, 60),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn opposite_orders_of_concurrent_writes_fail() {
        let h = [
            put(1, "k", "a", 0, 100),
            put(2, "k", "b", 0, 100),
            get(3, "k", Some("a"), 10, 20),
            get(3, "k", Some("b"), 30, 40),
            get(4, "k", Some("b"), 10, 20),
            get(4, "k", Some("a"), 30, 40),
        ];
        assert_violation(&h, "k", "no sequential order");
        // Each reader alone is fine.
        assert_eq!(check(&h[..4]), Ok(()));
        assert_eq!(check(&[&h[..2], &h[4..]].concat()), Ok(()));
    }

    #[test]
    fn malformed_operations_fail() {
        let undecodable = Operation {
            client: ClientId(1),
            op: KvOp::get(b"k"),
            invoke_ns: 0,
            outcome: Outcome::Completed {
                at_ns: 1,
                result: Err(vec![0xff, 0x00]),
            },
        };
        assert_violation(&[undecodable], "k", "did not decode");

        let error = done(
            1,
            KvOp::put(b"k", b"a"),
            0,
            1,
            KvResult::Error(diffuse_core::codec::Blob::try_from_vec(b"full".to_vec()).unwrap()),
        );
        assert_violation(&[error], "k", "returned an error");

        let backwards = put(1, "k", "a", 10, 5);
        assert_violation(&[backwards], "k", "completed before it was invoked");

        let wrong_kind = done(1, KvOp::get(b"k"), 0, 1, KvResult::Done);
        assert_violation(&[wrong_kind], "k", "wrong kind");
    }

    #[test]
    fn duplicate_and_zero_length_intervals() {
        // Everything at the same instant: any order will do.
        let h = [
            put(1, "k", "a", 5, 5),
            get(2, "k", Some("a"), 5, 5),
            get(3, "k", None, 5, 5),
        ];
        assert_eq!(check(&h), Ok(()));
        // An invocation at the instant of another completion comes after it.
        let h = [put(1, "k", "a", 0, 5), get(1, "k", None, 5, 9)];
        assert!(check(&h).is_err());
        let h = [put(1, "k", "a", 0, 5), get(1, "k", Some("a"), 5, 9)];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn display_is_one_readable_truncated_line() {
        let long = "v".repeat(500);
        let mut h = vec![put(1, "key\nwith newline", &long, 0, 1)];
        for i in 0..40 {
            h.push(get(i + 2, "key\nwith newline", None, 10, 20));
        }
        let err = check(&h).unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains(r#""key\nwith newline""#), "{line}");
        assert!(line.contains("c2 get [10ns..20ns] -> absent"), "{line}");
        assert!(line.contains("500 bytes"), "{line}");
        assert!(line.contains("more"), "{line}");
        assert!(line.len() < 2500, "{} chars", line.len());
    }

    #[test]
    fn budget_exhaustion_is_reported() {
        let h = generate(&mut Rng(7), 300, 5, &["k"], 4, 2);
        assert_eq!(check(&h), Ok(()));
        let err = check_with_budget(&h, 50).unwrap_err();
        assert!(err.explanation.contains("budget"), "{err}");
    }

    /// splitmix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
    }

    fn random_value(rng: &mut Rng, values: u64) -> Option<Vec<u8>> {
        let v = rng.below(values + 1);
        (v < values).then(|| format!("v{v}").into_bytes())
    }

    fn random_op(rng: &mut Rng, keys: &[&str], values: u64) -> KvOp {
        let key = rng.pick(keys).as_bytes();
        let value = format!("v{}", rng.below(values)).into_bytes();
        match rng.below(4) {
            0 => KvOp::put(key, &value),
            1 => KvOp::get(key),
            2 => KvOp::cas(key, random_value(rng, values).as_deref(), &value),
            _ => KvOp::delete(key),
        }
    }

    /// A history from a real sequential execution: operations take effect at
    /// strictly increasing instants, each inside a random interval; clients are
    /// sequential. Some operations stay pending, having taken effect or not; a
    /// fresh client then takes the place of the one left waiting.
    fn generate(
        rng: &mut Rng,
        n_ops: usize,
        clients: usize,
        keys: &[&str],
        values: u64,
        pending_percent: u64,
    ) -> Vec<Operation> {
        let mut store = KvStore::default();
        // Per client slot: its current id and when it is next free.
        let mut ids: Vec<u32> = (0..clients).map(|c| u32::try_from(c).unwrap()).collect();
        let mut next_id = ids.len() as u32;
        let mut ready: Vec<u64> = vec![0; clients];
        let mut now = 0;
        let mut history = Vec::new();
        for _ in 0..n_ops {
            now += 1 + rng.below(5);
            now = now.max(ready.iter().min().unwrap() + 1);
            let free: Vec<usize> = (0..clients).filter(|&c| ready[c] < now).collect();
            let c = rng.pick(&free);
            let invoke_ns = now - rng.below((now - ready[c]).min(20));
            let op = random_op(rng, keys, values);
            if rng.percent(pending_percent) {
                if rng.percent(50) {
                    store.apply(op.clone());
                }
                history.push(pending(ids[c], op, invoke_ns));
                ids[c] = next_id;
                next_id += 1;
                ready[c] = invoke_ns;
            } else {
                let at_ns = now + rng.below(30);
                let result = store.apply(op.clone());
                ready[c] = at_ns;
                history.push(done(ids[c], op, invoke_ns, at_ns, result));
            }
        }
        history
    }

    #[test]
    fn random_linearizable_histories_pass() {
        let mut rng = Rng(1);
        for trial in 0..300 {
            let clients = 1 + rng.below(6) as usize;
            let keys: &[&str] = if trial % 2 == 0 {
                &["k"]
            } else {
                &["a", "b", "c"]
            };
            let n = 1 + rng.below(120) as usize;
            let h = generate(&mut rng, n, clients, keys, 3, 3);
            if let Err(e) = check(&h) {
                panic!("trial {trial}: {e}\n{h:#?}");
            }
        }
    }

    #[test]
    fn mutated_results_are_detected() {
        let mut rng = Rng(2);
        let (mut trials, mut detected) = (0, 0);
        for _ in 0..400 {
            let h = generate(&mut rng, 40, 3, &["k"], 3, 0);
            assert_eq!(check(&h), Ok(()));
            let targets: Vec<usize> = (0..h.len())
                .filter(|&i| !matches!(h[i].op, KvOp::Put { .. }))
                .collect();
            if targets.is_empty() {
                continue;
            }
            let i = rng.pick(&targets);
            let mut mutated = h.clone();
            let Outcome::Completed {
                result: Ok(result), ..
            } = &mut mutated[i].outcome
            else {
                unreachable!("no pending operations were generated")
            };
            match result {
                KvResult::Value(seen) => {
                    let original = seen.clone();
                    while *seen == original {
                        *seen = random_value(&mut rng, 3).map(|v| Value::try_from_vec(v).unwrap());
                    }
                }
                KvResult::Swapped { swapped, .. } => *swapped = !*swapped,
                KvResult::Deleted { existed } => *existed = !*existed,
                other => unreachable!("unexpected result {other:?}"),
            }
            trials += 1;
            if check(&mutated).is_err() {
                detected += 1;
            }
        }
        println!("detected {detected} of {trials} mutations");
        assert!(detected >= 1, "no mutation detected in {trials} trials");
        assert!(
            detected * 2 > trials,
            "only {detected} of {trials} detected"
        );
    }

    /// Brute force over every order that respects real time, with the real store.
    fn brute_force(ops: &[Operation]) -> bool {
        fn precedes(a: &Operation, b: &Operation) -> bool {
            match (a.completed_at(), b.completed_at()) {
                (Some(ca), Some(cb)) => ca <= b.invoke_ns && ca < cb,
                (Some(ca), None) => ca <= b.invoke_ns,
                (None, _) => false,
            }
        }
        fn go(ops: &[Operation], placed: &mut Vec<bool>, store: &KvStore) -> bool {
            let remaining_completed =
                (0..ops.len()).any(|i| !placed[i] && ops[i].completed_at().is_some());
            if !remaining_completed {
                return true;
            }
            for i in 0..ops.len() {
                if placed[i]
                    || (0..ops.len()).any(|j| !placed[j] && j != i && precedes(&ops[j], &ops[i]))
                {
                    continue;
                }
                let mut next = store.clone();
                let actual = next.apply(ops[i].op.clone());
                let fits = match &ops[i].outcome {
                    Outcome::Pending => true,
                    Outcome::Completed { result, .. } => result.as_ref() == Ok(&actual),
                };
                if fits {
                    placed[i] = true;
                    let ok = go(ops, placed, &next);
                    placed[i] = false;
                    if ok {
                        return true;
                    }
                }
            }
            false
        }
        go(ops, &mut vec![false; ops.len()], &KvStore::default())
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        let mut rng = Rng(3);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3000 {
            let n = 1 + rng.below(6) as usize;
            let mut h = Vec::new();
            for c in 0..n {
                let op = random_op(&mut rng, &["k"], 2);
                let invoke_ns = rng.below(12);
                let client = u32::try_from(c).unwrap();
                if rng.percent(15) {
                    h.push(pending(client, op, invoke_ns));
                    continue;
                }
                let result = match &op {
                    KvOp::Put { .. } => KvResult::Done,
                    KvOp::Get { .. } => KvResult::Value(
                        random_value(&mut rng, 2).map(|v| Value::try_from_vec(v).unwrap()),
                    ),
                    KvOp::Cas { .. } => KvResult::Swapped {
                        swapped: rng.percent(50),
                        previous: random_value(&mut rng, 2)
                            .map(|v| Value::try_from_vec(v).unwrap()),
                    },
                    KvOp::Delete { .. } => KvResult::Deleted {
                        existed: rng.percent(50),
                    },
                };
                let at_ns = invoke_ns + rng.below(6);
                h.push(done(client, op, invoke_ns, at_ns, result));
            }
            let expected = brute_force(&h);
            assert_eq!(check(&h).is_ok(), expected, "{h:#?}\n{:?}", check(&h));
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 300 && no > 300, "{yes} linearizable, {no} not");
    }

    #[test]
    fn three_hundred_ops_five_clients_one_key() {
        for seed in 10..15 {
            let h = generate(&mut Rng(seed), 300, 5, &["k"], 4, 1);
            assert_eq!(h.len(), 300);
            assert_eq!(check(&h), Ok(()));
        }
    }
}
