//! VGs made by devpool are accepted by real LVM2 (`vgck`, `pvck`) and LVM2's
//! reports agree with devpool's, extent for extent.

mod common;
use common::*;

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

#[test]
fn vg_reduce_rename_remove_and_pv_remove_are_seen_by_lvm2() {
    if skip_unless_real("vg_reduce_rename_remove_and_pv_remove_are_seen_by_lvm2") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 100);
    let b = lab.loop_dev("b.img", 100);
    let devs = [a.as_path(), b.as_path()];
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());
    let vg = vg_name("vgops");
    let renamed = vg_name("renamed");
    lab.dp(&devs, &["vg", "create", &vg, &a_s, &b_s]);
    lab.dp(
        &devs,
        &["lv", "create", &format!("{vg}/on_a"), "--size", "40M"],
    );
    // b is unused: reduce it out; a is used: refused with the LV named.
    let e = lab.dp_err(&devs, &["vg", "reduce", &vg, &a_s]);
    assert!(e.contains("still used by LV") && e.contains("on_a"), "{e}");
    lab.dp(&devs, &["vg", "reduce", &vg, &b_s]);
    let pvs = lvm_report(&devs, "pvs", "pv_name,vg_name");
    let vg_of = |d: &str| {
        pvs.iter()
            .find(|r| r["pv_name"] == d)
            .map(|r| r["vg_name"].as_str().unwrap().to_string())
    };
    assert_eq!(vg_of(&a_s).as_deref(), Some(vg.as_str()));
    assert_eq!(
        vg_of(&b_s).as_deref(),
        Some(""),
        "b is an orphan PV for LVM2"
    );

    lab.dp(&devs, &["vg", "rename", &vg, &renamed]);
    let (ok, out) = vgck(&devs, &renamed);
    assert!(ok, "{out}");
    let vgs = lvm_report(&devs, "vgs", "vg_name");
    assert!(
        vgs.iter().any(|r| r["vg_name"] == renamed.as_str())
            && !vgs.iter().any(|r| r["vg_name"] == vg.as_str())
    );

    let e = lab.dp_err(&devs, &["vg", "remove", &renamed]);
    assert!(
        e.contains("needs confirmation") && e.contains("1 LVs"),
        "{e}"
    );
    lab.dp(&devs, &["--yes", "vg", "remove", &renamed]);
    lab.dp(&devs, &["pv", "remove", &a_s, &b_s]);
    let pvs = lvm_report(&devs, "pvs", "pv_name");
    assert!(pvs.is_empty(), "LVM2 sees no PV left: {pvs:?}");
}

/// `vg create --no-autoactivation` writes LVM2's `NOAUTOACTIVATE` flag
/// (LVM2 reports autoactivation off and keeps it through devpool's later
/// commits); without it the VG is LVM2's default, autoactivated.
#[test]
fn vg_create_no_autoactivation_is_lvm2s_setautoactivation_n() {
    if skip_unless_real("vg_create_no_autoactivation_is_lvm2s_setautoactivation_n") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 64);
    let b = lab.loop_dev("b.img", 64);
    let (off, on) = (vg_name("noauto"), vg_name("auto"));
    lab.dp(
        &[&a],
        &[
            "vg",
            "create",
            &off,
            &a.display().to_string(),
            "--no-autoactivation",
        ],
    );
    lab.dp(&[&b], &["vg", "create", &on, &b.display().to_string()]);
    lab.dp(
        &[&a],
        &["lv", "create", &format!("{off}/l"), "--size", "8M"],
    );
    let devs = [a.as_path(), b.as_path()];
    let vgs = lvm_report(&devs, "vgs", "vg_name,autoactivation");
    let auto = |vg: &str| {
        vgs.iter()
            .find(|r| r["vg_name"] == vg)
            .and_then(|r| r["vg_autoactivation"].as_str())
            .unwrap_or_else(|| panic!("{vg} missing: {vgs:?}"))
            .to_string()
    };
    assert_eq!(auto(&off), "", "{vgs:?}");
    assert_eq!(auto(&on), "enabled", "{vgs:?}");
    for vg in [&off, &on] {
        let (ok, out) = vgck(&devs, vg);
        assert!(ok, "{out}");
    }
}
