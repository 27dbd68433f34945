//! The `lock` file of a security context directory: only one process may use a context
//! (nonce reuse otherwise). aiocoap takes it with `filelock.FileLock(basedir/lock)`, which on
//! Linux is `flock(LOCK_EX | LOCK_NB)` on that file, held for the process lifetime, and
//! deletes the file on clean shutdown. We take the same lock, so aiocoap and this gateway
//! exclude each other.
//!
//! `std::fs::File::try_lock` (Rust 1.89) is `flock(LOCK_EX | LOCK_NB)` on Linux. flock
//! belongs to the open file description, so a second open of the same directory in the
//! same process is refused as well.
//!
//! Deleting the file on release opens a race that every delete-on-release scheme has: a
//! peer may have opened the old file just before we deleted it and then gets its flock on
//! an inode nobody else will ever open again. After locking we therefore check that the
//! path still names the inode we locked (filelock does the same with `st_nlink`), and
//! start over if it does not.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

pub const LOCK_FILE: &str = "lock";

/// How often we start over when the lock file is replaced under us (each round means a
/// peer deleted the file; it cannot go on for long).
const MAX_ATTEMPTS: usize = 16;

#[derive(Debug, Error)]
pub enum LockError {
    #[error(
        "context directory {} is in use by another process (flock on {} is held)",
        dir.display(),
        lock.display()
    )]
    InUse { dir: PathBuf, lock: PathBuf },
    #[error("context directory {} does not exist or is not a directory", dir.display())]
    NoDirectory { dir: PathBuf },
    #[error("cannot lock {}: {step}: {source}", lock.display())]
    Io {
        lock: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {}: the file kept being replaced by another process", lock.display())]
    Unstable { lock: PathBuf },
    #[error(
        "cannot open {}: too many open files (RLIMIT_NOFILE soft limit {soft}, hard limit \
         {hard}; every open security context holds its lock file open: raise the hard limit, \
         e.g. `ulimit -Hn`, LimitNOFILE= in a systemd unit, or use fewer contexts)",
        lock.display()
    )]
    TooManyOpenFiles { lock: PathBuf, soft: u64, hard: u64 },
}

/// An exclusive flock on `dir/lock`, released (and the file deleted) by `release` or drop.
#[derive(Debug)]
pub struct ContextLock {
    path: PathBuf,
    file: Option<File>,
}

impl ContextLock {
    /// Takes the lock without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        if !dir.is_dir() {
            return Err(LockError::NoDirectory {
                dir: dir.to_owned(),
            });
        }
        let path = dir.join(LOCK_FILE);
        let io = |step, source| LockError::Io {
            lock: path.clone(),
            step,
            source,
        };
        for _ in 0..MAX_ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| {
                    if super::fd_limit::is_out_of_descriptors(&e) {
                        let (soft, hard) = super::fd_limit::nofile_limits().unwrap_or((0, 0));
                        LockError::TooManyOpenFiles {
                            lock: path.clone(),
                            soft,
                            hard,
                        }
                    } else {
                        io("opening the lock file", e)
                    }
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LockError::InUse {
                        dir: dir.to_owned(),
                        lock: path.clone(),
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io("flock", e)),
            }
            let ours = file.metadata().map_err(|e| io("fstat", e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {
                    return Ok(Self {
                        path,
                        file: Some(file),
                    })
                }
                // Deleted or replaced after we opened it: our flock guards nothing.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("stat", e)),
            }
        }
        Err(LockError::Unstable { lock: path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Clean release as aiocoap does it: delete the file, then drop the flock.
    pub fn release(mut self) -> Result<(), LockError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), LockError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let removed = std::fs::remove_file(&self.path);
        // Closing the descriptor drops the flock; unlock explicitly anyway so the order
        // (delete, then unlock) does not depend on when `file` is dropped.
        let unlocked = file.unlock();
        drop(file);
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LockError::Io {
                    lock: self.path.clone(),
                    step: "deleting the lock file",
                    source,
                })
            }
        }
        unlocked.map_err(|source| LockError::Io {
            lock: self.path.clone(),
            step: "unlock",
            source,
        })
    }
}

impl Drop for ContextLock {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_in_same_process_is_refused_and_release_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let first = ContextLock::acquire(dir.path()).unwrap();
        let e = ContextLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(e, LockError::InUse { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "context directory {} is in use by another process (flock on {}/lock is held)",
                dir.path().display(),
                dir.path().display()
            )
        );
        assert!(dir.path().join(LOCK_FILE).exists());
        first.release().unwrap();
        assert!(!dir.path().join(LOCK_FILE).exists());
        let again = ContextLock::acquire(dir.path()).unwrap();
        drop(again);
        assert!(!dir.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn stale_lock_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), b"").unwrap();
        ContextLock::acquire(dir.path()).unwrap().release().unwrap();
    }

    #[test]
    fn missing_directory_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            ContextLock::acquire(&missing),
            Err(LockError::NoDirectory { .. })
        ));
        assert!(!missing.exists());
    }
}
