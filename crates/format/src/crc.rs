//! LVM2's checksum: reflected CRC-32 (polynomial 0xEDB88320) with initial value
//! 0xf597a6cf and no final XOR. It is zlib's CRC-32 with a different seed,
//! so the SIMD implementation of `crc32fast` does the work.

pub const INITIAL_CRC: u32 = 0xf597_a6cf;

/// Continue an LVM2 CRC from `state` over `data` (LVM2's `calc_crc`).
pub fn calc_crc(state: u32, data: &[u8]) -> u32 {
    // crc32fast applies ~ on entry and exit; undo both to get LVM2's raw register.
    let mut h = crc32fast::Hasher::new_with_initial(!state);
    h.update(data);
    !h.finalize()
}

/// LVM2 CRC of `data` from the initial value.
pub fn lvm_crc(data: &[u8]) -> u32 {
    calc_crc(INITIAL_CRC, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-at-a-time reference, straight from the definition.
    fn reference(mut crc: u32, data: &[u8]) -> u32 {
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn matches_definition_and_chains() {
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(lvm_crc(&data), reference(INITIAL_CRC, &data));
        let (a, b) = data.split_at(1234);
        assert_eq!(calc_crc(lvm_crc(a), b), lvm_crc(&data));
        assert_eq!(lvm_crc(&[]), INITIAL_CRC);
    }
}
