//! Password checks on a small pool of dedicated Argon2 threads.
//!
//! Argon2id costs ~13 ms of CPU and 19 MiB of memory per check (default parameters), so checks must
//! neither run on a runtime worker (they would stall every connection on it) nor escape a bound.
//! Before this pool, a semaphore permit held by the awaiting future was freed when the client went
//! away while the blocking closure ran on, so cancelled logins ran without limit, and each of
//! tokio's blocking threads kept its own Argon2 blocks in its malloc arena for good.
//!
//! Here the capacity is the thread: a job, once a pool thread takes it, runs to completion there,
//! so a requester that goes away cannot free a slot early. A queued job whose requester is already
//! gone is skipped (no CPU for nobody). The queue is bounded; beyond it the caller hears
//! [`VerifyError::Busy`]. Each thread allocates its Argon2 blocks once and reuses them, so the
//! memory the pool holds is at most threads × [`MAX_HASH_MEMORY_BYTES`] (19 MiB each with
//! default parameters), whatever the traffic.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

/// The most Argon2 memory one check may use. Hashes needing more are refused when the config is
/// loaded: each pool thread keeps the blocks of the largest hash it has checked.
pub const MAX_HASH_MEMORY_BYTES: usize = 64 << 20;

/// Jobs that may wait per pool thread; past `threads × this` a check is refused as busy. At ~15 ms
/// a check, a full queue is about half a second of work.
pub const QUEUE_PER_THREAD: usize = 32;

/// The blocks every thread allocates at least: enough for default-cost hashes, so the common case
/// never reallocates.
const DEFAULT_BLOCKS: usize = Params::DEFAULT.block_count();

/// The longest Argon2 output a PHC string can carry.
const MAX_OUTPUT_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("too many password checks are queued")]
    Busy,
    #[error("password verification task failed")]
    TaskFailed,
}

/// Why a PHC string is not a usable password hash. The messages complete "password_hash …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("is not a PHC string (make one with `tokengate hash-password`)")]
    NotPhc,
    #[error("uses {0}; only argon2id is accepted (see `tokengate hash-password`)")]
    Algorithm(String),
    #[error("has version {0}; Argon2 versions are 16 and 19 (see `tokengate hash-password`)")]
    Version(u32),
    #[error("has unusable Argon2 parameters: {0}")]
    Params(String),
    #[error("has no salt or no hash value")]
    Incomplete,
    #[error("has a salt of {0} bytes; Argon2 needs at least 8")]
    SaltTooShort(usize),
    #[error("needs {mib} MiB of memory per check (m={m_cost}); at most 64 MiB is accepted")]
    TooMuchMemory { m_cost: u32, mib: usize },
}

/// An Argon2id PHC string, decoded and checked once: what a password check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHash {
    version: Version,
    params: Params,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl StoredHash {
    /// Parses a PHC string and checks that the pool can verify it: argon2id, a known version,
    /// valid parameters within [`MAX_HASH_MEMORY_BYTES`], a salt of at least 8 bytes.
    pub fn parse(phc: &str) -> Result<StoredHash, HashError> {
        let h = PasswordHash::new(phc).map_err(|_| HashError::NotPhc)?;
        if !matches!(Algorithm::try_from(h.algorithm), Ok(Algorithm::Argon2id)) {
            return Err(HashError::Algorithm(h.algorithm.to_string()));
        }
        let version = match h.version {
            None => Version::default(),
            Some(v) => Version::try_from(v).map_err(|_| HashError::Version(v))?,
        };
        let params = Params::try_from(&h).map_err(|e| HashError::Params(e.to_string()))?;
        let (Some(salt), Some(hash)) = (h.salt, h.hash) else {
            return Err(HashError::Incomplete);
        };
        let mut buf = [0u8; 64];
        let salt = salt.decode_b64(&mut buf).map_err(|_| HashError::NotPhc)?.to_vec();
        if salt.len() < argon2::MIN_SALT_LEN {
            return Err(HashError::SaltTooShort(salt.len()));
        }
        let memory = params.block_count() * Block::SIZE;
        if memory > MAX_HASH_MEMORY_BYTES {
            return Err(HashError::TooMuchMemory {
                m_cost: params.m_cost(),
                mib: memory.div_ceil(1 << 20),
            });
        }
        Ok(StoredHash {
            version,
            params,
            salt,
            hash: hash.as_bytes().to_vec(),
        })
    }

    /// An Argon2id (version 19) hash with the default parameters, from its salt and output: for
    /// the fixed decoy that unknown usernames are checked against.
    pub fn with_default_params(salt: &[u8], hash: &[u8]) -> StoredHash {
        // As `parse` decodes a PHC string, the output length is part of the parameters.
        let params = Params::new(
            Params::DEFAULT_M_COST,
            Params::DEFAULT_T_COST,
            Params::DEFAULT_P_COST,
            Some(hash.len()),
        )
        .unwrap_or(Params::DEFAULT);
        StoredHash {
            version: Version::V0x13,
            params,
            salt: salt.to_vec(),
            hash: hash.to_vec(),
        }
    }

    /// Argon2 memory blocks (1 KiB each) one check of this hash uses.
    pub fn block_count(&self) -> usize {
        self.params.block_count()
    }
}

/// What the pool has done, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub threads: usize,
    /// Checks run to completion (or failed while running).
    pub run: u64,
    /// Jobs dropped unrun because their requester had gone.
    pub skipped: u64,
    /// Checks running right now.
    pub running: usize,
    /// The most checks ever running at once (never more than `threads`).
    pub peak_running: usize,
    /// Jobs waiting for a thread.
    pub queued: usize,
    /// Times a thread allocated its Argon2 blocks (once per thread, plus once per growth for a
    /// hash with more memory than it had seen).
    pub block_allocations: u64,
}

#[derive(Default)]
struct Counters {
    run: AtomicU64,
    skipped: AtomicU64,
    running: AtomicUsize,
    peak_running: AtomicUsize,
    block_allocations: AtomicU64,
}

struct Job {
    hash: Arc<StoredHash>,
    password: zeroize::Zeroizing<Vec<u8>>, // zeroed when the job is done
    reply: oneshot::Sender<Result<bool, VerifyError>>,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Tests hold the threads back to line jobs up deterministically.
    paused: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued, the pool closes, or it is resumed.
    work: Condvar,
    max_queued: usize,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half-updated: every change to it
        // is a single push, pop or retain.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job to run, or `None` once the pool is closed. Jobs whose requester has gone are
    /// counted and skipped here.
    fn next_job(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if !q.paused {
                while let Some(job) = q.jobs.pop_front() {
                    if job.reply.is_closed() {
                        self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    return Some(job);
                }
            }
            q = self.work.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A fixed set of Argon2 threads (`tokengate-argon2-N`) behind a bounded queue. Dropping the pool
/// drops the queued jobs (their requesters hear [`VerifyError::TaskFailed`]) and lets every thread
/// exit after the check it is running, if any; nothing waits for them, so exit is never held up.
pub struct PasswordPool {
    shared: Arc<Shared>,
    threads: usize,
}

/// A submitted check; resolves to whether the password matched.
pub struct Verification(oneshot::Receiver<Result<bool, VerifyError>>);

impl Future for Verification {
    type Output = Result<bool, VerifyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A closed channel means the job was dropped: the pool shut down or its thread panicked.
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(VerifyError::TaskFailed)))
    }
}

impl PasswordPool {
    /// Starts `threads` (at least one) Argon2 threads.
    pub fn new(threads: usize) -> std::io::Result<PasswordPool> {
        let threads = threads.max(1);
        let pool = PasswordPool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    closed: false,
                    paused: false,
                }),
                work: Condvar::new(),
                max_queued: threads * QUEUE_PER_THREAD,
                counters: Counters::default(),
            }),
            threads,
        };
        for i in 0..threads {
            let shared = pool.shared.clone();
            // On failure `pool` is dropped, which stops the threads already started.
            std::thread::Builder::new()
                .name(format!("tokengate-argon2-{i}"))
                .spawn(move || work(&shared))?;
        }
        Ok(pool)
    }

    /// Queues a check of `password` against `hash`. Refused at once when the queue is full.
    pub fn submit(&self, hash: Arc<StoredHash>, password: &str) -> Result<Verification, VerifyError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            hash,
            password: zeroize::Zeroizing::new(password.as_bytes().to_vec()),
            reply,
        };
        {
            let mut q = self.shared.lock();
            if q.closed {
                return Err(VerifyError::TaskFailed);
            }
            if q.jobs.len() >= self.shared.max_queued {
                // Jobs of requesters that have gone hold places for nothing: make room first.
                let before = q.jobs.len();
                q.jobs.retain(|j| !j.reply.is_closed());
                let dropped = (before - q.jobs.len()) as u64;
                self.shared.counters.skipped.fetch_add(dropped, Ordering::Relaxed);
                if q.jobs.len() >= self.shared.max_queued {
                    return Err(VerifyError::Busy);
                }
            }
            q.jobs.push_back(job);
        }
        self.shared.work.notify_one();
        Ok(Verification(rx))
    }

    /// Checks `password` against `hash` on a pool thread.
    pub async fn verify(&self, hash: Arc<StoredHash>, password: &str) -> Result<bool, VerifyError> {
        self.submit(hash, password)?.await
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.shared.counters;
        PoolStats {
            threads: self.threads,
            run: c.run.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            running: c.running.load(Ordering::Relaxed),
            peak_running: c.peak_running.load(Ordering::Relaxed),
            queued: self.shared.lock().jobs.len(),
            block_allocations: c.block_allocations.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn set_paused(&self, paused: bool) {
        self.shared.lock().paused = paused;
        self.shared.work.notify_all();
    }
}

impl Drop for PasswordPool {
    fn drop(&mut self) {
        let jobs = {
            let mut q = self.shared.lock();
            q.closed = true;
            std::mem::take(&mut q.jobs)
        };
        // Outside the lock: dropping a job wakes its requester.
        drop(jobs);
        self.shared.work.notify_all();
    }
}

/// A pool thread: takes jobs until the pool closes, reusing one block buffer for all of them.
fn work(shared: &Shared) {
    let mut blocks: Vec<Block> = Vec::new();
    let c = &shared.counters;
    while let Some(job) = shared.next_job() {
        let now = c.running.fetch_add(1, Ordering::Relaxed) + 1;
        c.peak_running.fetch_max(now, Ordering::Relaxed);
        // A panic inside Argon2 must not take the thread (and a slot of the pool) with it.
        let result = catch_unwind(AssertUnwindSafe(|| check(&job.hash, &job.password, &mut blocks, c)));
        c.running.fetch_sub(1, Ordering::Relaxed);
        c.run.fetch_add(1, Ordering::Relaxed);
        let result = match result {
            Ok(Ok(matched)) => Ok(matched),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Argon2 could not check a password");
                Err(VerifyError::TaskFailed)
            }
            Err(_) => {
                tracing::error!("Argon2 panicked while checking a password");
                blocks = Vec::new();
                Err(VerifyError::TaskFailed)
            }
        };
        // The requester may have gone meanwhile; the check ran in its slot all the same.
        let _ = job.reply.send(result);
    }
}

/// Recomputes the hash of `password` with `hash`'s salt and parameters in `blocks` (grown when too
/// small, never shrunk) and compares it with the stored value in constant time.
fn check(hash: &StoredHash, password: &[u8], blocks: &mut Vec<Block>, c: &Counters) -> Result<bool, argon2::Error> {
    let needed = hash.block_count();
    if blocks.len() < needed {
        // Free the old buffer first, so that old and new are never both held.
        *blocks = Vec::new();
        *blocks = vec![Block::default(); needed.max(DEFAULT_BLOCKS)];
        c.block_allocations.fetch_add(1, Ordering::Relaxed);
    }
    let mut out = [0u8; MAX_OUTPUT_LEN];
    let out = out.get_mut(..hash.hash.len()).ok_or(argon2::Error::OutputTooLong)?;
    // Every block in use is overwritten before it is read, so what a previous check left in the
    // buffer does not matter.
    Argon2::new(Algorithm::Argon2id, hash.version, hash.params.clone()).hash_password_into_with_memory(
        password,
        &hash.salt,
        out,
        &mut blocks[..needed],
    )?;
    Ok(out.ct_eq(&hash.hash).into())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;

    use super::*;

    fn hash_with(password: &str, params: Params) -> Arc<StoredHash> {
        let salt = SaltString::encode_b64(b"pool-test-salt-1").unwrap();
        let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string();
        Arc::new(StoredHash::parse(&phc).unwrap())
    }

    fn default_hash(password: &str) -> Arc<StoredHash> {
        hash_with(password, Params::DEFAULT)
    }

    /// Waits (a hang guard, not a timing assertion) until the pool's counters satisfy `cond`.
    fn wait_for(pool: &PasswordPool, cond: impl Fn(&PoolStats) -> bool) -> PoolStats {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = pool.stats();
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "the pool never reached the state: {s:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[tokio::test]
    async fn right_and_wrong_passwords() {
        let pool = PasswordPool::new(2).unwrap();
        let h = default_hash("right");
        assert!(pool.verify(h.clone(), "right").await.unwrap());
        assert!(!pool.verify(h.clone(), "wrong").await.unwrap());
        assert!(!pool.verify(h, "").await.unwrap());
    }

    #[tokio::test]
    async fn hashes_with_other_parameters_verify_in_the_same_buffer() {
        let pool = PasswordPool::new(1).unwrap();
        // Less memory than the default, more passes, two lanes; then more memory than the default.
        let small = hash_with("pw", Params::new(8 * 1024, 3, 2, Some(24)).unwrap());
        let large = hash_with("pw", Params::new(24 * 1024, 1, 1, None).unwrap());
        for _ in 0..2 {
            assert!(pool.verify(small.clone(), "pw").await.unwrap());
            assert!(!pool.verify(small.clone(), "px").await.unwrap());
            assert!(pool.verify(default_hash("pw"), "pw").await.unwrap());
            assert!(pool.verify(large.clone(), "pw").await.unwrap());
            assert!(!pool.verify(large.clone(), "px").await.unwrap());
        }
        let s = pool.stats();
        assert_eq!(
            s.block_allocations, 2,
            "allocated once, grown once for the larger hash: {s:?}"
        );
    }

    #[tokio::test]
    async fn each_thread_allocates_its_blocks_once_across_many_checks() {
        let pool = PasswordPool::new(2).unwrap();
        let h = default_hash("pw");
        for round in 0..4 {
            let checks: Vec<_> = (0..6).map(|_| pool.submit(h.clone(), "pw").unwrap()).collect();
            for check in checks {
                assert!(check.await.unwrap(), "round {round}");
            }
        }
        let s = pool.stats();
        assert_eq!(s.run, 24);
        assert!(
            (1..=2).contains(&s.block_allocations),
            "one allocation per thread at most, not per check: {s:?}"
        );
    }

    #[test]
    fn cancelled_requesters_never_push_the_checks_running_past_the_pool_size() {
        const N: usize = 2;
        let pool = PasswordPool::new(N).unwrap();
        let h = default_hash("pw");
        // Every requester goes away right after submitting, as a client closing its connection
        // does. Each job taken by a thread still runs to its end in that thread's slot.
        for _ in 0..3 * N {
            drop(pool.submit(h.clone(), "guess").unwrap());
        }
        let s = wait_for(&pool, |s| s.run + s.skipped == 3 * N as u64);
        assert!(
            s.peak_running <= N,
            "{} checks ran at once; the pool has {N}",
            s.peak_running
        );
        assert_eq!(s.running, 0);
    }

    #[tokio::test]
    async fn queued_jobs_of_gone_requesters_are_skipped() {
        const N: usize = 2;
        let pool = PasswordPool::new(N).unwrap();
        let h = default_hash("pw");
        pool.set_paused(true);
        let mut kept = Vec::new();
        for i in 0..3 * N {
            let check = pool.submit(h.clone(), "pw").unwrap();
            if i % 3 == 0 {
                kept.push(check);
            }
        }
        assert_eq!(pool.stats().queued, 3 * N);
        pool.set_paused(false);
        for check in kept {
            assert!(check.await.unwrap());
        }
        let s = wait_for(&pool, |s| s.run + s.skipped == 3 * N as u64);
        assert_eq!((s.run, s.skipped), (N as u64, 2 * N as u64), "{s:?}");
        assert!(s.peak_running <= N);
    }

    #[test]
    fn a_full_queue_is_busy_but_gone_requesters_make_room() {
        let pool = PasswordPool::new(1).unwrap();
        let h = default_hash("pw");
        pool.set_paused(true);
        let waiting: Vec<_> = (0..QUEUE_PER_THREAD)
            .map(|_| pool.submit(h.clone(), "pw").unwrap())
            .collect();
        assert!(matches!(pool.submit(h.clone(), "pw"), Err(VerifyError::Busy)));
        drop(waiting);
        assert!(pool.submit(h, "pw").is_ok(), "abandoned jobs do not hold the queue");
        assert_eq!(pool.stats().skipped, QUEUE_PER_THREAD as u64);
    }

    #[tokio::test]
    async fn dropping_the_pool_fails_waiting_checks_and_stops_its_threads() {
        let pool = PasswordPool::new(2).unwrap();
        let threads_alive = Arc::downgrade(&pool.shared);
        pool.set_paused(true);
        let check = pool.submit(default_hash("pw"), "pw").unwrap();
        drop(pool);
        assert!(matches!(check.await, Err(VerifyError::TaskFailed)));
        // Each thread holds the shared state until it exits.
        let deadline = Instant::now() + Duration::from_secs(60);
        while threads_alive.strong_count() > 0 {
            assert!(Instant::now() < deadline, "the pool's threads did not exit");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn parse_refuses_what_the_pool_cannot_or_should_not_check() {
        let argon2i = "$argon2i$v=19$m=19456,t=2,p=1$dG9rZW5nYXRlLXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";
        assert_eq!(StoredHash::parse(argon2i), Err(HashError::Algorithm("argon2i".into())));
        assert_eq!(StoredHash::parse("plaintext"), Err(HashError::NotPhc));
        let huge = "$argon2id$v=19$m=131072,t=1,p=1$dG9rZW5nYXRlLXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";
        assert_eq!(
            StoredHash::parse(huge),
            Err(HashError::TooMuchMemory {
                m_cost: 131072,
                mib: 128
            })
        );
        let v42 = "$argon2id$v=42$m=19456,t=2,p=1$dG9rZW5nYXRlLXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";
        assert_eq!(StoredHash::parse(v42), Err(HashError::Version(42)));
        let no_hash = "$argon2id$v=19$m=19456,t=2,p=1$dG9rZW5nYXRlLXNhbHQ";
        assert_eq!(StoredHash::parse(no_hash), Err(HashError::Incomplete));
        let short_salt = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";
        assert_eq!(StoredHash::parse(short_salt), Err(HashError::SaltTooShort(4)));
        let max = "$argon2id$v=19$m=65536,t=1,p=1$dG9rZW5nYXRlLXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";
        assert!(StoredHash::parse(max).is_ok(), "64 MiB is accepted");
    }
}
