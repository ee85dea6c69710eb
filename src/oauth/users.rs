//! Resource owners (`[[users]]`) and password verification.
//!
//! Checks run on the shared Argon2 pool ([`PasswordPool`]), which bounds how many run at once and
//! how much memory they hold, cancelled or not. An unknown username is checked against a decoy
//! hash of the same cost, so that it costs the same as a wrong password.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::Argon2;

use crate::config::UserSettings;
pub use crate::oauth::password::VerifyError;
use crate::oauth::password::{PasswordPool, StoredHash};

/// An Argon2id hash (default parameters, as `tokengate hash-password` makes) of a random password
/// nobody knows: the decoy, as a PHC string.
#[cfg(test)]
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$dG9rZW5nYXRlLWR1bW15LXNhbHQ$rmGuE1mECPfb07S9RZc0mRN2WZvA1aBXcN5OSG3DOIc";

/// The decoy that unknown usernames are checked against: an Argon2id hash with the default cost
/// of a random password nobody knows. Built from its parts, so that it needs no parsing that
/// could fail; a test checks it against its PHC string.
fn decoy() -> StoredHash {
    const SALT: &[u8] = b"tokengate-dummy-salt";
    const OUTPUT: [u8; 32] = [
        174, 97, 174, 19, 89, 132, 8, 247, 219, 211, 180, 189, 69, 151, 52, 153, 19, 118, 89, 155, 192, 213, 160, 87,
        112, 222, 78, 72, 109, 195, 56, 135,
    ];
    StoredHash::with_default_params(SALT, &OUTPUT)
}

/// A user as the login path needs them: the settings and the decoded hash (`None` for one that
/// does not decode — the config check refuses those, so only a hand-built store has one: that
/// user never logs in).
struct User {
    settings: UserSettings,
    hash: Option<Arc<StoredHash>>,
}

pub struct UserStore {
    /// foldhash: the names are the config's, so there is no flooding to resist; SipHash was
    /// a visible share of a refresh.
    by_name: HashMap<String, User, foldhash::fast::RandomState>,
    decoy: Arc<StoredHash>,
    pool: Arc<PasswordPool>,
}

impl UserStore {
    pub fn new(users: Vec<UserSettings>, pool: Arc<PasswordPool>) -> Self {
        let by_name = users
            .into_iter()
            .map(|u| {
                let hash = match StoredHash::parse(&u.password_hash) {
                    Ok(h) => Some(Arc::new(h)),
                    Err(e) => {
                        tracing::error!(username = %u.username, "password_hash {e}; this user cannot log in");
                        None
                    }
                };
                (u.username.clone(), User { settings: u, hash })
            })
            .collect();
        UserStore {
            by_name,
            decoy: Arc::new(decoy()),
            pool,
        }
    }

    pub fn exists(&self, username: &str) -> bool {
        self.by_name.contains_key(username)
    }

    pub fn get(&self, username: &str) -> Option<&UserSettings> {
        self.by_name.get(username).map(|u| &u.settings)
    }

    /// The user if the password is right. Unknown users and wrong passwords take the same path and
    /// the same time.
    pub async fn verify(&self, username: &str, password: &str) -> Result<Option<&UserSettings>, VerifyError> {
        let found = self
            .by_name
            .get(username)
            .and_then(|u| Some((&u.settings, u.hash.clone()?)));
        let hash = found.as_ref().map_or_else(|| self.decoy.clone(), |(_, h)| h.clone());
        let matched = self.pool.verify(hash, password).await?;
        Ok(found.filter(|_| matched).map(|(u, _)| u))
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
    use argon2::PasswordHash;

    use super::*;
    use crate::scope::ScopeSet;

    #[test]
    fn the_decoy_is_the_dummy_hash_with_default_cost() {
        assert_eq!(StoredHash::parse(DUMMY_HASH).unwrap(), decoy());
        let h = PasswordHash::new(DUMMY_HASH).unwrap();
        assert_eq!(h.algorithm.as_str(), "argon2id");
        let real = hash_password("x").unwrap();
        let real = PasswordHash::new(&real).unwrap();
        assert_eq!(h.params, real.params, "same cost as a real user's hash");
    }

    #[tokio::test]
    async fn verifies_passwords() {
        let store = UserStore::new(
            vec![
                UserSettings {
                    username: "ann".into(),
                    password_hash: hash_password("right").unwrap(),
                    scopes: ScopeSet(1),
                },
                UserSettings {
                    username: "bad".into(),
                    password_hash: "plaintext".into(),
                    scopes: ScopeSet(1),
                },
            ],
            Arc::new(PasswordPool::new(2).unwrap()),
        );
        let name = |r: Option<&UserSettings>| r.map(|u| u.username.clone());
        assert_eq!(
            name(store.verify("ann", "right").await.unwrap()).as_deref(),
            Some("ann")
        );
        assert_eq!(name(store.verify("ann", "wrong").await.unwrap()), None);
        assert_eq!(name(store.verify("bob", "right").await.unwrap()), None);
        assert_eq!(
            name(store.verify("bad", "plaintext").await.unwrap()),
            None,
            "an unusable hash never matches"
        );
    }
}
