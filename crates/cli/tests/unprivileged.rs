//! devpool without root (as `nobody`, through `setpriv`): a pool on an image
//! file the user owns, leases without loop devices, volumes served over NBD
//! (by `serve` and by `run --export nbd`), state and locks in the user's
//! own directories. The data lands where LVM2 says.

mod common;
use common::serving::need_tools;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const NOBODY: u32 = 65534;

/// `devpool ARGS` as nobody, with `home` as its HOME and XDG_STATE_HOME's
/// parent (no DEVPOOL_STATE_DIR, no XDG_RUNTIME_DIR).
fn as_nobody(home: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
        env!("CARGO_BIN_EXE_devpool"),
    ])
    .env_remove("DEVPOOL_STATE_DIR")
    .env_remove("DEVPOOL_DEVICES")
    .env_remove("DEVPOOL_POOL")
    .env_remove("XDG_RUNTIME_DIR")
    .env("HOME", home)
    .env("XDG_STATE_HOME", home.join("state"))
    .env("LVM_SUPPRESS_FD_WARNINGS", "1")
    .current_dir(home);
    c
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn without_root_a_pool_on_the_users_image_leases_and_serves_volumes_over_nbd() {
    let t = "without_root_a_pool_on_the_users_image_leases_and_serves_volumes_over_nbd";
    if skip_unless_real(t) || need_tools(t, &["setpriv", "nbdinfo", "qemu-io"]) {
        return;
    }
    let mut lab = Lab::new();
    // The lab is root's (0700): let nobody through to a home of its own.
    std::fs::set_permissions(lab.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = lab.path("nobody");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let img = home.join("pool.img");
    let run = |args: &[&str]| as_nobody(&home).args(args).output().unwrap();

    ok(
        run(&[
            "pool",
            "setup",
            "pool.img",
            "--image-size",
            "256M",
            "--name",
            "u",
            "--yes",
        ]),
        "pool setup",
    );
    assert!(
        home.join("state/devpool/pools/u.json").exists(),
        "the state lives under XDG_STATE_HOME"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().uid(), NOBODY);

    // A lease: volumes, no loop devices, and a note saying how to reach them.
    let o = run(&["--pool", "u", "lease", "acquire", "--volumes", "a:8M"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = ok(o, "lease acquire");
    assert!(err.contains("may not attach loop devices"), "{err}");
    let session = out
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .unwrap()
        .trim()
        .to_string();
    let lv = out
        .lines()
        .find(|l| l.starts_with("a "))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_string();
    assert!(out.contains("a - "), "no loop device: {out}");
    // The JSON (and so the MCP tool's answer) carries the same note.
    let o = run(&[
        "--pool",
        "u",
        "--json",
        "lease",
        "acquire",
        "--volumes",
        "b:4M",
    ]);
    let j: serde_json::Value = serde_json::from_str(&ok(o, "lease acquire --json")).unwrap();
    assert!(j["devices"][0].get("device").is_none(), "{j}");
    assert!(
        j["notes"][0].as_str().unwrap().contains("devpool serve"),
        "{j}"
    );
    ok(
        run(&[
            "--pool",
            "u",
            "lease",
            "release",
            j["session"].as_str().unwrap(),
        ]),
        "release b",
    );

    // Served over NBD by the user's own server.
    let sock = home.join("a.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut srv = as_nobody(&home)
        .args(["--pool", "u", "serve", &lv, "--nbd"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed().as_secs() < 20, "the server never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let size = ok(
        Command::new("nbdinfo")
            .args(["--size", &uri])
            .output()
            .unwrap(),
        "nbdinfo",
    );
    assert_eq!(size.trim(), "8388608");
    ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 4096 1M",
                "-c",
                "flush",
                &uri,
            ])
            .output()
            .unwrap(),
        "qemu-io write",
    );
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(srv.id() as i32, libc::SIGTERM) };
    assert!(
        srv.wait().unwrap().success(),
        "the server exits 0 on SIGTERM"
    );

    // LVM2 (root, through a loop device) agrees on the VG and on
    // where the volume is: the bytes are there.
    let l = Loop::attach(&img);
    let dev = l.dev.clone();
    lab.loops.push(l);
    let (good, why) = vgck(&[&dev], "devpool-u");
    assert!(good, "vgck: {why}");
    let seg = lvm_report(&[&dev], "lvs", "lv_name,seg_pe_ranges")
        .into_iter()
        .find(|r| r["lv_name"] == lv.as_str())
        .unwrap();
    let pe_start = num(&lvm_report(&[&dev], "pvs", "pe_start")[0]["pe_start"]);
    let first_pe: u64 = seg["seg_pe_ranges"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let at = pe_start + first_pe * (4 << 20) + 4096;
    let mut buf = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&img).unwrap(), &mut buf, at)
        .unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x5a),
        "the data is where LVM2 says"
    );

    // `run` needs an export here, and gets one.
    let o = run(&["--pool", "u", "run", "--volumes", "test:4M", "--", "true"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--export nbd"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = ok(
        run(&[
            "--pool",
            "u",
            "run",
            "--volumes",
            "test:4M",
            "--export",
            "nbd",
            "--",
            "sh",
            "-c",
            "nbdinfo --size \"$DEVPOOL_NBD_TEST\"; echo TEST_DEV=${TEST_DEV-unset}",
        ]),
        "run --export nbd",
    );
    assert!(
        out.contains("4194304") && out.contains("TEST_DEV=unset"),
        "{out}"
    );

    ok(
        run(&["--pool", "u", "lease", "release", &session]),
        "release",
    );
    ok(run(&["pool", "teardown", "u", "--yes"]), "teardown");
    // Locks in a directory of nobody's own (no XDG_RUNTIME_DIR here), and
    // none left held.
    let locks = PathBuf::from(format!("/tmp/devpool-locks-{NOBODY}"));
    let m = std::fs::symlink_metadata(&locks).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (NOBODY, 0o700));
    assert_eq!(std::fs::read_dir(&locks).unwrap().count(), 0);
    // Nothing of root's in nobody's home.
    for e in walk(&home) {
        assert_eq!(
            std::fs::symlink_metadata(&e).unwrap().uid(),
            NOBODY,
            "{}",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
