//! Device-mapper proof: VGs devpool made on the host (linear and striped
//! volumes, and a VG of 300 volumes) are activated in a Debian 6.12 guest by
//! real LVM2 (`vgchange -ay`, lvm copied into the initramfs) on real
//! dm-linear and dm-striped. Records the host wrote at the offsets devpool
//! computed read back in the guest; records the guest wrote through
//! device-mapper are found by the host at the offsets devpool computes; an LV
//! that LVM2 creates in the guest is read correctly by devpool afterwards.

mod common;
use common::guest::*;
use common::{Lab, Loop, assert_reports_agree, first_lv, vgck};
use devpool_engine::engine::{DeviceSource, Engine};
use devpool_format::metadata::VgMetadata;
use devpool_serve::map::{PvPlace, VolumeMap};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MANY: usize = 300;

/// A VG as devpool reads it: metadata and each PV's path (metadata order).
struct DevpoolView {
    meta: std::sync::Arc<VgMetadata>,
    paths: Vec<PathBuf>,
}

impl DevpoolView {
    fn read(lab: &Lab, devs: &[&Path], vg: &str) -> DevpoolView {
        let e = Engine::new(
            DeviceSource::List(devs.iter().map(|p| p.to_path_buf()).collect()),
            lab.state_dir(),
        );
        let (v, _) = e
            .read_vg(vg)
            .unwrap_or_else(|e| panic!("devpool reads {vg}: {e}"));
        let paths = v
            .devices
            .iter()
            .map(|d| d.as_ref().expect("every PV present").path.clone())
            .collect();
        DevpoolView {
            meta: v.meta.clone(),
            paths,
        }
    }

    /// Where byte `offset` of `lv` lives, by devpool's own mapping (one
    /// 512-byte record never straddles a stripe chunk here).
    fn place(&self, lv: &str, offset: u64) -> (PathBuf, u64) {
        let l = self
            .meta
            .lv(lv)
            .unwrap_or_else(|| panic!("devpool does not see LV {lv}"));
        let map = VolumeMap::from_lv(&self.meta, l, |key| {
            let dev = self.meta.pvs.iter().position(|p| p.key == key)?;
            let pv = &self.meta.pvs[dev];
            Some(PvPlace {
                dev,
                pe_start_bytes: pv.pe_start.0 * 512,
                pe_count: pv.pe_count,
            })
        })
        .unwrap();
        let mut pieces = Vec::new();
        map.pieces(offset, 512, &mut pieces).unwrap();
        assert_eq!(pieces.len(), 1, "record at {offset} of {lv} straddles");
        (self.paths[pieces[0].dev].clone(), pieces[0].offset)
    }

    fn write_record(&self, lv: &str, offset: u64, text: &str) {
        let (path, at) = self.place(lv, offset);
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        let mut sector = [0u8; 512];
        sector[..text.len()].copy_from_slice(text.as_bytes());
        f.write_all(&sector).unwrap();
    }

    fn read_record(&self, lv: &str, offset: u64, len: usize) -> String {
        let (path, at) = self.place(lv, offset);
        let mut f = std::fs::File::open(&path).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact(&mut b).unwrap();
        String::from_utf8_lossy(&b).into_owned()
    }
}

/// (VG, LV, byte offsets of the records) for every volume checked.
fn records() -> Vec<(&'static str, String, Vec<u64>)> {
    let mib = 1u64 << 20;
    let mut r = vec![
        // Across all of the 8 MiB linear volume, two extents apart.
        (
            "dmproof",
            "lin".to_string(),
            (0..8).map(|k| k * mib).collect(),
        ),
        // Every 192 KiB of the striped volume: both stripes, many chunks.
        (
            "dmproof",
            "str".to_string(),
            (0..80).map(|k| k * 192 * 1024).collect(),
        ),
    ];
    for i in 0..MANY {
        r.push(("many", format!("v-{i}"), vec![0, mib - 4096]));
    }
    r
}

/// Guest shell helpers beside [`DM_GUEST_HELPERS`]: `check DEV OFFSET TEXT`
/// (a record reads back, else MISMATCH and bad=1), `put DEV OFFSET TEXT`.
const RECORD_HELPERS: &str = "check() { got=$(dd if=$1 bs=512 skip=$(($2/512)) count=1 2>/dev/null | head -c ${#3}); \
[ \"$got\" = \"$3\" ] || { echo \"MISMATCH $1 at $2: [$got] wanted [$3]\"; bad=1; }; }\n\
put() { printf '%s' \"$3\" | dd of=$1 bs=512 seek=$(($2/512)) conv=sync 2>/dev/null || { echo \"WRITE FAILED $1 $2\"; bad=1; }; }\n";

/// The guest: activate, check host records, write guest records (1 KiB
/// after each host record), create an LV, deactivate.
fn guest_script() -> String {
    let mut s = format!("{DM_GUEST_HELPERS}{RECORD_HELPERS}");
    s.push_str(
        "lvm_c vgchange -ay dmproof many || exit 10\n\
         echo \"ACTIVE $(ls /dev/mapper | grep -c -e '^dmproof-' -e '^many-')\"\n\
         dmsetup table dmproof-str\n",
    );
    for (vg, lv, offsets) in records() {
        for o in offsets {
            let _ = writeln!(s, "check /dev/{vg}/{lv} {o} 'host {vg}/{lv} {o}'");
            let _ = writeln!(s, "put /dev/{vg}/{lv} {} 'guest {vg}/{lv} {o}'", o + 1024);
        }
    }
    s.push_str("lvm_c lvcreate -L 8M -n fromguest dmproof || exit 11\n");
    for k in 0..8u64 {
        let o = k << 20;
        let _ = writeln!(s, "put /dev/dmproof/fromguest {o} 'lvcreate-in-guest {o}'");
    }
    s.push_str(
        "sync\nlvm_c vgchange -an dmproof many || exit 12\n\
         echo \"DEACTIVATED $(ls /dev/mapper | grep -c -e '^dmproof-' -e '^many-')\"\n\
         exit $bad\n",
    );
    s
}

#[test]
fn guest_lvm2_activates_devpool_vgs_on_real_device_mapper() {
    let t = "guest_lvm2_activates_devpool_vgs_on_real_device_mapper";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let (a, b, c) = (lab.path("a.img"), lab.path("b.img"), lab.path("c.img"));
    let ab: [&Path; 2] = [&a, &b];
    let all: [&Path; 3] = [&a, &b, &c];
    let s = |p: &Path| p.display().to_string();
    lab.dp(
        &ab,
        &[
            "vg",
            "create",
            "dmproof",
            &s(&a),
            &s(&b),
            "--image-size",
            "128M",
            "--yes",
        ],
    );
    lab.dp(&ab, &["lv", "create", "dmproof/lin", "--size", "8M"]);
    lab.dp(
        &ab,
        &[
            "lv",
            "create",
            "dmproof/str",
            "--size",
            "16M",
            "--stripes",
            "2",
            "--stripe-size",
            "64K",
        ],
    );
    lab.dp(
        &[&c],
        &[
            "vg",
            "create",
            "many",
            &s(&c),
            "--extent-size",
            "1M",
            "--image-size",
            "512M",
            "--yes",
        ],
    );
    lab.dp(
        &[&c],
        &[
            "lv",
            "create",
            "many/v",
            "--size",
            "1M",
            "--count",
            &MANY.to_string(),
        ],
    );

    // Host → guest: records at the offsets devpool computes.
    let dm = DevpoolView::read(&lab, &ab, "dmproof");
    let many = DevpoolView::read(&lab, &[&c], "many");
    let view = |vg: &str| if vg == "dmproof" { &dm } else { &many };
    for (vg, lv, offsets) in records() {
        for o in offsets {
            view(vg).write_record(&lv, o, &format!("host {vg}/{lv} {o}"));
        }
    }

    let image = kernel.image.display().to_string();
    let modules = kernel.modules.as_ref().unwrap().display().to_string();
    let script = guest_script();
    let out = lab.devpool(
        &all,
        &[
            "vm",
            "run",
            "--kernel",
            &image,
            "--modules",
            &modules,
            "--mem",
            "1G",
            "--timeout",
            "600",
            "--disk",
            &s(&a),
            "--disk",
            &s(&b),
            "--disk",
            &s(&c),
            "--add",
            "/sbin/lvm",
            "--add",
            "/sbin/dmsetup",
            "--load-module",
            "dm_mod",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let console = guest_console(&out);
    assert!(
        console.contains(&format!("ACTIVE {}", MANY + 2)),
        "LVM2 did not activate every volume:\n{console}"
    );
    assert!(
        console.contains("striped 2 128"),
        "dm-striped table:\n{console}"
    );
    assert!(console.contains("DEACTIVATED 0"), "{console}");

    // Guest → host: what the guest wrote through dm is where devpool says.
    let dm = DevpoolView::read(&lab, &ab, "dmproof");
    let many = DevpoolView::read(&lab, &[&c], "many");
    let view = |vg: &str| if vg == "dmproof" { &dm } else { &many };
    for (vg, lv, offsets) in records() {
        for o in offsets {
            let want = format!("guest {vg}/{lv} {o}");
            assert_eq!(view(vg).read_record(&lv, o + 1024, want.len()), want);
            let host = format!("host {vg}/{lv} {o}");
            assert_eq!(view(vg).read_record(&lv, o, host.len()), host);
        }
    }
    // The LV LVM2 created in the guest: devpool maps it and finds its data.
    for k in 0..8u64 {
        let o = k << 20;
        let want = format!("lvcreate-in-guest {o}");
        assert_eq!(dm.read_record("fromguest", o, want.len()), want);
    }
    let lvs = lab.dp_json(&ab, &["lv", "list", "dmproof"]);
    assert!(lvs.to_string().contains("fromguest"), "{lvs}");
    // LVM2 on the host reads PVs through loop devices.
    let (la, lb) = (Loop::attach(&a), Loop::attach(&b));
    let loops: [&Path; 2] = [&la.dev, &lb.dev];
    let (ok, msg) = vgck(&loops, "dmproof");
    assert!(ok, "vgck after the guest's lvcreate: {msg}");
    assert_reports_agree(&lab, &loops, "dmproof");
}

/// A snapshot devpool creates (`lv snapshot`) is a real dm-snapshot: in the
/// guest, LVM2 activates it, the origin is overwritten and the snapshot
/// still shows the old data; back on the host, the COW store holds the
/// exceptions dm wrote, in the format devpool reads.
#[test]
fn guest_dm_snapshot_runs_on_a_snapshot_devpool_created() {
    use devpool_format::cow::{CowHeader, CowLayout, ExceptionTable};
    let t = "guest_dm_snapshot_runs_on_a_snapshot_devpool_created";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let a = lab.path("s.img");
    let devs: [&Path; 1] = [&a];
    let s = a.display().to_string();
    lab.dp(
        &devs,
        &[
            "vg",
            "create",
            "snapvg",
            &s,
            "--image-size",
            "128M",
            "--yes",
        ],
    );
    lab.dp(&devs, &["lv", "create", "snapvg/origin", "--size", "16M"]);
    let view = DevpoolView::read(&lab, &devs, "snapvg");
    for k in 0..16u64 {
        view.write_record("origin", k * 4096, &format!("old {k}"));
    }
    lab.dp(
        &devs,
        &[
            "lv",
            "snapshot",
            "snapvg/origin",
            "--name",
            "snap",
            "--size",
            "4M",
        ],
    );
    let mut script = format!("{DM_GUEST_HELPERS}{RECORD_HELPERS}");
    script.push_str(
        "lvm_c vgchange -ay snapvg || exit 10\n\
         dmsetup status snapvg-snap\n",
    );
    for k in 0..8u64 {
        let _ = writeln!(
            script,
            "printf 'new {k}' | dd of=/dev/snapvg/origin bs=512 seek={} conv=sync oflag=direct 2>/dev/null",
            k * 8
        );
    }
    for k in 0..16u64 {
        let now = if k < 8 { "new" } else { "old" };
        let _ = writeln!(script, "check /dev/snapvg/origin {} '{now} {k}'", k * 4096);
        let _ = writeln!(script, "check /dev/snapvg/snap {} 'old {k}'", k * 4096);
    }
    script.push_str(
        "sync; echo \"STATUS $(dmsetup status snapvg-snap)\"\n\
         lvm_c vgchange -an snapvg || exit 12\nexit $bad\n",
    );
    let console = run_lvm_guest(&lab, &kernel, &[&a], &a, &[], "dm_snapshot", &script);
    // dm reports a valid snapshot: "snapshot <used>/<total> <metadata>".
    let status = console
        .lines()
        .find(|l| l.starts_with("STATUS "))
        .unwrap_or_else(|| panic!("no status:\n{console}"));
    assert!(
        status.contains(" snapshot ") && !status.contains("Invalid"),
        "{status}"
    );

    // Host: the COW store as devpool reads it.
    let view = DevpoolView::read(&lab, &devs, "snapvg");
    let (path, cow_at) = view.place("snap", 0);
    let bytes = std::fs::read(&path).unwrap();
    let cow = &bytes[cow_at as usize..cow_at as usize + (4 << 20)];
    let h = CowHeader::parse(cow).unwrap().expect("header");
    assert!(h.valid);
    assert_eq!(h.chunk_sectors, 8);
    let layout = CowLayout {
        chunk_sectors: 8,
        chunks: (4 << 20) / 4096,
    };
    let table = ExceptionTable::load(&layout, |area| {
        let at = (layout.area_location(area).unwrap() * 4096) as usize;
        Ok(cow[at..at + 4096].to_vec())
    })
    .unwrap();
    let olds: Vec<u64> = table.map.keys().copied().collect();
    assert_eq!(olds, (0..8).collect::<Vec<u64>>(), "{table:?}");
    for (old, new) in &table.map {
        let at = (*new * 4096) as usize;
        let want = format!("old {old}");
        assert_eq!(&cow[at..at + want.len()], want.as_bytes());
    }
    for k in 0..8u64 {
        let want = format!("new {k}");
        assert_eq!(view.read_record("origin", k * 4096, want.len()), want);
    }
}

/// The byte every chunk of the test holds, as an octal escape for the guest.
fn oct(b: u8) -> String {
    format!("{b:03o}")
}

#[test]
fn guest_dm_snapshot_and_devpool_read_each_others_copy_outs_and_merge_restores() {
    use common::serving::{Server, Sleeper, block_holds, need_tools, window_of};
    let t = "guest_dm_snapshot_and_devpool_read_each_others_copy_outs_and_merge_restores";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    if need_tools(t, &["qemu-io"]) {
        return;
    }
    let lab = Lab::new();
    let pool = "snapg";
    let img = image_pool(&lab, pool);
    let owner = Sleeper::new();
    let lease = lab.dp_json(
        &[&img],
        &[
            "--pool",
            pool,
            "lease",
            "acquire",
            "--volumes",
            "test:16M",
            "--owner-pid",
            &owner.pid(),
        ],
    );
    let lv = first_lv(&lease);
    let (off, _) = window_of(lease["devices"][0]["device"].as_str().unwrap());
    // Old data: chunk k holds byte 0x10+k.
    let old = |k: u64| 0x10 + k as u8;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for k in 0..32u64 {
            f.write_all_at(&[old(k); 4096], off + k * 4096).unwrap();
        }
        f.sync_all().unwrap();
    }
    lab.dp(
        &[&img],
        &[
            "--pool", pool, "snapshot", "create", &lv, "--name", "snap", "--size", "4M",
        ],
    );
    // The host's data plane overwrites chunks 0..8 of the origin.
    let sock = lab.path("o.sock");
    let srv = Server::start(
        &lab,
        pool,
        &[&lv, "--nbd", &format!("unix:{}", sock.display())],
    );
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for k in 0..8u64 {
        cmd.arg("-c")
            .arg(format!("write -P {:#04x} {} 4096", 0xa0 + k, k * 4096));
    }
    cmd.arg(common::serving::uri(&sock));
    assert!(cmd.status().unwrap().success());
    drop(srv);

    // The guest: dm-snapshot reads devpool's exceptions, then adds its own
    // (origin chunks 8..16 overwritten) and writes chunk 20 of the snapshot.
    let vg = format!("devpool-{pool}");
    let (o, s) = (format!("/dev/{vg}/{lv}"), format!("/dev/{vg}/snap"));
    let mut script = format!("{DM_GUEST_HELPERS}{RECORD_HELPERS}");
    let _ = writeln!(script, "lvm_c vgchange -ay {vg} || exit 10");
    for k in 0..32u64 {
        let now = if k < 8 { 0xa0 + k as u8 } else { old(k) };
        let _ = writeln!(script, "chk {s} {k} {}", oct(old(k)));
        let _ = writeln!(script, "chk {o} {k} {}", oct(now));
    }
    for k in 8..16u64 {
        let _ = writeln!(script, "fill {o} {k} {}", oct(0xc0 + k as u8));
    }
    let _ = writeln!(script, "fill {s} 20 {}", oct(0xee));
    for k in 0..32u64 {
        let snap = if k == 20 { 0xee } else { old(k) };
        let _ = writeln!(script, "chk {s} {k} {}", oct(snap));
    }
    script.push_str("sync; echo \"STATUS $(dmsetup status | grep ' snapshot ')\"\n");
    let _ = writeln!(script, "lvm_c vgchange -an {vg} || exit 12\nexit $bad");
    let console = run_lvm_guest(&lab, &kernel, &[&img], &img, &[], "dm_snapshot", &script);
    let status = console
        .lines()
        .find(|l| l.starts_with("STATUS "))
        .unwrap_or_else(|| panic!("no status:\n{console}"));
    assert!(!status.contains("Invalid"), "{status}");

    // The host: devpool's snapshot server reads dm's exceptions and its own.
    let st = lab.dp_json(&[&img], &["--pool", pool, "pool", "status"]);
    assert_eq!(
        st["snapshots"][0]["usage"]["used_chunks"].as_u64(),
        Some(8 + 8 + 1),
        "{st}"
    );
    let ssock = lab.path("s.sock");
    let srv = Server::start(
        &lab,
        pool,
        &["snap", "--nbd", &format!("unix:{}", ssock.display())],
    );
    for k in 0..32u64 {
        let want = if k == 20 { 0xee } else { old(k) };
        assert!(block_holds(&ssock, k, want), "snapshot chunk {k}");
    }
    drop(srv);
    // Merge: the origin is the snapshot again (with the guest's write to it).
    let m = lab.dp_json(
        &[&img],
        &["--pool", pool, "--yes", "snapshot", "merge", "snap"],
    );
    let dev = m["deleted"]["reattached"]
        .as_str()
        .expect("loop device back");
    let mut f = std::fs::File::open(dev).unwrap();
    let mut chunk = vec![0u8; 4096];
    for k in 0..32u64 {
        f.read_exact(&mut chunk).unwrap();
        let want = if k == 20 { 0xee } else { old(k) };
        assert!(chunk.iter().all(|&b| b == want), "merged chunk {k}");
    }
    assert_no_qemu_left(&lab);
}
