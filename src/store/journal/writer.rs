//! The append path and the writer thread: appenders frame records into one pending buffer under
//! a short lock; one OS thread takes the whole buffer at a time and commits it with one write and
//! one fdatasync (group commit), then publishes the durable seq on a watch channel.
//!
//! Why an OS thread: fdatasync blocks for milliseconds, and batching wants exactly one sync in
//! flight, so a dedicated thread is simpler than borrowing tokio's blocking pool. While it syncs
//! batch n, batch n+1 accumulates; the batch grows with the load, so throughput scales with
//! concurrency while each record waits about one to two syncs.
//!
//! Gathering: callers typically wait for their record and then append the next one, and they do
//! so some tens or hundreds of microseconds after a commit releases them. A writer that took the
//! next batch at once would take it before most of them are back, so they would split into two
//! alternating halves, each waiting two commits. So when fewer records are pending than went
//! into the last batch, the writer waits for that many, but no longer than a quarter of the last
//! commit's duration (capped by `max_commit_delay`). A lone caller is never delayed: with one
//! record in the last batch, one pending record is enough.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::format::{self, SEGMENT_HEADER_LEN};
use super::{CommitObserver, Failure, JournalError, JournalOptions, JournalStats, Seq};

/// The writer keeps its batch buffer's capacity for the next batch, up to this size; a burst that
/// grew it further gives the memory back.
const KEEP_BUFFER_CAPACITY: usize = 8 << 20;

/// The segment the writer appends to.
pub struct Segment {
    pub file: File,
    pub path: PathBuf,
    /// Bytes in the file, header included.
    pub len: u64,
}

impl Segment {
    fn has_records(&self) -> bool {
        self.len > SEGMENT_HEADER_LEN as u64
    }
}

/// A failed file operation, before it becomes a [`JournalError`] or a [`Failure`].
pub struct IoFailure {
    op: &'static str,
    path: PathBuf,
    error: io::Error,
}

impl From<IoFailure> for JournalError {
    fn from(f: IoFailure) -> JournalError {
        JournalError::Io {
            op: f.op,
            path: f.path,
            source: f.error,
        }
    }
}

/// Creates a segment whose first record will be `first`: header written and synced, folder
/// synced, so that once a record in it is reported durable the file is sure to be found.
pub fn create_segment(dir: &Path, first: u64) -> Result<Segment, JournalError> {
    create_segment_io(dir, first).map_err(JournalError::from)
}

fn create_segment_io(dir: &Path, first: u64) -> Result<Segment, IoFailure> {
    let path = dir.join(format::segment_name(first));
    let failed = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |error| IoFailure { op, path, error }
    };
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(failed("create", &path))?;
    file.write_all(&format::encode_segment_header(first))
        .and_then(|()| file.sync_all())
        .map_err(failed("write the header of", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(failed("sync the folder", dir))?;
    Ok(Segment {
        file,
        path,
        len: SEGMENT_HEADER_LEN as u64,
    })
}

/// Test-only faults, applied by the writer to the batches it takes.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    /// The writer takes no batch (as if stuck in a write): appends pile up in the pending buffer.
    pub stalled: bool,
    pub fail_write: bool,
    pub fail_sync: bool,
}

type SwitchReply = SyncSender<Result<u64, JournalError>>;

/// Everything appenders and the writer share under the one lock.
struct Pending {
    /// Framed records not yet taken by the writer.
    buf: Vec<u8>,
    records: usize,
    next_seq: u64,
    appended_records: u64,
    appended_bytes: u64,
    rejected_appends: u64,
    failure: Option<Arc<Failure>>,
    closing: bool,
    /// The writer is waiting on `wake`, for `wake_at_records` pending records (an append that
    /// brings `records` there must notify it).
    writer_idle: bool,
    wake_at_records: usize,
    /// A compaction waiting for the writer to start a new segment.
    switch: Option<SwitchReply>,
    #[cfg(test)]
    faults: Faults,
}

struct DurableState {
    seq: u64,
    failure: Option<Arc<Failure>>,
    closed: bool,
}

pub struct Shared {
    pub dir: PathBuf,
    state: Mutex<Pending>,
    wake: Condvar,
    head: AtomicU64,
    durable: AtomicU64,
    durable_tx: watch::Sender<DurableState>,
    written_records: AtomicU64,
    written_bytes: AtomicU64,
    commits: AtomicU64,
    max_pending: usize,
    /// Held (so the folder stays locked) as long as anything, the writer thread included, holds
    /// this; the kernel releases it if the process dies.
    _lock: File,
}

pub struct WriterHandle {
    pub thread: JoinHandle<()>,
    /// Sent to (or dropped) when the writer thread ends.
    pub done: Receiver<()>,
}

/// How long the writer may hold a batch open for callers it just released.
#[derive(Debug, Clone, Copy, Default)]
struct Gather {
    records: usize,
    window: Duration,
}

/// One batch, as taken from the pending buffer.
struct Batch {
    records: usize,
    /// The last seq appended when the batch was taken: the batch ends with it.
    last_seq: u64,
    switch: Option<SwitchReply>,
    closing: bool,
    #[cfg(test)]
    faults: Faults,
}

pub fn start(
    dir: &Path,
    lock: File,
    segment: Segment,
    head: u64,
    options: &JournalOptions,
) -> Result<(Arc<Shared>, WriterHandle), JournalError> {
    let (durable_tx, _) = watch::channel(DurableState {
        seq: head,
        failure: None,
        closed: false,
    });
    let shared = Arc::new(Shared {
        dir: dir.to_path_buf(),
        state: Mutex::new(Pending {
            buf: Vec::new(),
            records: 0,
            next_seq: head + 1,
            appended_records: 0,
            appended_bytes: 0,
            rejected_appends: 0,
            failure: None,
            closing: false,
            writer_idle: false,
            wake_at_records: 1,
            switch: None,
            #[cfg(test)]
            faults: Faults::default(),
        }),
        wake: Condvar::new(),
        head: AtomicU64::new(head),
        durable: AtomicU64::new(head),
        durable_tx,
        written_records: AtomicU64::new(0),
        written_bytes: AtomicU64::new(0),
        commits: AtomicU64::new(0),
        max_pending: options.max_pending_bytes,
        _lock: lock,
    });
    let writer = Writer {
        shared: shared.clone(),
        segment,
        batch: Vec::new(),
        segment_bytes: options.segment_bytes,
        observer: options.observer.clone(),
        max_commit_delay: options.max_commit_delay,
        gather: Gather::default(),
    };
    let (done_tx, done) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || {
            writer.run();
            let _ = done_tx.send(());
        })
        .map_err(JournalError::io("cannot start the writer thread for", dir))?;
    Ok((shared, WriterHandle { thread, done }))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding this lock; if something did, the data is still consistent
        // (every field is updated in one step), so carry on rather than poison every caller.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn append(&self, payload: &[u8]) -> Result<Seq, JournalError> {
        let Some(frame_len) = format::frame_len(payload.len()).filter(|&l| l <= self.max_pending) else {
            let limit = self
                .max_pending
                .saturating_sub(format::FRAME_HEADER_LEN)
                .min(u32::MAX as usize);
            return Err(JournalError::TooLarge {
                len: payload.len(),
                limit,
            });
        };
        let mut p = self.lock();
        if let Some(f) = &p.failure {
            return Err(JournalError::Failed(f.clone()));
        }
        if p.closing {
            return Err(JournalError::Closed);
        }
        if p.buf.len() + frame_len > self.max_pending {
            p.rejected_appends += 1;
            // A writer gathering more records must stop waiting: no more will fit.
            let wake = std::mem::take(&mut p.writer_idle);
            drop(p);
            if wake {
                self.wake.notify_one();
            }
            return Err(JournalError::Backpressure {
                limit: self.max_pending,
            });
        }
        let seq = p.next_seq;
        format::encode_frame(&mut p.buf, seq, payload);
        p.next_seq += 1;
        p.records += 1;
        p.appended_records += 1;
        p.appended_bytes += frame_len as u64;
        self.head.store(seq, Ordering::Release);
        let wake = p.writer_idle && p.records >= p.wake_at_records;
        if wake {
            p.writer_idle = false;
        }
        drop(p);
        if wake {
            self.wake.notify_one();
        }
        Ok(Seq(seq))
    }

    pub fn head(&self) -> Seq {
        Seq(self.head.load(Ordering::Acquire))
    }

    pub fn durable_seq(&self) -> Seq {
        Seq(self.durable.load(Ordering::Acquire))
    }

    pub async fn durable(&self, seq: Seq) -> Result<(), JournalError> {
        if seq.0 <= self.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        let head = self.head();
        if seq > head {
            return Err(JournalError::NotAppended { seq, head });
        }
        let mut rx = self.durable_tx.subscribe();
        match rx.wait_for(|d| d.seq >= seq.0 || d.failure.is_some() || d.closed).await {
            Ok(d) if d.seq >= seq.0 => Ok(()),
            Ok(d) => Err(match &d.failure {
                Some(f) => JournalError::Failed(f.clone()),
                None => JournalError::Closed,
            }),
            // The sender lives in `self`, so this cannot happen; answer as for a closed journal.
            Err(_) => Err(JournalError::Closed),
        }
    }

    pub fn stats(&self) -> JournalStats {
        let p = self.lock();
        JournalStats {
            appended_records: p.appended_records,
            appended_bytes: p.appended_bytes,
            written_records: self.written_records.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            rejected_appends: p.rejected_appends,
            pending_bytes: p.buf.len() as u64,
            head: self.head(),
            durable: self.durable_seq(),
        }
    }

    pub fn failure(&self) -> Option<Arc<Failure>> {
        self.lock().failure.clone()
    }

    pub fn begin_close(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }

    /// Asks the writer to finish the current segment after committing everything appended so
    /// far, and to start a new one; the answer is the last seq in the finished segment.
    pub fn request_switch(&self) -> Result<Receiver<Result<u64, JournalError>>, JournalError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut p = self.lock();
        if let Some(f) = &p.failure {
            return Err(JournalError::Failed(f.clone()));
        }
        if p.closing {
            return Err(JournalError::Closed);
        }
        p.switch = Some(tx);
        drop(p);
        self.wake.notify_one();
        Ok(rx)
    }

    #[cfg(test)]
    pub fn set_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.lock().faults);
        self.wake.notify_one();
    }

    /// Waits for work and takes it: the whole pending buffer (swapped with `spare`, so no copy),
    /// any switch request, and whether this is the last batch. With records pending but fewer
    /// than `gather.records`, waits up to `gather.window` for more (see the module docs).
    fn take_batch(&self, spare: &mut Vec<u8>, gather: Gather) -> Batch {
        let mut p = self.lock();
        loop {
            let work = !p.buf.is_empty() || p.switch.is_some() || p.closing;
            #[cfg(test)]
            let work = work && !p.faults.stalled;
            if work {
                break;
            }
            p.writer_idle = true;
            p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.records < gather.records && p.switch.is_none() && !p.closing {
            let deadline = Instant::now() + gather.window;
            p.wake_at_records = gather.records;
            loop {
                let now = Instant::now();
                let full = p.buf.len() >= self.max_pending / 2;
                if p.records >= gather.records || full || p.switch.is_some() || p.closing || now >= deadline {
                    break;
                }
                p.writer_idle = true;
                p = self
                    .wake
                    .wait_timeout(p, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            p.wake_at_records = 1;
        }
        p.writer_idle = false;
        std::mem::swap(&mut p.buf, spare);
        Batch {
            records: std::mem::take(&mut p.records),
            last_seq: p.next_seq - 1,
            switch: p.switch.take(),
            closing: p.closing,
            #[cfg(test)]
            faults: p.faults,
        }
    }

    fn publish_durable(&self, seq: u64) {
        self.durable.store(seq, Ordering::Release);
        self.durable_tx.send_modify(|d| d.seq = seq);
    }

    /// Stops the journal for good: records not yet durable are dropped (their waiters get the
    /// failure), appenders and waiters from now on get it too. The first failure wins.
    fn fail(&self, f: IoFailure) -> Arc<Failure> {
        let failure = Arc::new(Failure {
            op: f.op,
            path: f.path,
            error: f.error,
            durable: self.durable_seq(),
        });
        let mut p = self.lock();
        let failure = p.failure.get_or_insert(failure).clone();
        p.buf = Vec::new();
        p.records = 0;
        let switch = p.switch.take();
        drop(p);
        if let Some(reply) = switch {
            let _ = reply.send(Err(JournalError::Failed(failure.clone())));
        }
        self.durable_tx.send_modify(|d| d.failure = Some(failure.clone()));
        failure
    }
}

struct Writer {
    shared: Arc<Shared>,
    segment: Segment,
    /// The batch being written; between batches, an empty buffer kept for its capacity.
    batch: Vec<u8>,
    segment_bytes: u64,
    observer: Option<CommitObserver>,
    max_commit_delay: Duration,
    /// Set from the last commit.
    gather: Gather,
}

/// Marks the journal failed if the writer thread unwinds (a panicking observer, say), so that
/// waiters get an error instead of waiting forever.
struct FailOnPanic(Arc<Shared>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(IoFailure {
                op: "the writer thread for",
                path: self.0.dir.clone(),
                error: io::Error::other("panicked"),
            });
        }
    }
}

impl Writer {
    fn run(mut self) {
        let _guard = FailOnPanic(self.shared.clone());
        loop {
            let batch = self.shared.take_batch(&mut self.batch, self.gather);
            if let Err(e) = self.step(&batch) {
                let failure = self.shared.fail(e);
                if let Some(reply) = batch.switch {
                    let _ = reply.send(Err(JournalError::Failed(failure)));
                }
                return;
            }
            if let Some(reply) = batch.switch {
                let _ = reply.send(Ok(batch.last_seq));
            }
            if batch.closing {
                // Appends stop once `closing` is set, so this batch held the last of them.
                self.shared.durable_tx.send_modify(|d| d.closed = true);
                return;
            }
        }
    }

    /// Commits the batch, then starts a new segment if a compaction asked for one or the current
    /// one is full (never leaving an empty segment behind).
    fn step(&mut self, batch: &Batch) -> Result<(), IoFailure> {
        if batch.records > 0 {
            self.commit(batch)?;
        }
        let roll = batch.switch.is_some() || self.segment.len >= self.segment_bytes;
        if roll && self.segment.has_records() {
            self.segment = create_segment_io(&self.shared.dir, batch.last_seq + 1)?;
        }
        Ok(())
    }

    /// One write and one fdatasync for the whole batch, then the durable seq moves.
    fn commit(&mut self, batch: &Batch) -> Result<(), IoFailure> {
        let started = Instant::now();
        let failed = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |error| IoFailure { op, path, error }
        };
        #[cfg(test)]
        if batch.faults.fail_write {
            return Err(failed("write to", &self.segment.path)(io::Error::other(
                "injected write failure",
            )));
        }
        self.segment
            .file
            .write_all(&self.batch)
            .map_err(failed("write to", &self.segment.path))?;
        #[cfg(test)]
        if batch.faults.fail_sync {
            return Err(failed("fdatasync", &self.segment.path)(io::Error::other(
                "injected fdatasync failure",
            )));
        }
        self.segment
            .file
            .sync_data()
            .map_err(failed("fdatasync", &self.segment.path))?;
        let elapsed = started.elapsed();
        self.gather = Gather {
            records: batch.records,
            window: (elapsed / 4).min(self.max_commit_delay),
        };

        let bytes = self.batch.len() as u64;
        self.segment.len += bytes;
        self.shared
            .written_records
            .fetch_add(batch.records as u64, Ordering::Relaxed);
        self.shared.written_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.shared.publish_durable(batch.last_seq);
        if let Some(observe) = &self.observer {
            observe(batch.records, elapsed);
        }
        if self.batch.capacity() > KEEP_BUFFER_CAPACITY {
            self.batch = Vec::new();
        } else {
            self.batch.clear();
        }
        Ok(())
    }
}
