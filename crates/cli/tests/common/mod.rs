//! Test harness for tests that use real loop devices, real LVM2 and the real
//! `devpool` binary. Without root, `losetup` or `lvm`, such tests print
//! `SKIPPED: <why>` — unless `DEVPOOL_REQUIRE_REAL_TESTS=1` or `CI=true` (as on
//! CI), which turns a missing capability into a failure.
#![allow(dead_code)]

pub mod guest;
pub mod serving;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

pub const LVM_CONFIG: &str = "global{activation=0} backup{backup=0 archive=0} \
devices{obtain_device_list_from_udev=0 use_devicesfile=0 md_component_detection=0 multipath_component_detection=0 fw_raid_component_detection=0}";

/// Why real-device tests cannot run here, if they cannot.
pub fn missing_capability() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (loop devices and LVM2 need root)".into());
    }
    for tool in ["losetup", "lvm"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).exists()
            || Path::new("/sbin").join(tool).exists();
        if !found {
            return Some(format!(
                "'{tool}' is not installed (apt-get install lvm2 util-linux)"
            ));
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop devices unavailable)".into());
    }
    None
}

/// Returns true (and says so) when the test must be skipped.
pub fn skip_unless_real(test: &str) -> bool {
    match missing_capability() {
        None => false,
        Some(why) => {
            // CI must run them: there a missing capability is a failure.
            if std::env::var("DEVPOOL_REQUIRE_REAL_TESTS").as_deref() == Ok("1")
                || std::env::var("CI").as_deref() == Ok("true")
            {
                panic!("{test}: required real-device test cannot run: {why}");
            }
            eprintln!("SKIPPED: {test}: {why}");
            true
        }
    }
}

static LOSETUP: Mutex<()> = Mutex::new(());

/// A loop device, detached (by its own path) when dropped.
pub struct Loop {
    pub dev: PathBuf,
    pub image: PathBuf,
}

impl Loop {
    pub fn attach(image: &Path) -> Loop {
        let _g = LOSETUP.lock().unwrap_or_else(|p| p.into_inner());
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop {
            dev,
            image: image.to_path_buf(),
        }
    }
    /// Drop the loop device's caches after the backing file was rewritten.
    pub fn flush(&self) {
        let _ = Command::new("blockdev")
            .arg("--flushbufs")
            .arg(&self.dev)
            .status();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _g = LOSETUP.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The devpool binary with its state in `state_dir` (and no fault injection).
pub fn devpool_command(state_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_devpool"));
    c.env("DEVPOOL_STATE_DIR", state_dir)
        .env_remove("DEVPOOL_FAULT_CRASH_AFTER_WRITES");
    c
}

/// A scratch directory with sparse images, a devpool state dir, and helpers.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub loops: Vec<Loop>,
}

/// Detach every loop device whose backing file satisfies `ours`. The device
/// is opened before its backing file is read: a device bound while we hold
/// it cannot be unbound and given to another test's file until we close it,
/// so a device freed and re-taken meanwhile is never detached by mistake
/// (`losetup -d` by name after a listing would race exactly like that).
pub fn detach_loops_where(ours: impl Fn(&Path, &Path) -> bool) {
    use std::os::fd::AsRawFd;
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        let Ok(f) = std::fs::File::open(&dev) else {
            continue;
        };
        let backing =
            std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if !backing.trim().is_empty() && ours(&dev, Path::new(backing.trim())) {
            // SAFETY: LOOP_CLR_FD takes no argument; f is an open loop device.
            unsafe {
                libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD);
            }
        }
    }
}

impl Drop for Lab {
    /// Loop devices a failed test left stacked on the lab's devices or images
    /// (a lease's devices over a pool PV) go first, so nothing stays attached.
    fn drop(&mut self) {
        let _g = LOSETUP.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.dir.path().to_path_buf();
        let mine: Vec<(PathBuf, PathBuf)> = self
            .loops
            .iter()
            .map(|l| (l.dev.clone(), l.image.clone()))
            .collect();
        detach_loops_where(|dev, backing| {
            // Over files in the lab (pools on image files), or stacked on the
            // lab's own loop devices and images (but not those themselves).
            backing.starts_with(&dir) && !mine.iter().any(|(d, _)| d == dev)
                || mine
                    .iter()
                    .any(|(d, img)| dev != d && (backing == d || backing == img))
        });
        // A FUSE mount a failed test's killed server left in the lab (its
        // directory cannot be removed under it): lazily unmounted.
        for m in devpool_pool::sysblk::mounts() {
            if Path::new(&m.mountpoint).starts_with(&dir)
                && let Ok(c) = std::ffi::CString::new(m.mountpoint)
            {
                // SAFETY: a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Lab {
    pub fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("devpool-test-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        Lab { dir, loops: vec![] }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::File::create(&p).expect("create image");
        f.set_len(mib << 20).expect("size image");
        p
    }
    /// A sparse image attached as a loop device; returns the device path.
    pub fn loop_dev(&mut self, name: &str, mib: u64) -> PathBuf {
        let img = self.image(name, mib);
        let l = Loop::attach(&img);
        let d = l.dev.clone();
        self.loops.push(l);
        d
    }
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Run devpool with `--devices` set to `devices`.
    pub fn devpool(&self, devices: &[&Path], args: &[&str]) -> Output {
        self.devpool_env(devices, args, &[])
    }
    pub fn devpool_env(&self, devices: &[&Path], args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = devpool_command(&self.state_dir());
        let list: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
        if !list.is_empty() {
            c.arg("--devices").arg(list.join(","));
        }
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run devpool")
    }
    /// devpool that must succeed; returns stdout.
    pub fn dp(&self, devices: &[&Path], args: &[&str]) -> String {
        let o = self.devpool(devices, args);
        assert!(
            o.status.success(),
            "devpool {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// `pool setup` of pool `pool` on a new sparse image `file` of `size` in
    /// the lab (`extra`: more setup arguments, e.g. `--thin`); the image.
    pub fn image_pool(&self, file: &str, pool: &str, size: &str, extra: &[&str]) -> PathBuf {
        let img = self.path(file);
        let path = img.display().to_string();
        let mut args = vec![
            "pool",
            "setup",
            path.as_str(),
            "--name",
            pool,
            "--image-size",
            size,
            "--yes",
        ];
        args.extend_from_slice(extra);
        self.dp(&[&img], &args);
        img
    }
    /// devpool that must fail; returns stderr.
    pub fn dp_err(&self, devices: &[&Path], args: &[&str]) -> String {
        let o = self.devpool(devices, args);
        assert!(
            !o.status.success(),
            "devpool {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }
    pub fn dp_json(&self, devices: &[&Path], args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.dp(devices, &a)).expect("devpool JSON")
    }
}

/// Run an LVM2 command restricted to `devices`, in metadata-only mode.
pub fn lvm(devices: &[&Path], args: &[&str]) -> Output {
    let list: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
    Command::new("lvm")
        .args(args)
        .arg("--devices")
        .arg(list.join(","))
        .arg("--config")
        .arg(LVM_CONFIG)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .expect("run lvm")
}

pub fn lvm_ok(devices: &[&Path], args: &[&str]) -> String {
    let o = lvm(devices, args);
    assert!(
        o.status.success(),
        "lvm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `lvm <report> --reportformat json` rows (values are strings, sizes in bytes).
pub fn lvm_report(devices: &[&Path], report: &str, fields: &str) -> Vec<Value> {
    let key = report.trim_end_matches('s');
    let out = lvm_ok(
        devices,
        &[
            report,
            "-a",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ],
    );
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lvm {report} JSON: {e}\n{out}"));
    v["report"][0][key].as_array().cloned().unwrap_or_default()
}

pub fn vgck(devices: &[&Path], vg: &str) -> (bool, String) {
    let o = lvm(devices, &["vgck", vg]);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The host device of `role` in a `lease acquire --json` answer.
pub fn device_of(lease: &Value, role: &str) -> String {
    lease["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["role"] == role)
        .and_then(|d| d["device"].as_str())
        .expect("the role's device")
        .to_string()
}

/// Bytes a file occupies on its filesystem (not its apparent size).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

pub fn num(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().expect("u64"),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        other => panic!("not a number: {other}"),
    }
}

/// The LV name of a lease's first volume (`lease acquire --json`).
pub fn first_lv(lease: &Value) -> String {
    lease["devices"][0]["lv"]
        .as_str()
        .unwrap_or_else(|| panic!("no volume in {lease}"))
        .to_string()
}

/// A unique VG name per test run (LVM2's lock files are per VG name).
pub fn vg_name(base: &str) -> String {
    format!("dpt{}_{base}", std::process::id())
}

/// Compare devpool's and LVM2's view of every PV, the VG and every segment.
pub fn assert_reports_agree(lab: &Lab, devs: &[&Path], vg: &str) {
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
    let fields = "vg_name,lv_name,lv_uuid,lv_size,lv_tags,segtype,seg_start_pe,seg_size_pe,stripes,stripe_size,devices";
    let lv_segs = lvm_report(devs, "lvs", fields);
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
        assert_eq!(
            num(&seg["seg_size_pe"]),
            num(&ls["seg_size_pe"]),
            "{name} segment size"
        );
        compared += 1;
        if !matches!(ls["segtype"].as_str(), Some("linear" | "striped")) {
            continue; // kept verbatim; LVM2 reports its sub-LVs as devices
        }
        assert_eq!(num(&seg["stripes"]), num(&ls["stripes"]), "{name} stripes");
        assert_eq!(
            num(&seg["stripe_size"]),
            num(&ls["stripe_size"]),
            "{name} stripe size"
        );
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
    }
    // LVM2 never lists the hidden snapshotN LVs of old-style snapshots.
    let dp_seg_count: usize = dp_lvs["lvs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["segments"].as_array().unwrap())
        .filter(|s| s["segtype"] != "snapshot")
        .count();
    let rows: Vec<String> = lv_segs
        .iter()
        .map(|r| format!("{}:{}:{}", r["lv_name"], r["segtype"], r["seg_start_pe"]))
        .collect();
    assert_eq!(
        compared, dp_seg_count,
        "LVM2 and devpool list the same segments: {rows:?}"
    );
}

/// After a run on pool `pool` (VG `devpool-<pool>` on `dev`): no volumes
/// left, all the space back (`start_free`), no loop device over `dev`, and
/// LVM2's `vgck` content with the VG.
pub fn assert_nothing_leaked(lab: &Lab, pool: &str, start_free: &Value, dev: &Path) {
    let st = lab.dp_json(&[], &["--pool", pool, "pool", "status"]);
    assert_eq!(st["volumes"], 0, "{st}");
    assert_eq!(&st["free_bytes"], start_free);
    let loops = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "BACK-FILE"])
        .output()
        .expect("losetup --list");
    let d = dev.display().to_string();
    assert!(
        !String::from_utf8_lossy(&loops.stdout)
            .lines()
            .any(|l| l.trim() == d),
        "loop devices left over {d}"
    );
    let (good, why) = vgck(&[dev], &format!("devpool-{pool}"));
    assert!(good, "vgck: {why}");
}

/// The `initialize` request of a minimal MCP client, for tests that speak
/// JSON-RPC to `devpool mcp` line by line.
pub fn mcp_initialize(id: u64) -> Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}})
}

/// The notification a client sends once `initialize` is answered.
pub fn mcp_initialized() -> Value {
    serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
}

/// A program holding block device `dev` open: exclusively (`O_EXCL`, as a
/// mount or a claim holds it) or merely open (as a `dd` or a QEMU has it);
/// killed (by its PID) when dropped.
pub struct DeviceHolder(std::process::Child);

/// A block device node at `node` (outside /dev) for the device `dev`, as
/// `mknod` makes one.
pub fn node_outside_dev(dev: &Path, node: &Path) {
    let made = Command::new("python3")
        .args([
            "-c",
            "import os,stat,sys; os.mknod(sys.argv[2], stat.S_IFBLK|0o600, os.stat(sys.argv[1]).st_rdev)",
        ])
        .arg(dev)
        .arg(node)
        .status()
        .expect("python3");
    assert!(made.success(), "mknod {}", node.display());
}

impl DeviceHolder {
    pub fn exclusive(dev: &str) -> DeviceHolder {
        DeviceHolder::spawn(dev, "os.O_RDONLY|os.O_EXCL")
    }

    pub fn open(dev: &str) -> DeviceHolder {
        DeviceHolder::spawn(dev, "os.O_RDWR")
    }

    fn spawn(dev: &str, flags: &str) -> DeviceHolder {
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import os,sys,time; fd=os.open(sys.argv[1], {flags}); print('held', flush=True); time.sleep(60)"
                ),
                dev,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = [0u8; 4];
        std::io::Read::read_exact(child.stdout.as_mut().expect("piped"), &mut line)
            .expect("the holder opened the device");
        DeviceHolder(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for DeviceHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
