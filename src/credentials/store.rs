//! Opening security context directories for use, and the handle that hands out Sender
//! Sequence Numbers only once they are covered on disk (RFC 8613 §7.2.1, App. B.1.1).
//!
//! `ContextStore::open` locks the directory, loads the parameters and `sequence.json`, and
//! before returning writes a first mark (`next + 10`) together with `"received": "unknown"`:
//! from then on a crash leaves a file that skips the numbers possibly used and forces
//! App. B.1.2 recovery of the replay window. (aiocoap writes nothing at startup and writes
//! "unknown" at the first change of the window; writing it at once is the conservative
//! equivalent.) The persister then keeps the mark ahead of need; see `persist`.
//!
//! `open` does blocking file I/O (one fsync); from async code call it in `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use thiserror::Error;

use super::lock::{ContextLock, LockError};
use super::persist::{
    self, lock, CloseError, Job, Shared, WriteReason, CHUNK_START, METRIC_SEQUENCE_WAITS,
};
use super::sequence_file::{read_sequence_file, Received, SequenceFileError, SequenceState};
use super::settings::{load_context_params, SettingsError};
use crate::oscore::sequence::MAX_SENDER_SEQUENCE_NUMBER;
use crate::oscore::{
    ContextParams, ReplayWindow, SenderSequence, SenderSequenceNumber, SequenceError,
};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    SequenceFile(#[from] SequenceFileError),
    #[error("cannot start the sequence persister thread: {0}")]
    Spawn(#[source] std::io::Error),
}

impl From<CloseError> for StoreError {
    fn from(e: CloseError) -> Self {
        match e {
            CloseError::Write(e) => Self::SequenceFile(e),
            CloseError::Unlock(e) => Self::Lock(e),
        }
    }
}

/// Why no Sender Sequence Number was handed out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NextSequenceError {
    /// §7.2.1: the context must not be used any more.
    #[error(
        "context {}: sender sequence numbers exhausted (2^40-1 reached); the security context must be renewed",
        dir.display()
    )]
    Exhausted { dir: PathBuf },
    #[error("context {} is closed", dir.display())]
    Closed { dir: PathBuf },
    #[error("context {}: cannot persist the sequence number mark: {message}", dir.display())]
    PersistFailed { dir: PathBuf, message: String },
    #[error("context {}: the sequence persister thread is gone", dir.display())]
    PersisterGone { dir: PathBuf },
    /// Only from `try_next_sequence_number`: the mark is reached and the persister is
    /// raising it; try again after it did.
    #[error("context {}: next sequence number not yet persisted", dir.display())]
    WouldBlock { dir: PathBuf },
}

/// Opens context directories; owns the one persister thread that serves all of them.
pub struct ContextStore {
    jobs: Mutex<Option<Sender<Job>>>,
}

impl Default for ContextStore {
    fn default() -> Self {
        Self::new()
    }
}

impl ContextStore {
    /// A store; its persister thread starts with the first `open`.
    pub fn new() -> Self {
        Self {
            jobs: Mutex::new(None),
        }
    }

    /// The process-wide store (`ContextStore::global().open(dir)`).
    pub fn global() -> &'static ContextStore {
        static GLOBAL: OnceLock<ContextStore> = OnceLock::new();
        GLOBAL.get_or_init(ContextStore::new)
    }

    fn jobs(&self) -> Result<Sender<Job>, StoreError> {
        let mut jobs = lock(&self.jobs);
        if let Some(tx) = jobs.as_ref() {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("oscore-persist".into())
            .spawn(move || persist::run(rx))
            .map_err(StoreError::Spawn)?;
        *jobs = Some(tx.clone());
        Ok(tx)
    }

    /// Locks `dir`, loads it and writes the first mark. The context stays locked until
    /// `close` (or the drop of the last `ContextPersister` clone).
    pub fn open(&self, dir: impl AsRef<Path>) -> Result<OpenContext, StoreError> {
        let dir = dir.as_ref().to_owned();
        let jobs = self.jobs()?;
        // Dropping `lock` on an error path below releases it and deletes the file.
        let lock = ContextLock::acquire(&dir)?;
        let params = load_context_params(&dir)?;
        let stored = read_sequence_file(&dir)?.unwrap_or_else(SequenceState::fresh);

        let window = match stored.received {
            Received::Unknown => ReplayWindow::uninitialized(params.replay_window),
            Received::Window(state) => ReplayWindow::from_state(params.replay_window, Some(state)),
        };
        let next = stored.next_to_send;
        let mark = if next > MAX_SENDER_SEQUENCE_NUMBER {
            next
        } else {
            (next + CHUNK_START).min(MAX_SENDER_SEQUENCE_NUMBER + 1)
        };
        let replay_window = Arc::new(Mutex::new(window));
        let shared = Arc::new(Shared::new(
            dir,
            SenderSequence::new(next, next),
            Arc::clone(&replay_window),
            lock,
            jobs,
        ));
        shared.write(
            SequenceState {
                next_to_send: mark,
                received: Received::Unknown,
            },
            WriteReason::Open,
        )?;
        shared.sequence.raise_persisted_limit(mark);
        Ok(OpenContext {
            params,
            replay_window,
            persister: ContextPersister {
                _closer: Arc::new(Handle {
                    shared: Arc::clone(&shared),
                }),
                shared,
            },
        })
    }
}

/// An open, locked context directory.
#[derive(Debug)]
pub struct OpenContext {
    pub params: ContextParams,
    /// Initialised from `sequence.json`, uninitialised after `"unknown"` (App. B.1.2).
    /// Written back at close, then left uninitialised (nothing is accepted after close).
    pub replay_window: Arc<Mutex<ReplayWindow>>,
    pub persister: ContextPersister,
}

impl OpenContext {
    /// The Sender Sequence counter. Take numbers through `persister`, which keeps the mark
    /// ahead; `reserve` on this directly never hands out an unpersisted number either, but
    /// does not ask for more.
    pub fn sequence(&self) -> &SenderSequence {
        &self.persister.shared.sequence
    }
}

/// The handle to an open context's persistence. Clones share it; the context is closed by
/// `close` or when the last clone is dropped.
#[derive(Clone)]
pub struct ContextPersister {
    /// Held only for its `Drop`: the last clone closes the context.
    _closer: Arc<Handle>,
    /// The same as the closer's `shared`, one pointer less to follow on every request.
    shared: Arc<Shared>,
}

struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Err(e) = self.shared.close() {
            tracing::error!(
                "closing context {} on drop: {e}",
                self.shared.dir().display()
            );
        }
    }
}

impl std::fmt::Debug for ContextPersister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextPersister")
            .field("dir", &self.dir())
            .field("next", &self.shared().sequence.next())
            .field("persisted_limit", &self.persisted_limit())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl ContextPersister {
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn dir(&self) -> &Path {
        self.shared().dir()
    }

    /// The mark currently on disk (every number handed out is below it).
    pub fn persisted_limit(&self) -> u64 {
        self.shared().sequence.persisted_limit()
    }

    /// The current chunk (10, doubling up to 10000).
    pub fn chunk(&self) -> u64 {
        self.shared().chunk()
    }

    pub fn is_closed(&self) -> bool {
        self.shared().is_closed()
    }

    /// The address of the one cache line every request reads (closed flag, chunk, Sender
    /// Sequence counter: `Shared` keeps them in its first 64 bytes), for a prefetch.
    pub fn hot_line(&self) -> usize {
        crate::prefetch::address_of(&**self.shared())
    }

    /// Takes the next number if it is already covered on disk; never waits.
    pub fn try_next_sequence_number(&self) -> Result<SenderSequenceNumber, NextSequenceError> {
        let shared = self.shared();
        let dir = || shared.dir().to_owned();
        if shared.is_closed() {
            return Err(NextSequenceError::Closed { dir: dir() });
        }
        match shared.sequence.reserve() {
            Ok(n) => {
                shared.after_reserve();
                Ok(n)
            }
            Err(SequenceError::Exhausted) => Err(NextSequenceError::Exhausted { dir: dir() }),
            Err(SequenceError::NotPersisted { .. }) => {
                if shared.is_closed() {
                    return Err(NextSequenceError::Closed { dir: dir() });
                }
                if !shared.nudge() {
                    return Err(NextSequenceError::PersisterGone { dir: dir() });
                }
                Err(NextSequenceError::WouldBlock { dir: dir() })
            }
        }
    }

    /// Takes the next number, blocking the thread while the persister raises the mark.
    /// Never returns a number that is not covered by `sequence.json` on disk.
    pub fn next_sequence_number(&self) -> Result<SenderSequenceNumber, NextSequenceError> {
        let shared = self.shared();
        let mut waited = false;
        loop {
            match self.try_next_sequence_number() {
                Err(NextSequenceError::WouldBlock { .. }) => {}
                other => return other,
            }
            let mut state = lock(&shared.wait);
            let generation = state.generation;
            if shared.can_retry() {
                continue;
            }
            // Under the wait lock, so the job we rely on finishes after we start waiting.
            if !shared.nudge() {
                return Err(self.gone());
            }
            if !waited {
                metrics::counter!(METRIC_SEQUENCE_WAITS).increment(1);
                waited = true;
            }
            while state.generation == generation {
                state = shared.cond.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if !shared.can_retry() {
                if let Some(message) = state.failure.clone() {
                    return Err(self.failed(message));
                }
            }
        }
    }

    /// Like `next_sequence_number`, but waits asynchronously (no thread is blocked).
    pub async fn next_sequence_number_async(
        &self,
    ) -> Result<SenderSequenceNumber, NextSequenceError> {
        let shared = self.shared();
        let mut waited = false;
        loop {
            match self.try_next_sequence_number() {
                Err(NextSequenceError::WouldBlock { .. }) => {}
                other => return other,
            }
            let mut notified = std::pin::pin!(shared.notify.notified());
            // Registered before the checks below, so a wake-up in between is not lost.
            notified.as_mut().enable();
            {
                let _state = lock(&shared.wait);
                if shared.can_retry() {
                    continue;
                }
                if !shared.nudge() {
                    return Err(self.gone());
                }
            }
            if !waited {
                metrics::counter!(METRIC_SEQUENCE_WAITS).increment(1);
                waited = true;
            }
            notified.await;
            let failure = lock(&shared.wait).failure.clone();
            if let (false, Some(message)) = (shared.can_retry(), failure) {
                return Err(self.failed(message));
            }
        }
    }

    /// Clean shutdown: writes the exact next-to-send and the replay window (or "unknown"
    /// if it is uninitialised), then deletes and unlocks `lock`. Idempotent; also done on
    /// drop of the last clone. Afterwards no number is handed out and no number is
    /// accepted by the replay window.
    pub fn close(&self) -> Result<(), StoreError> {
        self.shared().close().map_err(StoreError::from)
    }

    fn gone(&self) -> NextSequenceError {
        NextSequenceError::PersisterGone {
            dir: self.dir().to_owned(),
        }
    }

    fn failed(&self, message: String) -> NextSequenceError {
        NextSequenceError::PersistFailed {
            dir: self.dir().to_owned(),
            message,
        }
    }
}
