//! The LVM2 label (`LABELONE`, one of the first four sectors, normally sector 1)
//! and the PV header that follows it: UUID, device size, the data-area and
//! metadata-area lists, and the version-2 extension (flags, bootloader areas).

use crate::crc::lvm_crc;
use crate::error::{FormatError, le_u32, le_u64};
use crate::uuid::LvmUuid;

pub const SECTOR: usize = 512;
pub const LABEL_ID: &[u8; 8] = b"LABELONE";
pub const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
/// LVM2 looks for the label in the first four sectors.
pub const LABEL_SCAN_SECTORS: u64 = 4;
/// Offset of the PV header from the start of the label sector.
pub const PV_HEADER_OFFSET: usize = 32;
pub const PV_EXT_VERSION: u32 = 2;
/// Extension flag: the PV belongs to a VG.
pub const PV_EXT_USED: u32 = 1;

/// `{offset, size}` in bytes from the start of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLocn {
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvHeaderExt {
    pub version: u32,
    pub flags: u32,
    pub bootloader_areas: Vec<DiskLocn>,
}

/// Label and PV header, as found in the label sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvLabel {
    /// The sector the label lives in (1 for everything LVM2 and devpool write).
    pub sector: u64,
    pub uuid: LvmUuid,
    pub device_size: u64,
    pub data_areas: Vec<DiskLocn>,
    pub metadata_areas: Vec<DiskLocn>,
    pub ext: Option<PvHeaderExt>,
}

/// Is there an LVM2 label id at the start of this sector? (cheap probe)
pub fn has_label_id(sector: &[u8]) -> bool {
    sector.len() >= 8 && &sector[..8] == LABEL_ID
}

/// Read a zero-terminated `disk_locn` list starting at `at`; returns the list
/// and the position after its terminator.
fn read_locn_list(
    b: &[u8],
    mut at: usize,
    base: u64,
    what: &'static str,
) -> Result<(Vec<DiskLocn>, usize), FormatError> {
    let mut out = Vec::new();
    loop {
        if at + 16 > b.len() {
            return Err(FormatError::new(
                "PV header",
                base + at as u64,
                format!("{what} list runs past the label sector"),
            ));
        }
        let l = DiskLocn {
            offset: le_u64(b, at),
            size: le_u64(b, at + 8),
        };
        at += 16;
        if l.offset == 0 {
            return Ok((out, at));
        }
        if l.offset.checked_add(l.size).is_none() {
            return Err(FormatError::new(
                "PV header",
                base + at as u64 - 16,
                format!("{what} offset+size overflows"),
            ));
        }
        out.push(l);
    }
}

/// Write a zero-terminated `disk_locn` list at `*at`.
fn put_locn_list(
    b: &mut [u8; SECTOR],
    at: &mut usize,
    list: &[DiskLocn],
) -> Result<(), FormatError> {
    for l in list
        .iter()
        .chain(std::iter::once(&DiskLocn { offset: 0, size: 0 }))
    {
        if *at + 16 > SECTOR {
            return Err(FormatError::new(
                "PV header",
                544,
                "area lists do not fit in the label sector",
            ));
        }
        b[*at..*at + 8].copy_from_slice(&l.offset.to_le_bytes());
        b[*at + 8..*at + 16].copy_from_slice(&l.size.to_le_bytes());
        *at += 16;
    }
    Ok(())
}

impl PvLabel {
    /// Parse the label sector found at sector index `sector` (byte offset `sector*512`).
    pub fn parse(buf: &[u8], sector: u64) -> Result<PvLabel, FormatError> {
        let base = sector * SECTOR as u64;
        let err = |off: usize, r: String| FormatError::new("label", base + off as u64, r);
        if buf.len() < SECTOR {
            return Err(err(0, format!("truncated: {} of 512 bytes", buf.len())));
        }
        let b = &buf[..SECTOR];
        if &b[..8] != LABEL_ID {
            return Err(err(0, "no LABELONE id".into()));
        }
        let sector_xl = le_u64(b, 8);
        if sector_xl != sector {
            return Err(err(
                8,
                format!("label says it is in sector {sector_xl}, found in sector {sector}"),
            ));
        }
        let crc = le_u32(b, 16);
        let calc = lvm_crc(&b[20..]);
        if crc != calc {
            return Err(err(
                16,
                format!("label checksum 0x{crc:08x} does not match contents (0x{calc:08x})"),
            ));
        }
        let offset = le_u32(b, 20) as usize;
        if offset != PV_HEADER_OFFSET {
            return Err(err(20, format!("PV header offset {offset} (expected 32)")));
        }
        if &b[24..32] != LABEL_TYPE {
            return Err(err(
                24,
                format!(
                    "label type {:?} is not LVM2 001",
                    String::from_utf8_lossy(&b[24..32])
                ),
            ));
        }
        let mut uuid_raw = [0u8; 32];
        uuid_raw.copy_from_slice(&b[32..64]);
        let uuid = LvmUuid::from_raw_bytes(&uuid_raw)
            .map_err(|e| FormatError::new("PV header", base + 32, e.to_string()))?;
        let device_size = le_u64(b, 64);
        let (data_areas, at) = read_locn_list(b, 72, base, "data area")?;
        let (metadata_areas, at) = read_locn_list(b, at, base, "metadata area")?;
        // The extension exists when its version field is non-zero.
        let ext = if at + 8 <= SECTOR && le_u32(b, at) != 0 {
            let version = le_u32(b, at);
            let flags = le_u32(b, at + 4);
            let (bootloader_areas, _) = read_locn_list(b, at + 8, base, "bootloader area")?;
            Some(PvHeaderExt {
                version,
                flags,
                bootloader_areas,
            })
        } else {
            None
        };
        if data_areas.len() > 1 {
            return Err(FormatError::new(
                "PV header",
                base + 72,
                "more than one data area (not an LVM2 PV layout)",
            ));
        }
        if metadata_areas.len() > 2 {
            return Err(FormatError::new(
                "PV header",
                base + 72,
                "more than two metadata areas",
            ));
        }
        Ok(PvLabel {
            sector,
            uuid,
            device_size,
            data_areas,
            metadata_areas,
            ext,
        })
    }

    /// The 512-byte label sector, with its checksum.
    pub fn to_sector(&self) -> Result<[u8; SECTOR], FormatError> {
        let mut b = [0u8; SECTOR];
        b[..8].copy_from_slice(LABEL_ID);
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b[20..24].copy_from_slice(&(PV_HEADER_OFFSET as u32).to_le_bytes());
        b[24..32].copy_from_slice(LABEL_TYPE);
        b[32..64].copy_from_slice(self.uuid.raw());
        b[64..72].copy_from_slice(&self.device_size.to_le_bytes());
        let mut at = 72;
        put_locn_list(&mut b, &mut at, &self.data_areas)?;
        put_locn_list(&mut b, &mut at, &self.metadata_areas)?;
        if let Some(ext) = &self.ext {
            if at + 8 > SECTOR {
                return Err(FormatError::new(
                    "PV header",
                    544,
                    "extension does not fit in the label sector",
                ));
            }
            b[at..at + 4].copy_from_slice(&ext.version.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&ext.flags.to_le_bytes());
            at += 8;
            put_locn_list(&mut b, &mut at, &ext.bootloader_areas)?;
        }
        let crc = lvm_crc(&b[20..]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Where the data area (first extent) starts, in bytes.
    pub fn pe_start(&self) -> Option<u64> {
        self.data_areas.first().map(|d| d.offset)
    }
}

/// Find the label in the first four sectors of a device (`head` holds at least
/// those bytes, or the whole device if it is shorter). `Ok(None)`: no label id.
pub fn find_label(head: &[u8]) -> Result<Option<PvLabel>, FormatError> {
    for s in 0..LABEL_SCAN_SECTORS as usize {
        let start = s * SECTOR;
        if head.len() < start + 8 {
            break;
        }
        if has_label_id(&head[start..]) {
            return PvLabel::parse(&head[start..head.len().min(start + SECTOR)], s as u64)
                .map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> PvLabel {
        PvLabel {
            sector: 1,
            uuid: LvmUuid::parse("0t4yaeo2yWyq2KchYnu9I7Ej8ojsi0Ml").unwrap(),
            device_size: 209_715_200,
            data_areas: vec![DiskLocn {
                offset: 1 << 20,
                size: 0,
            }],
            metadata_areas: vec![DiskLocn {
                offset: 4096,
                size: 1_044_480,
            }],
            ext: Some(PvHeaderExt {
                version: 2,
                flags: 1,
                bootloader_areas: vec![],
            }),
        }
    }

    #[test]
    fn matches_the_bytes_lvm2_wrote() {
        // Label sector written by lvm2 2.03.16 pvcreate + vgcreate (crc 0x79c88b9e).
        let s = sample().to_sector().unwrap();
        assert_eq!(&s[16..20], &0x79c8_8b9eu32.to_le_bytes());
        let mut head = vec![0u8; 2048];
        head[512..1024].copy_from_slice(&s);
        assert_eq!(find_label(&head).unwrap().unwrap(), sample());
    }

    #[test]
    fn bit_flips_are_caught_with_offsets() {
        let s = sample().to_sector().unwrap();
        for i in 8..SECTOR {
            let mut b = s;
            b[i] ^= 0x10;
            match PvLabel::parse(&b, 1) {
                Err(e) => assert!(e.offset >= 512 && e.offset < 1024, "{e}"),
                Ok(l) => panic!("flip at {i} accepted: {l:?}"),
            }
        }
        assert!(
            PvLabel::parse(&s[..100], 1)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
