//! Records on disk: `[length: u32 LE][crc32: u32 LE][payload]`, the
//! checksum over the payload. Scanning a file tells an intact record from
//! a torn tail (the last record, cut short or garbled by a crash in the
//! middle of a write) and from corruption before the tail.

/// Bytes before a record's payload.
pub const HEADER_BYTES: usize = 8;

/// Largest payload a record may have; a length beyond it is garbage.
pub const PAYLOAD_MAX: usize = 1 << 30;

/// Appends `payload` as one record to `out`.
pub fn put(out: &mut Vec<u8>, payload: &[u8]) {
    debug_assert!(!payload.is_empty() && payload.len() <= PAYLOAD_MAX);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// How a scan of a file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every byte belongs to an intact record.
    Clean,
    /// The records stop being intact at `offset`, and no intact record
    /// follows: a write cut short by a crash.
    Torn {
        /// Where the first broken record starts.
        offset: usize,
    },
    /// The record at `offset` is broken, yet an intact record follows it:
    /// the file was damaged, not cut short.
    Corrupt {
        /// Where the broken record starts.
        offset: usize,
    },
}

/// The payloads of the intact records at the start of `bytes`, with their
/// offsets, and how the scan ended.
pub fn scan(bytes: &[u8]) -> (Vec<(usize, &[u8])>, End) {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        match record_at(bytes, offset) {
            Some(payload) => {
                records.push((offset, payload));
                offset += HEADER_BYTES + payload.len();
            }
            None if any_record_after(bytes, offset) => {
                return (records, End::Corrupt { offset });
            }
            None => return (records, End::Torn { offset }),
        }
    }
    (records, End::Clean)
}

/// The payload of the intact record at `offset`, if there is one there.
fn record_at(bytes: &[u8], offset: usize) -> Option<&[u8]> {
    let header = bytes.get(offset..offset + HEADER_BYTES)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // An empty payload is never written, and zeros would pass the checksum.
    if len == 0 || len > PAYLOAD_MAX {
        return None;
    }
    let start = offset + HEADER_BYTES;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Whether an intact record starts anywhere after `offset`: only asked once
/// a broken record was found, to tell a torn tail from damage.
fn any_record_after(bytes: &[u8], offset: usize) -> bool {
    (offset + 1..bytes.len().saturating_sub(HEADER_BYTES)).any(|at| record_at(bytes, at).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_records() -> Vec<u8> {
        let mut bytes = Vec::new();
        put(&mut bytes, b"first record");
        put(&mut bytes, b"second record");
        bytes
    }

    #[test]
    fn intact_records_scan_clean() {
        let bytes = two_records();
        let (records, end) = scan(&bytes);
        let payloads: Vec<&[u8]> = records.iter().map(|(_, p)| *p).collect();
        assert_eq!(payloads, [&b"first record"[..], b"second record"]);
        assert_eq!(end, End::Clean);
    }

    #[test]
    fn a_cut_or_garbled_last_record_is_a_torn_tail() {
        let bytes = two_records();
        let second = HEADER_BYTES + b"first record".len();
        for cut in second + 1..bytes.len() {
            let (records, end) = scan(&bytes[..cut]);
            assert_eq!(records.len(), 1, "cut at {cut}");
            assert_eq!(end, End::Torn { offset: second });
        }
        let mut garbled = bytes.clone();
        *garbled.last_mut().unwrap_or(&mut 0) ^= 1;
        assert_eq!(scan(&garbled).1, End::Torn { offset: second });
        let mut zeros = two_records();
        zeros.extend_from_slice(&[0; 64]);
        assert_eq!(
            scan(&zeros).1,
            End::Torn {
                offset: bytes.len()
            }
        );
    }

    #[test]
    fn a_broken_record_before_an_intact_one_is_corruption() {
        let mut bytes = two_records();
        bytes[HEADER_BYTES + 2] ^= 0x40;
        let (records, end) = scan(&bytes);
        assert!(records.is_empty());
        assert_eq!(end, End::Corrupt { offset: 0 });
    }
}
