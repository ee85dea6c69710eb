//! The on-disk format: record frames, segment and snapshot headers, file names. Everything is
//! little-endian; every checksum is CRC32C.
//!
//! ```text
//! segment  {first_seq:020}.log   header: magic "TGJSEG\r\n" | version u32 | crc u32 | first_seq u64
//!                                then frames: len u32 | crc u32 | seq u64 | payload[len]
//!                                (frame crc over seq and payload; header crc over magic, version, first_seq)
//! snapshot {seq:020}.snap        header: magic "TGJSNP\r\n" | version u32 | header_crc u32 | seq u64
//!                                        | payload_len u64 | payload_crc u32 | reserved u32 (0)
//!                                then payload[payload_len], and nothing after it
//! temp     {seq:020}.snap.tmp    a snapshot being written; never read, removed at open
//! lock     LOCK                  held with an exclusive advisory lock while a Journal is open
//! ```
//!
//! The `\r\n` in the magics catches files mangled by text-mode transfers, as PNG's signature does.

/// Bumped when the format changes incompatibly; a reader refuses versions it does not know.
pub const FORMAT_VERSION: u32 = 1;

pub const SEGMENT_MAGIC: [u8; 8] = *b"TGJSEG\r\n";
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"TGJSNP\r\n";

pub const SEGMENT_HEADER_LEN: usize = 24;
pub const SNAPSHOT_HEADER_LEN: usize = 40;
/// `len u32 | crc u32 | seq u64` before each payload.
pub const FRAME_HEADER_LEN: usize = 16;

pub const LOCK_FILE: &str = "LOCK";
const SEGMENT_EXT: &str = ".log";
const SNAPSHOT_EXT: &str = ".snap";
const TEMP_EXT: &str = ".snap.tmp";
const SEQ_DIGITS: usize = 20;

/// The CRC of a frame: over the sequence number's 8 bytes, then the payload.
pub fn frame_crc(seq: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), payload)
}

/// The length of a frame holding `payload_len` bytes, if it fits the u32 length field.
pub fn frame_len(payload_len: usize) -> Option<usize> {
    u32::try_from(payload_len).ok()?;
    payload_len.checked_add(FRAME_HEADER_LEN)
}

/// Appends one frame. The caller has checked the payload length with [`frame_len`].
pub fn encode_frame(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&frame_crc(seq, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// A frame that checked out: its sequence number, payload, and where the next frame starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
    pub next: usize,
}

/// The frame at `at`, or `None` if the bytes there are not a whole frame with a matching CRC
/// (short, torn, zeroed or corrupt: the caller decides which from what follows).
pub fn decode_frame(buf: &[u8], at: usize) -> Option<Frame<'_>> {
    let header = buf.get(at..at.checked_add(FRAME_HEADER_LEN)?)?;
    let len = u32_at(header, 0) as usize;
    let crc = u32_at(header, 4);
    let seq = u64_at(header, 8);
    let start = at + FRAME_HEADER_LEN;
    let end = start.checked_add(len)?;
    let payload = buf.get(start..end)?;
    (frame_crc(seq, payload) == crc).then_some(Frame {
        seq,
        payload,
        next: end,
    })
}

/// Whether any whole, CRC-valid frame with a sequence number of at least `min_seq` starts at or
/// after `from`. Used after a bad frame to tell a torn tail (nothing valid follows) from
/// corruption inside the log (valid records follow the bad one, so dropping them would lose
/// acknowledged writes). A frame needs at least [`FRAME_HEADER_LEN`] bytes, so no valid frame
/// past the bad one can carry a sequence number beyond `min_seq + remaining / FRAME_HEADER_LEN`;
/// that bound rejects almost every offset before any CRC is computed.
pub fn find_valid_frame(buf: &[u8], from: usize, min_seq: u64) -> Option<usize> {
    let remaining = buf.len().saturating_sub(from);
    let max_seq = min_seq.saturating_add((remaining / FRAME_HEADER_LEN) as u64);
    let last_start = buf.len().checked_sub(FRAME_HEADER_LEN)?;
    (from..=last_start).find(|&at| {
        let seq = u64_at(buf, at + 8);
        (min_seq..=max_seq).contains(&seq) && decode_frame(buf, at).is_some()
    })
}

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = segment_header_crc(&h);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn segment_header_crc(h: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&h[0..12]), &h[16..24])
}

/// The first sequence number a segment header declares, or why the header is not one.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, String> {
    let h = buf
        .get(..SEGMENT_HEADER_LEN)
        .ok_or_else(|| format!("shorter than the {SEGMENT_HEADER_LEN}-byte segment header"))?;
    if h[0..8] != SEGMENT_MAGIC {
        return Err("not a tokengate journal segment (bad magic)".into());
    }
    if segment_header_crc(h) != u32_at(h, 12) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version}, this build reads {FORMAT_VERSION}"
        ));
    }
    Ok(u64_at(h, 16))
}

pub struct SnapshotHeader {
    pub seq: u64,
    pub payload_len: u64,
    pub payload_crc: u32,
}

pub fn encode_snapshot_header(h: &SnapshotHeader) -> [u8; SNAPSHOT_HEADER_LEN] {
    let mut b = [0u8; SNAPSHOT_HEADER_LEN];
    b[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[24..32].copy_from_slice(&h.payload_len.to_le_bytes());
    b[32..36].copy_from_slice(&h.payload_crc.to_le_bytes());
    let crc = snapshot_header_crc(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

fn snapshot_header_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..SNAPSHOT_HEADER_LEN])
}

/// The payload of a whole snapshot file, checked: magic, version, header and payload CRCs, the
/// covered sequence number against the one in the file name, and the exact length.
pub fn decode_snapshot(file: &[u8], seq_from_name: u64) -> Result<&[u8], String> {
    let b = file
        .get(..SNAPSHOT_HEADER_LEN)
        .ok_or_else(|| format!("shorter than the {SNAPSHOT_HEADER_LEN}-byte snapshot header"))?;
    if b[0..8] != SNAPSHOT_MAGIC {
        return Err("not a tokengate journal snapshot (bad magic)".into());
    }
    if snapshot_header_crc(b) != u32_at(b, 12) {
        return Err("snapshot header checksum mismatch".into());
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {version}, this build reads {FORMAT_VERSION}"
        ));
    }
    let seq = u64_at(b, 16);
    if seq != seq_from_name {
        return Err(format!("header covers seq {seq}, the file name says {seq_from_name}"));
    }
    let payload = &file[SNAPSHOT_HEADER_LEN..];
    let len = u64_at(b, 24);
    if payload.len() as u64 != len {
        return Err(format!("payload is {} bytes, the header says {len}", payload.len()));
    }
    if crc32c::crc32c(payload) != u32_at(b, 32) {
        return Err("snapshot payload checksum mismatch".into());
    }
    Ok(payload)
}

/// What a file in the journal folder is, from its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Segment(u64),
    Snapshot(u64),
    TempSnapshot,
    Lock,
    Other,
}

pub fn classify(name: &str) -> FileKind {
    if name == LOCK_FILE {
        return FileKind::Lock;
    }
    let seq_prefix = |ext: &str| {
        let digits = name.strip_suffix(ext)?;
        (digits.len() == SEQ_DIGITS && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
    };
    if let Some(seq) = seq_prefix(SEGMENT_EXT) {
        FileKind::Segment(seq)
    } else if let Some(seq) = seq_prefix(SNAPSHOT_EXT) {
        FileKind::Snapshot(seq)
    } else if seq_prefix(TEMP_EXT).is_some() {
        FileKind::TempSnapshot
    } else {
        FileKind::Other
    }
}

pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:0SEQ_DIGITS$}{SEGMENT_EXT}")
}

pub fn snapshot_name(seq: u64) -> String {
    format!("{seq:0SEQ_DIGITS$}{SNAPSHOT_EXT}")
}

pub fn temp_snapshot_name(seq: u64) -> String {
    format!("{seq:0SEQ_DIGITS$}{TEMP_EXT}")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (seq, payload) in records {
            encode_frame(&mut buf, *seq, payload);
        }
        buf
    }

    #[test]
    fn frames_round_trip() {
        let payloads: [&[u8]; 4] = [b"", b"a", b"hello journal", &[0xff; 300]];
        let records: Vec<(u64, &[u8])> = payloads.iter().enumerate().map(|(i, p)| (i as u64 + 7, *p)).collect();
        let buf = frames(&records);
        let mut at = 0;
        for (seq, payload) in &records {
            let f = decode_frame(&buf, at).expect("valid frame");
            assert_eq!((f.seq, f.payload), (*seq, *payload));
            at = f.next;
        }
        assert_eq!(at, buf.len());
        assert_eq!(decode_frame(&buf, at), None);
    }

    #[test]
    fn frame_layout_is_len_crc_seq_payload_little_endian() {
        let buf = frames(&[(0x0102_0304_0506_0708, b"xyz")]);
        assert_eq!(&buf[0..4], &3u32.to_le_bytes());
        assert_eq!(
            &buf[4..8],
            &crc32c::crc32c(&[8, 7, 6, 5, 4, 3, 2, 1, b'x', b'y', b'z']).to_le_bytes()
        );
        assert_eq!(&buf[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&buf[16..], b"xyz");
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_rejected() {
        let buf = frames(&[(42, b"some payload bytes")]);
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut], 0), None, "cut at {cut}");
        }
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_frame(&bad, 0), None, "bit {bit}");
        }
        assert_eq!(decode_frame(&[0u8; 64], 0), None, "zeros are not a frame");
    }

    #[test]
    fn find_valid_frame_sees_a_frame_behind_garbage_but_not_an_older_seq() {
        let mut buf = vec![0xa5; 37];
        let at = buf.len();
        encode_frame(&mut buf, 10, b"later");
        assert_eq!(find_valid_frame(&buf, 1, 9), Some(at));
        assert_eq!(find_valid_frame(&buf, 1, 11), None, "seq below the minimum");
        assert_eq!(find_valid_frame(&buf, at + 1, 9), None);
        assert_eq!(find_valid_frame(&[0u8; 100], 0, 1), None);
    }

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let h = encode_segment_header(12345);
        assert_eq!(decode_segment_header(&h), Ok(12345));
        for bit in 0..h.len() * 8 {
            let mut bad = h;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_segment_header(&bad).is_err(), "segment header bit {bit}");
        }
        let payload = b"state";
        let header = encode_snapshot_header(&SnapshotHeader {
            seq: 99,
            payload_len: payload.len() as u64,
            payload_crc: crc32c::crc32c(payload),
        });
        let mut file = header.to_vec();
        file.extend_from_slice(payload);
        assert_eq!(decode_snapshot(&file, 99), Ok(&payload[..]));
        assert!(decode_snapshot(&file, 98).unwrap_err().contains("file name"));
        for bit in 0..file.len() * 8 {
            let mut bad = file.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_snapshot(&bad, 99).is_err(), "snapshot bit {bit}");
        }
        file.push(0);
        assert!(decode_snapshot(&file, 99).is_err(), "trailing bytes");
    }

    #[test]
    fn names_sort_by_seq_and_classify_back() {
        assert_eq!(segment_name(1), "00000000000000000001.log");
        assert!(segment_name(9) < segment_name(10));
        assert_eq!(classify(&segment_name(u64::MAX)), FileKind::Segment(u64::MAX));
        assert_eq!(classify(&snapshot_name(5)), FileKind::Snapshot(5));
        assert_eq!(classify(&temp_snapshot_name(5)), FileKind::TempSnapshot);
        assert_eq!(classify(LOCK_FILE), FileKind::Lock);
        for other in [
            "1.log",
            "0000000000000000000x.log",
            "00000000000000000001.log.bak",
            "notes.txt",
        ] {
            assert_eq!(classify(other), FileKind::Other, "{other}");
        }
    }
}
