//! Measurements, not tests: run in release, one at a time, and read the figures.
//!
//! ```text
//! cargo test --release --lib journal::bench -- --ignored --nocapture --test-threads 1
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{CommitObserver, Journal, JournalOptions, Replay, Seq};

fn open(dir: &std::path::Path) -> (Journal, u64, Duration) {
    open_with(dir, JournalOptions::default())
}

fn open_with(dir: &std::path::Path, options: JournalOptions) -> (Journal, u64, Duration) {
    let started = Instant::now();
    let mut records = 0u64;
    let mut snapshot_bytes = 0usize;
    let (journal, _) = Journal::open(dir, options, |item| {
        match item {
            Replay::Snapshot { payload, .. } => snapshot_bytes = payload.len(),
            Replay::Record { payload, .. } => {
                records += 1;
                std::hint::black_box(payload);
            }
        }
        Ok::<(), std::convert::Infallible>(())
    })
    .expect("open");
    std::hint::black_box(snapshot_bytes);
    (journal, records, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `tasks` concurrent appenders, each appending a record and waiting until it is durable, over
/// and over for `duration`: records/s, commits, and the append → durable latency distribution.
fn group_commit(tasks: usize, payload_len: usize, duration: Duration, max_commit_delay: Duration) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let commits = Arc::new(Mutex::new(Vec::new()));
    let seen = commits.clone();
    let observer: CommitObserver = Arc::new(move |_, took| seen.lock().expect("lock").push(took));
    let options = JournalOptions {
        observer: Some(observer),
        max_commit_delay,
        ..JournalOptions::default()
    };
    let (journal, _, _) = open_with(&tmp.path().join("state"), options);
    let journal = Arc::new(journal);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let latencies: Vec<Duration> = runtime.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let journal = journal.clone();
            handles.push(tokio::spawn(async move {
                let payload = vec![t as u8; payload_len];
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let at = Instant::now();
                    let seq = journal.append(&payload).expect("append");
                    journal.durable(seq).await.expect("durable");
                    latencies.push(at.elapsed());
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("task"));
        }
        all
    });
    let elapsed = started.elapsed();
    let mut sorted = latencies;
    sorted.sort_unstable();
    let mut commits = std::mem::take(&mut *commits.lock().expect("lock"));
    commits.sort_unstable();
    let stats = journal.stats();
    println!(
        "group commit: {tasks} tasks, {payload_len} B payloads, max_commit_delay {max_commit_delay:?}, {:.1} s: \
         {:.0} records/s, {} commits ({:.0}/s, {:.1} records/commit, write+fdatasync p50 {:?} p99 {:?}), \
         durable wait p50 {:?} p99 {:?} max {:?}",
        elapsed.as_secs_f64(),
        sorted.len() as f64 / elapsed.as_secs_f64(),
        stats.commits,
        stats.commits as f64 / elapsed.as_secs_f64(),
        stats.written_records as f64 / stats.commits.max(1) as f64,
        percentile(&commits, 0.50),
        percentile(&commits, 0.99),
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or_default(),
    );
}

#[test]
#[ignore = "measurement: run in release with --nocapture"]
fn group_commit_64_appenders() {
    // Without gathering first, then with the default, back to back so the disk is comparable.
    group_commit(64, 512, Duration::from_secs(5), Duration::ZERO);
    group_commit(
        64,
        512,
        Duration::from_secs(5),
        JournalOptions::default().max_commit_delay,
    );
}

#[test]
#[ignore = "measurement: run in release with --nocapture"]
fn group_commit_1_appender() {
    group_commit(
        1,
        512,
        Duration::from_secs(3),
        JournalOptions::default().max_commit_delay,
    );
}

#[test]
#[ignore = "measurement: run in release with --nocapture"]
fn group_commit_256_appenders() {
    group_commit(
        256,
        512,
        Duration::from_secs(5),
        JournalOptions::default().max_commit_delay,
    );
}

/// Appends `n` records as fast as the pending cap allows (waiting for the head when it pushes
/// back), then closes.
fn fill(journal: &Journal, n: u64, payload_len: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let payload = vec![0x5a; payload_len];
    let mut appended = 0;
    while appended < n {
        match journal.append(&payload) {
            Ok(_) => appended += 1,
            Err(super::JournalError::Backpressure { .. }) => {
                runtime.block_on(journal.durable(journal.head())).expect("durable");
            }
            Err(e) => panic!("{e}"),
        }
    }
    journal.close().expect("close");
}

#[test]
#[ignore = "measurement: run in release with --nocapture"]
fn recovery_of_a_million_records() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("state");
    let (journal, _, _) = open(&dir);
    let started = Instant::now();
    fill(&journal, 1_000_000, 150);
    let written = started.elapsed();
    drop(journal);
    let bytes: u64 = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    let (_journal, records, took) = open(&dir);
    assert_eq!(records, 1_000_000);
    println!(
        "recovery: 1M records of 150 B ({:.0} MB of log, written in {:.1} s) replayed in {:?}",
        bytes as f64 / 1e6,
        written.as_secs_f64(),
        took
    );
}

#[test]
#[ignore = "measurement: run in release with --nocapture"]
fn recovery_of_a_snapshot_and_a_tail() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("state");
    let (journal, _, _) = open(&dir);
    fill_open(&journal, 1000);
    // A snapshot the size of 1M sessions at 200 bytes each, then 100k records after it.
    let chunk = vec![0xa5u8; 1 << 20];
    let started = Instant::now();
    let stats = journal
        .compact(|w| {
            for _ in 0..200 {
                w.write_all(&chunk)?;
            }
            Ok(())
        })
        .expect("compact");
    let compacted = started.elapsed();
    fill(&journal, 100_000, 150);
    drop(journal);
    let (_journal, records, took) = open(&dir);
    assert_eq!(records, 100_000);
    println!(
        "recovery: snapshot of {:.0} MB (written in {:.2} s) + 100k records of 150 B replayed in {:?}",
        stats.snapshot_bytes as f64 / 1e6,
        compacted.as_secs_f64(),
        took
    );
}

fn fill_open(journal: &Journal, n: u64) {
    for _ in 0..n {
        journal.append(&[1u8; 150]).expect("append");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(journal.durable(journal.head())).expect("durable");
    assert!(journal.head() >= Seq(n));
}
