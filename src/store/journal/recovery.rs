//! Reading a journal folder back: pick the snapshot, replay the segments after it, decide what a
//! bad frame means (torn tail: cut it; anything else: refuse to start), and prepare the segment
//! the writer continues in.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::format::{self, FileKind, SEGMENT_HEADER_LEN, SNAPSHOT_HEADER_LEN};
use super::writer::{self, Segment};
use super::{JournalError, Recovered, Replay, Seq, SnapshotInfo, Truncation};

pub struct Recovery {
    pub report: Recovered,
    tail: Tail,
}

/// What becomes of the last segment once replay has succeeded.
enum Tail {
    /// Nothing to continue (no segment, or the log ends before the snapshot): start a new
    /// segment at head + 1.
    Fresh,
    /// Keep appending to the last segment, cut to `valid_len` first if it was longer.
    Continue {
        path: PathBuf,
        valid_len: u64,
        file_len: u64,
    },
    /// The last segment's header is torn (the crash came while it was being created, so it holds
    /// no record): replace it.
    Recreate { path: PathBuf },
}

type ReplayError = Box<dyn std::error::Error + Send + Sync>;

pub fn recover<F, E>(dir: &Path, replay: &mut F) -> Result<Recovery, JournalError>
where
    F: FnMut(Replay<'_>) -> Result<(), E>,
    E: Into<ReplayError>,
{
    let mut report = Recovered::default();
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    let mut snapshots: Vec<(u64, PathBuf)> = Vec::new();
    let entries = fs::read_dir(dir).map_err(JournalError::io("cannot list the state folder", dir))?;
    for entry in entries {
        let entry = entry.map_err(JournalError::io("cannot list the state folder", dir))?;
        let path = entry.path();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let kind = match entry.file_name().to_str() {
            Some(name) if is_file => format::classify(name),
            _ => FileKind::Other,
        };
        match kind {
            FileKind::Segment(first) => segments.push((first, path)),
            FileKind::Snapshot(seq) => snapshots.push((seq, path)),
            FileKind::TempSnapshot => {
                fs::remove_file(&path)
                    .map_err(JournalError::io("cannot remove the leftover temporary snapshot", &path))?;
                report.removed_temp_files.push(path);
            }
            FileKind::Lock => {}
            FileKind::Other => report.ignored_files.push(path),
        }
    }
    segments.sort_unstable_by_key(|s| s.0);
    snapshots.sort_unstable_by_key(|s| s.0);

    // The newest snapshot that checks out. A damaged newer one is passed over only if the log
    // still reaches past it (checked below); otherwise its damage is the error.
    let mut base = 0u64;
    let mut newest_skipped: Option<u64> = None;
    let mut buf = Vec::new();
    for (seq, path) in snapshots.iter().rev() {
        read_whole(path, &mut buf)?;
        match format::decode_snapshot(&buf, *seq) {
            Ok(payload) => {
                replay(Replay::Snapshot {
                    seq: Seq(*seq),
                    payload,
                })
                .map_err(|e| JournalError::Replay {
                    path: path.clone(),
                    offset: SNAPSHOT_HEADER_LEN as u64,
                    what: "the snapshot".into(),
                    source: e.into(),
                })?;
                report.snapshot = Some(SnapshotInfo {
                    seq: Seq(*seq),
                    path: path.clone(),
                    bytes: buf.len() as u64,
                });
                base = *seq;
                break;
            }
            Err(reason) => {
                newest_skipped.get_or_insert(*seq);
                report.skipped_snapshots.push(JournalError::Corrupt {
                    path: path.clone(),
                    offset: 0,
                    reason,
                });
            }
        }
    }
    if report.snapshot.is_none() && !report.skipped_snapshots.is_empty() {
        return Err(report.skipped_snapshots.swap_remove(0));
    }
    // The snapshot may be hundreds of megabytes; do not keep it while reading segments.
    buf = Vec::new();

    // Segments whose records are all covered by the snapshot (the next one starts at or below
    // base + 1) are not read at all: they are left over from a compaction interrupted before
    // its deletions, and will go at the next one.
    let start = (0..segments.len()).find(|&i| segments.get(i + 1).is_none_or(|next| next.0 > base + 1));
    let mut tail = Tail::Fresh;
    let mut log_end = base;
    if let Some(start) = start {
        let (first, path) = &segments[start];
        if *first > base + 1 {
            if newest_skipped.is_some() {
                return Err(report.skipped_snapshots.swap_remove(0));
            }
            let covered = match &report.snapshot {
                Some(s) => format!("the snapshot {} covers only up to seq {base}", s.path.display()),
                None => "there is no snapshot, so seq 1 was expected".into(),
            };
            return Err(JournalError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: format!("records before seq {first} are missing: {covered}"),
            });
        }
        let mut expected = *first;
        for (j, (first, path)) in segments.iter().enumerate().skip(start) {
            let last = j + 1 == segments.len();
            if *first != expected {
                return Err(JournalError::Corrupt {
                    path: path.clone(),
                    offset: 0,
                    reason: format!(
                        "sequence gap: the previous segment ends at seq {}, this one starts at {first}",
                        expected - 1
                    ),
                });
            }
            read_whole(path, &mut buf)?;
            match format::decode_segment_header(&buf) {
                Ok(declared) if declared == *first => {}
                Ok(declared) => {
                    return Err(JournalError::Corrupt {
                        path: path.clone(),
                        offset: 0,
                        reason: format!("the header says the first seq is {declared}, the file name says {first}"),
                    });
                }
                Err(_) if last && buf.len() <= SEGMENT_HEADER_LEN => {
                    report.truncated = Some(Truncation {
                        path: path.clone(),
                        offset: 0,
                        dropped_bytes: buf.len() as u64,
                    });
                    tail = Tail::Recreate { path: path.clone() };
                    break;
                }
                Err(reason) => {
                    return Err(JournalError::Corrupt {
                        path: path.clone(),
                        offset: 0,
                        reason,
                    });
                }
            }
            let mut at = SEGMENT_HEADER_LEN;
            while at < buf.len() {
                let Some(frame) = format::decode_frame(&buf, at) else {
                    bad_frame(&buf, path, at, expected, last)?;
                    report.truncated = Some(Truncation {
                        path: path.clone(),
                        offset: at as u64,
                        dropped_bytes: (buf.len() - at) as u64,
                    });
                    break;
                };
                if frame.seq != expected {
                    return Err(JournalError::Corrupt {
                        path: path.clone(),
                        offset: at as u64,
                        reason: format!("sequence gap: expected seq {expected}, found {}", frame.seq),
                    });
                }
                if frame.seq > base {
                    replay(Replay::Record {
                        seq: Seq(frame.seq),
                        payload: frame.payload,
                    })
                    .map_err(|e| JournalError::Replay {
                        path: path.clone(),
                        offset: at as u64,
                        what: format!("record {}", frame.seq),
                        source: e.into(),
                    })?;
                    report.records += 1;
                }
                expected += 1;
                at = frame.next;
            }
            if last {
                tail = Tail::Continue {
                    path: path.clone(),
                    valid_len: at.min(buf.len()) as u64,
                    file_len: buf.len() as u64,
                };
            }
        }
        log_end = expected - 1;
    }
    if log_end < base && matches!(tail, Tail::Continue { .. }) {
        // Every record is in the snapshot but the log stops short of it (its newest segment is
        // gone). Nothing is lost; continuing that segment would leave a gap, so start afresh.
        tail = Tail::Fresh;
    }
    let head = log_end.max(base);
    if newest_skipped.is_some_and(|skipped| head < skipped) {
        // The damaged snapshot covered records the log no longer has.
        return Err(report.skipped_snapshots.swap_remove(0));
    }
    report.head = Seq(head);
    Ok(Recovery { report, tail })
}

/// A frame at `at` did not check out. Only the tail of the last segment may be torn: if any valid
/// frame follows, or this segment is not the last, records after the damage were written (and
/// perhaps acknowledged) after it, so this is corruption, not a crash mid-write.
fn bad_frame(buf: &[u8], path: &Path, at: usize, expected: u64, last: bool) -> Result<(), JournalError> {
    let reason = if !last {
        Some(format!(
            "record {expected} is short or fails its checksum, in a segment that is not the last"
        ))
    } else {
        format::find_valid_frame(buf, at + 1, expected).map(|next| {
            format!(
                "record {expected} is short or fails its checksum, but a valid record follows at byte offset {next}"
            )
        })
    };
    match reason {
        Some(reason) => Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            offset: at as u64,
            reason,
        }),
        None => Ok(()),
    }
}

fn read_whole(path: &Path, buf: &mut Vec<u8>) -> Result<(), JournalError> {
    buf.clear();
    File::open(path)
        .and_then(|mut f| f.read_to_end(buf))
        .map(drop)
        .map_err(JournalError::io("cannot read", path))
}

/// Applies the outcome of a successful recovery to the last segment (cut a torn tail, replace a
/// torn header, or start a new segment) and opens the segment the writer appends to.
pub fn prepare_tail(dir: &Path, recovery: &Recovery) -> Result<Segment, JournalError> {
    let head = recovery.report.head.0;
    match &recovery.tail {
        Tail::Continue {
            path,
            valid_len,
            file_len,
        } => {
            let file = OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(JournalError::io("cannot open the segment", path))?;
            if valid_len < file_len {
                file.set_len(*valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(JournalError::io("cannot cut the torn tail of", path))?;
            }
            Ok(Segment {
                file,
                path: path.clone(),
                len: *valid_len,
            })
        }
        Tail::Recreate { path } => {
            fs::remove_file(path).map_err(JournalError::io("cannot remove the torn segment", path))?;
            writer::create_segment(dir, head + 1)
        }
        Tail::Fresh => writer::create_segment(dir, head + 1),
    }
}
