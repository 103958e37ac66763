use super::*;
use devpool_format::units::ExtentSize;
use proptest::prelude::*;

fn uuid(n: u64) -> LvmUuid {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&n.to_le_bytes());
    LvmUuid::from_random(b)
}

fn vg_with(pv_counts: &[u64]) -> VgMetadata {
    let mut vg = VgMetadata::new_empty("vg", uuid(0), ExtentSize::DEFAULT);
    vg.seqno = 1;
    for (i, &c) in pv_counts.iter().enumerate() {
        let es = 4u64 << 20;
        add_pv(
            &mut vg,
            uuid(1000 + i as u64),
            "/dev/x",
            Bytes((1 << 20) + c * es),
            Bytes(1 << 20),
            Bytes(0),
        )
        .unwrap();
    }
    vg
}

fn new_lv(name: &str, extents: u64, layout: Layout) -> NewLv {
    NewLv {
        name: name.into(),
        extents: Extents(extents),
        layout,
        tags: vec![],
        id: uuid(name.len() as u64 * 7919 + extents),
        creation_time: 0,
        creation_host: "h".into(),
    }
}

#[test]
fn contiguous_when_it_fits_best_fit_first() {
    let mut vg = vg_with(&[100]);
    create_lv(&mut vg, new_lv("a", 10, Layout::Linear)).unwrap();
    create_lv(&mut vg, new_lv("b", 30, Layout::Linear)).unwrap();
    create_lv(&mut vg, new_lv("c", 10, Layout::Linear)).unwrap();
    remove_lv(&mut vg, "a").unwrap(); // hole 0..10, tail 50..100
    create_lv(&mut vg, new_lv("d", 8, Layout::Linear)).unwrap();
    let d = vg.lv("d").unwrap();
    assert_eq!(d.segments.len(), 1);
    match &d.segments[0].kind {
        SegmentKind::Striped { stripes, .. } => {
            assert_eq!(stripes[0].start, 0, "best fit is the 10-extent hole")
        }
        _ => unreachable!(),
    }
}

#[test]
fn fewest_segments_when_fragmented() {
    let mut vg = vg_with(&[100]);
    for (i, n) in [5u64, 1, 20, 1, 10, 1].iter().enumerate() {
        create_lv(&mut vg, new_lv(&format!("l{i}"), *n, Layout::Linear)).unwrap();
    }
    for i in [0, 2, 4] {
        remove_lv(&mut vg, &format!("l{i}")).unwrap();
    }
    // holes: 5, 20, 10, and a 62-extent tail -> 80 extents need the tail plus the 20.
    let mut contiguous = vg.clone();
    let e = create_lv(&mut contiguous, new_lv("big", 80, Layout::Contiguous))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("largest free run is 62 extents (248.00 MiB)")
            && e.contains("97 free in all (388.00 MiB)"),
        "{e}"
    );
    create_lv(&mut contiguous, new_lv("fits", 62, Layout::Contiguous)).unwrap();
    assert_eq!(contiguous.lv("fits").unwrap().segments.len(), 1);
    create_lv(&mut vg, new_lv("big", 80, Layout::Linear)).unwrap();
    assert_eq!(vg.lv("big").unwrap().segments.len(), 2);
}

#[test]
fn grows_in_place_and_reports_no_space_with_numbers() {
    let mut vg = vg_with(&[100]);
    create_lv(&mut vg, new_lv("a", 10, Layout::Linear)).unwrap();
    resize_lv(&mut vg, "a", 50).unwrap();
    assert_eq!(vg.lv("a").unwrap().segments.len(), 1);
    let e = create_lv(&mut vg, new_lv("b", 51, Layout::Linear))
        .unwrap_err()
        .to_string();
    assert!(e.contains("51 extents") && e.contains("50 free"), "{e}");
}

#[test]
fn striped_needs_distinct_pvs() {
    let mut vg = vg_with(&[50, 50, 50]);
    let ss = Sectors(128);
    create_lv(
        &mut vg,
        new_lv(
            "s",
            30,
            Layout::Striped {
                stripes: 3,
                stripe_size: ss,
            },
        ),
    )
    .unwrap();
    let seg = &vg.lv("s").unwrap().segments[0];
    match &seg.kind {
        SegmentKind::Striped { stripes, .. } => {
            let pvs: std::collections::BTreeSet<_> = stripes.iter().map(|s| &s.pv).collect();
            assert_eq!(pvs.len(), 3);
        }
        _ => unreachable!(),
    }
    let e = create_lv(
        &mut vg,
        new_lv(
            "t",
            8,
            Layout::Striped {
                stripes: 4,
                stripe_size: ss,
            },
        ),
    )
    .unwrap_err();
    assert!(e.to_string().contains("4 PVs"), "{e}");
}

#[derive(Debug, Clone)]
enum Op {
    Create { extents: u64, stripes: u32 },
    Resize { which: usize, extents: u64 },
    Remove { which: usize },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..60, prop_oneof![Just(1u32), Just(1), Just(2), Just(3)])
            .prop_map(|(extents, stripes)| Op::Create { extents, stripes }),
        (0usize..16, 1u64..80).prop_map(|(which, extents)| Op::Resize { which, extents }),
        (0usize..16).prop_map(|which| Op::Remove { which }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    /// After any sequence of create/resize/remove: no extent is used twice,
    /// nothing lies past a PV's pe_count, segments are contiguous, sizes are as
    /// asked, and used + free = total.
    #[test]
    fn allocation_map_stays_consistent(pvs in proptest::collection::vec(10u64..120, 1..5), ops in proptest::collection::vec(arb_op(), 1..40)) {
        let mut vg = vg_with(&pvs);
        let total: u64 = pvs.iter().sum();
        let mut next = 0;
        for op in ops {
            let before = vg.clone();
            let result = match op {
                Op::Create { extents, stripes } => {
                    next += 1;
                    let layout = if stripes == 1 { Layout::Linear } else { Layout::Striped { stripes, stripe_size: Sectors(128) } };
                    let extents = extents.div_ceil(stripes as u64) * stripes as u64;
                    let r = create_lv(&mut vg, new_lv(&format!("lv{next}"), extents, layout));
                    if r.is_ok() { prop_assert_eq!(vg.lv(&format!("lv{next}")).unwrap().extent_count(), extents); }
                    r
                }
                Op::Resize { which, extents } => {
                    if vg.lvs.is_empty() { continue; }
                    let name = vg.lvs[which % vg.lvs.len()].name.clone();
                    let r = resize_lv(&mut vg, &name, extents);
                    if r.is_ok() {
                        let got = vg.lv(&name).unwrap().extent_count();
                        prop_assert!(got >= extents && got < extents + 3, "asked {} got {}", extents, got);
                    }
                    r
                }
                Op::Remove { which } => {
                    if vg.lvs.is_empty() { continue; }
                    let name = vg.lvs[which % vg.lvs.len()].name.clone();
                    remove_lv(&mut vg, &name)
                }
            };
            if result.is_err() {
                prop_assert_eq!(&vg, &before, "a failed operation must not change the VG");
            }
            // What the change frees is exactly what was used and is not now,
            // each extent once, named by the LV that had it.
            let owners = |v: &VgMetadata| -> std::collections::BTreeMap<(LvmUuid, u64), String> {
                v.used_areas().iter().flat_map(|&(pv, start, len, lv)| {
                    let id = v.pv(pv).unwrap().id;
                    (start..start + len).map(move |e| ((id, e), lv.to_string()))
                }).collect()
            };
            let (was, is) = (owners(&before), owners(&vg));
            let mut freed = std::collections::BTreeMap::new();
            for f in crate::alloc::freed(&before, &vg) {
                for e in f.start..f.start + f.len {
                    prop_assert!(freed.insert((f.pv, e), f.lv.clone()).is_none(), "extent {} freed twice", e);
                }
            }
            let expected: std::collections::BTreeMap<_, _> =
                was.into_iter().filter(|(k, _)| !is.contains_key(k)).collect();
            prop_assert_eq!(freed, expected);
            vg.check().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let used: u64 = vg.used_areas().iter().map(|u| u.2).sum();
            prop_assert_eq!(used + vg_free_extents(&vg), total);
        }
    }
}

#[test]
fn a_snapshot_is_a_hidden_cow_lv_and_a_visible_snapshot_n_like_lvm2_writes() {
    use super::snapshot::{NewSnapshot, create_snapshot};
    let mut vg = vg_with(&[100]);
    create_lv(&mut vg, new_lv("origin", 8, Layout::Linear)).unwrap();
    let name = create_snapshot(
        &mut vg,
        NewSnapshot {
            origin: "origin".into(),
            cow: new_lv("snap", 2, Layout::Contiguous),
            chunk_sectors: 8,
            id: uuid(77),
        },
    )
    .unwrap();
    assert_eq!(name, "snapshot0");
    let cow = vg.lv("snap").unwrap();
    assert_eq!(cow.status, ["READ", "WRITE"]);
    let s0 = vg.lv("snapshot0").unwrap();
    assert_eq!(s0.status, ["READ", "WRITE", "VISIBLE"]);
    assert_eq!(s0.segments[0].extent_count, 8);
    assert_eq!(s0.segments[0].segtype(), "snapshot");
    // LVM2's view: the COW store shows as the snapshot, snapshotN never.
    assert!(vg.lv_is_visible("snap"));
    assert!(!vg.lv_is_visible("snapshot0"));
    vg.check().unwrap();
    let text = vg.to_disk_text();
    let printed = String::from_utf8_lossy(&text);
    assert!(
        printed.contains(
            "type = \"snapshot\"\nchunk_size = 8\norigin = \"origin\"\ncow_store = \"snap\""
        ),
        "{printed}"
    );
    assert_eq!(VgMetadata::parse(&text).unwrap(), vg);
    // The origin and the COW store are now in use: plain operations refuse them.
    assert!(resize_lv(&mut vg.clone(), "origin", 16).is_err());
    assert!(remove_lv(&mut vg.clone(), "origin").is_err());
    assert!(remove_lv(&mut vg.clone(), "snapshot0").is_err());
    // Removing the snapshot (by its name) takes the COW LV and snapshotN.
    let mut gone = vg.clone();
    remove_lv(&mut gone, "snap").unwrap();
    assert!(gone.lv("snap").is_none() && gone.lv("snapshot0").is_none());
    assert!(gone.lv("origin").is_some());
    gone.check().unwrap();
    // Snapshots of a COW store, of snapshotN or of a missing LV are refused,
    // as are chunk sizes dm does not take.
    for (origin, chunk) in [("snap", 8), ("snapshot0", 8), ("nope", 8), ("origin", 3)] {
        let r = create_snapshot(
            &mut vg.clone(),
            NewSnapshot {
                origin: origin.into(),
                cow: new_lv("snap2", 2, Layout::Contiguous),
                chunk_sectors: chunk,
                id: uuid(78),
            },
        );
        assert!(r.is_err(), "{origin} chunk {chunk}");
    }
    // A second snapshot of the same origin gets the next snapshotN.
    let n = create_snapshot(
        &mut vg,
        NewSnapshot {
            origin: "origin".into(),
            cow: new_lv("snap2", 2, Layout::Contiguous),
            chunk_sectors: 16,
            id: uuid(79),
        },
    )
    .unwrap();
    assert_eq!(n, "snapshot1");
}
