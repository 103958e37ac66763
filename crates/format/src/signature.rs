//! Recognise well-known signatures at the start of a device, so that writing a
//! PV label over something valuable needs confirmation.

use crate::label::find_label;

/// `(name, byte offset, magic)`.
const MAGICS: &[(&str, usize, &[u8])] = &[
    ("xfs", 0, b"XFSB"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("GPT partition table", 512, b"EFI PART"),
    ("ext2/3/4", 1080, &[0x53, 0xef]),
    ("md RAID member", 4096, &[0xfc, 0x4e, 0x2b, 0xa9]),
    ("swap", 4086, b"SWAPSPACE2"),
    ("swap (old)", 4086, b"SWAP-SPACE"),
    ("btrfs", 65600, b"_BHRfS_M"),
    ("iso9660", 32769, b"CD001"),
    ("squashfs", 0, b"hsqs"),
    ("f2fs", 1024, &[0x10, 0x20, 0xf5, 0xf2]),
];

/// A signature found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub name: &'static str,
    pub offset: u64,
}

/// Scan the first bytes of a device (`head`: ideally the first 68 KiB).
pub fn detect(head: &[u8]) -> Vec<Signature> {
    let mut found = Vec::new();
    if let Ok(Some(l)) = find_label(head) {
        found.push(Signature {
            name: "LVM2 PV",
            offset: l.sector * 512,
        });
    }
    for (name, off, magic) in MAGICS {
        if head.len() >= off + magic.len() && &head[*off..off + magic.len()] == *magic {
            found.push(Signature {
                name,
                offset: *off as u64,
            });
        }
    }
    // A DOS partition table: boot signature plus at least one typed entry.
    if head.len() >= 512
        && head[510] == 0x55
        && head[511] == 0xaa
        && (0..4).any(|i| head[446 + i * 16 + 4] != 0)
    {
        found.push(Signature {
            name: "DOS partition table",
            offset: 510,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ext4_and_nothing_on_zeroes() {
        let mut head = vec![0u8; 70000];
        assert!(detect(&head).is_empty());
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(
            detect(&head),
            vec![Signature {
                name: "ext2/3/4",
                offset: 1080
            }]
        );
    }
}
