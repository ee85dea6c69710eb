//! An embedded durable log: opaque records appended in order, made durable in batches (group
//! commit), replayed after a restart on top of the newest snapshot, and compacted into a new
//! snapshot so the folder's size tracks live state rather than history. It knows nothing of what
//! the records mean; the durable session store gives them their meaning.
//!
//! ```text
//!  append(payload) ──▶ pending buffer (memory, capped) ──▶ writer thread: write + fdatasync per batch
//!        │ returns seq at once                                     │ publishes the durable seq
//!  durable(seq).await ◀────────────────────────────────────────────┘
//!
//!  folder: LOCK  00000000000000000001.log  00000000000000004097.log  00000000000000004096.snap
//!          lock  segments, named by their first seq                   snapshot, named by the seq it covers
//! ```
//!
//! **Durability.** A record is durable once the writer's `fdatasync` of the batch holding it has
//! returned; [`Journal::durable`] resolves only then. A segment or snapshot file is created with its
//! header synced and the folder synced before any record in it is reported durable. If a write or
//! sync fails the journal stops for good ([`JournalError::Failed`]): after a failed fsync the page
//! cache may have dropped the dirty pages and a retried fsync can report success for data that is
//! gone (the 2018 "fsyncgate" finding, after which PostgreSQL panics instead of retrying), so the
//! only honest answer is to acknowledge nothing more and let a restart recover from what is on disk.
//!
//! **Recovery** ([`Journal::open`]): the newest snapshot that checks out, then the records after
//! it, segment by segment, in sequence order, each handed to the caller as it is read. A bad frame
//! at the end of the last segment with nothing valid after it is a torn write from a crash: it is
//! cut off and reported in [`Recovered::truncated`]. Anything else that does not check out (a bad
//! frame with valid ones after it, damage in an older segment, a sequence gap, no usable snapshot
//! where one is needed) is an error naming the file and byte offset: guessing there could drop or
//! reorder acknowledged writes.
//!
//! **Compaction** ([`Journal::compact`]): the writer switches to a new segment at seq S, the
//! caller writes its state (reflecting at least every record ≤ S) into a temp file, which is
//! synced, renamed into place, the folder synced, and only then are the covered segments and older
//! snapshots deleted. A crash at any point leaves either the old snapshot and its segments, or the
//! new snapshot with (some of) the old files still there, both of which recover.
//!
//! **One process per folder**: an exclusive advisory lock (`flock`) on `LOCK`, held until the
//! writer thread ends; the kernel drops it when the process dies, so a `kill -9` never blocks the
//! next start. (On a network filesystem `flock` may not exclude another machine: keep the folder
//! local.)
//!
//! **What the caller must do** so that a snapshot and the log agree:
//! - make an in-memory change only after its `append` succeeded, under the same lock (so a
//!   refused append leaves no trace, and records are in the same order as the changes);
//! - have `write_snapshot` read that state under that lock (shard by shard is fine);
//! - replay idempotently: a snapshot may already reflect records after its seq, and after a crash
//!   such a record may be missing from the log, its seq then reused by a different record (it was
//!   never acknowledged, so nobody relied on it; the snapshot's copy of its effect is harmless);
//! - acknowledge only after [`Journal::durable`] resolved, and treat any error there as "not
//!   acknowledged".
//!
//! `open`, `close` and `compact` do blocking IO: call them before the runtime starts or from
//! `spawn_blocking`. `append`, `head` and `stats` never do IO; `durable` is async.

mod compact;
mod format;
mod recovery;
mod writer;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use compact::CompactStats;

use writer::{Shared, WriterHandle};

/// A record's sequence number: 1 for the first record ever appended to a folder, then +1 per
/// record, across segments, snapshots and restarts. `Seq(0)` means "no record".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Called by the writer thread after each batch's fdatasync: (records in the batch, time spent
/// writing and syncing it). Runs on the writer thread, so it must be quick.
pub type CommitObserver = Arc<dyn Fn(usize, Duration) + Send + Sync>;

#[derive(Clone)]
pub struct JournalOptions {
    /// A new segment starts once the current one has passed this size.
    pub segment_bytes: u64,
    /// Cap on framed bytes appended but not yet taken by the writer. Past it [`Journal::append`]
    /// fails with [`JournalError::Backpressure`]. The writer holds at most one more batch of
    /// this size while writing it, so the journal's buffers stay below twice this.
    pub max_pending_bytes: usize,
    /// How long [`Journal::close`] (and so `drop`) waits for the writer to flush and stop, and
    /// how long [`Journal::compact`] waits for the writer to switch segments. A disk that hangs
    /// longer gets [`JournalError::Stalled`] instead of a hung caller.
    pub writer_timeout: Duration,
    /// Upper bound on how long the writer holds a batch open for the callers its last commit
    /// released to append again (it waits at most a quarter of the last commit's duration, and
    /// only while fewer records are pending than went into the last batch). Zero disables it.
    pub max_commit_delay: Duration,
    pub observer: Option<CommitObserver>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_bytes: 64 << 20,
            max_pending_bytes: 64 << 20,
            writer_timeout: Duration::from_secs(10),
            max_commit_delay: Duration::from_millis(1),
            observer: None,
        }
    }
}

impl fmt::Debug for JournalOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalOptions")
            .field("segment_bytes", &self.segment_bytes)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("writer_timeout", &self.writer_timeout)
            .field("max_commit_delay", &self.max_commit_delay)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// What recovery hands to the caller, in order: at most one snapshot, then records.
#[derive(Debug)]
pub enum Replay<'a> {
    /// The caller's state as written by [`Journal::compact`], reflecting every record up to
    /// `seq` and possibly some after it (so replaying a record must be idempotent).
    Snapshot { seq: Seq, payload: &'a [u8] },
    /// One appended record, in sequence order, every one with a seq above the snapshot's.
    Record { seq: Seq, payload: &'a [u8] },
}

/// What [`Journal::open`] found and did, for the caller to log.
#[derive(Debug, Default)]
pub struct Recovered {
    pub snapshot: Option<SnapshotInfo>,
    /// Records handed to the replay callback.
    pub records: u64,
    /// The last seq recovered (the snapshot's or the last record's); the next append gets head+1.
    pub head: Seq,
    /// A torn or corrupt tail that was cut off (the caller should WARN, naming file and offset).
    pub truncated: Option<Truncation>,
    /// Newer snapshots that failed their checks and were passed over for an older one that
    /// the log still continues from. They stay on disk until a compaction replaces them.
    pub skipped_snapshots: Vec<JournalError>,
    /// Leftover temporary snapshot files from an interrupted compaction, now deleted.
    pub removed_temp_files: Vec<PathBuf>,
    /// Files the journal does not recognise, left alone.
    pub ignored_files: Vec<PathBuf>,
    /// The folder's permission bits, when group or others have any access to it.
    pub loose_permissions: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub seq: Seq,
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub path: PathBuf,
    /// Where the file now ends: the first byte that did not form a valid record.
    pub offset: u64,
    /// How many bytes were cut off.
    pub dropped_bytes: u64,
}

impl fmt::Display for Truncation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: cut a torn or corrupt tail of {} bytes at byte offset {} (records there were never acknowledged)",
            self.path.display(),
            self.dropped_bytes,
            self.offset
        )
    }
}

impl Recovered {
    /// One line per thing an operator should hear about.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(t) = &self.truncated {
            w.push(t.to_string());
        }
        for e in &self.skipped_snapshots {
            w.push(format!("skipped a damaged snapshot, recovered from an older one: {e}"));
        }
        for p in &self.removed_temp_files {
            w.push(format!(
                "{}: removed a snapshot left unfinished by an interrupted compaction",
                p.display()
            ));
        }
        for p in &self.ignored_files {
            w.push(format!("{}: not a journal file, left alone", p.display()));
        }
        if let Some(mode) = self.loose_permissions {
            w.push(format!(
                "the state folder is accessible to group or others (mode {mode:o}); 0700 is expected"
            ));
        }
        w
    }
}

/// Why the journal stopped accepting writes: the first write or sync that failed.
#[derive(Debug)]
pub struct Failure {
    pub op: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
    /// Everything up to here was durable before the failure; nothing after it is acknowledged.
    pub durable: Seq,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} failed: {}; records after seq {} are not durable and the journal accepts no more writes",
            self.op,
            self.path.display(),
            self.error,
            self.durable
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "the state folder {} is in use by another tokengate process (it holds the lock on {})",
        dir.display(),
        lock.display()
    )]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: corrupt at byte offset {offset}: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("{}: replaying {what} at byte offset {offset} failed: {source}", path.display())]
    Replay {
        path: PathBuf,
        offset: u64,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the journal's pending buffer is full ({limit} bytes): the disk is not keeping up")]
    Backpressure { limit: usize },
    #[error("a record of {len} bytes cannot be appended (limit {limit} bytes)")]
    TooLarge { len: usize, limit: usize },
    #[error("the journal failed: {0}")]
    Failed(Arc<Failure>),
    #[error("the journal is closed")]
    Closed,
    #[error("seq {seq} was never appended (head is {head})")]
    NotAppended { seq: Seq, head: Seq },
    #[error("the journal writer did not {what} within {waited:?}; the disk may be stalled")]
    Stalled { what: &'static str, waited: Duration },
    #[error("writing the snapshot failed: {0}")]
    Snapshot(#[source] io::Error),
}

impl JournalError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
        let path = path.to_path_buf();
        move |source| JournalError::Io { op, path, source }
    }
}

/// Counters for metrics and benches, read together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub appended_records: u64,
    /// Framed bytes (headers included).
    pub appended_bytes: u64,
    pub written_records: u64,
    pub written_bytes: u64,
    /// Batch commits: one write and one fdatasync each.
    pub commits: u64,
    /// Appends refused because the pending buffer was full.
    pub rejected_appends: u64,
    pub pending_bytes: u64,
    pub head: Seq,
    pub durable: Seq,
}

/// The open journal. Share it (e.g. in an `Arc`); every method takes `&self`.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Mutex<Option<WriterHandle>>,
    /// One compaction at a time.
    compaction: Mutex<()>,
    writer_timeout: Duration,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating if missing) the journal folder `dir`, replays it through `replay`, and
    /// starts the writer. `replay` sees at most one [`Replay::Snapshot`], then every record after
    /// it in order; records are read one segment at a time, never all at once, and the snapshot
    /// payload is read whole (it is checked before the caller sees it). An error from `replay`
    /// stops recovery and comes back as [`JournalError::Replay`] naming the file and offset.
    ///
    /// Fails at once with [`JournalError::Locked`] if another process (or another `Journal` in
    /// this one) has the folder open. Nothing on disk changes unless recovery succeeds (apart
    /// from removing leftover temporary snapshot files).
    pub fn open<F, E>(dir: &Path, options: JournalOptions, mut replay: F) -> Result<(Journal, Recovered), JournalError>
    where
        F: FnMut(Replay<'_>) -> Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if !dir.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(JournalError::io("cannot create the state folder", dir))?;
            // The new folder's own name must survive a crash too, or every record in it could.
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            sync_dir(parent.unwrap_or(Path::new(".")))?;
        }
        let lock_path = dir.join(format::LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(JournalError::io("cannot open the lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked {
                    dir: dir.to_path_buf(),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(JournalError::io("cannot lock", &lock_path)(e));
            }
        }
        let mode = std::fs::metadata(dir)
            .map_err(JournalError::io("cannot stat the state folder", dir))?
            .permissions()
            .mode();

        let mut recovery = recovery::recover(dir, &mut replay)?;
        recovery.report.loose_permissions = (mode & 0o077 != 0).then_some(mode & 0o777);
        let segment = recovery::prepare_tail(dir, &recovery)?;
        let head = recovery.report.head.0;
        let (shared, handle) = writer::start(dir, lock, segment, head, &options)?;
        let journal = Journal {
            shared,
            writer: Mutex::new(Some(handle)),
            compaction: Mutex::new(()),
            writer_timeout: options.writer_timeout,
        };
        Ok((journal, recovery.report))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Frames `payload` into the pending buffer and returns its seq. No IO: one short lock, one
    /// CRC and one copy. Fails with [`JournalError::Backpressure`] when the pending buffer is at
    /// its cap (the record is not appended; counted in [`JournalStats::rejected_appends`]).
    pub fn append(&self, payload: &[u8]) -> Result<Seq, JournalError> {
        self.shared.append(payload)
    }

    /// The last seq appended (durable or not). Waiting for it waits for everything before it.
    pub fn head(&self) -> Seq {
        self.shared.head()
    }

    /// The last seq known to be on disk.
    pub fn durable_seq(&self) -> Seq {
        self.shared.durable_seq()
    }

    /// Resolves once `seq` is durable; fails if the journal failed or closed before that. Cheap
    /// for many concurrent waiters (one watch channel, woken once per batch). Has no timeout of
    /// its own: a caller that must answer within a bound wraps it in `tokio::time::timeout`
    /// (and must then treat the record as not acknowledged, though it may still become durable).
    pub async fn durable(&self, seq: Seq) -> Result<(), JournalError> {
        self.shared.durable(seq).await
    }

    pub fn stats(&self) -> JournalStats {
        self.shared.stats()
    }

    /// Flushes what is pending, syncs, and stops the writer; later appends fail with
    /// [`JournalError::Closed`]. Blocks the calling thread for one batch commit at most (call it
    /// from `spawn_blocking` in async code), and no longer than `writer_timeout`: past that it
    /// returns [`JournalError::Stalled`] and leaves the writer thread to finish or hang on its
    /// own (it keeps the folder locked while it lives). Idempotent.
    pub fn close(&self) -> Result<(), JournalError> {
        self.shared.begin_close();
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = writer.as_ref() {
            match handle.done.recv_timeout(self.writer_timeout) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    // The writer has returned (or panicked, which its guard turned into a failure).
                    if let Some(handle) = writer.take() {
                        let _ = handle.thread.join();
                    }
                }
                // The handle stays, so a later close (or drop) waits again.
                Err(RecvTimeoutError::Timeout) => {
                    return Err(JournalError::Stalled {
                        what: "flush and stop",
                        waited: self.writer_timeout,
                    });
                }
            }
        }
        drop(writer);
        match self.shared.failure() {
            Some(f) => Err(JournalError::Failed(f)),
            None => Ok(()),
        }
    }
}

impl Drop for Journal {
    /// Same as [`Journal::close`]; a failure was already reported to every appender and waiter,
    /// but a stalled writer has no one else to tell.
    fn drop(&mut self) {
        if let Err(e @ JournalError::Stalled { .. }) = self.close() {
            tracing::error!(dir = %self.shared.dir.display(), error = %e, "journal not closed cleanly");
        }
    }
}

/// Syncs a folder, so that files created, renamed or removed in it stay that way after a crash.
fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(JournalError::io("cannot sync the folder", dir))
}
