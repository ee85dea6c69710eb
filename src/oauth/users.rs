//! Resource owners (`[[users]]`) and password verification.
//!
//! Argon2id costs ~13 ms of CPU per check, so it runs on tokio's blocking pool behind a semaphore
//! (never on a runtime worker, where it would stall every connection on that thread). An unknown
//! username is verified against a dummy hash so that it costs the same as a wrong password.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use tokio::sync::Semaphore;

use crate::config::UserSettings;

/// An Argon2id hash (default parameters, as `tokengate hash-password` makes) of a random password
/// nobody knows.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$dG9rZW5nYXRlLWR1bW15LXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";

pub struct UserStore {
    by_name: HashMap<String, UserSettings>,
    permits: Arc<Semaphore>,
    /// Verifications waiting for a permit; bounded so a flood queues no unbounded work.
    waiting: AtomicUsize,
    max_waiting: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("too many password checks are queued")]
    Busy,
    #[error("password verification task failed")]
    TaskFailed,
}

/// Decrements the waiting count when a queued verification gets its permit (or is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UserStore {
    pub fn new(users: Vec<UserSettings>, concurrency: usize) -> Self {
        let by_name = users.into_iter().map(|u| (u.username.clone(), u)).collect();
        let concurrency = concurrency.max(1);
        UserStore {
            by_name,
            permits: Arc::new(Semaphore::new(concurrency)),
            waiting: AtomicUsize::new(0),
            max_waiting: concurrency * 32,
        }
    }

    pub fn exists(&self, username: &str) -> bool {
        self.by_name.contains_key(username)
    }

    pub fn get(&self, username: &str) -> Option<&UserSettings> {
        self.by_name.get(username)
    }

    /// The user if the password is right. Unknown users and wrong passwords take the same path and
    /// the same time.
    pub async fn verify(&self, username: &str, password: &str) -> Result<Option<&UserSettings>, VerifyError> {
        let found = self.by_name.get(username);
        let hash = match found {
            Some(u) => u.password_hash.clone(),
            None => DUMMY_HASH.to_owned(),
        };
        // Zeroed when the blocking task is done with it.
        let password = zeroize::Zeroizing::new(password.to_owned());
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(VerifyError::Busy);
        }
        let queued = Waiting(&self.waiting);
        let _permit = self.permits.acquire().await.map_err(|_| VerifyError::TaskFailed)?;
        drop(queued);
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        })
        .await
        .map_err(|_| VerifyError::TaskFailed)?;
        Ok(if ok { found } else { None })
    }
}

/// A PHC string for `password` with Argon2id's default parameters and a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;
    let salt_bytes = crate::crypto::random_bytes::<16>().map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&salt_bytes)?;
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::ScopeSet;

    #[test]
    fn dummy_hash_is_a_valid_argon2id_hash_with_default_cost() {
        let h = PasswordHash::new(DUMMY_HASH).unwrap();
        assert_eq!(h.algorithm.as_str(), "argon2id");
        let real = hash_password("x").unwrap();
        let real = PasswordHash::new(&real).unwrap();
        assert_eq!(h.params, real.params, "same cost as a real user's hash");
    }

    #[tokio::test]
    async fn verifies_passwords() {
        let store = UserStore::new(
            vec![UserSettings {
                username: "ann".into(),
                password_hash: hash_password("right").unwrap(),
                scopes: ScopeSet(1),
            }],
            2,
        );
        assert_eq!(
            store.verify("ann", "right").await.unwrap().map(|u| u.username.as_str()),
            Some("ann")
        );
        assert!(store.verify("ann", "wrong").await.unwrap().is_none());
        assert!(store.verify("bob", "right").await.unwrap().is_none());
    }
}
