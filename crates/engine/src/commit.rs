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
use devpool_format::mda::{MdaHeader, RawLocn, place_next_copy};

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
            a.dev
                .write_at(gate, a.header.start + off, &text[at..at + len as usize])?;
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

/// Clear both slots (VG removal; the ring contents are left alone, as LVM2 does).
pub fn clear_slots(gate: &WriteGate, dev: &Device, header: &MdaHeader) -> Result<()> {
    let mut h = header.clone();
    h.committed = RawLocn::default();
    h.precommitted = RawLocn::default();
    dev.write_at(gate, h.start, &h.to_bytes())?;
    dev.sync()
}
