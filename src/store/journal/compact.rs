//! Compaction: a new snapshot of the caller's state, then the log segments and snapshots it
//! makes redundant are deleted. Each step is ordered so a crash after it leaves a folder that
//! recovers to the same state:
//!
//! 1. the writer commits what is pending and starts a new segment at S + 1 (every record ≤ S is
//!    now in older segments, all durable);
//! 2. the caller's state goes into `{S}.snap.tmp`, header last, then fsync (a crash here leaves a
//!    temp file, which recovery removes and never reads);
//! 3. rename to `{S}.snap`, fsync the folder (from here recovery uses the new snapshot and skips
//!    the older segments without reading them);
//! 4. delete segments whose records are all ≤ S and snapshots older than S, fsync the folder.
//!
//! Appenders are not blocked: after step 1 their records go to the new segment, which step 4
//! never touches.

use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;

use super::format::{self, FileKind, SNAPSHOT_HEADER_LEN, SnapshotHeader};
use super::{Journal, JournalError, Seq, sync_dir};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactStats {
    /// The snapshot covers every record up to and including this one.
    pub seq: Seq,
    pub snapshot_path: PathBuf,
    /// Size of the snapshot file, header included.
    pub snapshot_bytes: u64,
    pub segments_removed: usize,
    pub snapshots_removed: usize,
}

/// The steps after which a test can make compaction stop, as if the process died there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Switched,
    TempWritten,
    Renamed,
    OneDeleted,
}

/// Counts and checksums what the caller writes.
struct Checksummed<W> {
    inner: W,
    crc: u32,
    len: u64,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Journal {
    /// Writes a snapshot and deletes what it makes redundant (see the module docs for the steps).
    /// `write_snapshot` must write state that reflects every record up to the returned
    /// [`CompactStats::seq`] — records whose in-memory change was made under the same lock as
    /// their `append` are covered as long as `write_snapshot` reads that state under that lock —
    /// and may reflect later ones too. It runs on the calling thread while appends go on; call
    /// `compact` from `spawn_blocking` in async code. One compaction runs at a time.
    ///
    /// On error nothing already durable is lost: a half-written snapshot is removed (or, after
    /// a crash, ignored and removed at the next open).
    pub fn compact(
        &self,
        write_snapshot: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<CompactStats, JournalError> {
        self.compact_steps(write_snapshot, |_| Ok(()))
    }

    /// [`Journal::compact`] that stops with an error right after `crash`, leaving the folder as
    /// a crash there would.
    #[cfg(test)]
    pub(super) fn compact_crashing_after(
        &self,
        crash: Step,
        write_snapshot: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<CompactStats, JournalError> {
        self.compact_steps(write_snapshot, |step| {
            if step == crash {
                Err(JournalError::Snapshot(io::Error::other(format!(
                    "simulated crash {step:?}"
                ))))
            } else {
                Ok(())
            }
        })
    }

    fn compact_steps(
        &self,
        write_snapshot: impl FnOnce(&mut dyn Write) -> io::Result<()>,
        after: impl Fn(Step) -> Result<(), JournalError>,
    ) -> Result<CompactStats, JournalError> {
        let _one_at_a_time = self.compaction.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.shared.dir.clone();

        let reply = self.shared.request_switch()?;
        let seq = match reply.recv_timeout(self.writer_timeout) {
            Ok(result) => result?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(JournalError::Stalled {
                    what: "switch segments",
                    waited: self.writer_timeout,
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(self.shared.failure().map_or(JournalError::Closed, JournalError::Failed));
            }
        };
        after(Step::Switched)?;

        let temp = dir.join(format::temp_snapshot_name(seq));
        let written = write_temp_snapshot(&temp, seq, write_snapshot);
        let snapshot_bytes = match written {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        after(Step::TempWritten)?;

        let snapshot_path = dir.join(format::snapshot_name(seq));
        fs::rename(&temp, &snapshot_path).map_err(JournalError::io("cannot rename the new snapshot", &temp))?;
        sync_dir(&dir)?;
        after(Step::Renamed)?;

        let mut stats = CompactStats {
            seq: Seq(seq),
            snapshot_path,
            snapshot_bytes,
            segments_removed: 0,
            snapshots_removed: 0,
        };
        let entries = fs::read_dir(&dir).map_err(JournalError::io("cannot list the state folder", &dir))?;
        let mut redundant = Vec::new();
        for entry in entries {
            let entry = entry.map_err(JournalError::io("cannot list the state folder", &dir))?;
            let Some(name) = entry.file_name().to_str().map(format::classify) else {
                continue;
            };
            match name {
                // Segments are named by their first seq and the writer started S + 1 in a new
                // one, so every segment named ≤ S holds only records ≤ S.
                FileKind::Segment(first) if first <= seq => redundant.push((entry.path(), true)),
                FileKind::Snapshot(covered) if covered < seq => redundant.push((entry.path(), false)),
                _ => {}
            }
        }
        redundant.sort();
        for (path, is_segment) in redundant {
            fs::remove_file(&path).map_err(JournalError::io("cannot remove", &path))?;
            if is_segment {
                stats.segments_removed += 1;
            } else {
                stats.snapshots_removed += 1;
            }
            after(Step::OneDeleted)?;
        }
        sync_dir(&dir)?;
        Ok(stats)
    }
}

/// Writes the whole snapshot file: a placeholder header, the caller's payload (checksummed on
/// the way), then the real header, then fsync. Returns the file's size.
fn write_temp_snapshot(
    path: &std::path::Path,
    seq: u64,
    write_snapshot: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<u64, JournalError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(JournalError::io("cannot create the snapshot", path))?;
    let mut out = Checksummed {
        inner: BufWriter::with_capacity(1 << 20, &file),
        crc: 0,
        len: 0,
    };
    out.inner
        .write_all(&[0u8; SNAPSHOT_HEADER_LEN])
        .map_err(JournalError::io("cannot write the snapshot", path))?;
    write_snapshot(&mut out).map_err(JournalError::Snapshot)?;
    out.flush()
        .map_err(JournalError::io("cannot write the snapshot", path))?;
    let (payload_crc, payload_len) = (out.crc, out.len);
    drop(out);
    let header = format::encode_snapshot_header(&SnapshotHeader {
        seq,
        payload_len,
        payload_crc,
    });
    file.write_all_at(&header, 0)
        .and_then(|()| file.sync_all())
        .map_err(JournalError::io("cannot write the snapshot", path))?;
    Ok(SNAPSHOT_HEADER_LEN as u64 + payload_len)
}
