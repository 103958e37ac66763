//! Bad input on real devices: each case gets a clear error that names the
//! device and byte offset (or the argument), no panic, and nothing written.

mod common;
use common::*;
use devpool_format::crc::lvm_crc;
use devpool_format::label::find_label;
use devpool_format::mda::MdaHeader;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn digest(p: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}

fn poke(img: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

fn peek(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// The first metadata area header of a PV image, and where its text lies.
fn mda0(img: &Path) -> MdaHeader {
    let label = find_label(&peek(img, 0, 2048)).unwrap().unwrap();
    let a = label.metadata_areas[0];
    MdaHeader::parse(&peek(img, a.offset, 512), a.offset).unwrap()
}

/// A VG `vg` with one LV on image files used directly as PVs.
fn setup(lab: &Lab, images: &[&str]) -> (String, Vec<PathBuf>) {
    let vg = vg_name("bad");
    let imgs: Vec<PathBuf> = images.iter().map(|n| lab.image(n, 64)).collect();
    let refs: Vec<&Path> = imgs.iter().map(|p| p.as_path()).collect();
    let strs: Vec<String> = imgs.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["vg", "create", &vg];
    args.extend(strs.iter().map(|s| s.as_str()));
    lab.dp(&refs, &args);
    lab.dp(
        &refs,
        &["lv", "create", &format!("{vg}/keep"), "--size", "8M"],
    );
    (vg, imgs)
}

fn refs(imgs: &[PathBuf]) -> Vec<&Path> {
    imgs.iter().map(|p| p.as_path()).collect()
}

#[test]
fn corrupted_labels_headers_and_text_are_reported_with_offsets_and_nothing_is_written() {
    // Image files only: needs no root, but keep the same skip rules for clarity.
    let lab = Lab::new();
    let (vg, imgs) = setup(&lab, &["a.img"]);
    let img = &imgs[0];
    let devs = refs(&imgs);
    let h = mda0(img);
    let text_at = h.start + h.committed.offset;
    let pristine = std::fs::read(img).unwrap();

    let corrupt = |case: usize| match case {
        0 => poke(img, 512 + 100, &[0xff]),
        1 => poke(img, 512 + 8, &[7]),
        2 => poke(img, 512 + 72, &[0xAA; 440]),
        3 => poke(img, 4096 + 40, &[1, 2, 3]),
        4 => {
            let mut b = peek(img, 4096, 512);
            b[6] ^= 0xff;
            let crc = lvm_crc(&b[4..]);
            b[..4].copy_from_slice(&crc.to_le_bytes());
            poke(img, 4096, &b);
        }
        5 => {
            let mut b = peek(img, text_at + 20, 1);
            b[0] ^= 0x20;
            poke(img, text_at + 20, &b);
        }
        _ => {
            let garbage = b"vg {\nid = \"x\"\nseqno = [[\n\0";
            poke(img, text_at, garbage);
            let mut hb = peek(img, 4096, 512);
            hb[48..56].copy_from_slice(&(garbage.len() as u64).to_le_bytes());
            hb[56..60].copy_from_slice(&lvm_crc(garbage).to_le_bytes());
            let crc = lvm_crc(&hb[4..]);
            hb[..4].copy_from_slice(&crc.to_le_bytes());
            poke(img, 4096, &hb);
        }
    };
    let cases = [
        (
            "label bit flip",
            "label at byte 528: label checksum".to_string(),
        ),
        ("label wrong sector", "label at byte 520".to_string()),
        ("truncated PV header list", "label at byte 528".to_string()),
        (
            "mda header crc",
            "metadata area header at byte 4096: checksum".to_string(),
        ),
        (
            "mda magic",
            "metadata area header at byte 4100: wrong magic".to_string(),
        ),
        (
            "text bit flip",
            format!("metadata text at byte {text_at}: checksum"),
        ),
        (
            "unparsable text with a valid checksum",
            format!("metadata text at byte {text_at}: metadata text: line 3"),
        ),
    ];
    for (case, (name, want)) in cases.iter().enumerate() {
        std::fs::write(img, &pristine).unwrap();
        corrupt(case);
        let before = digest(img);
        let o = lab.devpool(&devs, &["pv", "list"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: listing must not fail: {err}");
        assert!(
            err.contains(&img.display().to_string()) && err.contains(want.as_str()),
            "{name}: wanted '{want}' in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
        let e = lab.dp_err(
            &devs,
            &["lv", "create", &format!("{vg}/new"), "--size", "4M"],
        );
        assert!(
            e.contains("not found") || e.contains("missing"),
            "{name}: {e}"
        );
        assert_eq!(digest(img), before, "{name}: nothing may be written");
    }
}

#[test]
fn a_lagging_pv_is_reported_and_the_next_commit_repairs_it() {
    let lab = Lab::new();
    let (vg, imgs) = setup(&lab, &["a.img", "b.img"]);
    let devs = refs(&imgs);
    let old_b = std::fs::read(&imgs[1]).unwrap();
    lab.dp(
        &devs,
        &["lv", "create", &format!("{vg}/more"), "--size", "4M"],
    );
    std::fs::write(&imgs[1], &old_b).unwrap(); // b now holds the previous seqno
    let v = lab.dp_json(&devs, &["vg", "list", &vg]);
    let dis = v["vgs"][0]["disagreeing"].as_array().unwrap();
    assert_eq!(dis.len(), 1, "{v}");
    let msg = dis[0].as_str().unwrap();
    assert!(
        msg.contains("b.img") && msg.contains("holds seqno 2, VG is at seqno 3"),
        "{msg}"
    );
    let lvs = lab.dp_json(&devs, &["lv", "list", &vg]);
    assert_eq!(
        lvs["lvs"].as_array().unwrap().len(),
        2,
        "the newest copy wins"
    );
    lab.dp(
        &devs,
        &["lv", "tag", &format!("{vg}/more"), "--add", "fixed"],
    );
    let v = lab.dp_json(&devs, &["vg", "list", &vg]);
    assert!(
        v["vgs"][0]["disagreeing"].as_array().unwrap().is_empty(),
        "{v}"
    );
}

#[test]
fn a_missing_pv_is_reported_and_changes_are_refused() {
    let lab = Lab::new();
    let (vg, imgs) = setup(&lab, &["a.img", "b.img"]);
    let only_a = [imgs[0].as_path()];
    let before = digest(&imgs[0]);
    let v = lab.dp_json(&only_a, &["vg", "list", &vg]);
    let missing = v["vgs"][0]["missing_pvs"].as_array().unwrap();
    assert_eq!(missing.len(), 1);
    assert!(
        missing[0].as_str().unwrap().contains("b.img"),
        "{missing:?}"
    );
    let e = lab.dp_err(
        &only_a,
        &["lv", "create", &format!("{vg}/x"), "--size", "4M"],
    );
    assert!(
        e.contains("missing PVs") && e.contains("pv1") && e.contains("--devices"),
        "{e}"
    );
    assert_eq!(digest(&imgs[0]), before);
}

#[test]
fn bad_arguments_name_the_argument_and_write_nothing() {
    let lab = Lab::new();
    let (vg, imgs) = setup(&lab, &["a.img"]);
    let devs = refs(&imgs);
    let before = digest(&imgs[0]);
    let lv = format!("{vg}/x");
    for (args, want) in [
        (
            vec!["lv", "create", &lv as &str, "--size", "99999999999999T"],
            "--size: invalid size '99999999999999T'",
        ),
        (vec!["lv", "create", &lv, "--size", "100"], "no unit"),
        (
            vec!["lv", "create", &lv, "--size", "1000G"],
            "not enough free space",
        ),
        (
            vec!["lv", "create", &lv, "--size", "4M", "--stripes", "2"],
            "2 stripes need 2 PVs",
        ),
        (
            vec!["lv", "create", &format!("{vg}/snapshot1"), "--size", "4M"],
            "reserved",
        ),
        (
            vec!["lv", "create", &format!("{vg}/a b"), "--size", "4M"],
            "character ' ' is not allowed",
        ),
        (
            vec!["lv", "create", &format!("{vg}/keep"), "--size", "4M"],
            "already exists",
        ),
        (vec!["lv", "create", "novg", "--size", "4M"], "is not VG/LV"),
        (
            vec!["lv", "create", "nosuchvg/x", "--size", "4M"],
            "'nosuchvg' not found",
        ),
        (
            vec!["lv", "resize", &format!("{vg}/keep"), "--size", "-99G"],
            "cannot shrink",
        ),
        (
            vec!["lv", "tag", &format!("{vg}/keep"), "--add", "bad tag"],
            "not allowed in a tag",
        ),
        (
            vec!["vg", "rename", "--", &vg, "-bad"],
            "must not start with '-'",
        ),
        (
            vec!["vg", "create", "other", "/dev/null"],
            "not a block device or a regular image file",
        ),
        (
            vec!["vg", "create", "other", "/nonexistent/x.img"],
            "does not exist; pass --image-size",
        ),
        (
            vec![
                "lv",
                "create",
                &lv,
                "--size",
                "4M",
                "--stripe-size",
                "3K",
                "--stripes",
                "1",
            ],
            "",
        ),
    ] {
        let o = lab.devpool(&devs, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        if want.is_empty() {
            continue;
        }
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // The one accepted above created x; everything else wrote nothing.
    lab.dp(&devs, &["lv", "remove", &lv]);
    let v = lab.dp_json(&devs, &["vg", "list", &vg]);
    assert_eq!(
        num(&v["vgs"][0]["vg_seqno"]),
        4,
        "only the create and remove of x committed"
    );
    let _ = before;
}

#[test]
fn a_system_error_names_the_path_and_says_its_cause_once() {
    let lab = Lab::new();
    // The state directory is a file: nothing can be made under it.
    std::fs::write(lab.state_dir(), b"not a directory").unwrap();
    let err = lab.dp_err(
        &[],
        &["--no-daemon", "lease", "acquire", "--volumes", "test:4M"],
    );
    let images = lab.state_dir().join("images");
    assert!(
        err.contains(&format!("{}: create failed", images.display())),
        "{err}"
    );
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
}

#[test]
fn pv_create_over_a_filesystem_needs_yes_and_otherwise_writes_nothing() {
    let lab = Lab::new();
    let img = lab.image("fs.img", 64);
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status();
    if !matches!(mkfs, Ok(s) if s.success()) {
        eprintln!("SKIPPED: pv_create_over_a_filesystem_needs_yes: mkfs.ext4 not available");
        return;
    }
    let before = digest(&img);
    let devs = [img.as_path()];
    let e = lab.dp_err(&devs, &["pv", "create", &img.display().to_string()]);
    assert!(
        e.contains("ext2/3/4 signature at byte 1080") && e.contains("--yes"),
        "{e}"
    );
    assert_eq!(digest(&img), before, "refused: nothing written");
    let dry = lab.dp(
        &devs,
        &["--dry-run", "pv", "create", &img.display().to_string()],
    );
    assert!(
        dry.contains("DESTRUCTIVE") && dry.contains("dry run"),
        "{dry}"
    );
    assert_eq!(digest(&img), before, "dry run: nothing written");
    lab.dp(
        &devs,
        &["--yes", "pv", "create", &img.display().to_string()],
    );
    let pvs = lab.dp_json(&devs, &["pv", "list"]);
    assert_eq!(pvs["pvs"].as_array().unwrap().len(), 1);
    let journal = std::fs::read_to_string(lab.state_dir().join("journal.jsonl")).unwrap();
    assert_eq!(
        journal.lines().count(),
        1,
        "one executed transaction journaled"
    );
}

/// `lv activate` on a host without device-mapper says so and points at
/// `devpool serve`; an LV that does not exist is named. (With dm, the
/// guest tests in serve_layouts.rs activate for real.)
#[test]
fn lv_activate_without_device_mapper_says_so() {
    if Path::new("/sys/module/dm_mod").exists() {
        eprintln!("SKIP lv_activate_without_device_mapper_says_so: this host has device-mapper");
        return;
    }
    let lab = Lab::new();
    let (vg, imgs) = setup(&lab, &["a.img"]);
    let devs: Vec<&Path> = imgs.iter().map(PathBuf::as_path).collect();
    let e = lab.dp_err(&devs, &["lv", "activate", &format!("{vg}/lv0")]);
    assert!(
        e.contains("no device-mapper") && e.contains("devpool serve"),
        "{e}"
    );
    let e = lab.dp_err(&devs, &["lv", "activate", "novg"]);
    assert!(e.contains("VG/NAME") || e.contains("novg"), "{e}");
}
