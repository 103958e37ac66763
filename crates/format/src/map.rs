//! A volume's address space: its logical byte range, cut by its segments
//! (linear or striped) into pieces on PVs. Pure arithmetic, no I/O: every
//! byte any frontend touches goes through [`VolumeMap::pieces`], which refuses
//! anything outside the volume, so a bug in a protocol can never reach a
//! neighbour's extents.

use crate::metadata::{LvMeta, SegmentKind, VgMetadata};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MapError {
    #[error("request {offset}+{len} is outside the volume (size {size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume {lv}: {reason}")]
    Unsupported { lv: String, reason: String },
}

/// One contiguous stretch of a request on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into the volume's device list.
    pub dev: usize,
    /// Byte offset on that device.
    pub offset: u64,
    pub len: u64,
    /// Where this piece starts inside the request's buffer.
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Run {
    Linear {
        dev: usize,
        phys: u64,
    },
    /// `areas[i]` is the byte start of stripe area i on its device.
    Striped {
        stripe: u64,
        areas: Vec<(usize, u64)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Extent {
    /// Logical byte offset where this run starts.
    start: u64,
    len: u64,
    run: Run,
}

/// Where a PV's data area is: its device index and the first byte of
/// physical extent 0 (`pe_start`), plus how many extents it has.
#[derive(Debug, Clone, Copy)]
pub struct PvPlace {
    pub dev: usize,
    pub pe_start_bytes: u64,
    pub pe_count: u64,
}

/// One run of a [`VolumeMap`]: logical bytes `start..start+len` on one
/// area (linear) or striped over several, `stripe` bytes at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunView {
    pub start: u64,
    pub len: u64,
    pub stripe: Option<u64>,
    /// `(device index, byte offset)` of each area.
    pub areas: Vec<(usize, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMap {
    size: u64,
    runs: Vec<Extent>,
}

impl VolumeMap {
    /// A map over one linear run (tests; image-backed volumes).
    pub fn linear(dev: usize, phys: u64, size: u64) -> VolumeMap {
        VolumeMap {
            size,
            runs: vec![Extent {
                start: 0,
                len: size,
                run: Run::Linear { dev, phys },
            }],
        }
    }

    /// A map over linear runs `(device, physical byte offset, length)`, in
    /// logical order.
    pub fn from_runs(runs: &[(usize, u64, u64)]) -> VolumeMap {
        let mut start = 0;
        let runs = runs
            .iter()
            .map(|&(dev, phys, len)| {
                let e = Extent {
                    start,
                    len,
                    run: Run::Linear { dev, phys },
                };
                start += len;
                e
            })
            .collect();
        VolumeMap { size: start, runs }
    }

    /// The map of an LV. `place` tells where each PV (by its key in the VG)
    /// is; an LV with segment types other than linear/striped is refused.
    pub fn from_lv(
        meta: &VgMetadata,
        lv: &LvMeta,
        place: impl Fn(&str) -> Option<PvPlace>,
    ) -> Result<VolumeMap, MapError> {
        let es = meta.extent_size.bytes().0;
        let unsupported = |reason: String| MapError::Unsupported {
            lv: lv.name.clone(),
            reason,
        };
        let mut runs = Vec::new();
        let mut next = 0u64;
        let mut segs: Vec<_> = lv.segments.iter().collect();
        segs.sort_by_key(|s| s.start_extent);
        for seg in segs {
            let SegmentKind::Striped {
                stripe_size,
                stripes,
            } = &seg.kind
            else {
                return Err(unsupported(format!(
                    "segment type '{}' cannot be served yet",
                    seg.segtype()
                )));
            };
            if seg.start_extent != next || stripes.is_empty() {
                return Err(unsupported(format!(
                    "segments do not cover extents 0..{} without gaps",
                    lv.extent_count()
                )));
            }
            let area_len = seg.area_len();
            let mut areas = Vec::with_capacity(stripes.len());
            for st in stripes {
                let p =
                    place(&st.pv).ok_or_else(|| unsupported(format!("PV {} is missing", st.pv)))?;
                let end = st.start.checked_add(area_len);
                if end.is_none_or(|e| e > p.pe_count) {
                    return Err(unsupported(format!(
                        "extents {}+{} lie past the end of PV {} ({} extents)",
                        st.start, area_len, st.pv, p.pe_count
                    )));
                }
                areas.push((p.dev, p.pe_start_bytes + st.start * es));
            }
            let start = next
                .checked_mul(es)
                .ok_or_else(|| unsupported("size overflows".into()))?;
            let len = seg.extent_count * es;
            let run = if areas.len() == 1 {
                Run::Linear {
                    dev: areas[0].0,
                    phys: areas[0].1,
                }
            } else {
                let stripe = stripe_size
                    .ok_or_else(|| unsupported("striped segment without stripe_size".into()))?
                    .0
                    * 512;
                if stripe == 0 || !(area_len * es).is_multiple_of(stripe) {
                    return Err(unsupported(format!(
                        "stripe size {stripe} does not divide the stripe area"
                    )));
                }
                Run::Striped { stripe, areas }
            };
            runs.push(Extent { start, len, run });
            next = seg.end_extent();
        }
        Ok(VolumeMap {
            size: next * es,
            runs,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the volume is one range on one device (a loop device or
    /// QEMU's raw driver can cover it without a server).
    pub fn single_range(&self) -> Option<(usize, u64)> {
        let first = self.runs.first()?;
        let Run::Linear { dev, phys } = first.run else {
            return None;
        };
        let mut end = phys + first.len;
        for r in &self.runs[1..] {
            match r.run {
                Run::Linear { dev: d, phys: p } if d == dev && p == end => end += r.len,
                _ => return None,
            }
        }
        Some((dev, phys))
    }

    pub fn check(&self, offset: u64, len: u64) -> Result<(), MapError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MapError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Cut `offset..offset+len` into device pieces (appended to `out`), merging
    /// pieces that continue each other on the same device.
    pub fn pieces(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<(), MapError> {
        self.check(offset, len)?;
        let first = out.len();
        let mut pos = offset;
        let end = offset + len;
        // Runs are sorted and contiguous: find the one holding `offset`.
        let mut i = self.runs.partition_point(|r| r.start + r.len <= offset);
        while pos < end {
            let Some(r) = self.runs.get(i) else {
                // Unreachable when check() passed; refuse rather than guess.
                return Err(MapError::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                });
            };
            let in_run = pos - r.start;
            let run_left = (r.len - in_run).min(end - pos);
            let (dev, phys, n) = match &r.run {
                Run::Linear { dev, phys } => (*dev, phys + in_run, run_left),
                Run::Striped { stripe, areas } => {
                    let chunk = in_run / stripe;
                    let within = in_run % stripe;
                    let n_areas = areas.len() as u64;
                    let (dev, base) = areas[(chunk % n_areas) as usize];
                    let row = chunk / n_areas;
                    (
                        dev,
                        base + row * stripe + within,
                        (stripe - within).min(run_left),
                    )
                }
            };
            push_merged(
                out,
                first,
                Piece {
                    dev,
                    offset: phys,
                    len: n,
                    at: pos - offset,
                },
            );
            pos += n;
            if pos >= r.start + r.len {
                i += 1;
            }
        }
        Ok(())
    }

    /// The runs in logical order, as a device-mapper table needs them.
    pub fn runs_view(&self) -> impl Iterator<Item = RunView> + '_ {
        self.runs.iter().map(|r| match &r.run {
            Run::Linear { dev, phys } => RunView {
                start: r.start,
                len: r.len,
                stripe: None,
                areas: vec![(*dev, *phys)],
            },
            Run::Striped { stripe, areas } => RunView {
                start: r.start,
                len: r.len,
                stripe: Some(*stripe),
                areas: areas.clone(),
            },
        })
    }

    /// Every physical byte range the volume owns, per device (used to prove
    /// that neighbours are untouched).
    pub fn physical_ranges(&self) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        let mut ps = Vec::new();
        if self.pieces(0, self.size, &mut ps).is_ok() {
            for p in ps {
                out.push((p.dev, p.offset, p.len));
            }
        }
        out.sort();
        out
    }
}

fn push_merged(out: &mut Vec<Piece>, first: usize, p: Piece) {
    if out.len() > first
        && let Some(last) = out.last_mut()
        && last.dev == p.dev
        && last.offset + last.len == p.offset
        && last.at + last.len == p.at
    {
        last.len += p.len;
        return;
    }
    out.push(p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Segment, StripeArea};
    use crate::units::{Bytes, ExtentSize, Sectors};
    use crate::uuid::LvmUuid;
    use proptest::prelude::*;

    const ES: u64 = 4 << 20;

    fn vg() -> VgMetadata {
        let id = LvmUuid::parse("aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa").unwrap();
        VgMetadata::new_empty("vg", id, ExtentSize::new_for_vg(Bytes(ES)).unwrap())
    }

    fn lv(segments: Vec<Segment>) -> LvMeta {
        LvMeta {
            name: "lv".into(),
            id: LvmUuid::parse("bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb").unwrap(),
            status: vec!["READ".into(), "WRITE".into(), "VISIBLE".into()],
            flags: vec![],
            tags: vec![],
            creation_time: None,
            creation_host: None,
            extra: vec![],
            segments,
        }
    }

    fn seg(start: u64, count: u64, stripe: Option<u64>, areas: &[(&str, u64)]) -> Segment {
        Segment {
            start_extent: start,
            extent_count: count,
            kind: SegmentKind::Striped {
                stripe_size: stripe.map(Sectors),
                stripes: areas
                    .iter()
                    .map(|(pv, s)| StripeArea {
                        pv: pv.to_string(),
                        start: *s,
                    })
                    .collect(),
            },
            extra: vec![],
        }
    }

    fn place(key: &str) -> Option<PvPlace> {
        match key {
            "pv0" => Some(PvPlace {
                dev: 0,
                pe_start_bytes: 1 << 20,
                pe_count: 100,
            }),
            "pv1" => Some(PvPlace {
                dev: 1,
                pe_start_bytes: 1 << 20,
                pe_count: 100,
            }),
            _ => None,
        }
    }

    /// The byte-by-byte definition of LVM2's mapping, to check the fast one.
    fn naive(map_lv: &LvMeta, logical: u64) -> (usize, u64) {
        let ext = logical / ES;
        let within = logical % ES;
        for s in &map_lv.segments {
            if ext >= s.start_extent && ext < s.end_extent() {
                let SegmentKind::Striped {
                    stripe_size,
                    stripes,
                } = &s.kind
                else {
                    unreachable!()
                };
                let off = (ext - s.start_extent) * ES + within;
                let (area, area_off) = if stripes.len() == 1 {
                    (0, off)
                } else {
                    let st = stripe_size.unwrap().0 * 512;
                    let chunk = off / st;
                    let n = stripes.len() as u64;
                    ((chunk % n) as usize, (chunk / n) * st + off % st)
                };
                let p = place(&stripes[area].pv).unwrap();
                return (
                    p.dev,
                    p.pe_start_bytes + stripes[area].start * ES + area_off,
                );
            }
        }
        unreachable!()
    }

    fn sample_lv() -> LvMeta {
        lv(vec![
            seg(0, 2, None, &[("pv0", 10)]),
            seg(2, 4, Some(128), &[("pv0", 20), ("pv1", 3)]),
            seg(6, 1, None, &[("pv1", 50)]),
            seg(7, 2, None, &[("pv1", 51)]),
        ])
    }

    #[test]
    fn requests_past_the_end_are_refused() {
        let l = sample_lv();
        let m = VolumeMap::from_lv(&vg(), &l, place).unwrap();
        assert_eq!(m.size(), 9 * ES);
        let mut out = Vec::new();
        assert!(m.pieces(9 * ES - 512, 512, &mut out).is_ok());
        assert!(matches!(
            m.pieces(9 * ES - 512, 1024, &mut out),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(m.pieces(u64::MAX, 2, &mut out).is_err());
    }

    #[test]
    fn adjacent_segments_on_one_device_merge_into_one_piece() {
        let l = sample_lv();
        let m = VolumeMap::from_lv(&vg(), &l, place).unwrap();
        let mut out = Vec::new();
        m.pieces(6 * ES, 3 * ES, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(m.single_range(), None);
        let one = lv(vec![
            seg(0, 2, None, &[("pv0", 10)]),
            seg(2, 3, None, &[("pv0", 12)]),
        ]);
        let m = VolumeMap::from_lv(&vg(), &one, place).unwrap();
        assert_eq!(m.single_range(), Some((0, (1 << 20) + 10 * ES)));
    }

    #[test]
    fn extents_past_a_pv_and_unknown_segment_types_are_refused() {
        let bad = lv(vec![seg(0, 2, None, &[("pv0", 99)])]);
        assert!(VolumeMap::from_lv(&vg(), &bad, place).is_err());
        let mut other = lv(vec![seg(0, 2, None, &[("pv0", 1)])]);
        other.segments[0].kind = SegmentKind::Other {
            segtype: "thin".into(),
        };
        assert!(VolumeMap::from_lv(&vg(), &other, place).is_err());
        let missing = lv(vec![seg(0, 2, None, &[("pv7", 1)])]);
        assert!(VolumeMap::from_lv(&vg(), &missing, place).is_err());
    }

    proptest! {
        #[test]
        fn pieces_match_the_bytewise_mapping(offset in 0u64..9 * ES, len in 1u64..3 * ES) {
            let l = sample_lv();
            let m = VolumeMap::from_lv(&vg(), &l, place).unwrap();
            let len = len.min(9 * ES - offset);
            let mut out = Vec::new();
            m.pieces(offset, len, &mut out).unwrap();
            let mut at = 0;
            for p in &out {
                prop_assert_eq!(p.at, at);
                // First, last and a middle byte of each piece.
                for k in [0, p.len / 2, p.len - 1] {
                    prop_assert_eq!(naive(&l, offset + p.at + k), (p.dev, p.offset + k));
                }
                at += p.len;
            }
            prop_assert_eq!(at, len);
        }
    }
}
