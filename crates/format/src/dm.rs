//! Device-mapper tables and identities for LVM2 LVs: what a linear or
//! striped volume looks like to the kernel's `dm-linear` and `dm-stripe`,
//! named as LVM2 names its activated LVs (so `lvs` sees the LV as active
//! and LVM2's tools refuse to remove it while it is open).

use crate::map::{MapError, VolumeMap};

/// One line of a device-mapper table (sectors of 512 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub sectors: u64,
    /// `linear` or `striped`.
    pub kind: &'static str,
    pub params: String,
}

/// Where a map's device lies for the kernel: `MAJ:MIN`, and the byte on the
/// map's device that is sector 0 of the kernel device (non-zero when the
/// kernel device is a window over it, such as a loop device with an offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDev {
    pub major_minor: String,
    pub base: u64,
}

/// LVM2's device-mapper name for `vg`/`lv`: each `-` doubled, joined by `-`.
pub fn name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// LVM2's device-mapper uuid of an LV: `LVM-`, then the VG's and the LV's
/// uuids without dashes.
pub fn uuid(vg_uuid_raw: &str, lv_uuid_raw: &str) -> String {
    format!("LVM-{vg_uuid_raw}{lv_uuid_raw}")
}

/// The table of `map`, each device placed by `dev` (by its index in the map).
pub fn table(
    map: &VolumeMap,
    dev: impl Fn(usize) -> Option<KernelDev>,
) -> Result<Vec<Target>, MapError> {
    let bad = |reason: String| MapError::Unsupported {
        lv: "(device-mapper table)".into(),
        reason,
    };
    let sectors = |bytes: u64, what: &str| {
        if bytes.is_multiple_of(512) {
            Ok(bytes / 512)
        } else {
            Err(bad(format!(
                "{what} {bytes} is not a whole number of sectors"
            )))
        }
    };
    let place = |d: usize, phys: u64| -> Result<String, MapError> {
        let k = dev(d).ok_or_else(|| bad(format!("device {d} has no kernel device")))?;
        let rel = phys
            .checked_sub(k.base)
            .ok_or_else(|| bad(format!("byte {phys} lies before its device's window")))?;
        Ok(format!("{} {}", k.major_minor, sectors(rel, "offset")?))
    };
    map.runs_view()
        .map(|r| {
            let start = sectors(r.start, "start")?;
            let len = sectors(r.len, "length")?;
            let (kind, params) = match r.stripe {
                None => {
                    let (d, phys) = r.areas[0];
                    ("linear", place(d, phys)?)
                }
                Some(stripe) => {
                    let mut p = format!("{} {}", r.areas.len(), sectors(stripe, "stripe")?);
                    for &(d, phys) in &r.areas {
                        p.push(' ');
                        p.push_str(&place(d, phys)?);
                    }
                    ("striped", p)
                }
            };
            Ok(Target {
                start,
                sectors: len,
                kind,
                params,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_double_dashes_as_lvm2_does() {
        assert_eq!(name("devpool-g", "a-b"), "devpool--g-a--b");
        assert_eq!(name("vg", "lv"), "vg-lv");
        assert_eq!(
            uuid("V".repeat(32).as_str(), "L".repeat(32).as_str()).len(),
            68
        );
    }

    #[test]
    fn linear_runs_become_linear_targets_relative_to_their_window() {
        let map = VolumeMap::from_runs(&[(0, 8 << 20, 4 << 20), (1, 1 << 20, 8 << 20)]);
        let t = table(&map, |d| {
            Some(KernelDev {
                major_minor: format!("7:{d}"),
                base: if d == 0 { 8 << 20 } else { 0 },
            })
        })
        .unwrap();
        assert_eq!(
            t,
            vec![
                Target {
                    start: 0,
                    sectors: 8192,
                    kind: "linear",
                    params: "7:0 0".into()
                },
                Target {
                    start: 8192,
                    sectors: 16384,
                    kind: "linear",
                    params: "7:1 2048".into()
                },
            ]
        );
    }

    #[test]
    fn striped_runs_name_every_area_in_stripe_order() {
        use crate::metadata::{LvMeta, Segment, SegmentKind, StripeArea, VgMetadata};
        use crate::units::{Bytes, ExtentSize, Sectors};
        use crate::uuid::LvmUuid;
        let es = 4u64 << 20;
        let id = LvmUuid::parse("aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa").unwrap();
        let meta = VgMetadata::new_empty("vg", id, ExtentSize::new_for_vg(Bytes(es)).unwrap());
        let lv = LvMeta {
            name: "lv".into(),
            id: LvmUuid::parse("bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb").unwrap(),
            status: vec![],
            flags: vec![],
            tags: vec![],
            creation_time: None,
            creation_host: None,
            extra: vec![],
            segments: vec![Segment {
                start_extent: 0,
                extent_count: 4,
                extra: vec![],
                kind: SegmentKind::Striped {
                    stripe_size: Some(Sectors(128)),
                    stripes: vec![
                        StripeArea {
                            pv: "pv1".into(),
                            start: 3,
                        },
                        StripeArea {
                            pv: "pv0".into(),
                            start: 0,
                        },
                    ],
                },
            }],
        };
        let place = |k: &str| {
            Some(crate::map::PvPlace {
                dev: if k == "pv0" { 0 } else { 1 },
                pe_start_bytes: 1 << 20,
                pe_count: 100,
            })
        };
        let map = VolumeMap::from_lv(&meta, &lv, place).unwrap();
        let t = table(&map, |d| {
            Some(KernelDev {
                major_minor: format!("254:{d}"),
                base: 0,
            })
        })
        .unwrap();
        // 16 MiB over two stripes of 64 KiB; pv1's area at extent 3.
        let pv1_area = ((1u64 << 20) + 3 * es) / 512;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, "striped");
        assert_eq!(t[0].sectors, 4 * es / 512);
        assert_eq!(t[0].params, format!("2 128 254:1 {pv1_area} 254:0 2048"));
    }

    #[test]
    fn a_device_without_a_place_or_an_offset_before_its_window_is_refused() {
        let map = VolumeMap::from_runs(&[(0, 1 << 20, 4 << 20)]);
        assert!(table(&map, |_| None).is_err());
        let after = |_| {
            Some(KernelDev {
                major_minor: "7:0".into(),
                base: 2 << 20,
            })
        };
        assert!(table(&map, after).is_err());
    }
}
