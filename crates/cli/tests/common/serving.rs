//! Helpers for data-plane tests: a pool on an image file with three leased
//! neighbour volumes holding sentinel bytes, a running `devpool serve`, and
//! client tools.

use super::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Skips (with the reason) when a client tool is missing, unless CI requires it.
pub fn need_tools(test: &str, tools: &[&str]) -> bool {
    if skip_unless_real(test) {
        return true;
    }
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: '{t}' is not installed (.ci/run installs it)");
            }
            eprintln!("SKIPPED: {test}: '{t}' is not installed");
            return true;
        }
    }
    false
}

pub struct Sleeper(pub Child);
impl Sleeper {
    pub fn new() -> Sleeper {
        Sleeper(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep"),
        )
    }
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }
}
impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pool on an image file with three leased neighbours a, b, c; b is the
/// one served, a and c hold sentinels.
pub struct Bench {
    pub lab: Lab,
    pub image: PathBuf,
    pub owner: Sleeper,
    pub lease: Value,
    /// (offset, size) in the image of each volume, in role order a, b, c.
    pub windows: Vec<(u64, u64)>,
}

pub const SENTINEL: u8 = 0x5a;

pub fn window_of(loopdev: &str) -> (u64, u64) {
    let name = Path::new(loopdev)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let off: u64 = std::fs::read_to_string(format!("/sys/block/{name}/loop/offset"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (off, sectors * 512)
}

impl Bench {
    pub fn new(pool: &str, mib: u64) -> Bench {
        let lab = Lab::new();
        let image = lab.image_pool("pool.img", pool, "1G", &[]);
        let owner = Sleeper::new();
        let size = format!("{mib}M");
        let vols = format!("a:{size},b:{size},c:{size}");
        let lease = lab.dp_json(
            &[],
            &[
                "--pool",
                pool,
                "lease",
                "acquire",
                "--volumes",
                &vols,
                "--owner-pid",
                &owner.pid(),
            ],
        );
        let windows: Vec<(u64, u64)> = lease["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| window_of(d["device"].as_str().unwrap()))
            .collect();
        let b = Bench {
            lab,
            image,
            owner,
            lease,
            windows,
        };
        // Sentinels in the neighbours (and in b, to see what the server reads).
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&b.image)
            .unwrap();
        for &(off, size) in &b.windows {
            let buf = vec![SENTINEL; size as usize];
            f.write_all_at(&buf, off).unwrap();
        }
        f.sync_all().unwrap();
        b
    }
    pub fn lv(&self, i: usize) -> String {
        self.lease["devices"][i]["lv"].as_str().unwrap().to_string()
    }
    pub fn session(&self) -> String {
        self.lease["session"].as_str().unwrap().to_string()
    }
    pub fn pool_args<'a>(&'a self, pool: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["--pool", pool];
        a.extend_from_slice(rest);
        a
    }
    /// The neighbours a and c, and the image outside all three, are unchanged.
    pub fn assert_neighbours_intact(&self) {
        let f = std::fs::File::open(&self.image).unwrap();
        for i in [0, 2] {
            let (off, size) = self.windows[i];
            let mut buf = vec![0u8; size as usize];
            f.read_exact_at(&mut buf, off).unwrap();
            if let Some(p) = buf.iter().position(|&x| x != SENTINEL) {
                panic!(
                    "neighbour volume {} changed at byte {p} (image offset {})",
                    self.lv(i),
                    off + p as u64
                );
            }
        }
    }
}

/// A running `devpool serve`; killed by its PID when dropped.
pub struct Server {
    pub child: Child,
    pub line: String,
}

impl Server {
    pub fn start(lab: &Lab, pool: &str, args: &[&str]) -> Server {
        let mut c = devpool_command(&lab.state_dir());
        c.args(["--pool", pool, "serve"]).args(args);
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn devpool serve");
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        let n = BufReader::new(out).read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            let _ = child.wait();
            panic!("devpool serve {args:?} did not start: {err}");
        }
        Server { child, line }
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Wait for the server to exit on its own; returns (status, stderr).
    pub fn wait_exit(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .ok();
                return (st, err);
            }
            assert!(t.elapsed() < limit, "server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// qemu-io on an NBD socket, one `-c` per command: whether it exited 0,
/// and its stdout and stderr together.
fn qemu_io_status<S: AsRef<str>>(sock: &Path, script: &[S]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in script {
        cmd.arg("-c").arg(c.as_ref());
    }
    cmd.arg(uri(sock));
    let o = cmd.output().expect("run qemu-io");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

/// qemu-io's output, whatever happened (for requests expected to fail).
pub fn qemu_io<S: AsRef<str>>(sock: &Path, script: &[S]) -> String {
    qemu_io_status(sock, script).1
}

/// qemu-io that must succeed: exit 0, no failed request, no pattern
/// mismatch, no error.
pub fn qemu_io_ok<S: AsRef<str>>(sock: &Path, script: &[S]) -> String {
    let (ok, out) = qemu_io_status(sock, script);
    assert!(ok, "qemu-io failed: {out}");
    assert!(
        !out.contains("failed") && !out.contains("verification"),
        "{out}"
    );
    assert!(!out.to_lowercase().contains("error"), "{out}");
    out
}

/// Whether 4 KiB block `blk` of the volume behind `sock` holds only `byte`.
pub fn block_holds(sock: &Path, blk: u64, byte: u8) -> bool {
    let (ok, out) = qemu_io_status(sock, &[format!("read -P {byte:#04x} {} 4096", blk * 4096)]);
    ok && !out.contains("failed")
}

/// The whole volume behind an NBD socket, copied through `out`.
pub fn read_all(sock: &Path, out: &Path) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").arg(uri(sock)).arg(out));
    std::fs::read(out).unwrap()
}

pub fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run client");
    assert!(
        o.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deterministic non-repeating test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
