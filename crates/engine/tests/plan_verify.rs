//! Plans are verified against the disks before they execute: a plan built on
//! a VG that changed since is refused, and nothing is written.

use devpool_engine::EngineError;
use devpool_engine::engine::{DeviceSource, Engine, Operation, PvOptions};
use devpool_format::units::{Bytes, SizeArg};
use std::path::PathBuf;

fn engine(dir: &tempfile::TempDir, images: &[PathBuf]) -> Engine {
    let mut e = Engine::new(
        DeviceSource::List(images.to_vec()),
        dir.path().join("state"),
    );
    e.lock_dir = dir.path().join("locks");
    e
}

fn lv_create(vg: &str, name: &str, size: &str) -> Operation {
    Operation::LvCreate {
        vg: vg.into(),
        name: name.into(),
        size: SizeArg::parse(size).unwrap(),
        stripes: 1,
        stripe_size: Bytes(64 << 10),
        tags: vec![],
        wipe: true,
        count: None,
    }
}

fn setup() -> (tempfile::TempDir, Engine, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pv.img");
    let e = engine(&dir, std::slice::from_ref(&img));
    let opts = PvOptions {
        image_size: Some(Bytes(256 << 20)),
        ..PvOptions::default()
    };
    e.apply(
        &Operation::VgCreate {
            name: "vp".into(),
            pvs: vec![img.clone()],
            extent_size: Bytes(4 << 20),
            pv_options: opts,
            autoactivation: true,
        },
        false,
    )
    .unwrap();
    e.apply(&lv_create("vp", "a", "16M"), false).unwrap();
    (dir, e, img)
}

#[test]
fn a_plan_for_a_vg_that_changed_since_is_refused_and_writes_nothing() {
    let (_dir, e, img) = setup();
    let plan = e.plan(&lv_create("vp", "b", "8M")).unwrap();
    assert_eq!(plan.seqno_before, Some(2));
    e.apply(&lv_create("vp", "c", "8M"), false).unwrap(); // someone else commits
    let before = std::fs::read(&img).unwrap();
    match e.execute(&plan) {
        Err(EngineError::Changed { vg, planned, now }) => {
            assert_eq!((vg.as_str(), planned, now), ("vp", 2, 3))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(std::fs::read(&img).unwrap() == before, "nothing written");
    // A fresh plan executes.
    let plan = e.plan(&lv_create("vp", "b", "8M")).unwrap();
    e.execute(&plan).unwrap();
}

#[test]
fn destructive_plans_need_confirmation_and_show_their_diff() {
    let (_dir, e, _img) = setup();
    let shrink = Operation::LvResize {
        vg: "vp".into(),
        name: "a".into(),
        size: SizeArg::parse("-8M").unwrap(),
    };
    match e.apply(&shrink, false) {
        Err(EngineError::NeedsConfirmation(plan)) => {
            assert!(
                plan.confirm[0].contains("discards the data"),
                "{:?}",
                plan.confirm
            );
            let diff = plan.metadata_diff();
            assert!(
                diff.contains("-extent_count = 4") && diff.contains("+extent_count = 2"),
                "{diff}"
            );
        }
        other => panic!("expected a confirmation request, got {other:?}"),
    }
    let (plan, _) = e.apply(&shrink, true).unwrap();
    assert_eq!(plan.seqno_after, Some(3));
    let remove = Operation::VgRemove { name: "vp".into() };
    assert!(matches!(
        e.apply(&remove, false),
        Err(EngineError::NeedsConfirmation(_))
    ));
}

#[test]
fn every_plan_step_is_journaled_with_seqnos() {
    let (dir, _e, _img) = setup();
    let text = std::fs::read_to_string(dir.path().join("state/journal.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["seqno_before"], 1);
    assert_eq!(entries[1]["seqno_after"], 2);
    assert_eq!(entries[1]["outcome"], "ok");
    let steps: Vec<&str> = entries[1]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["zero_range", "commit_metadata"]);
    assert_eq!(entries[0]["transaction"].as_str().unwrap().len(), 16);
}

fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn lv_offset(e: &Engine, lv: &str) -> u64 {
    let (v, _) = e.read_vg("vp").unwrap();
    let a = v
        .meta
        .used_areas()
        .into_iter()
        .find(|u| u.3 == lv)
        .map(|u| (u.0.to_string(), u.1))
        .unwrap();
    v.meta.pv(&a.0).unwrap().pe_start.0 * 512 + a.1 * (4 << 20)
}

/// A release's data goes back in bounded rounds before its commit: all of
/// it, and nothing of the volumes that stay.
#[test]
fn give_back_punches_only_the_named_volumes_in_rounds() {
    use std::os::unix::fs::FileExt;
    let (_dir, e, img) = setup();
    e.apply(&lv_create("vp", "b", "8M"), false).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let (a, b) = (lv_offset(&e, "a"), lv_offset(&e, "b"));
    f.write_all_at(&vec![0xaau8; 16 << 20], a).unwrap();
    f.write_all_at(&vec![0xbbu8; 8 << 20], b).unwrap();
    f.sync_all().unwrap();
    let path_of = |_: &str| Some(img.clone());
    let (v, _) = e.read_vg("vp").unwrap();
    let names = vec!["a".to_string()];
    assert!(devpool_engine::giveback::lvs_hold_data(
        &v.meta, &path_of, &names
    ));
    let before = allocated(&img);
    // 1 MiB rounds: sixteen of them (and one that finds nothing left).
    let punched = e.give_back_in_rounds("vp", &names, 1 << 20).unwrap();
    assert_eq!(punched, 16 << 20);
    assert!(allocated(&img) + (16 << 20) <= before);
    assert!(!devpool_engine::giveback::lvs_hold_data(
        &v.meta, &path_of, &names
    ));
    let mut buf = vec![0u8; 8 << 20];
    f.read_exact_at(&mut buf, b).unwrap();
    assert!(
        buf.iter().all(|&x| x == 0xbb),
        "the other volume keeps its data"
    );
    f.read_exact_at(&mut buf, a).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    // A volume that is gone by now is skipped.
    assert_eq!(e.give_back("vp", &["nope".to_string()]).unwrap(), 0);
}
