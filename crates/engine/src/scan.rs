//! Reading a PV's on-disk state: label, PV header, metadata area headers and
//! the committed text copy of each area (checksum verified, parsed once per
//! distinct checksum).

use crate::device::Device;
use crate::error::{EngineError, Result};
use devpool_format::crc::lvm_crc;
use devpool_format::label::{PvLabel, find_label};
use devpool_format::mda::{MdaHeader, RingSpan};
use devpool_format::metadata::VgMetadata;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The committed text copy of one metadata area.
#[derive(Debug, Clone)]
pub struct MdaText {
    pub meta: Arc<VgMetadata>,
    pub checksum: u32,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct MdaState {
    pub header: MdaHeader,
    /// `None`: the area holds no VG (an orphan PV). `Some(Err)`: unreadable copy.
    pub text: Option<std::result::Result<MdaText, String>>,
}

#[derive(Debug, Clone)]
pub struct ScannedPv {
    pub path: PathBuf,
    pub size: u64,
    pub label: PvLabel,
    /// Metadata areas in PV header order; `Err` for an unreadable header.
    pub mdas: Vec<std::result::Result<MdaState, String>>,
}

impl ScannedPv {
    /// The newest valid VG copy on this PV.
    pub fn newest(&self) -> Option<&MdaText> {
        self.mdas
            .iter()
            .filter_map(|m| m.as_ref().ok()?.text.as_ref()?.as_ref().ok())
            .max_by_key(|t| t.meta.seqno)
    }
}

/// Parsed texts by checksum, so a VG stored on many areas is parsed once.
#[derive(Default)]
pub struct ParseCache(HashMap<(u32, u64), Arc<VgMetadata>>);

/// Texts parsed by earlier scans of this process, when it keeps them
/// ([`keep_parsed_metadata`]).
static KEPT: Mutex<Option<ParseCache>> = Mutex::new(None);
/// How many parsed texts are kept: the newest commit of a few VGs (a VG
/// of 65,536 volumes takes tens of MB parsed; older versions are garbage).
const KEPT_LIMIT: usize = 4;

/// Make later scans of this process (a resident one: `devpool daemon`)
/// take an area's text from what an earlier scan or commit parsed when the
/// area header names the same checksum and size, instead of reading and
/// parsing it again. A header is still read on every scan, so a change by
/// anyone else is seen. (LVM2 trusts its cached metadata the same way.)
pub fn keep_parsed_metadata() {
    let mut k = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    k.get_or_insert_with(ParseCache::default);
}

/// Whether this process keeps parsed texts.
pub fn keeping() -> bool {
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// The kept text for an area header's committed slot, if any.
fn kept(checksum: u32, size: u64) -> Option<Arc<VgMetadata>> {
    let k = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    k.as_ref()?.0.get(&(checksum, size)).cloned()
}

/// Remember a parsed (or committed) text, when this process keeps them.
pub fn keep(checksum: u32, size: u64, meta: &Arc<VgMetadata>) {
    let mut k = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cache) = k.as_mut() {
        if cache.0.len() >= KEPT_LIMIT {
            cache.0.clear();
        }
        cache.0.insert((checksum, size), Arc::clone(meta));
    }
}

/// The first bytes of a device, read once: the label (in the first 2 KiB)
/// and, at LVM2's default layout, the first metadata area's header (at
/// 4 KiB) come from one read instead of one round trip each.
pub struct Head(Vec<u8>);

const HEAD_LEN: u64 = 8192;

impl Head {
    pub fn read(dev: &Device) -> Result<Head> {
        Ok(Head(dev.read_at(0, dev.size.min(HEAD_LEN) as usize)?))
    }

    /// The label. `Ok(None)`: not a PV.
    pub fn label(&self, dev: &Device) -> Result<Option<PvLabel>> {
        find_label(&self.0[..self.0.len().min(2048)]).map_err(|e| EngineError::Format {
            path: dev.path.clone(),
            err: e,
        })
    }

    /// The metadata area header at `start` (from the head when it holds it).
    pub fn area_header(&self, dev: &Device, start: u64) -> Result<MdaHeader> {
        let bytes = match self.0.get(start as usize..start as usize + 512) {
            Some(b) => b.to_vec(),
            None => dev.read_at(start, 512)?,
        };
        MdaHeader::parse(&bytes, start).map_err(|e| EngineError::Format {
            path: dev.path.clone(),
            err: e,
        })
    }
}

/// Read the label of a device. `Ok(None)`: not a PV.
pub fn read_label(dev: &Device) -> Result<Option<PvLabel>> {
    Head::read(dev)?.label(dev)
}

pub fn scan_device(dev: &Device, cache: &mut ParseCache) -> Result<Option<ScannedPv>> {
    let head = Head::read(dev)?;
    let Some(label) = head.label(dev)? else {
        return Ok(None);
    };
    let mut mdas = Vec::new();
    for area in &label.metadata_areas {
        mdas.push(read_area(dev, &head, area.offset, area.size, cache).map_err(|e| e.to_string()));
    }
    Ok(Some(ScannedPv {
        path: dev.path.clone(),
        size: dev.size,
        label,
        mdas,
    }))
}

fn read_area(
    dev: &Device,
    head: &Head,
    start: u64,
    size: u64,
    cache: &mut ParseCache,
) -> Result<MdaState> {
    let fmt = |reason: String| EngineError::Format {
        path: dev.path.clone(),
        err: devpool_format::FormatError::new("metadata area", start, reason),
    };
    if start.checked_add(size).is_none_or(|end| end > dev.size) {
        return Err(fmt(format!(
            "area of {size} bytes runs past the device end ({} bytes)",
            dev.size
        )));
    }
    let header = head.area_header(dev, start)?;
    if header.size != size {
        return Err(fmt(format!(
            "header says {} bytes, PV header says {size}",
            header.size
        )));
    }
    let slot = header.committed;
    if slot.is_empty() || slot.is_ignored() {
        return Ok(MdaState { header, text: None });
    }
    if let Some(meta) = kept(slot.checksum, slot.size) {
        return Ok(MdaState {
            header,
            text: Some(Ok(MdaText {
                meta,
                checksum: slot.checksum,
                size: slot.size,
            })),
        });
    }
    let text = read_text(dev, &header).map_err(|e| e.to_string());
    let text = match text {
        Ok((bytes, abs)) => {
            let key = (slot.checksum, slot.size);
            match cache.0.get(&key) {
                Some(meta) => Ok(MdaText {
                    meta: meta.clone(),
                    checksum: slot.checksum,
                    size: slot.size,
                }),
                None => match VgMetadata::parse(&bytes) {
                    Ok(meta) => {
                        let meta = Arc::new(meta);
                        cache.0.insert(key, meta.clone());
                        keep(slot.checksum, slot.size, &meta);
                        Ok(MdaText {
                            meta,
                            checksum: slot.checksum,
                            size: slot.size,
                        })
                    }
                    Err(e) => Err(EngineError::Metadata {
                        path: dev.path.clone(),
                        offset: abs,
                        err: e,
                    }
                    .to_string()),
                },
            }
        }
        Err(e) => Err(e),
    };
    Ok(MdaState {
        header,
        text: Some(text),
    })
}

/// The committed text of an area, checksum verified; returns the bytes and
/// their absolute offset.
pub fn read_text(dev: &Device, header: &MdaHeader) -> Result<(Vec<u8>, u64)> {
    let slot = header.committed;
    let span = RingSpan::of(header.size, slot.offset, slot.size);
    let mut bytes = Vec::with_capacity(slot.size as usize);
    for (off, len) in span.pieces() {
        bytes.extend(dev.read_at(header.start + off, len as usize)?);
    }
    let abs = header.start + slot.offset;
    let calc = lvm_crc(&bytes);
    if calc != slot.checksum {
        return Err(EngineError::Format {
            path: dev.path.clone(),
            err: devpool_format::FormatError::new(
                "metadata text",
                abs,
                format!(
                    "checksum 0x{calc:08x} does not match 0x{:08x} in the area header",
                    slot.checksum
                ),
            ),
        });
    }
    Ok((bytes, abs))
}

/// Open and scan, turning "not a PV" into `None` and errors into a message.
pub fn scan_path(
    path: &Path,
    cache: &mut ParseCache,
) -> std::result::Result<Option<ScannedPv>, String> {
    let dev = Device::open(path, false).map_err(|e| e.to_string())?;
    scan_device(&dev, cache).map_err(|e| e.to_string())
}
