//! Atomicity and locking on real loop devices: a commit cut after any of its
//! writes leaves the old or the new VG (never a mix) for devpool and LVM2
//! alike; devpool and lvm2 commands run side by side without losing a change.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const EDGE: u64 = 2 << 20;

/// The first and last 2 MiB of an image: every metadata area and label.
fn save_edges(img: &Path) -> (Vec<u8>, Vec<u8>, u64) {
    let f = std::fs::File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let mut head = vec![0u8; EDGE as usize];
    let mut tail = vec![0u8; EDGE as usize];
    f.read_exact_at(&mut head, 0).unwrap();
    f.read_exact_at(&mut tail, size - EDGE).unwrap();
    (head, tail, size)
}

fn restore_edges(img: &Path, saved: &(Vec<u8>, Vec<u8>, u64)) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&saved.0, 0).unwrap();
    f.write_all_at(&saved.1, saved.2 - EDGE).unwrap();
    f.sync_all().unwrap();
}

fn lv_names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["lvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lv_name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

#[test]
fn a_commit_cut_after_any_write_leaves_the_old_or_the_new_vg() {
    if skip_unless_real("a_commit_cut_after_any_write_leaves_the_old_or_the_new_vg") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 100);
    let b = lab.loop_dev("b.img", 100);
    let devs = [a.as_path(), b.as_path()];
    let vg = vg_name("crash");
    lab.dp(
        &devs,
        &[
            "vg",
            "create",
            &vg,
            &a.display().to_string(),
            "--metadata-copies",
            "2",
        ],
    );
    lab.dp(&devs, &["vg", "extend", &vg, &b.display().to_string()]);
    for n in ["one", "two"] {
        lab.dp(
            &devs,
            &["lv", "create", &format!("{vg}/{n}"), "--size", "12M"],
        );
    }
    let images: Vec<PathBuf> = ["a.img", "b.img"].iter().map(|n| lab.path(n)).collect();
    let saved: Vec<_> = images.iter().map(|i| save_edges(i)).collect();
    let base_vg = lab.dp_json(&devs, &["vg", "list", &vg]);
    let base_seqno = num(&base_vg["vgs"][0]["vg_seqno"]);
    let base_lvs = lab.dp_json(&devs, &["lv", "list", &vg]);

    let mut cut = 0;
    loop {
        for (img, s) in images.iter().zip(&saved) {
            restore_edges(img, s);
        }
        for l in &lab.loops {
            l.flush();
        }
        let o = lab.devpool_env(
            &devs,
            &["lv", "create", &format!("{vg}/new"), "--size", "8M"],
            &[("DEVPOOL_FAULT_CRASH_AFTER_WRITES", &cut.to_string())],
        );
        let finished = o.status.success();
        if !finished {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("injected crash"), "cut {cut}: {err}");
        }

        // devpool: exactly the old or exactly the new VG.
        let now = lab.dp_json(&devs, &["vg", "list", &vg]);
        let seqno = num(&now["vgs"][0]["vg_seqno"]);
        let lvs = lab.dp_json(&devs, &["lv", "list", &vg]);
        if seqno == base_seqno {
            assert_eq!(lvs["lvs"], base_lvs["lvs"], "cut {cut}: old VG, unchanged");
        } else {
            assert_eq!(seqno, base_seqno + 1, "cut {cut}");
            let mut want = lv_names(&base_lvs);
            want.push("new".into());
            want.sort();
            assert_eq!(lv_names(&lvs), want, "cut {cut}: new VG, complete");
        }
        // LVM2 sees the same VG version devpool picked.
        let lvm_vgs = lvm_report(&devs, "vgs", "vg_name,vg_seqno");
        let lvm_seqno = num(&lvm_vgs
            .iter()
            .find(|r| r["vg_name"] == vg.as_str())
            .expect("LVM2 finds the VG")["vg_seqno"]);
        assert_eq!(
            lvm_seqno, seqno,
            "cut {cut}: LVM2 and devpool pick the same metadata"
        );
        let lvm_lvs = lvm_report(&devs, "lvs", "vg_name,lv_name");
        let has_new = lvm_lvs
            .iter()
            .any(|r| r["vg_name"] == vg.as_str() && r["lv_name"] == "new");
        assert_eq!(
            has_new,
            seqno == base_seqno + 1,
            "cut {cut}: LVM2's view of the new LV"
        );
        let disagreeing = now["vgs"][0]["disagreeing"].as_array().unwrap().len();
        if disagreeing == 0 {
            let (ok, out) = vgck(&devs, &vg);
            assert!(ok, "cut {cut}: vgck on consistent metadata:\n{out}");
        }
        // The next devpool commit repairs any lagging area; then vgck passes.
        lab.dp(
            &devs,
            &["lv", "tag", &format!("{vg}/one"), "--add", "after-cut"],
        );
        let healed = lab.dp_json(&devs, &["vg", "list", &vg]);
        assert!(
            healed["vgs"][0]["disagreeing"]
                .as_array()
                .unwrap()
                .is_empty(),
            "cut {cut}: {healed}"
        );
        let (ok, out) = vgck(&devs, &vg);
        assert!(ok, "cut {cut}: vgck after repair:\n{out}");
        if finished {
            break;
        }
        cut += 1;
        assert!(cut < 40, "the commit never finished");
    }
    // wipe (1) + text on 3 areas + precommit on 3 + commit on 3: at least 10 writes.
    assert!(cut >= 10, "only {cut} writes were cut");
}

#[test]
fn devpool_and_lvm2_share_a_vg_concurrently_without_losing_changes() {
    if skip_unless_real("devpool_and_lvm2_share_a_vg_concurrently_without_losing_changes") {
        return;
    }
    let mut lab = Lab::new();
    let a = lab.loop_dev("a.img", 600);
    let devs = [a.as_path()];
    let vg = vg_name("conc");
    lab.dp(&devs, &["vg", "create", &vg, &a.display().to_string()]);
    let dev_list = a.display().to_string();
    let mut children = Vec::new();
    for w in 0..4 {
        let mut c = std::process::Command::new("sh");
        let script = format!(
            "for i in 0 1 2 3 4 5 6 7; do {exe} --devices {dev_list} lv create {vg}/w{w}_$i --size 4M >/dev/null || exit 1; done",
            exe = env!("CARGO_BIN_EXE_devpool")
        );
        c.arg("-c")
            .arg(script)
            .env("DEVPOOL_STATE_DIR", lab.state_dir());
        children.push(c.spawn().unwrap());
    }
    let lvm_script = format!(
        "for i in 0 1 2 3 4 5; do lvm lvcreate -an -Zn -L 4M -n l_$i --devices {dev_list} --config '{LVM_CONFIG}' {vg} >/dev/null 2>&1 || exit 1; done"
    );
    let mut lvm_child = std::process::Command::new("sh")
        .arg("-c")
        .arg(lvm_script)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .spawn()
        .unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a devpool worker failed");
    }
    assert!(
        lvm_child.wait().unwrap().success(),
        "the lvcreate loop failed"
    );
    let lvs = lab.dp_json(&devs, &["lv", "list", &vg]);
    assert_eq!(
        lvs["lvs"].as_array().unwrap().len(),
        4 * 8 + 6,
        "every create landed"
    );
    let (ok, out) = vgck(&devs, &vg);
    assert!(ok, "{out}");
    // No extent shared: devpool's reader checks the whole allocation map.
    let vgs = lab.dp_json(&devs, &["vg", "list", &vg]);
    assert_eq!(
        num(&vgs["vgs"][0]["vg_free_count"]),
        num(&vgs["vgs"][0]["vg_extent_count"]) - 38
    );
    let journal = std::fs::read_to_string(lab.state_dir().join("journal.jsonl")).unwrap();
    assert_eq!(
        journal
            .lines()
            .filter(|l| l.contains("\"outcome\":\"ok\"") && l.contains("lv create"))
            .count(),
        32
    );
}
