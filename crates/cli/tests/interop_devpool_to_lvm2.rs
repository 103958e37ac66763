//! VGs made by devpool are accepted by real LVM2 (`vgck`, `pvck`) and LVM2's
//! reports agree with devpool's, extent for extent.

mod common;
use common::*;
use std::path::Path;

/// Compare devpool's and LVM2's view of every PV, the VG and every segment.
fn assert_reports_agree(lab: &Lab, devs: &[&Path], vg: &str) {
    let (ok, out) = vgck(devs, vg);
    assert!(ok, "vgck rejected VG {vg}:\n{out}");
    for d in devs {
        let o = lvm(devs, &["pvck", &d.display().to_string()]);
        assert!(
            o.status.success(),
            "pvck {}: {}",
            d.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    let dp_vgs = lab.dp_json(devs, &["vg", "list", vg]);
    let dv = &dp_vgs["vgs"][0];
    let lv_vgs = lvm_report(
        devs,
        "vgs",
        "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,lv_count,pv_count,vg_seqno",
    );
    let lvg = lv_vgs
        .iter()
        .find(|r| r["vg_name"] == vg)
        .expect("LVM2 sees the VG");
    for f in [
        "vg_size",
        "vg_free",
        "vg_extent_size",
        "vg_extent_count",
        "vg_free_count",
        "lv_count",
        "pv_count",
        "vg_seqno",
    ] {
        assert_eq!(num(&dv[f]), num(&lvg[f]), "VG field {f}");
    }
    assert_eq!(dv["vg_uuid"], lvg["vg_uuid"]);

    let dp_pvs = lab.dp_json(devs, &["pv", "list"]);
    let lv_pvs = lvm_report(
        devs,
        "pvs",
        "pv_name,pv_uuid,pv_size,pv_free,pe_start,pv_pe_count,pv_pe_alloc_count,pv_mda_count,pv_mda_size,vg_name",
    );
    for lp in &lv_pvs {
        let dp = dp_pvs["pvs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pv_uuid"] == lp["pv_uuid"])
            .expect("devpool sees the PV");
        assert_eq!(dp["pv_name"], lp["pv_name"]);
        for f in [
            "pv_size",
            "pv_free",
            "pe_start",
            "pv_pe_count",
            "pv_pe_alloc_count",
            "pv_mda_count",
            "pv_mda_size",
        ] {
            assert_eq!(num(&dp[f]), num(&lp[f]), "PV {} field {f}", lp["pv_name"]);
        }
    }

    let dp_lvs = lab.dp_json(devs, &["lv", "list", vg]);
    let lv_segs = lvm_report(
        devs,
        "lvs",
        "vg_name,lv_name,lv_uuid,lv_size,lv_tags,segtype,seg_start_pe,seg_size_pe,stripes,stripe_size,devices",
    );
    let mut compared = 0;
    for ls in lv_segs.iter().filter(|r| r["vg_name"] == vg) {
        let name = ls["lv_name"].as_str().unwrap().trim_matches(['[', ']']);
        let dl = dp_lvs["lvs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["lv_name"] == name)
            .unwrap_or_else(|| panic!("devpool lacks LV {name}"));
        assert_eq!(dl["lv_uuid"], ls["lv_uuid"]);
        assert_eq!(num(&dl["lv_size"]), num(&ls["lv_size"]), "{name} size");
        let tags: Vec<&str> = dl["lv_tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(
            tags.join(","),
            ls["lv_tags"].as_str().unwrap(),
            "{name} tags"
        );
        let seg = dl["segments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| num(&s["seg_start_pe"]) == num(&ls["seg_start_pe"]))
            .unwrap_or_else(|| panic!("{name}: no devpool segment at {}", ls["seg_start_pe"]));
        assert_eq!(seg["segtype"], ls["segtype"], "{name} segtype");
        assert_eq!(num(&seg["seg_size_pe"]), num(&ls["seg_size_pe"]));
        assert_eq!(num(&seg["stripes"]), num(&ls["stripes"]));
        assert_eq!(num(&seg["stripe_size"]), num(&ls["stripe_size"]));
        let devices: Vec<String> = seg["areas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                format!(
                    "{}({})",
                    a["pv_name"].as_str().unwrap(),
                    num(&a["pv_start_pe"])
                )
            })
            .collect();
        assert_eq!(
            devices.join(","),
            ls["devices"].as_str().unwrap(),
            "{name} devices"
        );
        compared += 1;
    }
    let dp_seg_count: usize = dp_lvs["lvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["segments"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        compared, dp_seg_count,
        "LVM2 and devpool list the same segments"
    );
}

#[test]
fn devpool_vg_on_loop_devices_passes_vgck_and_reports_agree() {
    if skip_unless_real("devpool_vg_on_loop_devices_passes_vgck_and_reports_agree") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 300);
    let b = lab.loop_dev("b.img", 200);
    let devs = [a.as_path(), b.as_path()];
    let vg = vg_name("d2l");
    let a_s = a.display().to_string();
    let b_s = b.display().to_string();

    lab.dp(
        &devs,
        &[
            "vg",
            "create",
            &vg,
            &a_s,
            "--metadata-copies",
            "2",
            "--metadata-size",
            "2M",
        ],
    );
    lab.dp(&devs, &["vg", "extend", &vg, &b_s]);
    let lv = |n: &str| format!("{vg}/{n}");
    lab.dp(
        &devs,
        &[
            "lv",
            "create",
            &lv("lin"),
            "--size",
            "40M",
            "--tag",
            "role:test",
            "--tag",
            "owner=me",
        ],
    );
    lab.dp(
        &devs,
        &[
            "lv",
            "create",
            &lv("str"),
            "--size",
            "64M",
            "--stripes",
            "2",
            "--stripe-size",
            "128K",
        ],
    );
    lab.dp(&devs, &["lv", "create", &lv("gap"), "--size", "8M"]);
    lab.dp(&devs, &["lv", "create", &lv("tail"), "--size", "100%FREE"]);
    lab.dp(&devs, &["lv", "remove", &lv("tail")]);
    lab.dp(&devs, &["lv", "create", &lv("tail"), "--size", "12M"]);
    lab.dp(&devs, &["lv", "remove", &lv("gap")]);
    // Grows into the hole left by "gap" and beyond: a multi-segment LV.
    lab.dp(&devs, &["lv", "resize", &lv("lin"), "--size", "+200M"]);
    lab.dp(&devs, &["lv", "rename", &lv("tail"), "renamed"]);
    lab.dp(
        &devs,
        &[
            "lv",
            "tag",
            &lv("renamed"),
            "--add",
            "x",
            "--remove",
            "nothing",
        ],
    );
    lab.dp(
        &devs,
        &["--yes", "lv", "resize", &lv("str"), "--size", "-16M"],
    );

    let lvs = lab.dp_json(&devs, &["lv", "list", &vg]);
    let lin = lvs["lvs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lv_name"] == "lin")
        .unwrap();
    assert!(
        lin["segments"].as_array().unwrap().len() >= 2,
        "lin spans several segments: {lin}"
    );
    assert_reports_agree(&lab, &devs, &vg);

    // LVM2 can change what devpool wrote, and devpool reads it back.
    lvm_ok(
        &devs,
        &["lvcreate", "-an", "-Zn", "-L", "8M", "-n", "bylvm", &vg],
    );
    assert_reports_agree(&lab, &devs, &vg);
}

#[test]
fn devpool_vg_on_an_image_file_is_read_by_lvm2_through_a_loop_device() {
    if skip_unless_real("devpool_vg_on_an_image_file_is_read_by_lvm2_through_a_loop_device") {
        return;
    }
    let lab = Lab::new();
    let img = lab.path("pool.img");
    let img_s = img.display().to_string();
    let vg = vg_name("img");
    // Image created sparse by devpool itself; devpool addresses the file, not a loop device.
    lab.dp(
        &[img.as_path()],
        &["vg", "create", &vg, &img_s, "--image-size", "10G"],
    );
    for i in 0..20 {
        lab.dp(
            &[img.as_path()],
            &["lv", "create", &format!("{vg}/v{i}"), "--size", "64M"],
        );
    }
    let meta = std::fs::metadata(&img).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 200 << 20,
        "the image stays sparse ({} bytes allocated)",
        meta.blocks() * 512
    );
    let pvs = lab.dp_json(&[img.as_path()], &["pv", "list"]);
    assert_eq!(
        num(&pvs["pvs"][0]["pv_mda_size"]),
        (129 << 20) - 4096,
        "pool-sized metadata area by default"
    );

    let l = Loop::attach(&img);
    let devs = [l.dev.as_path()];
    let (ok, out) = vgck(&devs, &vg);
    assert!(ok, "{out}");
    let lvs = lvm_report(&devs, "lvs", "vg_name,lv_name,lv_size");
    assert_eq!(
        lvs.iter().filter(|r| r["vg_name"] == vg.as_str()).count(),
        20
    );
    assert!(lvs.iter().all(|r| num(&r["lv_size"]) == 64 << 20));
}
