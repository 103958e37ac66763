//! `devpool lv snapshot` as real LVM2 sees it: the snapshot reports its
//! origin, the `s`/`o` attributes and its chunk size, vgck passes, the COW
//! header is dm-snapshot's; bad requests are refused with the reason and
//! nothing changes; `lv remove` of the snapshot removes it whole.

mod common;
use common::*;
use devpool_format::cow::CowHeader;

#[test]
fn lvm2_reports_a_devpool_snapshot_and_bad_snapshots_are_refused() {
    if skip_unless_real("lvm2_reports_a_devpool_snapshot_and_bad_snapshots_are_refused") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 200);
    let devs = [a.as_path()];
    let vg = vg_name("snap");
    let a_s = a.display().to_string();
    let lv = |n: &str| format!("{vg}/{n}");
    lab.dp(&devs, &["vg", "create", &vg, &a_s]);
    lab.dp(&devs, &["lv", "create", &lv("origin"), "--size", "40M"]);
    let plan = lab.dp(
        &devs,
        &[
            "--dry-run",
            "lv",
            "snapshot",
            &lv("origin"),
            "--name",
            "snap",
        ],
    );
    assert!(
        plan.contains("write a snapshot COW header (chunk 4 KiB)"),
        "{plan}"
    );
    lab.dp(
        &devs,
        &[
            "lv",
            "snapshot",
            &lv("origin"),
            "--name",
            "snap",
            "--chunk-size",
            "16K",
        ],
    );
    let rows = lvm_report(&devs, "lvs", "lv_name,origin,lv_attr,lv_size,chunk_size");
    let row = |n: &str| {
        rows.iter()
            .find(|r| r["lv_name"] == n)
            .unwrap_or_else(|| panic!("LVM2 does not list {n}: {rows:?}"))
    };
    assert_eq!(row("snap")["origin"], "origin");
    assert!(row("snap")["lv_attr"].as_str().unwrap().starts_with('s'));
    assert!(row("origin")["lv_attr"].as_str().unwrap().starts_with('o'));
    // Default size: a fifth of the origin (8 MiB); chunk as asked.
    assert_eq!(num(&row("snap")["lv_size"]), 8 << 20);
    assert_eq!(num(&row("snap")["chunk_size"]), 16 << 10);
    let (ok, msg) = vgck(&devs, &vg);
    assert!(ok, "{msg}");
    assert_reports_agree(&lab, &devs, &vg);

    // The COW store starts with dm-snapshot's header.
    let segs = lab.dp_json(&devs, &["lv", "list", &vg, "--segments"]);
    let text = segs.to_string();
    assert!(text.contains("snapshot0"), "{text}");
    let pe_start = num(&lvm_report(&devs, "pvs", "pe_start")[0]["pe_start"]);
    let le = lvm_report(&devs, "lvs", "lv_name,seg_pe_ranges");
    let range = le
        .iter()
        .find(|r| r["lv_name"] == "snap")
        .and_then(|r| r["seg_pe_ranges"].as_str())
        .unwrap()
        .to_string();
    let first: u64 = range
        .rsplit(':')
        .next()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let img = std::fs::read(lab.path("a.img")).unwrap();
    let at = (pe_start + first * (4 << 20)) as usize;
    let h = CowHeader::parse(&img[at..at + 16])
        .unwrap()
        .expect("a COW header");
    assert!(h.valid);
    assert_eq!(h.chunk_sectors, 32);
    assert!(
        img[at + 16384..at + 2 * 16384].iter().all(|&b| b == 0),
        "area 0 is empty"
    );

    // Refusals: each names why; the VG is unchanged.
    let before = lab.dp(&devs, &["lv", "list", &vg]);
    for (args, want) in [
        (
            vec!["lv", "snapshot", &lv("snap"), "--name", "s2"],
            "COW store",
        ),
        (vec!["lv", "snapshot", &lv("nope"), "--name", "s2"], "nope"),
        (
            vec![
                "lv",
                "snapshot",
                &lv("origin"),
                "--name",
                "s2",
                "--chunk-size",
                "3K",
            ],
            "power of two",
        ),
        (
            vec!["lv", "snapshot", &lv("origin"), "--name", "snap"],
            "already exists",
        ),
        (
            vec!["lv", "resize", &lv("origin"), "--size", "+4M"],
            "used by another LV",
        ),
        (vec!["lv", "remove", &lv("origin")], "used by another LV"),
        (
            vec!["lv", "remove", &lv("snapshot0")],
            "internal part of snapshot",
        ),
    ] {
        let e = lab.dp_err(&devs, &args);
        assert!(e.contains(want), "{args:?}: wanted '{want}' in {e}");
    }
    assert_eq!(lab.dp(&devs, &["lv", "list", &vg]), before);

    // lv remove of the snapshot takes the COW LV and snapshot0; LVM2 agrees.
    lab.dp(&devs, &["lv", "remove", &lv("snap")]);
    let names: Vec<String> = lvm_report(&devs, "lvs", "lv_name")
        .iter()
        .map(|r| r["lv_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["origin"]);
    let origin = lvm_report(&devs, "lvs", "lv_name,lv_attr");
    assert!(origin[0]["lv_attr"].as_str().unwrap().starts_with('-'));
    assert!(vgck(&devs, &vg).0);
}

/// A snapshot of a leased volume belongs to the lease: releasing the lease
/// removes it too (an origin with a snapshot could not go otherwise).
#[test]
fn releasing_a_lease_removes_the_snapshots_of_its_volumes() {
    if skip_unless_real("releasing_a_lease_removes_the_snapshots_of_its_volumes") {
        return;
    }
    let lab = Lab::new();
    let img = lab.image_pool("p.img", "sn", "256M", &[]);
    let devs = [img.as_path()];
    let a = lab.dp_json(
        &devs,
        &["--pool", "sn", "lease", "acquire", "--volumes", "test:16M"],
    );
    let lv = a["devices"][0]["lv"].as_str().unwrap().to_string();
    let session = a["session"].as_str().unwrap().to_string();
    lab.dp(
        &devs,
        &[
            "lv",
            "snapshot",
            &format!("devpool-sn/{lv}"),
            "--name",
            "before",
        ],
    );
    let listed = lab.dp(&devs, &["lv", "list", "devpool-sn"]);
    assert!(listed.contains("devpool-sn/before"), "{listed}");
    lab.dp(&devs, &["--pool", "sn", "lease", "release", &session]);
    let listed = lab.dp_json(&devs, &["lv", "list", "devpool-sn"]);
    assert_eq!(listed["lvs"].as_array().map(Vec::len), Some(0), "{listed}");
}
