//! `sequence.json`: the mutable state of a security context directory, in aiocoap's exact
//! format (Python `json.dumps`, `", "` and `": "` separators, no trailing newline):
//!
//! ```text
//! {"next-to-send": 107, "received": {"index": 0, "bitfield": 0}}
//! {"next-to-send": 10, "received": "unknown"}
//! ```
//!
//! `next-to-send` is the persisted high-water mark of RFC 8613 App. B.1.1 (no number at or
//! above it has been used); `received` is the replay window (§7.4), or `"unknown"` when it
//! was not saved at a clean shutdown (App. B.1.2). aiocoap also writes
//! `{"index": null, "bitfield": null}` for a window that was never initialised; that reads
//! as unknown. A missing file means a fresh context.
//!
//! The file is replaced atomically: a temp file `.sequence-XXXXXXXX.json` (mode 0600) in the
//! same directory, fsync, rename, then fsync of the directory so the rename itself is
//! durable (aiocoap skips that last step).
//!
//! While a context is open, its writes (at open and at each raise of the mark:
//! `swap_in_sequence_file`, `write_sequence_files`) instead rewrite a kept spare,
//! `.sequence-spare.json`, and swap it with `sequence.json` in one
//! `renameat2(RENAME_EXCHANGE)`: just as atomic, but no inode is created and none freed per
//! raise. With 10 000 busy contexts, creating the temp files' inodes was 42 % of the
//! gateway's CPU (ext4 searching its inode bitmaps past recently deleted ones). The spare
//! holds an older state; nothing reads it, and the next clean `write_sequence_file` (at
//! close) removes it, so a closed directory holds what aiocoap's does.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use thiserror::Error;

use super::json::JsonSyntaxError;
use crate::oscore::ReplayWindowState;

pub const SEQUENCE_FILE: &str = "sequence.json";
/// The spare that raises rewrite and swap with `sequence.json` (named like aiocoap's temp
/// files, so tools that clean up `.sequence-*.json` treat it as one).
pub const SPARE_FILE: &str = ".sequence-spare.json";

/// The replay window as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Not saved (a crash, or a window that was never initialised): App. B.1.2 recovery.
    Unknown,
    Window(ReplayWindowState),
}

/// The contents of `sequence.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceState {
    pub next_to_send: u64,
    pub received: Received,
}

impl SequenceState {
    /// What a missing file means: sequence number 0 and an empty, initialised window.
    pub fn fresh() -> Self {
        Self {
            next_to_send: 0,
            received: Received::Window(ReplayWindowState {
                index: 0,
                bitfield: 0,
            }),
        }
    }

    /// Parses the file contents; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SequenceFileError> {
        serde_json::from_str::<Self>(text)
            .map_err(|e| SequenceFileError::Syntax(JsonSyntaxError::new(path, &e)))
    }

    /// The file contents, byte for byte as aiocoap's `json.dumps` writes them.
    pub fn to_json(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SequenceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{\"next-to-send\": {}, \"received\": ",
            self.next_to_send
        )?;
        match self.received {
            Received::Unknown => f.write_str("\"unknown\"")?,
            Received::Window(w) => write!(
                f,
                "{{\"index\": {}, \"bitfield\": {}}}",
                w.index, w.bitfield
            )?,
        }
        f.write_str("}")
    }
}

#[derive(Debug, Error)]
pub enum SequenceFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0)]
    Syntax(#[source] JsonSyntaxError),
    #[error("cannot write {}: {step} failed: {source}", path.display())]
    Write {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SequenceFileError {
    /// An `io::Error` of the same kind and message (the error itself is not `Clone`).
    fn to_io(&self) -> std::io::Error {
        let kind = match self {
            Self::Read { source, .. } | Self::Write { source, .. } => source.kind(),
            Self::Syntax(_) => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, self.to_string())
    }
}

/// Reads `dir/sequence.json`; `Ok(None)` if it does not exist.
pub fn read_sequence_file(dir: &Path) -> Result<Option<SequenceState>, SequenceFileError> {
    let path = dir.join(SEQUENCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => SequenceState::parse(&text, &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SequenceFileError::Read { path, source }),
    }
}

/// Durably replaces `dir/sequence.json` with `state`. When this returns `Ok`, the new
/// contents survive a crash or power loss (file and directory entry are both synced).
pub fn write_sequence_file(dir: &Path, state: &SequenceState) -> Result<(), SequenceFileError> {
    let path = dir.join(SEQUENCE_FILE);
    let err = |step, source| SequenceFileError::Write {
        path: path.clone(),
        step,
        source,
    };
    let tmp = new_temp_file(dir, state.to_json().as_bytes()).map_err(|(step, e)| err(step, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| err("fsync of the temp file", e))?;
    tmp.persist(&path)
        .map_err(|e| err("renaming the temp file", e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err("fsync of the directory", e))?;
    // The raises' spare holds an older state; once a state is durably in place it is no
    // longer needed (see the module doc). Failing to remove it is harmless.
    match std::fs::remove_file(dir.join(SPARE_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::debug!("cannot remove {}: {e}", dir.join(SPARE_FILE).display()),
    }
    Ok(())
}

/// Durably replaces `dir/sequence.json` with `state` while its context is open: like
/// `write_sequence_file`, but through the kept spare (see the module doc), which stays.
pub fn swap_in_sequence_file(dir: &Path, state: &SequenceState) -> Result<(), SequenceFileError> {
    // one item in, one result out
    write_sequence_files(&[(dir, *state)])
        .into_iter()
        .next()
        .unwrap_or(Ok(()))
}

/// Durably replaces `sequence.json` in each of `items` (a directory and its new state), as a
/// group: every new state is written first (into the directory's spare, or a temp file if
/// the spare cannot be opened), then all are synced, swapped or renamed into place, and
/// the directories synced. The result for item `i` is at index `i`; when it is `Ok`, that file
/// is as durable as after `write_sequence_file` (each new file and each directory gets its
/// own fsync, whose error is reported for that item).
///
/// Why a group: with many busy contexts the persister has many files to raise at once, and
/// one fsync per file (each a journal commit on ext4) made it the bottleneck. Before the
/// per-file fsyncs, one `syncfs(2)` per filesystem writes back all temp files (and later all
/// renames) in a single commit, so the per-file fsyncs that follow find nothing left to do.
/// Durability never depends on `syncfs` (its errors are ignored; older kernels do not even
/// report them): the per-file fsyncs still run and decide the result. `syncfs` also writes
/// back every other dirty file of that filesystem (a log writer's, say), so it is used only
/// for groups of at least `SYNCFS_MIN_GROUP` files, where it pays for itself; the usual
/// raise of one or a few contexts is plain per-file fsyncs.
pub fn write_sequence_files(
    items: &[(&Path, SequenceState)],
) -> Vec<Result<(), SequenceFileError>> {
    let err = |dir: &Path, step, source| SequenceFileError::Write {
        path: dir.join(SEQUENCE_FILE),
        step,
        source,
    };
    // A directory listed more than once is written once, with its last state (its spare
    // cannot hold two states at a time); the earlier items get that write's result.
    let mut last: std::collections::HashMap<&Path, usize> =
        std::collections::HashMap::with_capacity(items.len());
    for (i, (dir, _)) in items.iter().enumerate() {
        last.insert(*dir, i);
    }
    let mut results: Vec<Result<(), SequenceFileError>> = Vec::with_capacity(items.len());
    let mut staged: Vec<Option<Staged>> = Vec::with_capacity(items.len());
    for (i, (dir, state)) in items.iter().enumerate() {
        if last[dir] != i {
            staged.push(None);
            results.push(Ok(()));
            continue;
        }
        match Staged::write(dir, state.to_json().as_bytes()) {
            Ok(new) => {
                staged.push(Some(new));
                results.push(Ok(()));
            }
            Err((step, e)) => {
                staged.push(None);
                results.push(Err(err(dir, step, e)));
            }
        }
    }
    let group_sync = items.len() >= SYNCFS_MIN_GROUP;
    if group_sync {
        sync_filesystems(items.iter().map(|(dir, _)| *dir));
    }
    for (i, (dir, _)) in items.iter().enumerate() {
        let Some(new) = staged[i].take() else {
            continue;
        };
        if let Err((step, e)) = new.put_in_place(dir) {
            results[i] = Err(err(dir, step, e));
        }
    }
    let renamed = || {
        items
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|((dir, _), _)| *dir)
    };
    if group_sync {
        sync_filesystems(renamed());
    }
    let mut synced_dirs: std::collections::HashMap<&Path, Result<(), std::io::ErrorKind>> =
        std::collections::HashMap::new();
    for (i, (dir, _)) in items.iter().enumerate() {
        if results[i].is_err() {
            continue;
        }
        let outcome = match synced_dirs.get(dir) {
            Some(Ok(())) => continue,
            Some(Err(kind)) => Err(std::io::Error::from(*kind)),
            None => {
                let r = File::open(dir).and_then(|d| d.sync_all());
                synced_dirs.insert(dir, r.as_ref().map(|_| ()).map_err(|e| e.kind()));
                r
            }
        };
        if let Err(e) = outcome {
            results[i] = Err(err(dir, "fsync of the directory", e));
        }
    }
    for (i, (dir, _)) in items.iter().enumerate() {
        let j = last[dir];
        if j != i {
            if let Err(e) = &results[j] {
                results[i] = Err(err(dir, "the later write of this directory", e.to_io()));
            }
        }
    }
    results
}

/// Groups of fewer files are synced file by file only (see `write_sequence_files`).
const SYNCFS_MIN_GROUP: usize = 8;

/// A new temp file `.sequence-XXXXXXXX.json` in `dir` holding `contents`. tempfile creates
/// it with O_EXCL and mode 0600, like Python's mkstemp, and removes it again when it is
/// dropped before `persist`.
fn new_temp_file(dir: &Path, contents: &[u8]) -> Result<tempfile::NamedTempFile, StepError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".sequence-")
        .suffix(".json")
        .rand_bytes(8)
        .tempfile_in(dir)
        .map_err(|e| ("creating the temp file", e))?;
    tmp.write_all(contents)
        .map_err(|e| ("writing the temp file", e))?;
    Ok(tmp)
}

/// A new `sequence.json` written, not yet synced or in place.
enum Staged {
    /// In the directory's spare (`SPARE_FILE`), to be swapped with `sequence.json`.
    Spare(File),
    /// In a fresh temp file, to be renamed over `sequence.json`: the spare could not be
    /// opened (say, something else of that name is in the way).
    Temp(tempfile::NamedTempFile),
}

type StepError = (&'static str, std::io::Error);

impl Staged {
    fn write(dir: &Path, contents: &[u8]) -> Result<Self, StepError> {
        match Self::write_spare(dir, contents) {
            Ok(file) => Ok(Self::Spare(file)),
            Err(e) => {
                tracing::debug!("{}: {e}; using a temp file", dir.join(SPARE_FILE).display());
                new_temp_file(dir, contents).map(Self::Temp)
            }
        }
    }

    /// Rewrites the spare in place (created 0600 if missing; never through a symlink, and
    /// O_NONBLOCK so that a FIFO planted there cannot block the writer; only a regular
    /// file is used).
    fn write_spare(dir: &Path, contents: &[u8]) -> std::io::Result<File> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(dir.join(SPARE_FILE))?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        file.write_all_at(contents, 0)?;
        file.set_len(contents.len() as u64)?;
        Ok(file)
    }

    /// fsync, then atomically make it `dir/sequence.json`. A spare is swapped with a regular
    /// `sequence.json` (RENAME_EXCHANGE; the spare then holds the old state), otherwise
    /// renamed over it (no `sequence.json` yet, a file system without RENAME_EXCHANGE, or
    /// something other than a file in the way, where rename reports the error). On failure
    /// nothing new is left behind.
    fn put_in_place(self, dir: &Path) -> Result<(), StepError> {
        let target = dir.join(SEQUENCE_FILE);
        match self {
            Self::Temp(tmp) => {
                tmp.as_file()
                    .sync_all()
                    .map_err(|e| ("fsync of the temp file", e))?;
                tmp.persist(&target)
                    .map(drop)
                    .map_err(|e| ("renaming the temp file", e.error))
            }
            Self::Spare(file) => {
                let spare = dir.join(SPARE_FILE);
                let placed = file
                    .sync_all()
                    .map_err(|e| ("fsync of the spare", e))
                    .and_then(|()| swap_or_rename(&spare, &target));
                if placed.is_err() {
                    let _ = std::fs::remove_file(&spare);
                }
                placed
            }
        }
    }
}

fn swap_or_rename(spare: &Path, target: &Path) -> Result<(), StepError> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let is_file = std::fs::symlink_metadata(target).is_ok_and(|m| m.is_file());
    if is_file {
        match renameat_with(CWD, spare, CWD, target, RenameFlags::EXCHANGE) {
            Ok(()) => return Ok(()),
            // not supported by this file system (or kernel): plain rename below
            Err(e)
                if e == rustix::io::Errno::INVAL
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::OPNOTSUPP => {}
            Err(e) => return Err(("swapping in the spare", e.into())),
        }
    }
    std::fs::rename(spare, target).map_err(|e| ("renaming the spare", e))
}

/// One `syncfs(2)` per distinct filesystem among `dirs` (a performance hint only: errors
/// are ignored, the callers fsync each file afterwards).
fn sync_filesystems<'a>(dirs: impl Iterator<Item = &'a Path>) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let mut devices = std::collections::HashSet::new();
        for dir in dirs {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            if devices.insert(meta.dev()) {
                let Ok(d) = File::open(dir) else { continue };
                // SAFETY: `d` is an open descriptor for the duration of the call.
                unsafe { libc::syncfs(d.as_raw_fd()) };
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    drop(dirs.count());
}

impl<'de> Deserialize<'de> for SequenceState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StateVisitor;
        impl<'de> Visitor<'de> for StateVisitor {
            type Value = SequenceState;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with \"next-to-send\" and \"received\"")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SequenceState, A::Error> {
                let mut next_to_send = None;
                let mut received = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "next-to-send" => {
                            let n = map.next_value::<u64>().map_err(|e| {
                                A::Error::custom(format_args!(
                                    "\"next-to-send\" must be a non-negative integer: {e}"
                                ))
                            })?;
                            next_to_send = Some(n);
                        }
                        "received" => received = Some(map.next_value::<ReceivedField>()?.0),
                        // aiocoap ignores other keys too.
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(SequenceState {
                    next_to_send: next_to_send
                        .ok_or_else(|| A::Error::missing_field("next-to-send"))?,
                    received: received.ok_or_else(|| A::Error::missing_field("received"))?,
                })
            }
        }
        deserializer.deserialize_map(StateVisitor)
    }
}

/// `"unknown"` or `{"index": I, "bitfield": B}` (either may be null: unknown).
struct ReceivedField(Received);

impl<'de> Deserialize<'de> for ReceivedField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ReceivedVisitor;
        impl<'de> Visitor<'de> for ReceivedVisitor {
            type Value = ReceivedField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"unknown\" or {\"index\": ..., \"bitfield\": ...} for \"received\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ReceivedField, E> {
                if v == "unknown" {
                    Ok(ReceivedField(Received::Unknown))
                } else {
                    Err(E::custom(format_args!(
                        "\"received\" must be \"unknown\" or an object, not the string {v:?}"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReceivedField, A::Error> {
                let (mut index, mut bitfield) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "index" => {
                            index = Some(map.next_value::<Option<u64>>().map_err(|e| {
                                A::Error::custom(format_args!(
                                    "\"received.index\" must be a non-negative integer or null: {e}"
                                ))
                            })?)
                        }
                        // aiocoap's bitfield is an unbounded Python int; ours holds 128 bits.
                        "bitfield" => {
                            bitfield = Some(map.next_value::<Option<u128>>().map_err(|e| {
                                A::Error::custom(format_args!(
                                    "\"received.bitfield\" must be a non-negative integer below 2^128 \
                                     (replay windows above 128 are not supported) or null: {e}"
                                ))
                            })?)
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let index = index.ok_or_else(|| A::Error::missing_field("index"))?;
                let bitfield = bitfield.ok_or_else(|| A::Error::missing_field("bitfield"))?;
                Ok(ReceivedField(match (index, bitfield) {
                    (Some(index), Some(bitfield)) => {
                        Received::Window(ReplayWindowState { index, bitfield })
                    }
                    // aiocoap writes both as null for a window that was never initialised;
                    // anything partly null is treated the same (the safe reading).
                    _ => Received::Unknown,
                }))
            }
        }
        deserializer.deserialize_any(ReceivedVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SequenceState, SequenceFileError> {
        SequenceState::parse(text, Path::new("/d/sequence.json"))
    }

    #[test]
    fn group_write_replaces_every_file_and_reports_failures_per_item() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..20)
            .map(|i| {
                let d = tmp.path().join(format!("c{i}"));
                std::fs::create_dir(&d).unwrap();
                d
            })
            .collect();
        // c7: a non-empty directory where sequence.json should be, so its rename fails.
        std::fs::create_dir_all(dirs[7].join(SEQUENCE_FILE).join("blocker")).unwrap();
        let state = |i: u64| SequenceState {
            next_to_send: 1000 + i,
            received: Received::Unknown,
        };
        let items: Vec<(&Path, SequenceState)> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.as_path(), state(i as u64)))
            .collect();
        let results = write_sequence_files(&items);
        assert_eq!(results.len(), 20);
        for (i, (d, r)) in dirs.iter().zip(&results).enumerate() {
            let leftovers: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().starts_with(".sequence-"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?} in {}", d.display());
            if i == 7 {
                let e = r.as_ref().unwrap_err().to_string();
                assert!(e.contains("renaming") && e.contains("c7"), "{e}");
                continue;
            }
            r.as_ref().unwrap();
            let text = std::fs::read_to_string(d.join(SEQUENCE_FILE)).unwrap();
            assert_eq!(text, state(i as u64).to_json());
        }
        // A directory listed twice: both items succeed, the later state wins.
        let d = dirs[0].as_path();
        let twice = [(d, state(1)), (d, state(2))];
        assert!(write_sequence_files(&twice).iter().all(Result::is_ok));
        assert_eq!(
            std::fs::read_to_string(d.join(SEQUENCE_FILE)).unwrap(),
            state(2).to_json()
        );
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    /// Raises swap a kept spare with sequence.json: two inodes take turns, none is created
    /// per raise; the final write removes the spare. Fails if raises go back to temp files.
    #[test]
    fn raises_swap_the_spare_and_the_final_write_removes_it() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let state = |n| SequenceState {
            next_to_send: n,
            received: Received::Unknown,
        };
        let (seq, spare) = (d.join(SEQUENCE_FILE), d.join(SPARE_FILE));
        write_sequence_file(d, &state(10)).unwrap();
        let a = inode(&seq);
        assert!(write_sequence_files(&[(d, state(1_000_000))])[0].is_ok());
        assert_eq!(
            std::fs::read_to_string(&seq).unwrap(),
            state(1_000_000).to_json()
        );
        let b = inode(&seq);
        assert_ne!(a, b);
        assert_eq!(inode(&spare), a, "the spare holds the old file");
        assert_eq!(
            std::fs::read_to_string(&spare).unwrap(),
            state(10).to_json()
        );
        // A shorter state after a longer one: the spare is cut to length.
        swap_in_sequence_file(d, &state(7)).unwrap();
        assert_eq!(std::fs::read_to_string(&seq).unwrap(), state(7).to_json());
        assert_eq!((inode(&seq), inode(&spare)), (a, b));
        let mode = std::fs::metadata(&seq).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for n in 8..20 {
            swap_in_sequence_file(d, &state(n)).unwrap();
            assert_eq!(std::fs::read_to_string(&seq).unwrap(), state(n).to_json());
            let mut both = [inode(&seq), inode(&spare)];
            both.sort_unstable();
            let mut expected = [a, b];
            expected.sort_unstable();
            assert_eq!(both, expected, "no new inode at raise {n}");
        }
        write_sequence_file(d, &state(20)).unwrap();
        assert_eq!(std::fs::read_to_string(&seq).unwrap(), state(20).to_json());
        let names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [SEQUENCE_FILE]);
    }

    /// A symlink planted as the spare is never followed: the write goes through a temp
    /// file and the link's target is untouched.
    #[test]
    fn a_symlinked_spare_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("ctx");
        std::fs::create_dir(&d).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.join(SPARE_FILE)).unwrap();
        let state = SequenceState {
            next_to_send: 42,
            received: Received::Unknown,
        };
        write_sequence_file(&d, &SequenceState::fresh()).unwrap();
        std::os::unix::fs::symlink(&victim, d.join(SPARE_FILE)).unwrap();
        swap_in_sequence_file(&d, &state).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(
            std::fs::read_to_string(d.join(SEQUENCE_FILE)).unwrap(),
            state.to_json()
        );
        assert!(std::fs::symlink_metadata(d.join(SPARE_FILE))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    /// A FIFO planted as the spare neither blocks the writer (opening a FIFO for writing
    /// waits for a reader) nor is used: the write goes through a temp file.
    #[test]
    fn a_fifo_as_spare_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_owned();
        write_sequence_file(&d, &SequenceState::fresh()).unwrap();
        let fifo = std::ffi::CString::new(d.join(SPARE_FILE).to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let state = SequenceState {
            next_to_send: 99,
            received: Received::Unknown,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.clone();
        std::thread::spawn(move || tx.send(swap_in_sequence_file(&dir, &state).is_ok()));
        let done = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(done, Ok(true), "the write blocked on the FIFO or failed");
        assert_eq!(
            std::fs::read_to_string(d.join(SEQUENCE_FILE)).unwrap(),
            state.to_json()
        );
    }

    #[test]
    fn aiocoap_samples_round_trip_byte_exact() {
        for sample in [
            r#"{"next-to-send": 0, "received": {"index": 0, "bitfield": 2047}}"#,
            r#"{"next-to-send": 107, "received": {"index": 0, "bitfield": 0}}"#,
            r#"{"next-to-send": 2, "received": {"index": 11, "bitfield": 1}}"#,
            r#"{"next-to-send": 10, "received": "unknown"}"#,
            r#"{"next-to-send": 1099511627775, "received": {"index": 18446744073709551615, "bitfield": 340282366920938463463374607431768211455}}"#,
        ] {
            assert_eq!(parse(sample).unwrap().to_json(), sample);
        }
    }

    #[test]
    fn null_window_is_unknown() {
        let s = parse(r#"{"next-to-send": 10, "received": {"index": null, "bitfield": null}}"#)
            .unwrap();
        assert_eq!(s.received, Received::Unknown);
        assert_eq!(s.next_to_send, 10);
    }

    #[test]
    fn bitfield_beyond_u64_and_u128() {
        let s = parse(
            r#"{"next-to-send": 1, "received": {"index": 3, "bitfield": 36893488147419103232}}"#,
        )
        .unwrap();
        assert_eq!(
            s.received,
            Received::Window(ReplayWindowState {
                index: 3,
                bitfield: 1 << 65
            })
        );
        let e = parse(r#"{"next-to-send": 1, "received": {"index": 3, "bitfield": 340282366920938463463374607431768211456}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("below 2^128"), "{e}");
        assert!(e.starts_with("/d/sequence.json:1:"), "{e}");
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        for (text, want) in [
            (
                r#"{"next-to-send": -1, "received": "unknown"}"#,
                "next-to-send",
            ),
            (
                r#"{"next-to-send": "5", "received": "unknown"}"#,
                "next-to-send",
            ),
            (r#"{"received": "unknown"}"#, "missing field `next-to-send`"),
            (r#"{"next-to-send": 5}"#, "missing field `received`"),
            (r#"{"next-to-send": 5, "received": "lost"}"#, "\"lost\""),
            (
                r#"{"next-to-send": 5, "received": {"index": 1}}"#,
                "missing field `bitfield`",
            ),
            (
                r#"{"next-to-send": 5, "received": {"index": -1, "bitfield": 0}}"#,
                "received.index",
            ),
            (r#"{"next-to-send": 5, "received": 3}"#, "\"unknown\" or"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
