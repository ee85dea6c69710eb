//! The journal's behaviour end to end, through its public API, on real files.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::compact::Step;
use super::format::{self, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::*;

#[derive(Debug, Default, PartialEq, Eq)]
struct Replayed {
    snapshot: Option<(u64, Vec<u8>)>,
    records: Vec<(u64, Vec<u8>)>,
}

fn options() -> JournalOptions {
    JournalOptions {
        writer_timeout: Duration::from_secs(60),
        ..JournalOptions::default()
    }
}

fn open_with(dir: &Path, options: JournalOptions) -> Result<(Journal, Recovered, Replayed), JournalError> {
    let mut replayed = Replayed::default();
    let (journal, recovered) = Journal::open(dir, options, |item| {
        match item {
            Replay::Snapshot { seq, payload } => {
                assert!(
                    replayed.snapshot.is_none() && replayed.records.is_empty(),
                    "snapshot first, once"
                );
                replayed.snapshot = Some((seq.0, payload.to_vec()));
            }
            Replay::Record { seq, payload } => replayed.records.push((seq.0, payload.to_vec())),
        }
        Ok::<(), Infallible>(())
    })?;
    Ok((journal, recovered, replayed))
}

fn open(dir: &Path) -> (Journal, Recovered, Replayed) {
    open_with(dir, options()).expect("open")
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix("tokengate-journal-")
        .tempdir()
        .expect("temp dir");
    let dir = tmp.path().join("state");
    (tmp, dir)
}

fn payload(i: u64) -> Vec<u8> {
    // Varying lengths, so frame boundaries are not regular.
    format!("record {i} {}", "x".repeat((i % 7) as usize)).into_bytes()
}

fn records(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
    range.map(|i| (i, payload(i))).collect()
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn append_all(journal: &Journal, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        assert_eq!(journal.append(&payload(i)).expect("append"), Seq(i));
    }
}

/// Appends each record and waits for it, so each is its own batch.
fn append_durably(journal: &Journal, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        let seq = journal.append(&payload(i)).expect("append");
        block_on(journal.durable(seq)).expect("durable");
    }
}

fn files(dir: &Path, kind: fn(format::FileKind) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| kind(format::classify(p.file_name().and_then(|n| n.to_str()).unwrap_or(""))))
        .collect();
    v.sort();
    v
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    files(dir, |k| matches!(k, format::FileKind::Segment(_)))
}

fn snapshots(dir: &Path) -> Vec<PathBuf> {
    files(dir, |k| matches!(k, format::FileKind::Snapshot(_)))
}

/// Byte offset of each record's frame in a segment holding `range`, and the end offset.
fn frame_offsets(range: std::ops::RangeInclusive<u64>) -> (Vec<usize>, usize) {
    let mut at = SEGMENT_HEADER_LEN;
    let mut starts = Vec::new();
    for i in range {
        starts.push(at);
        at += FRAME_HEADER_LEN + payload(i).len();
    }
    (starts, at)
}

fn flip_bit(path: &Path, bit: usize) {
    let mut bytes = fs::read(path).expect("read");
    bytes[bit / 8] ^= 1 << (bit % 8);
    fs::write(path, bytes).expect("write");
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn reopen_returns_every_record_in_order_and_appends_continue_after_them() {
    let (_tmp, dir) = state_dir();
    let (journal, recovered, replayed) = open(&dir);
    assert_eq!((recovered.head, replayed), (Seq(0), Replayed::default()));
    append_all(&journal, 1..=100);
    drop(journal);

    let (journal, recovered, replayed) = open(&dir);
    assert_eq!(replayed.records, records(1..=100));
    assert_eq!(
        (recovered.head, recovered.records, recovered.truncated),
        (Seq(100), 100, None)
    );
    assert_eq!(journal.head(), Seq(100));
    append_all(&journal, 101..=110);
    drop(journal);

    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records, records(1..=110));
    assert_eq!(segments(&dir).len(), 1, "a restart continues the last segment");
}

#[test]
fn segments_roll_past_the_size_limit_and_are_named_by_their_first_seq() {
    let (_tmp, dir) = state_dir();
    let small = JournalOptions {
        segment_bytes: 100,
        ..options()
    };
    let (journal, _, _) = open_with(&dir, small.clone()).expect("open");
    append_durably(&journal, 1..=20);
    drop(journal);

    let segs = segments(&dir);
    assert!(segs.len() > 3, "{segs:?}");
    let mut expected_first = 1;
    for seg in &segs {
        let bytes = fs::read(seg).expect("read");
        let first = format::decode_segment_header(&bytes).expect("header");
        assert_eq!(
            seg.file_name().and_then(|n| n.to_str()),
            Some(format::segment_name(first).as_str())
        );
        assert_eq!(first, expected_first, "consecutive segments");
        let mut at = SEGMENT_HEADER_LEN;
        while let Some(frame) = format::decode_frame(&bytes, at) {
            assert_eq!(frame.seq, expected_first);
            expected_first += 1;
            at = frame.next;
        }
        assert_eq!(at, bytes.len());
    }
    let (_journal, _, replayed) = open_with(&dir, small).expect("reopen");
    assert_eq!(replayed.records, records(1..=20));
}

#[test]
fn a_torn_tail_at_every_byte_offset_of_the_last_record_is_cut_and_reported() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=3);
    drop(journal);
    let seg = segments(&dir).remove(0);
    let whole = fs::read(&seg).expect("read");
    let (starts, end) = frame_offsets(1..=3);
    assert_eq!(end, whole.len());
    let last = starts[2];

    for cut in last + 1..end {
        fs::write(&seg, &whole[..cut]).expect("write");
        let (journal, recovered, replayed) = open(&dir);
        assert_eq!(replayed.records, records(1..=2), "cut at {cut}");
        assert!(recovered.warnings()[0].contains(&seg.display().to_string()));
        let truncated = recovered.truncated.expect("truncation reported");
        assert_eq!(
            truncated,
            Truncation {
                path: seg.clone(),
                offset: last as u64,
                dropped_bytes: (cut - last) as u64
            },
            "cut at {cut}"
        );
        assert_eq!(
            fs::metadata(&seg).expect("stat").len(),
            last as u64,
            "the tail is cut off on disk"
        );
        assert_eq!(journal.head(), Seq(2));
    }
    // The cut was made durable, and the next record takes seq 3 where the torn one was.
    let (journal, recovered, _) = open(&dir);
    assert_eq!(recovered.truncated, None);
    journal.append(b"new third").expect("append");
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records[2], (3, b"new third".to_vec()));
}

#[test]
fn a_flipped_bit_anywhere_in_the_last_record_cuts_it() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=3);
    drop(journal);
    let seg = segments(&dir).remove(0);
    let whole = fs::read(&seg).expect("read");
    let (starts, end) = frame_offsets(1..=3);

    for bit in starts[2] * 8..end * 8 {
        fs::write(&seg, &whole).expect("write");
        flip_bit(&seg, bit);
        let (_journal, recovered, replayed) = open(&dir);
        assert_eq!(replayed.records, records(1..=2), "bit {bit}");
        assert_eq!(
            recovered.truncated.map(|t| t.offset),
            Some(starts[2] as u64),
            "bit {bit}"
        );
    }
}

#[test]
fn a_zeroed_tail_is_cut() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=5);
    drop(journal);
    let seg = segments(&dir).remove(0);
    let mut bytes = fs::read(&seg).expect("read");
    let len = bytes.len();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&seg, bytes).expect("write");

    let (_journal, recovered, replayed) = open(&dir);
    assert_eq!(replayed.records, records(1..=5));
    assert_eq!(
        recovered.truncated,
        Some(Truncation {
            path: seg,
            offset: len as u64,
            dropped_bytes: 4096
        })
    );
}

#[test]
fn a_flipped_bit_in_an_earlier_record_followed_by_valid_ones_is_an_error_naming_file_and_offset() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=3);
    drop(journal);
    let seg = segments(&dir).remove(0);
    let whole = fs::read(&seg).expect("read");
    let (starts, _) = frame_offsets(1..=3);

    // Every bit of record 2, its length field included (a longer length would swallow record 3
    // and look like a torn tail if nothing looked past it).
    for bit in starts[1] * 8..starts[2] * 8 {
        fs::write(&seg, &whole).expect("write");
        flip_bit(&seg, bit);
        let damaged = fs::read(&seg).expect("read");
        let err = open_with(&dir, options()).expect_err("opened");
        match &err {
            JournalError::Corrupt { path, offset, .. } => {
                assert_eq!((path, offset), (&seg, &(starts[1] as u64)), "bit {bit}");
            }
            other => panic!("bit {bit}: {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&seg.display().to_string()) && text.contains("valid record follows"),
            "{text}"
        );
        assert_eq!(
            fs::read(&seg).expect("read"),
            damaged,
            "nothing is cut when recovery fails"
        );
    }
}

#[test]
fn damage_in_a_segment_that_is_not_the_last_is_an_error_even_at_its_end() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open_with(
        &dir,
        JournalOptions {
            segment_bytes: 100,
            ..options()
        },
    )
    .expect("open");
    append_durably(&journal, 1..=10);
    drop(journal);
    let first = segments(&dir).remove(0);
    let len = fs::metadata(&first).expect("stat").len();
    let file = fs::OpenOptions::new().write(true).open(&first).expect("open");
    file.set_len(len - 1).expect("truncate");

    let err = open_with(&dir, options()).expect_err("opened");
    assert!(
        matches!(&err, JournalError::Corrupt { path, .. } if *path == first),
        "{err}"
    );
    assert!(err.to_string().contains("not the last"), "{err}");
}

#[test]
fn a_missing_segment_is_a_sequence_gap_error_naming_the_next_one() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open_with(
        &dir,
        JournalOptions {
            segment_bytes: 100,
            ..options()
        },
    )
    .expect("open");
    append_durably(&journal, 1..=10);
    drop(journal);
    let segs = segments(&dir);
    fs::remove_file(&segs[1]).expect("remove");

    let err = open_with(&dir, options()).expect_err("opened");
    assert!(
        matches!(&err, JournalError::Corrupt { path, offset: 0, .. } if *path == segs[2]),
        "{err}"
    );
    assert!(err.to_string().contains("sequence gap"), "{err}");

    // Without the first segment (and no snapshot), the log starts too late.
    fs::remove_file(&segs[0]).expect("remove");
    let err = open_with(&dir, options()).expect_err("opened");
    assert!(err.to_string().contains("records before seq"), "{err}");
}

#[test]
fn a_sequence_gap_or_repeat_inside_a_segment_is_an_error() {
    for (seqs, bad_index, found) in [(vec![1, 2, 4], 2, 4), (vec![1, 2, 2, 3], 2, 2)] {
        let (_tmp, dir) = state_dir();
        fs::create_dir(&dir).expect("mkdir");
        let path = dir.join(format::segment_name(1));
        let mut bytes = format::encode_segment_header(1).to_vec();
        let mut offsets = Vec::new();
        for seq in &seqs {
            offsets.push(bytes.len());
            format::encode_frame(&mut bytes, *seq, b"p");
        }
        fs::write(&path, bytes).expect("write");
        let err = open_with(&dir, options()).expect_err("opened");
        match &err {
            JournalError::Corrupt {
                path: p,
                offset,
                reason,
            } => {
                assert_eq!((p, offset), (&path, &(offsets[bad_index] as u64)));
                assert!(reason.contains(&format!("expected seq 3, found {found}")), "{reason}");
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn a_torn_segment_header_is_replaced_but_a_foreign_file_is_an_error() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open_with(
        &dir,
        JournalOptions {
            segment_bytes: 50,
            ..options()
        },
    )
    .expect("open");
    append_durably(&journal, 1..=3);
    drop(journal);
    // A crash while the next segment was being created leaves its header short.
    let next = dir.join(format::segment_name(4));
    let header = format::encode_segment_header(4);
    for len in 0..SEGMENT_HEADER_LEN {
        let _ = fs::remove_file(&next);
        fs::write(&next, &header[..len]).expect("write");
        let (journal, recovered, replayed) = open(&dir);
        assert_eq!(replayed.records, records(1..=3), "header cut at {len}");
        assert_eq!(recovered.truncated.map(|t| (t.path, t.offset)), Some((next.clone(), 0)));
        assert_eq!(fs::read(&next).expect("read"), header, "recreated");
        journal.append(&payload(4)).expect("append");
        drop(journal);
        let (_journal, _, replayed) = open(&dir);
        assert_eq!(replayed.records, records(1..=4));
        fs::remove_file(&next).expect("remove");
    }
    // A full-size file that is not a segment is refused, not overwritten.
    fs::write(&next, vec![b'#'; 100]).expect("write");
    let err = open_with(&dir, options()).expect_err("opened");
    assert!(
        matches!(&err, JournalError::Corrupt { path, .. } if *path == next),
        "{err}"
    );
    assert!(err.to_string().contains("bad magic"), "{err}");
}

#[test]
fn a_replay_error_stops_recovery_naming_file_offset_and_record() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=3);
    drop(journal);
    let err = Journal::open(&dir, options(), |item| match item {
        Replay::Record { seq: Seq(2), .. } => Err("undecodable"),
        _ => Ok(()),
    })
    .expect_err("opened");
    let (starts, _) = frame_offsets(1..=3);
    let seg = segments(&dir).remove(0);
    assert!(matches!(&err, JournalError::Replay { path, offset, .. } if *path == seg && *offset == starts[1] as u64));
    assert!(
        err.to_string().contains("record 2") && err.to_string().contains("undecodable"),
        "{err}"
    );
}

fn snapshot_of(upto: u64) -> Vec<u8> {
    format!("state through {upto}").into_bytes()
}

#[test]
fn after_compaction_recovery_returns_the_snapshot_and_exactly_the_later_records() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open_with(
        &dir,
        JournalOptions {
            segment_bytes: 200,
            ..options()
        },
    )
    .expect("open");
    append_durably(&journal, 1..=30);
    append_all(&journal, 31..=40); // pending, not yet waited for: the switch commits them first
    let old_segments = segments(&dir);
    assert!(old_segments.len() > 1);

    let stats = journal.compact(|w| w.write_all(&snapshot_of(40))).expect("compact");
    assert_eq!(stats.seq, Seq(40));
    // The writer may have rolled into further segments while committing 31..=40 since the listing
    // above; every segment the snapshot covers is removed, none of those listed survives.
    assert!(
        stats.segments_removed >= old_segments.len(),
        "{} removed, {} listed before",
        stats.segments_removed,
        old_segments.len()
    );
    assert!(old_segments.iter().all(|p| !p.exists()));
    assert_eq!(
        stats.snapshot_bytes,
        (format::SNAPSHOT_HEADER_LEN + snapshot_of(40).len()) as u64
    );
    assert_eq!(snapshots(&dir), vec![stats.snapshot_path.clone()]);
    assert_eq!(
        segments(&dir),
        vec![dir.join(format::segment_name(41))],
        "covered segments are gone"
    );
    append_all(&journal, 41..=45);
    drop(journal);

    let (journal, recovered, replayed) = open(&dir);
    assert_eq!(replayed.snapshot, Some((40, snapshot_of(40))));
    assert_eq!(replayed.records, records(41..=45));
    assert_eq!(recovered.head, Seq(45));
    assert_eq!(recovered.snapshot.map(|s| s.path), Some(stats.snapshot_path));

    // A second compaction replaces the first snapshot.
    let stats = journal.compact(|w| w.write_all(&snapshot_of(45))).expect("compact");
    assert_eq!(
        (stats.seq, stats.segments_removed, stats.snapshots_removed),
        (Seq(45), 1, 1)
    );
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!(
        (replayed.snapshot, replayed.records),
        (Some((45, snapshot_of(45))), vec![])
    );
}

#[test]
fn appends_go_on_while_the_snapshot_is_written_and_land_after_it() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=10);
    let stats = journal
        .compact(|w| {
            // The writer keeps committing into the new segment meanwhile.
            append_durably(&journal, 11..=15);
            w.write_all(&snapshot_of(10))
        })
        .expect("compact");
    assert_eq!(stats.seq, Seq(10));
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.snapshot, Some((10, snapshot_of(10))));
    assert_eq!(replayed.records, records(11..=15));
}

#[test]
fn a_crash_after_any_compaction_step_leaves_a_folder_that_recovers() {
    for crash in [Step::Switched, Step::TempWritten, Step::Renamed, Step::OneDeleted] {
        let (_tmp, dir) = state_dir();
        let small = JournalOptions {
            segment_bytes: 150,
            ..options()
        };
        let (journal, _, _) = open_with(&dir, small.clone()).expect("open");
        append_durably(&journal, 1..=20);
        journal
            .compact_crashing_after(crash, |w| w.write_all(&snapshot_of(20)))
            .expect_err("crashed");
        append_all(&journal, 21..=25);
        drop(journal);
        if crash == Step::TempWritten {
            assert_eq!(files(&dir, |k| k == format::FileKind::TempSnapshot).len(), 1);
        }

        let (journal, recovered, replayed) = open_with(&dir, small.clone()).expect("open");
        match crash {
            Step::Switched | Step::TempWritten => {
                assert_eq!(replayed.snapshot, None, "{crash:?}");
                assert_eq!(replayed.records, records(1..=25), "{crash:?}");
            }
            Step::Renamed | Step::OneDeleted => {
                assert_eq!(replayed.snapshot, Some((20, snapshot_of(20))), "{crash:?}");
                assert_eq!(replayed.records, records(21..=25), "{crash:?}: records ≤ 20 skipped");
                assert!(segments(&dir).len() > 1, "{crash:?}: covered segments still there");
            }
        }
        assert_eq!(
            recovered.removed_temp_files.len(),
            usize::from(crash == Step::TempWritten)
        );
        assert!(files(&dir, |k| k == format::FileKind::TempSnapshot).is_empty());

        // The next compaction finishes the job.
        journal.compact(|w| w.write_all(&snapshot_of(25))).expect("compact");
        assert_eq!(segments(&dir), vec![dir.join(format::segment_name(26))], "{crash:?}");
        assert_eq!(snapshots(&dir), vec![dir.join(format::snapshot_name(25))], "{crash:?}");
    }
}

#[test]
fn a_failed_snapshot_writer_leaves_no_temp_file_and_loses_nothing() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=5);
    let err = journal
        .compact(|w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("state encoder failed"))
        })
        .expect_err("fails");
    assert!(err.to_string().contains("state encoder failed"), "{err}");
    assert!(files(&dir, |k| k == format::FileKind::TempSnapshot).is_empty());
    append_all(&journal, 6..=6);
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!((replayed.snapshot, replayed.records), (None, records(1..=6)));
}

#[test]
fn a_leftover_temp_snapshot_is_ignored_and_removed() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=3);
    drop(journal);
    let temp = dir.join(format::temp_snapshot_name(3));
    fs::write(&temp, b"half a snapshot").expect("write");
    let stray = dir.join("notes.txt");
    fs::write(&stray, b"operator's notes").expect("write");

    let (_journal, recovered, replayed) = open(&dir);
    assert_eq!((replayed.snapshot, replayed.records), (None, records(1..=3)));
    assert_eq!(recovered.removed_temp_files, vec![temp.clone()]);
    assert!(!temp.exists());
    assert_eq!(recovered.ignored_files, vec![stray.clone()]);
    assert!(stray.exists(), "files the journal does not know are left alone");
}

#[test]
fn a_corrupt_snapshot_that_is_the_only_one_is_an_error_naming_it() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=5);
    let stats = journal.compact(|w| w.write_all(&snapshot_of(5))).expect("compact");
    drop(journal);
    flip_bit(&stats.snapshot_path, (format::SNAPSHOT_HEADER_LEN + 2) * 8);

    let err = open_with(&dir, options()).expect_err("opened");
    assert!(
        matches!(&err, JournalError::Corrupt { path, .. } if *path == stats.snapshot_path),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_an_older_one_only_while_the_log_reaches_past_it() {
    // The log still holds everything after the older snapshot: recover from it, report the skip.
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=5);
    journal.compact(|w| w.write_all(&snapshot_of(5))).expect("compact");
    append_all(&journal, 6..=8);
    journal
        .compact_crashing_after(Step::Renamed, |w| w.write_all(&snapshot_of(8)))
        .expect_err("crash");
    append_all(&journal, 9..=9);
    drop(journal);
    let newest = dir.join(format::snapshot_name(8));
    flip_bit(&newest, 0);
    let (journal, recovered, replayed) = open(&dir);
    assert_eq!(replayed.snapshot, Some((5, snapshot_of(5))));
    assert_eq!(replayed.records, records(6..=9));
    assert!(matches!(&recovered.skipped_snapshots[..], [JournalError::Corrupt { path, .. }] if *path == newest));
    // A later compaction replaces the damaged one.
    journal.compact(|w| w.write_all(&snapshot_of(9))).expect("compact");
    assert_eq!(snapshots(&dir), vec![dir.join(format::snapshot_name(9))]);
    drop(journal);

    // The log no longer reaches back to the older snapshot: the damage is the error.
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=5);
    let older = journal
        .compact(|w| w.write_all(&snapshot_of(5)))
        .expect("compact")
        .snapshot_path;
    let older_bytes = fs::read(&older).expect("read");
    append_all(&journal, 6..=8);
    let newest = journal
        .compact(|w| w.write_all(&snapshot_of(8)))
        .expect("compact")
        .snapshot_path;
    drop(journal);
    fs::write(&older, older_bytes).expect("restore the older snapshot");
    flip_bit(&newest, 0);
    let err = open_with(&dir, options()).expect_err("opened");
    assert!(
        matches!(&err, JournalError::Corrupt { path, .. } if *path == newest),
        "{err}"
    );
}

#[test]
fn a_second_open_of_the_folder_fails_at_once_naming_it_until_the_first_is_closed() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    let err = open_with(&dir, options()).expect_err("second open succeeded");
    assert!(
        matches!(&err, JournalError::Locked { dir: d, .. } if *d == dir),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&dir.display().to_string()) && text.contains("another tokengate process"),
        "{text}"
    );

    journal.close().expect("close");
    let err = open_with(&dir, options()).expect_err("open while the first still exists");
    assert!(
        matches!(err, JournalError::Locked { .. }),
        "close stops the writer, the lock goes with the Journal"
    );
    drop(journal);
    let (_journal, _, _) = open(&dir);
}

#[test]
fn the_folder_is_created_0700_and_every_file_0600() {
    let (_tmp, dir) = state_dir();
    let (journal, recovered, _) = open(&dir);
    assert_eq!(recovered.loose_permissions, None);
    append_all(&journal, 1..=3);
    journal.compact(|w| w.write_all(b"s")).expect("compact");
    drop(journal);
    assert_eq!(mode(&dir), 0o700);
    let all: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(all.len(), 3, "LOCK, a snapshot, a segment: {all:?}");
    for file in all {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }

    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (_journal, recovered, _) = open(&dir);
    assert_eq!(recovered.loose_permissions, Some(0o755));
    assert!(recovered.warnings().iter().any(|w| w.contains("0700")));
}

/// Records every batch size the writer reports.
fn observed(options: JournalOptions) -> (JournalOptions, Arc<Mutex<Vec<usize>>>) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = batches.clone();
    let observer: CommitObserver = Arc::new(move |records, _| seen.lock().expect("lock").push(records));
    (
        JournalOptions {
            observer: Some(observer),
            ..options
        },
        batches,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_are_group_committed_and_all_recovered() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 500;
    let (_tmp, dir) = state_dir();
    let (opts, batches) = observed(options());
    let (journal, _, _) = open_with(&dir, opts).expect("open");
    let journal = Arc::new(journal);

    // First, deterministically: with the writer held, 64 appends pile up and go in one commit.
    journal.shared.set_faults(|f| f.stalled = true);
    let (appended_tx, mut appended_rx) = tokio::sync::mpsc::channel(TASKS as usize);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let journal = journal.clone();
        let appended = appended_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..=PER_TASK {
                let body = format!("task {t} record {i}").into_bytes();
                let seq = journal.append(&body).expect("append");
                if i == 0 {
                    appended.send(()).await.expect("send");
                }
                journal.durable(seq).await.expect("durable");
                mine.push((seq.0, body));
            }
            mine
        }));
    }
    for _ in 0..TASKS {
        appended_rx.recv().await.expect("appended");
    }
    let stats = journal.stats();
    assert_eq!((stats.head, stats.durable, stats.commits), (Seq(TASKS), Seq(0), 0));
    journal.shared.set_faults(|f| f.stalled = false);

    let mut expected = BTreeMap::new();
    for task in tasks {
        expected.extend(task.await.expect("task"));
    }
    let total = TASKS * (PER_TASK + 1);
    let stats = journal.stats();
    assert_eq!((stats.written_records, stats.durable), (total, Seq(total)));
    assert_eq!(
        batches.lock().expect("lock")[0],
        TASKS as usize,
        "the held-back appends went in one commit"
    );
    assert!(stats.commits <= total - TASKS + 1, "{stats:?}");
    assert_eq!(batches.lock().expect("lock").iter().sum::<usize>() as u64, total);
    eprintln!("{total} records in {} commits", stats.commits);
    drop(journal);

    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records, expected.into_iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn a_failed_fdatasync_fails_current_and_later_waiters_and_appenders() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    let journal = Arc::new(journal);
    let first = journal.append(b"one").expect("append");
    journal.durable(first).await.expect("durable");

    journal.shared.set_faults(|f| {
        f.stalled = true;
        f.fail_sync = true;
    });
    let second = journal.append(b"two").expect("append");
    let waiter = tokio::spawn({
        let journal = journal.clone();
        async move { journal.durable(second).await }
    });
    journal.shared.set_faults(|f| f.stalled = false);
    let seg = segments(&dir).remove(0);

    let err = waiter.await.expect("task").expect_err("never acknowledged");
    let text = err.to_string();
    assert!(
        text.contains("fdatasync") && text.contains(&seg.display().to_string()),
        "{text}"
    );
    assert!(
        text.contains("injected fdatasync failure") && text.contains("after seq 1"),
        "{text}"
    );
    assert!(matches!(journal.durable(second).await, Err(JournalError::Failed(_))));
    assert!(matches!(journal.append(b"three"), Err(JournalError::Failed(_))));
    journal.durable(first).await.expect("what was durable stays so");
    assert_eq!(journal.durable_seq(), first);
    assert!(matches!(journal.close(), Err(JournalError::Failed(_))));
    drop(journal);

    // The record was written but its sync failed: a restart may find it (never acknowledged,
    // so either way is honest) and the journal works again.
    let (journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records[0], (1, b"one".to_vec()));
    journal.append(b"after restart").expect("append");
}

#[tokio::test]
async fn a_failed_write_fails_the_journal_and_the_record_is_not_recovered() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    journal
        .durable(journal.append(b"one").expect("append"))
        .await
        .expect("durable");
    journal.shared.set_faults(|f| f.fail_write = true);
    let second = journal.append(b"two").expect("append");
    let err = journal.durable(second).await.expect_err("never acknowledged");
    assert!(err.to_string().contains("injected write failure"), "{err}");
    assert!(matches!(journal.compact(|_| Ok(())), Err(JournalError::Failed(_))));
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records, vec![(1, b"one".to_vec())]);
}

#[tokio::test]
async fn a_panicking_observer_fails_the_journal_instead_of_hanging_waiters() {
    let (_tmp, dir) = state_dir();
    let observer: CommitObserver = Arc::new(|_, _| panic!("observer bug"));
    let (journal, _, _) = open_with(
        &dir,
        JournalOptions {
            observer: Some(observer),
            ..options()
        },
    )
    .expect("open");
    // The observer runs after the record is durable, so that one is acknowledged; the writer
    // is gone after it, and what comes next is refused rather than left waiting.
    let seq = journal.append(b"one").expect("append");
    journal.durable(seq).await.expect("durable before the observer ran");
    let next = match journal.append(b"two") {
        Ok(seq) => journal.durable(seq).await,
        Err(e) => Err(e),
    };
    let err = next.expect_err("the writer died");
    assert!(err.to_string().contains("panicked"), "{err}");
}

#[test]
fn a_full_pending_buffer_refuses_appends_with_a_distinct_error_and_counts_them() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open_with(
        &dir,
        JournalOptions {
            max_pending_bytes: 256,
            ..options()
        },
    )
    .expect("open");
    journal.shared.set_faults(|f| f.stalled = true);
    let body = [7u8; 50]; // 66 bytes framed: three fit in 256
    for i in 1..=3 {
        assert_eq!(journal.append(&body).expect("fits"), Seq(i));
    }
    for _ in 0..2 {
        let err = journal.append(&body).expect_err("full");
        assert!(matches!(err, JournalError::Backpressure { limit: 256 }), "{err}");
    }
    let stats = journal.stats();
    assert_eq!(
        (stats.rejected_appends, stats.pending_bytes, stats.head),
        (2, 198, Seq(3))
    );

    journal.shared.set_faults(|f| f.stalled = false);
    block_on(journal.durable(Seq(3))).expect("durable");
    assert_eq!(journal.append(&body).expect("room again"), Seq(4));
    let err = journal.append(&[0u8; 241]).expect_err("too large");
    assert!(matches!(err, JournalError::TooLarge { len: 241, limit: 240 }), "{err}");
    assert_eq!(
        journal.stats().rejected_appends,
        2,
        "a record too large for any buffer is not back-pressure"
    );
}

#[test]
fn close_flushes_what_is_pending_and_later_appends_fail() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    append_all(&journal, 1..=10);
    journal.close().expect("close");
    assert_eq!(journal.durable_seq(), Seq(10));
    block_on(journal.durable(Seq(10))).expect("durable");
    assert!(matches!(journal.append(b"late"), Err(JournalError::Closed)));
    journal.close().expect("idempotent");
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records, records(1..=10));
}

#[test]
fn close_gives_up_on_a_stalled_writer_after_the_timeout_and_can_wait_again() {
    let (_tmp, dir) = state_dir();
    let short = JournalOptions {
        writer_timeout: Duration::from_millis(20),
        ..options()
    };
    let (journal, _, _) = open_with(&dir, short).expect("open");
    journal.shared.set_faults(|f| f.stalled = true);
    append_all(&journal, 1..=2);
    assert!(matches!(journal.close(), Err(JournalError::Stalled { .. })));
    journal.shared.set_faults(|f| f.stalled = false);
    journal.close().expect("the writer finished");
    drop(journal);
    let (_journal, _, replayed) = open(&dir);
    assert_eq!(replayed.records, records(1..=2));
}

#[tokio::test]
async fn waiting_for_a_seq_never_appended_is_an_error_not_a_hang() {
    let (_tmp, dir) = state_dir();
    let (journal, _, _) = open(&dir);
    let err = journal.durable(Seq(1)).await.expect_err("nothing appended");
    assert!(
        matches!(
            err,
            JournalError::NotAppended {
                seq: Seq(1),
                head: Seq(0)
            }
        ),
        "{err}"
    );
    journal.durable(Seq(0)).await.expect("seq 0 is trivially durable");
}
