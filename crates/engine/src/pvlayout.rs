//! Where a new PV puts its metadata areas and data, as LVM2's pvcreate does:
//! area 0 at 4 KiB grown to the 1 MiB-aligned data start, area 1 (optional)
//! of the requested size at the end of the device.

use devpool_format::units::Bytes;

pub const MIB: u64 = 1 << 20;
/// LVM2's default: 1020 KiB, so that data starts at 1 MiB.
pub const LVM2_DEFAULT_MDA: u64 = MIB - 4096;
/// devpool's default on devices of 8 GiB and more: room for 65,536 volumes.
pub const POOL_DEFAULT_MDA: u64 = 128 * MIB;
pub const POOL_DEFAULT_MIN_DEVICE: u64 = 8 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvLayout {
    pub pe_start: u64,
    /// `[offset, size]` of each metadata area.
    pub mdas: Vec<[u64; 2]>,
    pub small_device_default: bool,
}

impl PvLayout {
    pub fn compute(
        dev_size: Bytes,
        mda_size: Option<Bytes>,
        copies: u8,
    ) -> Result<PvLayout, String> {
        if !(1..=2).contains(&copies) {
            return Err("metadata copies must be 1 or 2".into());
        }
        let small = mda_size.is_none() && dev_size.0 < POOL_DEFAULT_MIN_DEVICE;
        let req = match mda_size {
            Some(b) => b.0,
            None if small => LVM2_DEFAULT_MDA,
            None => POOL_DEFAULT_MDA,
        };
        if req < 8192 {
            return Err(format!(
                "metadata size of {req} bytes is too small (at least 8 KiB)"
            ));
        }
        let pe_start = (4096 + req)
            .div_ceil(MIB)
            .checked_mul(MIB)
            .ok_or("metadata size too large")?;
        let mut mdas = vec![[4096, pe_start - 4096]];
        let mut tail = 0;
        if copies == 2 {
            let start = dev_size.0.saturating_sub(req) / 4096 * 4096;
            tail = dev_size.0 - start;
            mdas.push([start, tail]);
        }
        let need = pe_start + tail + MIB;
        if dev_size.0 < need {
            return Err(format!(
                "device of {} bytes is too small: metadata and one MiB of data need {need} bytes",
                dev_size.0
            ));
        }
        Ok(PvLayout {
            pe_start,
            mdas,
            small_device_default: small,
        })
    }

    /// Bytes to zero at the start of the device: old labels and signatures.
    pub fn wipe_len(&self) -> u64 {
        (128 * 1024u64).min(self.pe_start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_lvm2_pvcreate() {
        // pvcreate on 200 MiB: data at 1 MiB, one area of 1020 KiB.
        let l = PvLayout::compute(Bytes(200 * MIB), None, 1).unwrap();
        assert_eq!((l.pe_start, l.mdas.clone()), (MIB, vec![[4096, 1_044_480]]));
        // pvcreate --pvmetadatacopies 2 --metadatasize 3M on 300 MiB.
        let l = PvLayout::compute(Bytes(300 * MIB), Some(Bytes(3 * MIB)), 2).unwrap();
        assert_eq!(l.pe_start, 4 * MIB);
        assert_eq!(l.mdas, vec![[4096, 4_190_208], [311_427_072, 3_145_728]]);
        // Pools: 128 MiB.
        let l = PvLayout::compute(Bytes(64 << 30), None, 1).unwrap();
        assert_eq!(l.mdas[0][1], 129 * MIB - 4096);
        assert!(PvLayout::compute(Bytes(MIB), None, 1).is_err());
    }
}
