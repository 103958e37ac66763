//! VGs made by LVM2 are read by devpool, changed by devpool, and read back by
//! LVM2 with every LV devpool did not touch unchanged.

mod common;
use common::*;
use devpool_format::label::find_label;
use devpool_format::mda::MdaHeader;
use devpool_format::metadata::VgMetadata;
use std::path::Path;

fn uuid(seed: u64) -> String {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add((i as u64).wrapping_mul(1442695040888963407))
            >> 33) as u8;
    }
    devpool_format::uuid::LvmUuid::from_random(b).dashed()
}

fn lv_section(name: &str, visible: bool, seg: &str, seed: u64) -> String {
    let status = if visible {
        r#""READ", "WRITE", "VISIBLE""#
    } else {
        r#""READ", "WRITE""#
    };
    format!(
        "{name} {{\nid = \"{}\"\nstatus = [{status}]\nflags = []\nsegment_count = 1\nsegment1 {{\nstart_extent = 0\n{seg}\n}}\n}}\n",
        uuid(seed)
    )
}

/// Add a thin pool (with tdata, tmeta, pmspare), a thin LV and an old-style
/// snapshot of `origin` to a vgcfgbackup file, using extents from `pe` on pv0.
fn add_thin_and_snapshot(backup: &str, origin: &str, pe: u64) -> String {
    let striped = |n: &str, vis: bool, start: u64, count: u64, seed: u64| {
        lv_section(
            n,
            vis,
            &format!(
                "extent_count = {count}\ntype = \"striped\"\nstripe_count = 1\nstripes = [\"pv0\", {start}]"
            ),
            seed,
        )
    };
    let extra = [
        lv_section("pool", true, "extent_count = 4\ntype = \"thin-pool\"\nmetadata = \"pool_tmeta\"\npool = \"pool_tdata\"\ntransaction_id = 1\nchunk_size = 128\ndiscards = \"passdown\"\nzero_new_blocks = 1", 1),
        lv_section("thin1", true, "extent_count = 8\ntype = \"thin\"\nthin_pool = \"pool\"\ntransaction_id = 0\ndevice_id = 1", 2),
        striped("pool_tdata", false, pe, 4, 3),
        striped("pool_tmeta", false, pe + 4, 1, 4),
        striped("lvol0_pmspare", false, pe + 5, 1, 5),
        striped("snap", true, pe + 6, 1, 6),
        lv_section("snapshot0", false, &format!("extent_count = 2\ntype = \"snapshot\"\nchunk_size = 8\norigin = \"{origin}\"\ncow_store = \"snap\""), 7),
    ]
    .concat();
    let at =
        backup.find("logical_volumes {").expect("backup has LVs") + "logical_volumes {\n".len();
    format!("{}{extra}{}", &backup[..at], &backup[at..])
}

fn backup(devs: &[&Path], vg: &str, file: &Path) -> VgMetadata {
    lvm_ok(
        devs,
        &["vgcfgbackup", "-f", &file.display().to_string(), vg],
    );
    VgMetadata::parse(&std::fs::read(file).unwrap()).expect("devpool parses LVM2's backup file")
}

/// Whether the committed copy in the last metadata area of this PV image
/// wraps around the end of the ring (read from the backing file: a loop
/// device's page cache would be stale after LVM2's direct writes).
fn ring_wrapped(image: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image).unwrap();
    let mut head = vec![0u8; 2048];
    f.read_exact_at(&mut head, 0).unwrap();
    let label = find_label(&head).unwrap().unwrap();
    let a = *label.metadata_areas.last().unwrap();
    let mut hb = vec![0u8; 512];
    f.read_exact_at(&mut hb, a.offset).unwrap();
    let h = MdaHeader::parse(&hb, a.offset).unwrap();
    h.committed.offset + h.committed.size > h.size
}

#[test]
fn lvm2_vg_is_read_changed_and_read_back_with_untouched_lvs_unchanged() {
    if skip_unless_real("lvm2_vg_is_read_changed_and_read_back_with_untouched_lvs_unchanged") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 200);
    let b = lab.loop_dev("b.img", 200);
    let devs = [a.as_path(), b.as_path()];
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());
    let vg = vg_name("l2d");
    // A: two metadata areas.
    lvm_ok(&devs, &["pvcreate", "--pvmetadatacopies", "2", &a_s]);
    lvm_ok(&devs, &["pvcreate", &b_s]);
    lvm_ok(&devs, &["vgcreate", &vg, &a_s, &b_s]);
    let create = |args: &[&str], pv: Option<&str>| {
        let mut v = vec!["lvcreate", "-an", "-Zn"];
        v.extend_from_slice(args);
        v.push(&vg);
        v.extend(pv);
        lvm_ok(&devs, &v);
    };
    create(&["-L", "12M", "-n", "base"], Some(&a_s));
    create(&["-L", "20M", "-n", "lin"], Some(&a_s));
    create(&["-L", "32M", "-i", "2", "-I", "64k", "-n", "str"], None);
    create(&["-L", "8M", "-n", "multi"], Some(&a_s));
    create(&["-L", "4M", "-n", "spacer"], Some(&a_s));
    lvm_ok(
        &devs,
        &["lvextend", "-L", "+16M", &format!("{vg}/multi"), &b_s],
    );
    let a_img = lab.path("a.img");
    let mut n = 0;
    while !ring_wrapped(&a_img) {
        // Long tags make each copy large, so the 1 MiB ring wraps within ~45 commits.
        let tag = format!("t{n}-{}", "x".repeat(1000));
        lvm_ok(
            &devs,
            &["lvchange", "--addtag", &tag, &format!("{vg}/spacer")],
        );
        n += 1;
        assert!(n < 80, "LVM2's metadata ring never wrapped");
    }

    // Thin and snapshot segments, written with vgcfgrestore.
    let file = lab.path("backup.vg");
    let before = backup(&devs, &vg, &file);
    let used_on_pv0: u64 = before
        .used_areas()
        .iter()
        .filter(|u| u.0 == "pv0")
        .map(|u| u.1 + u.2)
        .max()
        .unwrap();
    let text = add_thin_and_snapshot(
        &std::fs::read_to_string(&file).unwrap(),
        "base",
        used_on_pv0,
    );
    std::fs::write(&file, text).unwrap();
    lvm_ok(
        &devs,
        &[
            "vgcfgrestore",
            "--force",
            "-f",
            &file.display().to_string(),
            &vg,
        ],
    );
    let (ok, out) = vgck(&devs, &vg);
    assert!(ok, "{out}");

    // devpool reads all of it exactly as LVM2 does.
    assert_reports_agree(&lab, &devs, &vg);
    let original = backup(&devs, &vg, &file);

    // devpool changes some LVs...
    let lv = |n: &str| format!("{vg}/{n}");
    lab.dp(&devs, &["lv", "create", &lv("new"), "--size", "24M"]);
    lab.dp(&devs, &["lv", "remove", &lv("lin")]);
    lab.dp(&devs, &["lv", "resize", &lv("multi"), "--size", "+8M"]);
    lab.dp(&devs, &["lv", "rename", &lv("str"), "striped2"]);
    lab.dp(
        &devs,
        &["lv", "tag", &lv("spacer"), "--add", "devpool-was-here"],
    );
    // ...and refuses the ones it does not understand, writing nothing.
    let seqno = original.seqno + 5;
    for (args, why) in [
        (vec!["lv", "remove", &lv("pool") as &str], "thin-pool"),
        (
            vec!["lv", "resize", &lv("pool_tdata"), "--size", "+4M"],
            "used by another LV",
        ),
        (
            vec!["lv", "rename", &lv("snap"), "s2"],
            "used by another LV",
        ),
        (vec!["lv", "remove", &lv("snapshot0")], "snapshot"),
        (
            vec!["lv", "tag", &lv("thin1"), "--add", "x"],
            "'thin' segment",
        ),
    ] {
        let err = lab.dp_err(&devs, &args);
        assert!(err.contains(why), "{args:?}: {err}");
    }

    // LVM2 reads the result; everything devpool did not touch is unchanged.
    let (ok, out) = vgck(&devs, &vg);
    assert!(ok, "{out}");
    assert_reports_agree(&lab, &devs, &vg);
    let after = backup(&devs, &vg, &file);
    assert_eq!(
        after.seqno, seqno,
        "five commits, and none for the refused changes"
    );
    for untouched in [
        "base",
        "pool",
        "thin1",
        "pool_tdata",
        "pool_tmeta",
        "lvol0_pmspare",
        "snap",
        "snapshot0",
    ] {
        assert_eq!(
            after.lv(untouched),
            original.lv(untouched),
            "LV {untouched} changed"
        );
    }
    assert!(after.lv("lin").is_none());
    assert_eq!(
        after.lv("striped2").map(|l| &l.segments),
        original.lv("str").map(|l| &l.segments)
    );
    assert_eq!(
        after.lv("multi").unwrap().extent_count(),
        original.lv("multi").unwrap().extent_count() + 2
    );
    assert!(
        after
            .lv("spacer")
            .unwrap()
            .tags
            .contains(&"devpool-was-here".to_string())
    );
    // LVM2 can still work on it.
    lvm_ok(
        &devs,
        &["lvcreate", "-an", "-Zn", "-L", "4M", "-n", "after", &vg],
    );
    lvm_ok(&devs, &["lvremove", "-f", &lv("new")]);
    let (ok, out) = vgck(&devs, &vg);
    assert!(ok, "{out}");
}

/// LVM2 writes its whole command line into the metadata's `description`,
/// bytes that are not UTF-8 included. devpool still reads the VG, changes
/// it, and LVM2 checks and reads what devpool wrote.
#[test]
fn a_vg_whose_description_is_not_utf8_is_read_and_changed() {
    if skip_unless_real("a_vg_whose_description_is_not_utf8_is_read_and_changed") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("nu.img", 64);
    let devs = [a.as_path()];
    let a_s = a.display().to_string();
    let vg = vg_name("nonutf8");
    lvm_ok(&devs, &["vgcreate", &vg, &a_s]);
    // log/prefix is only printed; its value lands in the description.
    use std::os::unix::ffi::OsStrExt;
    let mut config = LVM_CONFIG.as_bytes().to_vec();
    config.extend_from_slice(b" log{prefix=\"\xff \"}");
    let o = std::process::Command::new("lvm")
        .args(["vgchange", "--addtag", "from_lvm2", &vg, "--devices", &a_s])
        .arg("--config")
        .arg(std::ffi::OsStr::from_bytes(&config))
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let head = std::fs::read(lab.path("nu.img")).unwrap();
    assert!(
        head[..1 << 20].windows(4).any(|w| w == b"=\\\"\xff"),
        "LVM2 did not write the byte into the metadata"
    );

    let vgs = lab.dp_json(&devs, &["vg", "list"]);
    assert_eq!(vgs["unreadable"].as_array().map(Vec::len), Some(0), "{vgs}");
    let row = vgs["vgs"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["vg_name"] == vg.as_str()))
        .unwrap_or_else(|| panic!("devpool does not list {vg}: {vgs}"));
    assert_eq!(row["vg_tags"][0], "from_lvm2", "{row}");
    lab.dp(
        &devs,
        &[
            "lv",
            "create",
            &format!("{vg}/after"),
            "--size",
            "4M",
            "--no-wipe",
        ],
    );
    lvm_ok(&devs, &["vgck", &vg]);
    let lvs = lvm_ok(
        &devs,
        &["lvs", "--noheadings", "-o", "lv_name,vg_tags", &vg],
    );
    assert!(lvs.contains("after") && lvs.contains("from_lvm2"), "{lvs}");
}

/// An `LVM_SYSTEM_DIR` whose configuration gives this host the system ID `id`.
fn system_id_dir(lab: &Lab, id: &str) -> std::path::PathBuf {
    let etc = lab.path(&format!("etc-lvm-{id}"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("lvm.conf"),
        "global {\n  system_id_source = \"lvmlocal\"\n}\n",
    )
    .unwrap();
    std::fs::write(
        etc.join("lvmlocal.conf"),
        format!("local {{\n  system_id = \"{id}\"\n}}\n"),
    )
    .unwrap();
    etc
}

/// LVM2 on `dev` as a host whose system ID is `id` (none: no ID).
fn lvm_as(dev: &str, id: Option<&str>, args: &[&str]) -> std::process::Output {
    let extra = id
        .map(|i| format!("global{{system_id_source=\"lvmlocal\"}} local{{system_id=\"{i}\"}}"))
        .unwrap_or_default();
    std::process::Command::new("lvm")
        .args(args)
        .args([
            "--devices",
            dev,
            "--config",
            &format!("{LVM_CONFIG} {extra}"),
        ])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap()
}

/// What LVM2 will not change on this host, devpool will not either: a VG
/// of another host (system ID), an exported VG, a read-only VG. Each
/// refusal says why and leaves the metadata as it was; once LVM2's own
/// configuration makes the VG this host's (or it is imported, or made
/// writable), devpool changes it and LVM2 reads the change.
#[test]
fn foreign_exported_and_read_only_vgs_are_refused_like_lvm2_does() {
    if skip_unless_real("foreign_exported_and_read_only_vgs_are_refused_like_lvm2_does") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("own.img", 64);
    let devs = [a.as_path()];
    let a_s = a.display().to_string();
    let vg = vg_name("owned");
    let lvm_as_other = |args: &[&str]| {
        let o = lvm_as(&a_s, Some("otherhost"), args);
        assert!(
            o.status.success(),
            "lvm {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    lvm_as_other(&["vgcreate", &vg, &a_s]);
    let seqno = |lab: &Lab| {
        let v = lab.dp_json(&devs, &["vg", "list"]);
        v["vgs"][0]["vg_seqno"].as_u64().unwrap()
    };
    let refused = |lab: &Lab, env: &[(&str, &str)], lv: &str, expect: &str| {
        let before = seqno(lab);
        let o = lab.devpool_env(
            &devs,
            &[
                "lv",
                "create",
                &format!("{vg}/{lv}"),
                "--size",
                "4M",
                "--no-wipe",
            ],
            env,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "devpool changed the VG");
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        assert_eq!(seqno(lab), before, "the metadata changed");
    };

    // Another host's VG.
    refused(&lab, &[], "a", "belongs to system ID 'otherhost'");
    // This host is 'otherhost' by LVM2's configuration: the VG is ours.
    let etc = system_id_dir(&lab, "otherhost");
    let ours = [("LVM_SYSTEM_DIR", etc.to_str().unwrap())];
    refused(
        &lab,
        &[("LVM_SYSTEM_DIR", "/nonexistent")],
        "a",
        "this host has none",
    );
    let o = lab.devpool_env(
        &devs,
        &[
            "lv",
            "create",
            &format!("{vg}/a"),
            "--size",
            "4M",
            "--no-wipe",
        ],
        &ours,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    lvm_as_other(&["vgck", &vg]);
    assert!(lvm_as_other(&["lvs", "--noheadings", "-o", "lv_name", &vg]).contains('a'));
    let sysid = lvm_as_other(&["vgs", "--noheadings", "-o", "systemid", &vg]);
    assert_eq!(sysid.trim(), "otherhost", "devpool kept the system ID");

    // Exported (vgexport drops the system ID): refused until imported.
    lvm_as_other(&["vgexport", &vg]);
    refused(&lab, &ours, "b", "is exported (vgexport)");
    lvm_ok(&devs, &["vgimport", &vg]);
    lab.dp(
        &devs,
        &[
            "lv",
            "create",
            &format!("{vg}/b"),
            "--size",
            "4M",
            "--no-wipe",
        ],
    );

    // Read-only: no WRITE in the VG's status (restored from a backup
    // edited so; LVM2 has no command for it).
    let file = lab.path("ro.vg");
    let f = file.display().to_string();
    lvm_ok(&devs, &["vgcfgbackup", "-f", &f, &vg]);
    let text = std::fs::read_to_string(&file).unwrap();
    let writable = "status = [\"RESIZEABLE\", \"READ\", \"WRITE\"]";
    assert!(text.contains(writable), "{text}");
    std::fs::write(
        &file,
        text.replacen(writable, "status = [\"RESIZEABLE\", \"READ\"]", 1),
    )
    .unwrap();
    lvm_ok(&devs, &["vgcfgrestore", "-f", &f, &vg]);
    refused(&lab, &[], "c", "is read-only");
    std::fs::write(&file, text).unwrap();
    lvm_ok(&devs, &["vgcfgrestore", "-f", &f, &vg]);
    lab.dp(
        &devs,
        &[
            "lv",
            "create",
            &format!("{vg}/c"),
            "--size",
            "4M",
            "--no-wipe",
        ],
    );
    lvm_ok(&devs, &["vgck", &vg]);
    let lvs = lvm_ok(&devs, &["lvs", "--noheadings", "-o", "lv_name", &vg]);
    assert_eq!(lvs.split_whitespace().count(), 3, "{lvs}");
}

/// On a host with an LVM2 system ID, a VG devpool creates carries it, as
/// `vgcreate`'s would: LVM2 on this host changes it, LVM2 without the ID
/// (another host) finds it foreign.
#[test]
fn a_vg_created_on_a_host_with_a_system_id_is_that_hosts() {
    if skip_unless_real("a_vg_created_on_a_host_with_a_system_id_is_that_hosts") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("stamp.img", 64);
    let devs = [a.as_path()];
    let a_s = a.display().to_string();
    let vg = vg_name("stamped");
    let etc = system_id_dir(&lab, "hostA");
    let host_a = [("LVM_SYSTEM_DIR", etc.to_str().unwrap())];
    let o = lab.devpool_env(&devs, &["vg", "create", &vg, &a_s, "--yes"], &host_a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let a_cfg = Some("hostA");
    let o = lvm_as(&a_s, a_cfg, &["vgs", "--noheadings", "-o", "systemid", &vg]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "hostA");
    let o = lvm_as(
        &a_s,
        a_cfg,
        &["lvcreate", "-an", "-Zn", "-L", "4M", "-n", "by_a", &vg],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Another host (no system ID): LVM2 will not touch it, nor will devpool.
    let o = lvm_as(
        &a_s,
        None,
        &["lvcreate", "-an", "-Zn", "-L", "4M", "-n", "by_b", &vg],
    );
    assert!(!o.status.success(), "LVM2 changed another host's VG");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("system ID hostA"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = lab.devpool_env(
        &devs,
        &[
            "lv",
            "create",
            &format!("{vg}/by_b"),
            "--size",
            "4M",
            "--no-wipe",
        ],
        &[("LVM_SYSTEM_DIR", "/nonexistent")],
    );
    assert!(!o.status.success());
    // Back on host A, devpool changes it and LVM2 checks the result.
    lab.devpool_env(
        &devs,
        &[
            "lv",
            "create",
            &format!("{vg}/by_devpool"),
            "--size",
            "4M",
            "--no-wipe",
        ],
        &host_a,
    );
    let o = lvm_as(&a_s, a_cfg, &["vgck", &vg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = lvm_as(&a_s, a_cfg, &["lvs", "--noheadings", "-o", "lv_name", &vg]);
    let lvs = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(lvs.contains("by_a") && lvs.contains("by_devpool"), "{lvs}");
}

/// On a host where LVM2 uses a devices file, LVM2 sees only the devices it
/// lists: devpool lists each PV it creates there as `pvcreate` does (same
/// ID type and name as LVM2's own entry for such a device), so LVM2 sees
/// devpool's PVs and pools at once, and a removed PV's entry loses its PVID
/// as `pvremove` leaves it.
#[test]
fn pvs_devpool_creates_are_listed_in_lvm2s_devices_file_where_lvm2_keeps_one() {
    if skip_unless_real("pvs_devpool_creates_are_listed_in_lvm2s_devices_file_where_lvm2_keeps_one")
    {
        return;
    }
    let mut lab = Lab::new();
    let listed = lab.loop_dev("listed.img", 64);
    let new = lab.loop_dev("new.img", 64);
    let etc = lab.path("etc-lvm-devicesfile");
    std::fs::create_dir_all(etc.join("devices")).unwrap();
    std::fs::write(
        etc.join("lvm.conf"),
        "devices {\n  use_devicesfile = 1\n  obtain_device_list_from_udev = 0\n}\n\
         global {\n  activation = 0\n}\nbackup {\n  backup = 0\n  archive = 0\n}\n",
    )
    .unwrap();
    let file = etc.join("devices/system.devices");
    let lvm = |args: &[&str]| {
        std::process::Command::new("lvm")
            .args(args)
            .env("LVM_SYSTEM_DIR", &etc)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .unwrap()
    };
    let report = |what: &str, field: &str| {
        String::from_utf8_lossy(&lvm(&[what, "--noheadings", "-o", field]).stdout).into_owned()
    };
    let entry_of = |dev: &Path| -> String {
        let text = std::fs::read_to_string(&file).unwrap();
        text.lines()
            .find(|l| l.contains(&format!("DEVNAME={} ", dev.display())))
            .unwrap_or_else(|| panic!("no entry for {}: {text}", dev.display()))
            .to_string()
    };
    let id_of = |line: &str| -> String {
        line.split_whitespace()
            .filter(|t| t.starts_with("IDTYPE=") || t.starts_with("IDNAME="))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // A devices file listing one device, written by LVM2 (pvcreate makes
    // one only on a host with no VGs; other tests' VGs may be visible).
    let o = lvm(&["lvmdevices", "--adddev", listed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(file.exists(), "LVM2 made no devices file");
    let o = lvm(&["pvcreate", listed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lvm2_entry = entry_of(&listed);

    let n = new.display().to_string();
    let env = [("LVM_SYSTEM_DIR", etc.to_str().unwrap())];
    let o = lab.devpool_env(&[], &["pv", "create", &n, "--yes"], &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("devices file"),
        "the plan shows the step: {out}"
    );
    let pvs = report("pvs", "pv_name,pv_uuid");
    assert!(pvs.contains(&n), "LVM2 does not see devpool's PV: {pvs}");
    // The same kind of ID as LVM2 gives such a device (loop_file and the
    // backing file here), and the PV's uuid.
    let ours = entry_of(&new);
    let expected = id_of(&lvm2_entry).replace("listed.img", "new.img");
    assert_eq!(id_of(&ours), expected, "{ours} vs LVM2's {lvm2_entry}");
    let uuid = pvs
        .lines()
        .find(|l| l.contains(&n))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .replace('-', "");
    assert!(ours.ends_with(&format!("PVID={uuid}")), "{ours}");
    assert!(
        entry_of(&listed) == lvm2_entry,
        "LVM2's own entry is kept as it was"
    );
    // LVM2 finds nothing wrong with the file devpool rewrote.
    let o = lvm(&["lvmdevices", "--check"]);
    let complaints: Vec<String> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&o.stdout).lines())
        .filter(|l| !l.contains("Activation disabled"))
        .map(str::to_string)
        .collect();
    assert!(
        o.status.success() && complaints.is_empty(),
        "{complaints:?}"
    );

    // A whole pool on a block device: LVM2 sees its VG and finds it sound.
    let disk = lab.loop_dev("pooldisk.img", 64);
    let d = disk.display().to_string();
    let o = lab.devpool_env(
        &[],
        &["pool", "setup", &d, "--name", "dfile", "--yes"],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(report("vgs", "vg_name").contains("devpool-dfile"));
    let o = lvm(&["vgck", "devpool-dfile"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Taken out of the file behind devpool's back: `pool status` says LVM2
    // cannot see the pool's device, and how to list it again.
    let health = |lab: &Lab| {
        let o = lab.devpool_env(&[], &["--pool", "dfile", "--json", "pool", "status"], &env);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        st["health"].to_string()
    };
    assert!(!health(&lab).contains("does not see"), "{}", health(&lab));
    let o = lvm(&["lvmdevices", "--deldev", &d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let h = health(&lab);
    assert!(
        h.contains(&format!("LVM2 does not see PV {d}")) && h.contains("lvmdevices --adddev"),
        "{h}"
    );
    let o = lvm(&["lvmdevices", "--adddev", &d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!health(&lab).contains("does not see"), "{}", health(&lab));
    // Teardown removes the PV: its entry stays, without a PVID, exactly as
    // LVM2's pvremove leaves its own.
    let o = lab.devpool_env(&[], &["pool", "teardown", "dfile", "--yes"], &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(entry_of(&disk).ends_with(" PVID=."), "{}", entry_of(&disk));
    let o = lvm(&["pvremove", listed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        entry_of(&listed).ends_with(" PVID=."),
        "{}",
        entry_of(&listed)
    );

    // Without a devices file in use, devpool leaves LVM2's files alone.
    let before = std::fs::read_to_string(&file).unwrap();
    let other = lab.loop_dev("other.img", 64);
    let o = lab.devpool(&[], &["pv", "create", other.to_str().unwrap(), "--yes"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.contains("devices file"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
}
