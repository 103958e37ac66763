//! Test harness for tests that use real loop devices, real LVM2 and the real
//! `devpool` binary. Without root, `losetup` or `lvm`, such tests print
//! `SKIPPED: <why>` — unless `DEVPOOL_REQUIRE_REAL_TESTS=1` (set by `.ci/run`),
//! which turns a missing capability into a failure.
#![allow(dead_code)]

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
            if std::env::var("DEVPOOL_REQUIRE_REAL_TESTS").as_deref() == Ok("1") {
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

/// A scratch directory with sparse images, a devpool state dir, and helpers.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub loops: Vec<Loop>,
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
        let mut c = Command::new(env!("CARGO_BIN_EXE_devpool"));
        let list: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
        c.env("DEVPOOL_STATE_DIR", self.state_dir())
            .env_remove("DEVPOOL_FAULT_CRASH_AFTER_WRITES");
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

pub fn num(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().expect("u64"),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        other => panic!("not a number: {other}"),
    }
}

/// A unique VG name per test run (LVM2's lock files are per VG name).
pub fn vg_name(base: &str) -> String {
    format!("dpt{}_{base}", std::process::id())
}
