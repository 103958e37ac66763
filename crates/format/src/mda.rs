//! The metadata area: a 512-byte header (checksum, magic, version, start, size,
//! `raw_locn` slots: 0 = committed, 1 = precommitted) followed by a circular
//! buffer of text metadata copies. Placement of a new copy follows LVM2: it
//! starts 512-aligned strictly after the old copy, wraps to area start + 512,
//! and may never overlap the old copy.

use crate::crc::lvm_crc;
use crate::error::{FormatError, le_u32, le_u64};

pub const MDA_HEADER_SIZE: u64 = 512;
pub const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
pub const MDA_VERSION: u32 = 1;
pub const RAW_LOCN_IGNORED: u32 = 1;
const ALIGN: u64 = 512;

/// Location of one text copy, relative to the area start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawLocn {
    pub offset: u64,
    pub size: u64,
    pub checksum: u32,
    pub flags: u32,
}

impl RawLocn {
    pub fn is_empty(&self) -> bool {
        self.offset == 0 && self.size == 0
    }
    pub fn is_ignored(&self) -> bool {
        self.flags & RAW_LOCN_IGNORED != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdaHeader {
    /// Absolute byte offset of the area on the device.
    pub start: u64,
    /// Area size in bytes, header included.
    pub size: u64,
    pub committed: RawLocn,
    pub precommitted: RawLocn,
}

impl MdaHeader {
    pub fn new(start: u64, size: u64) -> MdaHeader {
        MdaHeader {
            start,
            size,
            committed: RawLocn::default(),
            precommitted: RawLocn::default(),
        }
    }

    /// Parse the header of the area that the PV header says starts at `start`.
    pub fn parse(buf: &[u8], start: u64) -> Result<MdaHeader, FormatError> {
        let err = |off: u64, r: String| FormatError::new("metadata area header", start + off, r);
        if buf.len() < MDA_HEADER_SIZE as usize {
            return Err(err(0, format!("truncated: {} of 512 bytes", buf.len())));
        }
        let b = &buf[..MDA_HEADER_SIZE as usize];
        let crc = le_u32(b, 0);
        let calc = lvm_crc(&b[4..]);
        if crc != calc {
            return Err(err(
                0,
                format!("checksum 0x{crc:08x} does not match contents (0x{calc:08x})"),
            ));
        }
        if &b[4..20] != MDA_MAGIC {
            return Err(err(4, "wrong magic (not an LVM2 metadata area)".into()));
        }
        let version = le_u32(b, 20);
        if version != MDA_VERSION {
            return Err(err(20, format!("unsupported version {version}")));
        }
        let hstart = le_u64(b, 24);
        if hstart != start {
            return Err(err(
                24,
                format!("header says the area starts at {hstart}, PV header says {start}"),
            ));
        }
        let size = le_u64(b, 32);
        if size < 2 * MDA_HEADER_SIZE + 2 * ALIGN {
            return Err(err(32, format!("area size {size} is too small")));
        }
        let slot = |at: usize| RawLocn {
            offset: le_u64(b, at),
            size: le_u64(b, at + 8),
            checksum: le_u32(b, at + 16),
            flags: le_u32(b, at + 20),
        };
        let h = MdaHeader {
            start,
            size,
            committed: slot(40),
            precommitted: slot(64),
        };
        for (i, s) in [h.committed, h.precommitted].iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            if s.offset < MDA_HEADER_SIZE || s.offset >= size || s.size > size - MDA_HEADER_SIZE {
                return Err(err(
                    40 + 24 * i as u64,
                    format!(
                        "raw_locn slot {i} (offset {}, size {}) lies outside the area of {size} bytes",
                        s.offset, s.size
                    ),
                ));
            }
        }
        Ok(h)
    }

    pub fn to_bytes(&self) -> [u8; MDA_HEADER_SIZE as usize] {
        let mut b = [0u8; MDA_HEADER_SIZE as usize];
        b[4..20].copy_from_slice(MDA_MAGIC);
        b[20..24].copy_from_slice(&MDA_VERSION.to_le_bytes());
        b[24..32].copy_from_slice(&self.start.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        // LVM2 reads slots until one has offset 0: an empty slot 0 hides slot 1.
        for (at, s) in [(40usize, self.committed), (64, self.precommitted)] {
            b[at..at + 8].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.size.to_le_bytes());
            b[at + 16..at + 20].copy_from_slice(&s.checksum.to_le_bytes());
            b[at + 20..at + 24].copy_from_slice(&s.flags.to_le_bytes());
        }
        let crc = lvm_crc(&b[4..]);
        b[0..4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Largest text copy that fits (LVM2's rule: half the ring, less one sector).
    pub fn max_text_size(&self) -> u64 {
        ((self.size - MDA_HEADER_SIZE) / 2).saturating_sub(ALIGN)
    }
}

/// Where a text copy lies: one or two byte ranges relative to the area start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSpan {
    pub offset: u64,
    pub size: u64,
    /// Bytes that wrapped to `MDA_HEADER_SIZE`.
    pub wrap: u64,
}

impl RingSpan {
    pub fn of(area_size: u64, offset: u64, size: u64) -> RingSpan {
        let end = offset.saturating_add(size);
        let wrap = end.saturating_sub(area_size);
        RingSpan { offset, size, wrap }
    }
    /// `(area_offset, len)` pieces in text order.
    pub fn pieces(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(self.offset, self.size - self.wrap)];
        if self.wrap > 0 {
            v.push((MDA_HEADER_SIZE, self.wrap));
        }
        v
    }
    /// Last byte used (inclusive), as LVM2 computes it.
    pub fn last(&self) -> u64 {
        if self.wrap > 0 {
            self.wrap + MDA_HEADER_SIZE - 1
        } else {
            self.offset + self.size - 1
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error(
        "metadata of {size} bytes exceeds the maximum of {max} bytes for a metadata area of {area} bytes"
    )]
    TooLarge { size: u64, max: u64, area: u64 },
    #[error(
        "metadata of {size} bytes would overlap the current copy in the circular buffer ({area} bytes)"
    )]
    Overlap { size: u64, area: u64 },
    #[error("empty metadata")]
    Empty,
}

/// Where LVM2 starts the next copy: 512-aligned strictly after the committed
/// copy, or back at the ring start when fewer than 512 bytes remain.
pub fn next_offset(header: &MdaHeader) -> u64 {
    let old = header.committed;
    if old.is_ignored() || old.is_empty() {
        return MDA_HEADER_SIZE;
    }
    let area = header.size;
    let old_last = RingSpan::of(area, old.offset, old.size).last();
    if area - old_last < ALIGN {
        return MDA_HEADER_SIZE;
    }
    // LVM2 always adds a full alignment step when already aligned.
    let next = old_last + 1;
    let s = next + (ALIGN - next % ALIGN);
    if s > area - ALIGN { MDA_HEADER_SIZE } else { s }
}

/// Where the next copy of `new_size` bytes goes, given the committed copy.
/// Like LVM2, a copy under the size cap can still be refused when the
/// alignment rules would make it overlap the committed copy.
pub fn place_next_copy(header: &MdaHeader, new_size: u64) -> Result<RingSpan, RingError> {
    let area = header.size;
    if new_size == 0 {
        return Err(RingError::Empty);
    }
    let max = header.max_text_size();
    if new_size > max {
        return Err(RingError::TooLarge {
            size: new_size,
            max,
            area,
        });
    }
    let old = header.committed;
    let new = RingSpan::of(area, next_offset(header), new_size);
    if !(old.is_ignored() || old.is_empty())
        && overlaps(&RingSpan::of(area, old.offset, old.size), &new)
    {
        return Err(RingError::Overlap {
            size: new_size,
            area,
        });
    }
    Ok(new)
}

/// Whether two copies share a byte (exact: LVM2's case analysis refuses
/// some placements that do not overlap).
fn overlaps(old: &RingSpan, new: &RingSpan) -> bool {
    old.pieces()
        .iter()
        .any(|&(o, ol)| new.pieces().iter().any(|&(n, nl)| o < n + nl && n < o + ol))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_matches_lvm2_bytes() {
        // Written by lvm2 2.03.16: start 4096, size 1044480, slot0 {3072, 1410, 0x3ed26389}.
        let mut h = MdaHeader::new(4096, 1_044_480);
        h.committed = RawLocn {
            offset: 3072,
            size: 1410,
            checksum: 0x3ed2_6389,
            flags: 0,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], &0x3ab4_af97u32.to_le_bytes());
        assert_eq!(MdaHeader::parse(&b, 4096).unwrap(), h);
        assert!(
            MdaHeader::parse(&b, 8192)
                .unwrap_err()
                .to_string()
                .contains("byte 8216")
        );
    }

    #[test]
    fn placement_follows_lvm2() {
        let mut h = MdaHeader::new(4096, 1_044_480);
        let first = place_next_copy(&h, 700).unwrap();
        assert_eq!(first.offset, 512);
        h.committed = RawLocn {
            offset: 512,
            size: 700,
            ..Default::default()
        };
        assert_eq!(place_next_copy(&h, 900).unwrap().offset, 1536);
        // exactly aligned end still skips a sector, as LVM2 does
        h.committed = RawLocn {
            offset: 512,
            size: 1024,
            ..Default::default()
        };
        assert_eq!(place_next_copy(&h, 10).unwrap().offset, 2048);
        assert_eq!(h.max_text_size(), 521_472);
        assert!(matches!(
            place_next_copy(&h, 521_473),
            Err(RingError::TooLarge { .. })
        ));
    }

    proptest! {
        /// Any sequence of commits keeps old and new copies disjoint and inside the ring.
        #[test]
        fn ring_copies_never_overlap(sizes in proptest::collection::vec(1u64..6000, 1..60), area_k in 8u64..40) {
            let area = area_k * 1024;
            let mut h = MdaHeader::new(4096, area);
            for s in sizes {
                match place_next_copy(&h, s) {
                    Ok(span) => {
                        let mut used = vec![false; area as usize];
                        let old = if h.committed.is_empty() { vec![] } else { RingSpan::of(area, h.committed.offset, h.committed.size).pieces() };
                        for (o, l) in old { for i in o..o + l { used[i as usize] = true; } }
                        for (o, l) in span.pieces() {
                            prop_assert!(o >= MDA_HEADER_SIZE && o + l <= area);
                            prop_assert_eq!(o % 512, 0);
                            for i in o..o + l { prop_assert!(!used[i as usize], "overlap at {}", i); }
                        }
                        h.committed = RawLocn { offset: span.offset, size: s, ..Default::default() };
                    }
                    Err(RingError::TooLarge { .. }) => prop_assert!(s > h.max_text_size()),
                    Err(RingError::Overlap { .. }) => {
                        // A refusal must be genuine: the copy would really overlap.
                        let would = RingSpan::of(area, next_offset(&h), s);
                        let old = RingSpan::of(area, h.committed.offset, h.committed.size);
                        let bytes = |sp: &RingSpan| sp.pieces().into_iter().flat_map(|(o, l)| o..o + l).collect::<std::collections::HashSet<u64>>();
                        prop_assert!(!bytes(&would).is_disjoint(&bytes(&old)), "spurious overlap refusal");
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                }
            }
        }
    }
}
