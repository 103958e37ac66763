//! Snapshots through the data plane, with real clients: `devpool snapshot
//! create` on a leased volume (its loop device detached), the origin served
//! over NBD copies each chunk out before writing it, the snapshot served over
//! NBD shows the old data (and takes writes of its own), `snapshot merge`
//! rolls the origin back, a full COW store invalidates the snapshot while the
//! origin keeps working, and the paths that would bypass copy-on-write are
//! refused. Neighbouring volumes keep their sentinel bytes throughout.

mod common;
use common::serving::*;
use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Fill volume b of the bench with `data` through the pool image.
fn fill_b(b: &Bench, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&b.image)
        .unwrap();
    f.write_all_at(data, b.windows[1].0).unwrap();
    f.sync_all().unwrap();
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn stop(srv: Server) {
    // SAFETY: signalling the server we started, by its pid.
    unsafe { libc::kill(srv.pid(), libc::SIGTERM) };
    let (st, err) = srv.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "server: {err}");
}

/// `devpool serve LV --nbd` on a socket named `sock` in the lab.
fn serve(b: &Bench, pool: &str, lv: &str, sock: impl AsRef<Path>) -> (Server, std::path::PathBuf) {
    let path = b.lab.path(&sock.as_ref().display().to_string());
    let srv = Server::start(
        &b.lab,
        pool,
        &[lv, "--nbd", &format!("unix:{}", path.display())],
    );
    (srv, path)
}

fn snapshots(b: &Bench, pool: &str) -> Vec<Value> {
    let st = b.lab.dp_json(&[], &["--pool", pool, "pool", "status"]);
    st["snapshots"].as_array().unwrap().clone()
}

#[test]
fn a_served_origin_copies_out_the_snapshot_keeps_old_data_and_merge_rolls_back() {
    if need_tools("snapshot serve", &["nbdcopy", "qemu-io"]) {
        return;
    }
    let pool = "snapserve";
    let b = Bench::new(pool, 16);
    let old = pattern(16 * MIB as usize, 7);
    fill_b(&b, &old);
    let origin = b.lv(1);
    let loopdev = b.lease["devices"][1]["device"]
        .as_str()
        .unwrap()
        .to_string();
    let c = b.lab.dp_json(
        &[],
        &[
            "--pool", pool, "snapshot", "create", &origin, "--name", "before", "--size", "8M",
        ],
    );
    assert_eq!(c["detached"][0].as_str(), Some(loopdev.as_str()), "{c}");
    assert_eq!(c["lease"], b.lease["session"], "{c}");
    assert_eq!(c["chunk_bytes"].as_u64(), Some(4096));
    let gone = Path::new("/sys/block")
        .join(Path::new(&loopdev).file_name().unwrap())
        .join("loop");
    assert!(!gone.exists(), "{loopdev} is still attached");
    let s = snapshots(&b, pool);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["origin"].as_str(), Some(origin.as_str()));
    assert_eq!(s[0]["usage"]["used_chunks"].as_u64(), Some(0));
    assert_eq!(s[0]["usage"]["valid"], Value::Bool(true));

    // Writes through the origin's server: whole chunks, a range across a
    // chunk boundary at odd offsets, zeroes, a discard.
    let (srv, sock) = serve(&b, pool, &origin, "origin.sock");
    qemu_io_ok(
        &sock,
        &[
            "write -P 0xab 0 1048576",
            "write -P 0xcd 1048575 3000",
            "write -z 8388608 65536",
            "discard 12582912 65536",
            "flush",
        ],
    );
    let mut now = old.clone();
    now[..MIB as usize].fill(0xab);
    now[MIB as usize - 1..MIB as usize - 1 + 3000].fill(0xcd);
    now[8 * MIB as usize..8 * MIB as usize + 65536].fill(0);
    let discarded = 12 * MIB as usize..12 * MIB as usize + 65536;
    let seen = read_all(&sock, &b.lab.path("origin.now"));
    // A discarded range reads as anything; everything else as written.
    let mut cmp = seen.clone();
    cmp[discarded.clone()].copy_from_slice(&now[discarded.clone()]);
    assert_eq!(first_difference(&cmp, &now), None, "origin contents");
    stop(srv);

    // 256 chunks of the first MiB, one more for the range across it, 16 for
    // the zeroes and 16 for the discard were copied out, each once.
    let s = snapshots(&b, pool);
    assert_eq!(
        s[0]["usage"]["used_chunks"].as_u64(),
        Some(256 + 1 + 16 + 16)
    );

    // The snapshot shows the old data, and takes writes of its own.
    let (srv, ssock) = serve(&b, pool, "before", "snap.sock");
    let snap = read_all(&ssock, &b.lab.path("snap.now"));
    assert_eq!(first_difference(&snap, &old), None, "snapshot contents");
    qemu_io_ok(
        &ssock,
        &[
            "write -P 0x11 102400 4096",
            "read -P 0x11 102400 4096",
            "write -P 0x12 4194309 10",
            "read -P 0x12 4194309 10",
        ],
    );
    stop(srv);
    let mut expect = old.clone();
    expect[102400..102400 + 4096].fill(0x11);
    expect[4194309..4194319].fill(0x12);
    // The snapshot's own write to an uncopied chunk took one more chunk.
    let s = snapshots(&b, pool);
    assert_eq!(
        s[0]["usage"]["used_chunks"].as_u64(),
        Some(256 + 1 + 16 + 16 + 1)
    );

    // Merge: the origin becomes the snapshot, the snapshot goes, the lease's
    // loop device comes back.
    let m = b.lab.dp_json(
        &[],
        &["--pool", pool, "--yes", "snapshot", "merge", "before"],
    );
    assert_eq!(m["chunks"].as_u64(), Some(290), "{m}");
    let dev = m["deleted"]["reattached"]
        .as_str()
        .expect("loop device back");
    let mut back = vec![0u8; 16 * MIB as usize];
    std::fs::File::open(dev)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(first_difference(&back, &expect), None, "merged origin");
    assert!(snapshots(&b, pool).is_empty());
    b.assert_neighbours_intact();
}

#[test]
fn fio_verifies_on_a_snapshotted_origin_and_the_snapshot_keeps_its_data() {
    if need_tools("snapshot fio", &["fio", "nbdcopy"]) {
        return;
    }
    let pool = "snapfio";
    let b = Bench::new(pool, 16);
    let old = pattern(16 * MIB as usize, 9);
    fill_b(&b, &old);
    let origin = b.lv(1);
    b.lab.dp(
        &[],
        &[
            "--pool", pool, "snapshot", "create", &origin, "--name", "s1", "--size", "20M",
        ],
    );
    // A second snapshot with bigger chunks: each write copies out to both.
    b.lab.dp(
        &[],
        &[
            "--pool",
            pool,
            "snapshot",
            "create",
            &origin,
            "--name",
            "s2",
            "--size",
            "20M",
            "--chunk-size",
            "64K",
        ],
    );
    let (srv, sock) = serve(&b, pool, &origin, "o.sock");
    let out = run_ok(Command::new("fio").args([
        "--name=cow",
        "--ioengine=nbd",
        &format!("--uri={}", uri(&sock)),
        // Two connections, each on its own half.
        "--size=8M",
        "--offset_increment=8M",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=2",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    for job in v["jobs"].as_array().unwrap() {
        assert_eq!(job["error"].as_u64(), Some(0), "{job}");
    }
    stop(srv);
    for name in ["s1", "s2"] {
        let (srv, s) = serve(&b, pool, name, format!("{name}.sock"));
        let snap = read_all(&s, &b.lab.path(&format!("{name}.img")));
        assert_eq!(first_difference(&snap, &old), None, "snapshot {name}");
        stop(srv);
    }
    b.assert_neighbours_intact();
}

#[test]
fn a_full_cow_store_invalidates_the_snapshot_and_the_origin_keeps_working() {
    if need_tools("snapshot full", &["qemu-io"]) {
        return;
    }
    let pool = "snapfull";
    let b = Bench::new(pool, 16);
    let origin = b.lv(1);
    // One 4 MiB extent: 1019 data chunks of 4 KiB.
    b.lab.dp(
        &[],
        &[
            "--pool", pool, "snapshot", "create", &origin, "--name", "small", "--size", "4M",
        ],
    );
    let (srv, sock) = serve(&b, pool, &origin, "o.sock");
    qemu_io_ok(
        &sock,
        &["write -P 0x77 0 8388608", "read -P 0x77 0 8388608"],
    );
    stop(srv);
    let st = b.lab.dp_json(&[], &["--pool", pool, "pool", "status"]);
    let s = &st["snapshots"][0];
    assert_eq!(s["usage"]["valid"], Value::Bool(false), "{st}");
    let health = st["health"].to_string();
    assert!(health.contains("snapshot small is invalid"), "{health}");
    let text = b.lab.dp(&[], &["--pool", pool, "snapshot", "list"]);
    assert!(text.contains("INVALID"), "{text}");
    // The snapshot fails its reads; merging it is refused.
    let (srv, ssock) = serve(&b, pool, "small", "s.sock");
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4096", &uri(&ssock)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    stop(srv);
    let err = b.lab.dp_err(
        &[],
        &["--pool", pool, "--yes", "snapshot", "merge", "small"],
    );
    assert!(err.contains("invalid"), "{err}");
    b.lab
        .dp(&[], &["--pool", pool, "snapshot", "delete", "small"]);
    b.assert_neighbours_intact();
}

#[test]
fn paths_that_would_bypass_copy_on_write_are_refused() {
    if need_tools("snapshot refusals", &["nbdinfo"]) {
        return;
    }
    let pool = "snaprefuse";
    let b = Bench::new(pool, 16);
    let origin = b.lv(1);
    let loopdev = b.lease["devices"][1]["device"]
        .as_str()
        .unwrap()
        .to_string();
    // The loop device is open: detaching it would leave the holder writing
    // past copy-on-write.
    let holder = Command::new("sh")
        .args(["-c", &format!("exec sleep 600 < {loopdev}")])
        .spawn()
        .unwrap();
    // Wait until the shell has the device open (a fixed pause can be too
    // short on a loaded machine).
    let fd0 = format!("/proc/{}/fd/0", holder.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_link(&fd0)
        .map(|p| p.display().to_string())
        .ok()
        != Some(loopdev.clone())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never opened {loopdev}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let create = [
        "--pool", pool, "snapshot", "create", &origin, "--name", "s", "--size", "4M",
    ];
    let err = b.lab.dp_err(&[], &create);
    assert!(
        err.contains(&loopdev) && err.contains(&format!("open in process {} (sleep)", holder.id())),
        "{err}"
    );
    let mut holder = holder;
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(snapshots(&b, pool).is_empty());
    // The refused create left the device attached, and not marked to be
    // cleared at its holder's last close (which has happened now).
    let sys = format!(
        "/sys/block/{}/loop",
        Path::new(&loopdev).file_name().unwrap().to_string_lossy()
    );
    let autoclear = std::fs::read_to_string(format!("{sys}/autoclear"))
        .unwrap_or_else(|e| panic!("{loopdev} was detached by a refused snapshot: {e}"));
    assert_eq!(autoclear.trim(), "0", "{loopdev} is marked to go");

    // A server that does not know the snapshot serves the origin.
    let (srv, _) = serve(&b, pool, &origin, "o.sock");
    let err = b.lab.dp_err(&[], &create);
    assert!(err.contains(&format!("process {}", srv.pid())), "{err}");
    stop(srv);
    // Opened for a moment (as udev's blkid opens a device after a change)
    // by a process that lives on: the create waits it out.
    let mut blip = Command::new("python3")
        .args([
            "-c",
            "import os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); print('open', flush=True); time.sleep(0.2); os.close(fd); time.sleep(60)",
            &loopdev,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 4];
    std::io::Read::read_exact(blip.stdout.as_mut().unwrap(), &mut line).unwrap();
    let created = devpool_command(&b.lab.state_dir())
        .args(create)
        .output()
        .unwrap();
    let _ = blip.kill();
    let _ = blip.wait();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    // Origin served: the snapshot may not be served by another process,
    // nor merged, nor deleted.
    let (srv, _) = serve(&b, pool, &origin, "o.sock");
    let s2 = b.lab.path("s.sock");
    let o = devpool_command(&b.lab.state_dir())
        .args(["--pool", pool, "serve", "s", "--nbd"])
        .arg(format!("unix:{}", s2.display()))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("serve them one at a time"), "{err}");
    let busy = format!("process {}", srv.pid());
    let err = b
        .lab
        .dp_err(&[], &["--pool", pool, "--yes", "snapshot", "merge", "s"]);
    assert!(err.contains(&busy), "{err}");
    let err = b
        .lab
        .dp_err(&[], &["--pool", pool, "snapshot", "delete", "s"]);
    assert!(err.contains(&busy) && err.contains("being served"), "{err}");
    stop(srv);

    // A snapshot of a snapshot, a snapshot that does not exist, no --yes.
    let err = b.lab.dp_err(
        &[],
        &["--pool", pool, "snapshot", "create", "s", "--name", "t"],
    );
    assert!(err.contains("is itself a snapshot"), "{err}");
    let err = b
        .lab
        .dp_err(&[], &["--pool", pool, "snapshot", "delete", "nosuch"]);
    assert!(err.contains("no snapshot 'nosuch'"), "{err}");
    let err = b
        .lab
        .dp_err(&[], &["--pool", pool, "snapshot", "merge", "s"]);
    assert!(err.contains("--yes"), "{err}");
    // Releasing the lease removes the snapshot with it.
    b.lab
        .dp(&[], &["--pool", pool, "lease", "release", &b.session()]);
    assert!(snapshots(&b, pool).is_empty());
}
