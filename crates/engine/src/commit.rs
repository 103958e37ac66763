//! LVM2's commit protocol, on every metadata area of every PV of a VG:
//! 1. write the new text copy into each ring (never over the committed copy);
//! 2. point the precommit slot (1) at it;
//! 3. point the commit slot (0) at it and clear slot 1.
//!
//! The text is made durable before any header points at it, and the commit
//! before this returns, so a crash leaves every area with either the old or
//! the new committed copy.

use crate::device::{Device, WriteGate};
use crate::error::{EngineError, Result};
use devpool_format::crc::lvm_crc;
use devpool_format::mda::{MdaHeader, RawLocn, RingSpan, place_next_copy};

/// One metadata area to commit to.
pub struct AreaTarget<'a> {
    pub dev: &'a Device,
    pub header: MdaHeader,
}

pub fn commit_text(gate: &WriteGate, areas: &mut [AreaTarget<'_>], text: &[u8]) -> Result<()> {
    let checksum = lvm_crc(text);
    let size = text.len() as u64;
    // Place everywhere first: a VG too large for any area fails before any write.
    let mut spans = Vec::with_capacity(areas.len());
    for a in areas.iter() {
        let span = place_next_copy(&a.header, size).map_err(|e| {
            EngineError::Refused(format!(
                "{}: metadata area at byte {}: {e}; give new PVs a larger --metadata-size",
                a.dev.path.display(),
                a.header.start
            ))
        })?;
        spans.push(span);
    }
    let mut devs: Vec<&Device> = Vec::new();
    for a in areas.iter() {
        if !devs.iter().any(|d| std::ptr::eq(*d, a.dev)) {
            devs.push(a.dev);
        }
    }
    let sync_all = |devs: &[&Device]| -> Result<()> { devs.iter().try_for_each(|d| d.sync()) };

    for (a, span) in areas.iter().zip(&spans) {
        let mut at = 0usize;
        for (off, len) in span.pieces() {
            let piece = padded(a, off, &text[at..at + len as usize]);
            a.dev.write_at(gate, a.header.start + off, &piece)?;
            at += len as usize;
        }
    }
    sync_all(&devs)?;
    let new = |span: &devpool_format::mda::RingSpan| RawLocn {
        offset: span.offset,
        size,
        checksum,
        flags: 0,
    };
    for (a, span) in areas.iter_mut().zip(&spans) {
        a.header.precommitted = new(span);
        a.dev.write_at(gate, a.header.start, &a.header.to_bytes())?;
    }
    // No flush here: precommit and commit rewrite the same header sector with
    // synchronous writes, so their order needs no barrier. The barrier that
    // matters (text durable before any header names it) is the one above.
    for (a, span) in areas.iter_mut().zip(&spans) {
        a.header.committed = new(span);
        a.header.precommitted = RawLocn::default();
        a.dev.write_at(gate, a.header.start, &a.header.to_bytes())?;
    }
    sync_all(&devs)
}

/// A text piece at area offset `off`, with zeros up to the device's I/O
/// granularity when those bytes are free ring space: the direct-I/O write
/// then needs no read of the block's old contents. What follows a copy's
/// end is never read (its length is in the header).
fn padded<'t>(a: &AreaTarget<'_>, off: u64, piece: &'t [u8]) -> std::borrow::Cow<'t, [u8]> {
    let len = padded_len(&a.header, a.dev.io_align(), off, piece.len() as u64);
    if len == piece.len() as u64 {
        return std::borrow::Cow::Borrowed(piece);
    }
    let mut v = Vec::with_capacity(len as usize);
    v.extend_from_slice(piece);
    v.resize(len as usize, 0);
    std::borrow::Cow::Owned(v)
}

/// How long a piece of `len` bytes at area offset `off` may be written:
/// up to the next multiple of `align` if those bytes are inside the area
/// and not part of the committed copy, else exactly `len`.
fn padded_len(header: &MdaHeader, align: u64, off: u64, len: u64) -> u64 {
    let align = align.max(1);
    let end = off + len;
    let padded_end = end.div_ceil(align) * align;
    let c = header.committed;
    let clear_of_committed = c.is_empty()
        || RingSpan::of(header.size, c.offset, c.size)
            .pieces()
            .iter()
            .all(|&(o, l)| o + l <= end || o >= padded_end);
    if padded_end <= header.size && clear_of_committed {
        padded_end - off
    } else {
        len
    }
}

/// Clear both slots (VG removal; the ring contents are left alone, as LVM2 does).
pub fn clear_slots(gate: &WriteGate, dev: &Device, header: &MdaHeader) -> Result<()> {
    let mut h = header.clone();
    h.committed = RawLocn::default();
    h.precommitted = RawLocn::default();
    dev.write_at(gate, h.start, &h.to_bytes())?;
    dev.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_with_committed(offset: u64, size: u64) -> MdaHeader {
        let mut h = MdaHeader::new(4096, 1 << 20);
        h.committed = RawLocn {
            offset,
            size,
            checksum: 1,
            flags: 0,
        };
        h
    }

    #[test]
    fn a_text_tail_is_padded_only_over_free_ring_space() {
        // Committed copy far away: pad to the 512-byte boundary (byte 1536).
        let h = header_with_committed(64 << 10, 1000);
        assert_eq!(padded_len(&h, 512, 512, 700), 1536 - 512);
        // Already aligned, or an image file (align 1): unchanged.
        assert_eq!(padded_len(&h, 512, 512, 512), 512);
        assert_eq!(padded_len(&h, 1, 512, 700), 700);
        // On a 4Kn device the committed copy may begin inside the padding:
        // then the block's old contents must be read and kept.
        let h = header_with_committed(2048, 1000);
        assert_eq!(padded_len(&h, 4096, 512, 700), 700);
        assert_eq!(padded_len(&h, 512, 512, 700), 1536 - 512);
        // The committed copy wrapped: its second piece (512..2048) ends
        // before the new piece, its first starts far after the padding.
        let size = 1 << 20;
        let h = header_with_committed(size - 512, 2048);
        assert_eq!(padded_len(&h, 4096, 2048, 100), 4096 - 2048);
        // Never past the area's end (an area of 1 MiB + 512 bytes).
        let mut h = MdaHeader::new(4096, size + 512);
        h.committed = header_with_committed(1024, 100).committed;
        assert_eq!(padded_len(&h, 4096, size, 300), 300);
        assert_eq!(padded_len(&h, 512, size, 300), 512);
    }
}
