//! The durable store's on-disk encoding of registry events (journal records) and of the whole
//! registry (snapshots). Little-endian, length-prefixed, versioned; decoding is bounds-checked and
//! never panics (a record the journal's CRC accepted but this code cannot read is an error naming
//! what was wrong, which recovery reports with the file and offset).
//!
//! Nothing here lets a reader mint or use a token: refresh tokens appear as SHA-256 digests (or
//! 64-bit digest prefixes), and a response copy is sealed under a key derived from the token it
//! answered.

use std::collections::HashMap;
use std::sync::Arc;

use crate::crypto::Sealed;
use crate::ids::SessionId;
use crate::store::registry::{Event, Interner, RotatedToken, Session};

const EVENT_CREATED: u8 = 1;
const EVENT_ROTATED: u8 = 2;
const EVENT_SESSION_REVOKED: u8 = 3;
const EVENT_SID_REVOKED: u8 = 4;

const SNAPSHOT_MAGIC: &[u8; 8] = b"TGSTATE1";

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable {what}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

fn err(what: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        reason: reason.into(),
    }
}

pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes32(&mut self, v: &[u8; 32]) {
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, s: &str) {
        // Names are validated to at most 256 bytes; scope lists are bounded by 64 scopes.
        self.u16(s.len().min(u16::MAX as usize) as u16);
        self.0
            .extend_from_slice(&s.as_bytes()[..s.len().min(u16::MAX as usize)]);
    }
    fn sealed(&mut self, s: Option<&Sealed>) {
        match s {
            None => self.u32(u32::MAX),
            Some(s) => {
                self.u32(s.0.len() as u32);
                self.0.extend_from_slice(&s.0);
            }
        }
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(err(self.what, format!("needs {n} more bytes, has {}", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes32(&mut self) -> Result<[u8; 32], DecodeError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| err(self.what, "a name is not UTF-8"))
    }
    fn sealed(&mut self) -> Result<Option<Sealed>, DecodeError> {
        match self.u32()? {
            u32::MAX => Ok(None),
            n => Ok(Some(Sealed(self.take(n as usize)?.to_vec()))),
        }
    }
    fn done(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(err(self.what, format!("{} bytes left over", self.buf.len())))
        }
    }
}

pub fn encode_event(e: &Event, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    match e {
        Event::Created {
            sid,
            user,
            client,
            scopes,
            created_ms,
            session_expires_ms,
            access_exp_secs,
            token,
            token_exp_ms,
        } => {
            w.u8(EVENT_CREATED);
            w.u64(sid.0);
            w.str(user);
            w.str(client);
            w.str(scopes);
            w.u64(*created_ms);
            w.u64(*session_expires_ms);
            w.u64(*access_exp_secs);
            w.bytes32(token);
            w.u64(*token_exp_ms);
        }
        Event::Rotated {
            sid,
            from,
            to,
            to_exp_ms,
            at_ms,
            access_exp_secs,
            sealed,
        } => {
            w.u8(EVENT_ROTATED);
            w.u64(sid.0);
            w.bytes32(from);
            w.bytes32(to);
            w.u64(*to_exp_ms);
            w.u64(*at_ms);
            w.u64(*access_exp_secs);
            w.sealed(sealed.as_ref());
        }
        Event::SessionRevoked { sid, until_secs } => {
            w.u8(EVENT_SESSION_REVOKED);
            w.u64(sid.0);
            w.u64(*until_secs);
        }
        Event::SidRevoked { sid, until_secs } => {
            w.u8(EVENT_SID_REVOKED);
            w.u64(sid.0);
            w.u64(*until_secs);
        }
    }
}

pub fn decode_event(buf: &[u8], names: &Interner) -> Result<Event, DecodeError> {
    let mut r = Reader::new(buf, "journal record");
    let e = match r.u8()? {
        EVENT_CREATED => Event::Created {
            sid: SessionId(r.u64()?),
            user: names.intern(r.str()?),
            client: names.intern(r.str()?),
            scopes: names.intern(r.str()?),
            created_ms: r.u64()?,
            session_expires_ms: r.u64()?,
            access_exp_secs: r.u64()?,
            token: r.bytes32()?,
            token_exp_ms: r.u64()?,
        },
        EVENT_ROTATED => Event::Rotated {
            sid: SessionId(r.u64()?),
            from: r.bytes32()?,
            to: r.bytes32()?,
            to_exp_ms: r.u64()?,
            at_ms: r.u64()?,
            access_exp_secs: r.u64()?,
            sealed: r.sealed()?,
        },
        EVENT_SESSION_REVOKED => Event::SessionRevoked {
            sid: SessionId(r.u64()?),
            until_secs: r.u64()?,
        },
        EVENT_SID_REVOKED => Event::SidRevoked {
            sid: SessionId(r.u64()?),
            until_secs: r.u64()?,
        },
        other => return Err(err("journal record", format!("unknown event type {other}"))),
    };
    r.done()?;
    Ok(e)
}

const ITEM_END: u8 = 0;
const ITEM_SESSION: u8 = 1;
const ITEM_REVOKED: u8 = 2;
/// A session with the time its current refresh token was issued (after `current_expires_ms`).
/// Snapshots written before it have `ITEM_SESSION`, read with that time derived.
const ITEM_SESSION_ISSUED: u8 = 3;
/// A name reference with this bit set is a new name, written right after it (names are numbered
/// in order of first appearance, so the snapshot streams out without a table up front).
const NEW_NAME: u32 = 1 << 31;

/// Streams a snapshot: each session (its user, client and scope list written once, then referred
/// to by number), each revoked sid, an end marker.
pub struct SnapshotWriter<W: std::io::Write> {
    out: W,
    names: HashMap<Arc<str>, u32>,
    buf: Vec<u8>,
    pub sessions: u64,
    pub revoked: u64,
}

impl<W: std::io::Write> SnapshotWriter<W> {
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(SNAPSHOT_MAGIC)?;
        Ok(SnapshotWriter {
            out,
            names: HashMap::new(),
            buf: Vec::with_capacity(256),
            sessions: 0,
            revoked: 0,
        })
    }

    fn name(names: &mut HashMap<Arc<str>, u32>, w: &mut Writer<'_>, s: &Arc<str>) {
        if let Some(&i) = names.get(s) {
            w.u32(i);
            return;
        }
        let i = names.len() as u32;
        names.insert(s.clone(), i);
        w.u32(i | NEW_NAME);
        w.str(s);
    }

    /// Writes a session; rotated tokens keep their sealed copy only if `keep_sealed` says so.
    pub fn session(
        &mut self,
        sid: SessionId,
        s: &Session,
        keep_sealed: impl Fn(&RotatedToken) -> bool,
    ) -> std::io::Result<()> {
        self.buf.clear();
        let mut w = Writer(&mut self.buf);
        w.u8(ITEM_SESSION_ISSUED);
        w.u64(sid.0);
        Self::name(&mut self.names, &mut w, &s.user);
        Self::name(&mut self.names, &mut w, &s.client);
        Self::name(&mut self.names, &mut w, &s.scopes);
        w.u64(s.created_ms);
        w.u64(s.session_expires_ms);
        w.u64(s.access_exp_secs);
        w.bytes32(&s.current);
        w.u64(s.current_expires_ms);
        w.u64(s.current_issued_ms);
        w.u8(u8::from(s.revoked));
        w.u16(s.rotated.len().min(u16::MAX as usize) as u16);
        for r in s.rotated_oldest_first().take(u16::MAX as usize) {
            w.u64(r.prefix);
            w.u64(r.at_ms);
            w.u64(r.expires_ms);
            w.sealed(r.sealed.as_deref().filter(|_| keep_sealed(r)));
        }
        self.sessions += 1;
        self.out.write_all(&self.buf)
    }

    pub fn revoked(&mut self, sid: SessionId, until_secs: u64) -> std::io::Result<()> {
        self.buf.clear();
        let mut w = Writer(&mut self.buf);
        w.u8(ITEM_REVOKED);
        w.u64(sid.0);
        w.u64(until_secs);
        self.revoked += 1;
        self.out.write_all(&self.buf)
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(&[ITEM_END])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What a snapshot holds, handed out one item at a time.
pub enum Restored {
    Session(SessionId, Session),
    Revoked(SessionId, u64),
}

/// Decodes a snapshot; each distinct name goes through `interner` once.
pub fn decode_snapshot(buf: &[u8], interner: &Interner, mut each: impl FnMut(Restored)) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf, "snapshot");
    if r.take(8)? != SNAPSHOT_MAGIC {
        return Err(err("snapshot", "not a tokengate state snapshot (bad magic)"));
    }
    let mut names: Vec<Arc<str>> = Vec::new();
    let mut name = |r: &mut Reader<'_>| -> Result<Arc<str>, DecodeError> {
        let i = r.u32()?;
        if i & NEW_NAME != 0 {
            if (i & !NEW_NAME) as usize != names.len() {
                return Err(err("snapshot", format!("name {} out of order", i & !NEW_NAME)));
            }
            let s = interner.intern(r.str()?);
            names.push(s.clone());
            return Ok(s);
        }
        names
            .get(i as usize)
            .cloned()
            .ok_or_else(|| err("snapshot", format!("name index {i} out of range")))
    };
    loop {
        match r.u8()? {
            ITEM_END => return r.done(),
            item @ (ITEM_SESSION | ITEM_SESSION_ISSUED) => {
                let sid = SessionId(r.u64()?);
                let user = name(&mut r)?;
                let client = name(&mut r)?;
                let scopes = name(&mut r)?;
                let created_ms = r.u64()?;
                let session_expires_ms = r.u64()?;
                let access_exp_secs = r.u64()?;
                let current = r.bytes32()?;
                let current_expires_ms = r.u64()?;
                let issued = if item == ITEM_SESSION_ISSUED {
                    Some(r.u64()?)
                } else {
                    None
                };
                let revoked = r.u8()? != 0;
                let n_rotated = r.u16()?;
                let mut rotated = Vec::with_capacity(n_rotated as usize);
                for _ in 0..n_rotated {
                    rotated.push(RotatedToken {
                        prefix: r.u64()?,
                        at_ms: r.u64()?,
                        expires_ms: r.u64()?,
                        sealed: r.sealed()?.map(Box::new),
                    });
                }
                each(Restored::Session(
                    sid,
                    Session {
                        user,
                        client,
                        scopes,
                        created_ms,
                        session_expires_ms,
                        access_exp_secs,
                        current,
                        current_expires_ms,
                        // Older snapshots: the last rotation, else the login (exact unless that
                        // rotation's record was dropped when the token it retired expired).
                        current_issued_ms: issued
                            .unwrap_or_else(|| rotated.last().map_or(created_ms, |r: &RotatedToken| r.at_ms)),
                        rotated,
                        rotated_head: 0,
                        revoked,
                    },
                ));
            }
            ITEM_REVOKED => {
                let sid = SessionId(r.u64()?);
                each(Restored::Revoked(sid, r.u64()?));
            }
            other => return Err(err("snapshot", format!("unknown item type {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events() -> Vec<Event> {
        vec![
            Event::Created {
                sid: SessionId(7),
                user: "ann".into(),
                client: "web".into(),
                scopes: "a b".into(),
                created_ms: 1,
                session_expires_ms: 2,
                access_exp_secs: 3,
                token: [9; 32],
                token_exp_ms: 4,
            },
            Event::Rotated {
                sid: SessionId(7),
                from: [9; 32],
                to: [8; 32],
                to_exp_ms: 5,
                at_ms: 6,
                access_exp_secs: 7,
                sealed: Some(Sealed(vec![1, 2, 3])),
            },
            Event::Rotated {
                sid: SessionId(7),
                from: [8; 32],
                to: [7; 32],
                to_exp_ms: 5,
                at_ms: 6,
                access_exp_secs: 7,
                sealed: None,
            },
            Event::SessionRevoked {
                sid: SessionId(7),
                until_secs: 99,
            },
            Event::SidRevoked {
                sid: SessionId(8),
                until_secs: 98,
            },
        ]
    }

    #[test]
    fn events_round_trip() {
        let names = Interner::default();
        for e in events() {
            let mut buf = Vec::new();
            encode_event(&e, &mut buf);
            assert_eq!(decode_event(&buf, &names).unwrap(), e);
            // Every shorter prefix is refused, never a panic.
            for cut in 0..buf.len() {
                assert!(decode_event(&buf[..cut], &names).is_err());
            }
            buf.push(0);
            assert!(decode_event(&buf, &names).is_err(), "trailing bytes");
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_event(&buf, &Interner::default());
            let _ = decode_snapshot(&buf, &Interner::default(), |_| {});
        }
    }
}
