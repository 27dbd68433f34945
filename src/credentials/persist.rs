//! Keeping `sequence.json` ahead of the Sender Sequence Numbers in use (RFC 8613 App. B.1.1).
//!
//! Every open context has a `Shared` state. Callers take numbers lock-free from its
//! `SenderSequence`; when the headroom below the persisted mark falls under half the current
//! chunk, the caller sets a flag and sends the context down a channel (one atomic swap and
//! one channel send per threshold crossing, nothing else on the request path). A single
//! background thread serves all contexts of a process: it takes every queued context as one
//! batch, doubles each one's chunk (10 up to 10000, as aiocoap), writes all new marks
//! durably as a group (`write_sequence_files`: one `syncfs` per filesystem instead of one
//! journal commit per file, so many busy contexts do not make it fsync-bound), and only then
//! raises each limit in memory and wakes any caller that ran into it.
//!
//! Why one std thread and not tokio: the writes are blocking (fsync) and must go on while a
//! runtime shuts down and in programs without one (`check`, tests); a dedicated thread is
//! simpler than `spawn_blocking` and never competes with the runtime's blocking pool.
//! One thread for all contexts keeps thousands of contexts cheap; the marks are raised early
//! enough (half a chunk ahead) that the queue has time to drain before anyone waits.
//!
//! While running, the file always says `"received": "unknown"`: a crash then leads to
//! App. B.1.2 recovery rather than to a stale window. The real window is written at close.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::lock::ContextLock;
use super::sequence_file::{
    swap_in_sequence_file, write_sequence_file, write_sequence_files, Received, SequenceFileError,
    SequenceState,
};
use crate::oscore::sequence::MAX_SENDER_SEQUENCE_NUMBER;
use crate::oscore::{ReplayWindow, SenderSequence};

/// First chunk by which the mark runs ahead (aiocoap's `sequence_number_chunksize_start`).
pub const CHUNK_START: u64 = 10;
/// Largest chunk (aiocoap's `sequence_number_chunksize_limit`): at most this many numbers
/// (plus half a chunk of headroom) are skipped after a crash.
pub const CHUNK_LIMIT: u64 = 10_000;
/// The mark never needs to go beyond this: numbers above 2^40-1 are never used.
const MARK_CAP: u64 = MAX_SENDER_SEQUENCE_NUMBER + 1;

/// Counter of successful `sequence.json` writes; label `reason` = open | raise | close.
pub const METRIC_PERSIST_TOTAL: &str = "oscore_sequence_persist_total";
/// Histogram of the time one durable write took (temp file, fsync, rename, directory fsync).
pub const METRIC_PERSIST_SECONDS: &str = "oscore_sequence_persist_seconds";
/// Counter of failed writes; label `reason` as above.
pub const METRIC_PERSIST_ERRORS: &str = "oscore_sequence_persist_errors_total";
/// Counter of callers that had to wait for the persister (the mark was reached).
pub const METRIC_SEQUENCE_WAITS: &str = "oscore_sequence_wait_total";

pub(crate) type Job = Arc<Shared>;

/// Most contexts the persister raises in one batch (one group of durable writes).
const MAX_BATCH: usize = 4096;

/// The background thread's end of the channel: waits for a job, then takes every job
/// already queued (up to `MAX_BATCH`) and raises their marks as one batch.
pub(crate) fn run(jobs: Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        raise_marks(&batch);
    }
}

/// The persister's job for a batch of contexts: for each whose headroom is below half a
/// chunk, double its chunk and plan the new mark; write all planned marks durably as one
/// group (`write_sequence_files`); then, for each write that succeeded, let callers use the
/// numbers below its mark. Each context's `io` lock is held from planning until its limit
/// is raised, so a concurrent `close` cannot be overwritten by a stale mark.
fn raise_marks(batch: &[Job]) {
    // Cleared first: a nudge that arrives while we write queues another job, which then
    // finds nothing to do unless the headroom is low again.
    for shared in batch {
        shared.nudged.store(false, Ordering::Release);
    }
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    // (context, its io guard, planned chunk and mark)
    let mut planned = Vec::new();
    let mut done: Vec<&Shared> = Vec::with_capacity(batch.len());
    for shared in batch {
        if !seen.insert(Arc::as_ptr(shared)) {
            continue;
        }
        done.push(shared);
        let io = lock(&shared.io);
        if let Some((chunk, mark)) = shared.plan_raise(&io) {
            planned.push((&**shared, io, chunk, mark));
        }
    }
    let items: Vec<(&Path, SequenceState)> = planned
        .iter()
        .map(|(shared, _, _, mark)| {
            let state = SequenceState {
                next_to_send: *mark,
                received: Received::Unknown,
            };
            (shared.dir(), state)
        })
        .collect();
    let started = Instant::now();
    let results = write_sequence_files(&items);
    let per_write = started.elapsed().as_secs_f64() / items.len().max(1) as f64;
    let mut outcomes = std::collections::HashMap::with_capacity(planned.len());
    for ((shared, mut io, chunk, mark), result) in planned.into_iter().zip(results) {
        match result {
            Ok(()) => {
                metrics::counter!(METRIC_PERSIST_TOTAL, "reason" => "raise").increment(1);
                metrics::histogram!(METRIC_PERSIST_SECONDS, "reason" => "raise").record(per_write);
                // App. B.1.1: the mark is on disk; only now may numbers below it go out.
                shared.sequence.raise_persisted_limit(mark);
                io.chunk = chunk;
                shared.chunk.store(chunk, Ordering::Relaxed);
                outcomes.insert(shared as *const Shared, Ok(()));
            }
            Err(e) => {
                metrics::counter!(METRIC_PERSIST_ERRORS, "reason" => "raise").increment(1);
                tracing::error!("{e}");
                outcomes.insert(shared as *const Shared, Err(e.to_string()));
            }
        }
        drop(io);
    }
    for shared in done {
        let mut w = lock(&shared.wait);
        w.generation += 1;
        match outcomes.remove(&(shared as *const Shared)) {
            Some(Ok(())) => w.failure = None,
            Some(Err(message)) => w.failure = Some(message),
            None => {}
        }
        drop(w);
        shared.wake_all();
    }
}

/// Locks, ignoring poisoning: the data behind these mutexes stays consistent at every
/// point where a panic could occur.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-context state shared by the handles, the persister thread and waiting callers.
///
/// `repr(C, align(64))` with the fields every request touches first: the Sender Sequence
/// counter, the chunk and the two flags share one cache line. With 10 000 contexts in
/// round-robin use every context is cold when its turn comes; the counter in its own `Arc`
/// was one more cache miss per request (callgrind's cache simulation, `benches/scale.sh`).
#[repr(C, align(64))]
pub(crate) struct Shared {
    pub(crate) sequence: SenderSequence,
    /// The current chunk, read by callers for the threshold (written under `io`).
    chunk: AtomicU64,
    /// A job for this context is queued (cleared when the persister starts on it).
    nudged: AtomicBool,
    closed: AtomicBool,
    pub(crate) dir: PathBuf,
    pub(crate) replay_window: Arc<Mutex<ReplayWindow>>,
    /// Serialises every write of `sequence.json` and the release of the lock.
    io: Mutex<Io>,
    pub(crate) wait: Mutex<WaitState>,
    pub(crate) cond: Condvar,
    pub(crate) notify: tokio::sync::Notify,
    jobs: Sender<Job>,
}

// The hot fields stay in the first cache line (a field added in front of them would push
// one out, and the layout would silently cost a miss per request again).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(align_of::<Shared>() == 64);
    assert!(offset_of!(Shared, sequence) + size_of::<SenderSequence>() <= 64);
    assert!(offset_of!(Shared, chunk) + size_of::<AtomicU64>() <= 64);
    assert!(offset_of!(Shared, nudged) < 64);
    assert!(offset_of!(Shared, closed) < 64);
};

struct Io {
    closed: bool,
    chunk: u64,
    lock: Option<ContextLock>,
}

/// What waiting callers look at after a wake-up.
pub(crate) struct WaitState {
    /// Bumped after every job and at close.
    pub(crate) generation: u64,
    /// Set when the last attempt to raise the mark failed; cleared by a success.
    pub(crate) failure: Option<String>,
}

impl Shared {
    pub(crate) fn new(
        dir: PathBuf,
        sequence: SenderSequence,
        replay_window: Arc<Mutex<ReplayWindow>>,
        lock: ContextLock,
        jobs: Sender<Job>,
    ) -> Self {
        Self {
            sequence,
            chunk: AtomicU64::new(CHUNK_START),
            nudged: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            dir,
            replay_window,
            io: Mutex::new(Io {
                closed: false,
                chunk: CHUNK_START,
                lock: Some(lock),
            }),
            wait: Mutex::new(WaitState {
                generation: 0,
                failure: None,
            }),
            cond: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            jobs,
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn chunk(&self) -> u64 {
        self.chunk.load(Ordering::Relaxed)
    }

    /// Whether a caller that ran into the mark can try again.
    pub(crate) fn can_retry(&self) -> bool {
        self.is_closed() || self.sequence.headroom() > 0
    }

    /// Called after every successful reservation: asks for a higher mark once the
    /// headroom is below half a chunk.
    pub(crate) fn after_reserve(self: &Arc<Self>) {
        if self.sequence.headroom() < self.chunk() / 2 {
            self.nudge();
        }
    }

    /// Makes sure a job for this context is queued. Returns false if the persister
    /// thread is gone.
    pub(crate) fn nudge(self: &Arc<Self>) -> bool {
        // A plain load first: while a job is pending, callers only read the flag and do
        // not contend on its cache line.
        if self.nudged.load(Ordering::Acquire) || self.nudged.swap(true, Ordering::AcqRel) {
            return true;
        }
        if self.jobs.send(Arc::clone(self)).is_err() {
            self.nudged.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// One durable write, counted and timed. While the context is open the write goes
    /// through the directory's spare; the write at close removes the spare again.
    pub(crate) fn write(
        &self,
        state: SequenceState,
        reason: WriteReason,
    ) -> Result<(), SequenceFileError> {
        let started = Instant::now();
        let result = match reason {
            WriteReason::Open => swap_in_sequence_file(&self.dir, &state),
            WriteReason::Close => write_sequence_file(&self.dir, &state),
        };
        let reason = reason.label();
        match &result {
            Ok(()) => {
                metrics::counter!(METRIC_PERSIST_TOTAL, "reason" => reason).increment(1);
                metrics::histogram!(METRIC_PERSIST_SECONDS, "reason" => reason)
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                metrics::counter!(METRIC_PERSIST_ERRORS, "reason" => reason).increment(1);
                tracing::error!("{e}");
            }
        }
        result
    }

    /// Under `io`: if the headroom is below half a chunk, the doubled chunk and the new
    /// mark to write; `None` if nothing is to be done.
    fn plan_raise(&self, io: &Io) -> Option<(u64, u64)> {
        let limit = self.sequence.persisted_limit();
        if io.closed {
            None
        } else if limit >= MARK_CAP {
            // Nothing left to persist; keep the flag set so callers stop nudging.
            self.nudged.store(true, Ordering::Release);
            None
        } else if self.sequence.headroom() >= (io.chunk / 2).max(1) {
            None
        } else {
            let chunk = (io.chunk * 2).min(CHUNK_LIMIT);
            Some((chunk, (limit + chunk).min(MARK_CAP)))
        }
    }

    fn wake_all(&self) {
        self.cond.notify_all();
        self.notify.notify_waiters();
    }

    /// Clean shutdown: write the exact `next-to-send` and the real replay window, then
    /// delete and unlock `lock`. Idempotent. Afterwards the in-memory sequence hands out
    /// nothing and the window accepts nothing, so numbers used after the final write, or a
    /// replay accepted after it, cannot happen even through other clones of the Arcs.
    pub(crate) fn close(&self) -> Result<(), CloseError> {
        let mut io = lock(&self.io);
        if io.closed {
            return Ok(());
        }
        io.closed = true;
        self.closed.store(true, Ordering::Release);

        let next_to_send = drain(&self.sequence);
        let received = {
            let mut window = lock(&self.replay_window);
            let state = window.state();
            let size = window.size();
            *window = ReplayWindow::uninitialized(size);
            state.map_or(Received::Unknown, Received::Window)
        };
        let written = self.write(
            SequenceState {
                next_to_send,
                received,
            },
            WriteReason::Close,
        );
        // Released even if the write failed: the file then still holds the last mark and
        // "unknown", which is safe for whoever opens the context next.
        let released = io.lock.take().map_or(Ok(()), ContextLock::release);
        drop(io);

        lock(&self.wait).generation += 1;
        self.wake_all();
        written.map_err(CloseError::Write)?;
        released.map_err(CloseError::Unlock)
    }
}

/// Why `Shared::write` writes (the `reason` label of the persist metrics); raises go
/// through `raise_marks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteReason {
    Open,
    Close,
}

impl WriteReason {
    fn label(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Close => "close",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("{0}")]
    Write(#[source] SequenceFileError),
    #[error("{0}")]
    Unlock(#[source] super::lock::LockError),
}

/// Takes every number still below the persisted limit, so that nobody can use one after the
/// final write, and returns the exact next-to-send: the first number we took, if all of
/// them were ours (nobody else reserved concurrently); otherwise the limit, which is safe.
fn drain(sequence: &SenderSequence) -> u64 {
    let first = match sequence.reserve() {
        Ok(n) => n.0,
        Err(_) => return sequence.next(),
    };
    let mut expected = first + 1;
    let mut all_ours = true;
    while let Ok(n) = sequence.reserve() {
        all_ours &= n.0 == expected;
        expected = n.0 + 1;
    }
    if all_ours {
        first
    } else {
        sequence.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_returns_exact_next_and_blocks_further_use() {
        let s = SenderSequence::new(7, 30);
        assert_eq!(drain(&s), 7);
        assert!(s.reserve().is_err());
        let s = SenderSequence::new(30, 30);
        assert_eq!(drain(&s), 30);
        let s = SenderSequence::unpersisted(MAX_SENDER_SEQUENCE_NUMBER + 1);
        assert_eq!(drain(&s), MAX_SENDER_SEQUENCE_NUMBER + 1);
    }
}
