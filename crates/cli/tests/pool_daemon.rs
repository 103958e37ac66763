//! `devpool daemon` through its socket, on a real loop device: concurrent
//! clients get leases whose loop devices never overlap, their requests
//! share commits, the CLI goes through the daemon (and `--no-daemon` does
//! not), the fallbacks (a full pool with an orphan to reap, a release of a
//! lease the daemon never saw) work, nothing leaks and `vgck` passes.

mod common;
use common::serving::{Sleeper, window_of};
use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const CYCLES: usize = 6;

/// A running `devpool daemon`, stopped by SIGTERM (by its PID) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(lab: &Lab) -> Daemon {
        let socket = lab.state_dir().join("daemon.sock");
        let child = devpool_command(&lab.state_dir())
            .arg("daemon")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn devpool daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon socket never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM; the exit status and what it printed.
    fn stop(mut self) -> (bool, String) {
        // SAFETY: kill with a valid signal on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let st = self.child.wait().expect("wait daemon");
        (st.success(), err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection speaking the line protocol.
struct Conn {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        let out = UnixStream::connect(socket).expect("connect");
        let input = BufReader::new(out.try_clone().expect("clone"));
        Conn { out, input }
    }
    fn raw(&mut self, line: &str) -> Value {
        // One write: the daemon may close a connection after a bad line.
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        self.out.write_all(&bytes).expect("send");
        let mut answer = String::new();
        self.input.read_line(&mut answer).expect("answer");
        serde_json::from_str(&answer).expect("answer is JSON")
    }
    fn call(&mut self, req: Value) -> Value {
        let a = self.raw(&req.to_string());
        assert_eq!(a["ok"], true, "{req} -> {a}");
        a["result"].clone()
    }
}

/// The first `len` bytes of a device, past any page cache (O_DIRECT).
fn read_direct(dev: &str, len: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open O_DIRECT");
    let mut buf = vec![0u8; len + 4096];
    let shift = buf.as_ptr().align_offset(4096);
    f.read_exact_at(&mut buf[shift..shift + len], 0)
        .expect("read");
    buf[shift..shift + len].to_vec()
}

/// A lab with pool `<prefix><pid>` on a 256 MiB image file and a daemon
/// serving it; `None` (the test skips, saying why) without root and loop
/// devices.
fn image_pool_with_daemon(prefix: &str) -> Option<(Lab, String, PathBuf, Daemon)> {
    if skip_unless_real("pool_daemon") {
        return None;
    }
    let lab = Lab::new();
    let pool = format!("{prefix}{}", std::process::id());
    let img = lab.image_pool("pool.img", &pool, "256M", &[]);
    let daemon = Daemon::start(&lab);
    Some((lab, pool, img, daemon))
}

/// `devpool [FLAGS] lease acquire --volumes VOLUMES` with `env`; its JSON.
fn cli_lease(lab: &Lab, pool: &str, volumes: &str, flags: &[&str], env: &[(&str, &str)]) -> Value {
    let mut args = vec!["--pool", pool, "--json"];
    args.extend_from_slice(flags);
    args.extend(["lease", "acquire", "--volumes", volumes]);
    let o = lab.devpool_env(&[], &args, env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("lease JSON")
}

/// `devpool lease release` of `lease` (a `cli_lease` answer).
fn cli_release(lab: &Lab, pool: &str, lease: &Value) {
    let session = lease["session"].as_str().expect("session");
    lab.dp(&[], &["--pool", pool, "lease", "release", session]);
}

/// Stop the daemon (cleanly), check the pool holds no volume, tear it down.
fn stop_and_tear_down(lab: &Lab, daemon: Daemon, pool: &str) {
    let (clean, log) = daemon.stop();
    assert!(clean, "{log}");
    let st = lab.dp_json(&[], &["--pool", pool, "pool", "status"]);
    assert_eq!(st["volumes"], 0, "{st}");
    lab.dp(&[], &["pool", "teardown", pool, "--yes"]);
}

fn journal_pids(lab: &Lab) -> Vec<u64> {
    std::fs::read_to_string(lab.state_dir().join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| e["pid"].as_u64())
        .collect()
}

/// (backing device, offset, size) of a lease's loop devices, from sysfs.
fn windows(lease: &Value) -> Vec<(String, u64, u64)> {
    lease["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            let dev = d["device"].as_str().expect("a loop device");
            let name = Path::new(dev)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .expect("bound")
                .trim()
                .to_string();
            let (off, size) = window_of(dev);
            assert_eq!(size, d["size_bytes"].as_u64().unwrap(), "{dev}");
            (backing, off, size)
        })
        .collect()
}

#[test]
fn concurrent_clients_share_commits_and_get_disjoint_devices() {
    if skip_unless_real("pool_daemon") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("d{}", std::process::id());
    let dev = lab.loop_dev("pool.img", 1024);
    let d = dev.display().to_string();
    lab.dp(&[], &["pool", "setup", &d, "--name", &pool, "--yes"]);
    let start_free = lab.dp_json(&[], &["--pool", &pool, "pool", "status"])["free_bytes"].clone();
    let daemon = Daemon::start(&lab);
    let mode = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let owner = Sleeper::new();

    // Every live lease's windows: a new lease's must overlap none of them.
    let live: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::default();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (socket, pool, live) = (daemon.socket.clone(), pool.clone(), live.clone());
            let owner = owner.pid();
            std::thread::spawn(move || {
                let mut conn = Conn::open(&socket);
                for i in 0..CYCLES {
                    let want = if (c + i) % 2 == 0 {
                        json!({"op": "acquire", "pool": pool, "profile": "fstests", "size": "8M",
                               "owner_pid": owner.parse::<u32>().unwrap()})
                    } else {
                        json!({"op": "acquire", "pool": pool, "volumes": "test:12M,scratch:4M"})
                    };
                    let lease = conn.call(want);
                    let mine = windows(&lease);
                    {
                        let mut l = live.lock().unwrap();
                        for (b, o, s) in &mine {
                            for (b2, o2, s2) in l.iter() {
                                assert!(
                                    b != b2 || o + s <= *o2 || o2 + s2 <= *o,
                                    "lease {} overlaps a live one at {o}+{s} / {o2}+{s2}",
                                    lease["session"]
                                );
                            }
                        }
                        l.extend(mine.iter().cloned());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    live.lock().unwrap().retain(|w| !mine.contains(w));
                    let session = lease["session"].as_str().unwrap();
                    let r = conn.call(json!({"op": "release", "pool": pool, "session": session}));
                    assert_eq!(r["session"], session);
                    assert_eq!(
                        r["removed"].as_array().unwrap().len(),
                        lease["devices"].as_array().unwrap().len()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client");
    }

    // The requests shared commits, and the daemon made them all.
    let st = lab.dp_json(&[], &["daemon", "--status"]);
    let requests = st["requests"].as_u64().unwrap();
    let commits = st["commits"].as_u64().unwrap();
    assert_eq!(requests, (2 * CLIENTS * CYCLES) as u64, "{st}");
    assert!(commits < requests, "no commit was shared: {st}");
    let pids = journal_pids(&lab);
    assert_eq!(
        pids.iter()
            .filter(|&&p| p == u64::from(daemon.pid()))
            .count() as u64,
        commits,
        "journal pids {pids:?}"
    );

    // The CLI goes through the daemon; --no-daemon does the work itself.
    let before = journal_pids(&lab).len();
    let lease = cli_lease(&lab, &pool, "a:4M", &[], &[]);
    assert!(
        lease["devices"][0]["device"]
            .as_str()
            .unwrap()
            .starts_with("/dev/loop")
    );
    let session = lease["session"].as_str().unwrap();
    lab.dp(&[], &["--pool", &pool, "lease", "release", session]);
    let after = journal_pids(&lab);
    assert_eq!(after.len(), before + 2);
    assert!(
        after[before..]
            .iter()
            .all(|&p| p == u64::from(daemon.pid())),
        "{after:?}"
    );
    // The client's own LV name prefix goes along.
    let mine = cli_lease(&lab, &pool, "p:4M", &[], &[("DEVPOOL_PREFIX", "mine")]);
    let lv = mine["devices"][0]["lv"].as_str().unwrap();
    assert!(lv.starts_with("mine-"), "{mine}");
    assert_eq!(
        journal_pids(&lab).last().copied(),
        Some(u64::from(daemon.pid()))
    );
    let session = mine["session"].as_str().unwrap();
    lab.dp(&[], &["--pool", &pool, "lease", "release", session]);
    // Through sudo: the devices go to the invoking user while leased, and
    // back to root when released.
    let sudo = [("SUDO_UID", "4242"), ("SUDO_GID", "4243")];
    let theirs = cli_lease(&lab, &pool, "s:4M", &[], &sudo);
    let node = theirs["devices"][0]["device"].as_str().unwrap().to_string();
    let owner_of = |p: &str| {
        let m = std::fs::metadata(p).unwrap();
        (
            std::os::unix::fs::MetadataExt::uid(&m),
            std::os::unix::fs::MetadataExt::gid(&m),
        )
    };
    assert_eq!(owner_of(&node), (4242, 4243), "{node}");
    let session = theirs["session"].as_str().unwrap();
    lab.dp(&[], &["--pool", &pool, "lease", "release", session]);
    assert_eq!(owner_of(&node).0, 0, "{node} kept its leased owner");
    let lease = cli_lease(&lab, &pool, "a:4M", &["--no-daemon"], &[]);
    let own = journal_pids(&lab);
    assert_ne!(own.last().copied(), Some(u64::from(daemon.pid())));
    let by_env = cli_lease(&lab, &pool, "b:4M", &[], &[("DEVPOOL_NO_DAEMON", "1")]);
    let own = journal_pids(&lab);
    assert_ne!(own.last().copied(), Some(u64::from(daemon.pid())));
    let session = by_env["session"].as_str().unwrap();
    lab.dp(&[], &["--pool", &pool, "lease", "release", session]);
    // A lease the daemon never saw is released through it all the same.
    let session = lease["session"].as_str().unwrap();
    lab.dp(&[], &["--pool", &pool, "lease", "release", session]);

    // Bad input gets an error answer, and the connection goes on.
    let mut conn = Conn::open(&daemon.socket);
    let a = conn.raw("{\"op\": \"acquire\", \"pool\": \"nope\"}");
    assert_eq!(a["ok"], false);
    assert!(a["error"].as_str().unwrap().contains("\"volumes\""), "{a}");
    let a = conn.raw("not json");
    assert!(
        a["error"].as_str().unwrap().starts_with("bad request"),
        "{a}"
    );
    let a = conn.raw(&json!({"op": "release", "pool": pool, "session": "x-1"}).to_string());
    assert!(
        a["error"].as_str().unwrap().contains("no lease 'x-1'"),
        "{a}"
    );
    assert_eq!(conn.call(json!({"op": "ping"}))["pid"], daemon.pid());
    // A line without end gets an error and the connection is closed.
    let a = conn.raw(&"x".repeat(100 << 10));
    assert!(a["error"].as_str().unwrap().contains("longer than"), "{a}");
    drop(conn);

    let (clean, log) = daemon.stop();
    assert!(clean, "daemon exit: {log}");
    assert!(log.contains("stopped (received SIGTERM)"), "{log}");
    assert!(!lab.state_dir().join("daemon.sock").exists());

    // Nothing leaked.
    assert_nothing_leaked(&lab, &pool, &start_free, &dev);
    lab.dp(&[], &["pool", "teardown", &pool, "--yes"]);
}

#[test]
fn a_full_pool_reaps_an_orphan_through_the_daemon() {
    if skip_unless_real("pool_daemon") {
        return;
    }
    let mut lab = Lab::new();
    let pool = format!("f{}", std::process::id());
    // 64 MiB (15 extents of 4 MiB): room for 40M, or for 20M + 20M, not both.
    let dev = lab.loop_dev("pool.img", 64);
    let d = dev.display().to_string();
    // Old data everywhere: a lease's volumes must start wiped.
    std::fs::write(lab.path("pool.img"), vec![0xaau8; 64 << 20]).unwrap();
    lab.dp(&[], &["pool", "setup", &d, "--name", &pool, "--yes"]);
    let mut dead = Sleeper::new();
    let orphan = lab.dp_json(
        &[],
        &[
            "--pool",
            &pool,
            "lease",
            "acquire",
            "--volumes",
            "big:40M",
            "--owner-pid",
            &dead.pid(),
        ],
    );
    let _ = dead.0.kill();
    let _ = dead.0.wait();
    let daemon = Daemon::start(&lab);
    let mut conn = Conn::open(&daemon.socket);
    let lease = conn.call(json!({"op": "acquire", "pool": pool, "volumes": "a:20M,b:20M"}));
    assert_eq!(lease["reaped"], json!([orphan["session"]]), "{lease}");
    for dv in lease["devices"].as_array().unwrap() {
        let head = read_direct(dv["device"].as_str().unwrap(), 8192);
        assert!(
            head[..4096].iter().all(|&b| b == 0),
            "{dv}: start not wiped"
        );
        assert!(
            head[4096..].iter().all(|&b| b == 0xaa),
            "{dv}: wiped too much"
        );
    }
    // Owned by the connecting process (this test), which is alive.
    assert_eq!(lease["owner"]["pid"], std::process::id());
    let session = lease["session"].as_str().unwrap().to_string();
    // Still full: a second lease fails with the numbers, and nothing changes.
    let a = conn.raw(&json!({"op": "acquire", "pool": pool, "volumes": "c:20M,d:20M"}).to_string());
    assert_eq!(a["ok"], false);
    assert!(a["error"].as_str().unwrap().contains("free space"), "{a}");
    conn.call(json!({"op": "release", "pool": pool, "session": session}));
    let st = lab.dp_json(&[], &["--pool", &pool, "pool", "status"]);
    assert_eq!(st["volumes"], 0, "{st}");
    let (good, why) = vgck(&[&dev], &format!("devpool-{pool}"));
    assert!(good, "vgck: {why}");

    // The pool torn down and set up again under the same name: the daemon
    // serves the new VG, not what it remembers of the old one.
    lab.dp(&[], &["pool", "teardown", &pool, "--yes"]);
    lab.dp(&[], &["pool", "setup", &d, "--name", &pool, "--yes"]);
    let lease = conn.call(json!({"op": "acquire", "pool": pool, "volumes": "e:8M"}));
    let session = lease["session"].as_str().unwrap().to_string();
    let leases = lab.dp_json(&[], &["--pool", &pool, "lease", "list"]);
    assert_eq!(leases[0]["session"], session.as_str(), "{leases}");
    conn.call(json!({"op": "release", "pool": pool, "session": session}));
    stop_and_tear_down(&lab, daemon, &pool);
}

/// A loop device held in the kernel's run-down state: bound to a file,
/// then detached (LOOP_CLR_FD) by its only opener, which keeps it open.
/// Until dropped, any other open of it fails with ENXIO, as it does while
/// another process detaches it.
struct RunningDown {
    /// Closing it lets the device run down.
    _open: std::fs::File,
}

impl RunningDown {
    /// Err (losetup's complaint) when `dev` could not be bound: a test
    /// running alongside took it meanwhile.
    fn hold(dev: &str, file: &Path) -> Result<RunningDown, String> {
        let bound = std::process::Command::new("losetup")
            .arg(dev)
            .arg(file)
            .output()
            .expect("run losetup");
        if !bound.status.success() {
            return Err(format!(
                "{dev}: {}",
                String::from_utf8_lossy(&bound.stderr).trim()
            ));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .expect("open the bound device");
        // SAFETY: LOOP_CLR_FD (0x4C01) takes no argument.
        let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x4C01) };
        assert_eq!(
            r,
            0,
            "{dev}: LOOP_CLR_FD: {}",
            std::io::Error::last_os_error()
        );
        let again = std::fs::File::open(dev)
            .map(|_| ())
            .map_err(|e| e.raw_os_error());
        if again != Err(Some(libc::ENXIO)) {
            // Another process had it open as it was detached (a test
            // alongside trying the free device): it only clears at the
            // last close, so it is not running down. Try another.
            return Err(format!("{dev}: not running down ({again:?})"));
        }
        Ok(RunningDown { _open: f })
    }
}

#[test]
fn the_daemon_skips_a_loop_device_another_process_is_detaching() {
    let Some((lab, pool, _img, daemon)) = image_pool_with_daemon("r") else {
        return;
    };
    // The daemon attaches and detaches these; it tries them first next time.
    // Another process then binds each of them and is detaching it. Tests
    // running alongside may take the released devices first: try again.
    let other = lab.image("other.img", 4);
    let mut held: Vec<(String, RunningDown)> = Vec::new();
    let mut missed = Vec::new();
    for _ in 0..10 {
        let first = cli_lease(&lab, &pool, "a:4M,b:4M,c:4M", &[], &[]);
        let released: Vec<String> = first["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device"].as_str().unwrap().to_string())
            .collect();
        cli_release(&lab, &pool, &first);
        for d in &released {
            match RunningDown::hold(d, &other) {
                Ok(h) => held.push((d.clone(), h)),
                Err(why) => missed.push(why),
            }
        }
        if !held.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !held.is_empty(),
        "could bind no released device: {missed:?}"
    );
    let lease = cli_lease(&lab, &pool, "d:4M,e:4M", &[], &[]);
    for d in lease["devices"].as_array().unwrap() {
        let dev = d["device"].as_str().unwrap();
        assert!(
            !held.iter().any(|(h, _)| h == dev),
            "{dev} was being detached by another process"
        );
    }
    drop(held);
    cli_release(&lab, &pool, &lease);
    stop_and_tear_down(&lab, daemon, &pool);
}

/// Through the daemon too, a release gives the space its volumes wrote back
/// to the filesystem under the pool's image (ahead of its commit).
#[test]
fn a_release_through_the_daemon_gives_the_written_space_back() {
    let Some((lab, pool, img, daemon)) = image_pool_with_daemon("g") else {
        return;
    };
    let lease = cli_lease(&lab, &pool, "w:32M,k:8M", &[], &[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(device_of(&lease, "w"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x3cu8; 32 << 20], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let written = allocated(&img);
    cli_release(&lab, &pool, &lease);
    assert!(
        allocated(&img) + (31 << 20) <= written,
        "{written} -> {}",
        allocated(&img)
    );
    assert_eq!(
        journal_pids(&lab).last().copied(),
        Some(u64::from(daemon.child.id())),
        "the daemon committed the release"
    );
    stop_and_tear_down(&lab, daemon, &pool);
}

/// `devpool mcp` on pipes, spoken to line by line.
struct RawMcp {
    child: Child,
    out: std::process::ChildStdin,
    input: BufReader<std::process::ChildStdout>,
    next: u64,
}

impl RawMcp {
    fn start(lab: &Lab) -> RawMcp {
        let mut child = devpool_command(&lab.state_dir())
            .arg("mcp")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start devpool mcp");
        let out = child.stdin.take().unwrap();
        let input = BufReader::new(child.stdout.take().unwrap());
        let mut m = RawMcp {
            child,
            out,
            input,
            next: 0,
        };
        m.next = 1;
        m.send(mcp_initialize(1));
        m.answer(1);
        m.send(mcp_initialized());
        m
    }

    fn send(&mut self, msg: Value) {
        self.out
            .write_all(format!("{msg}\n").as_bytes())
            .expect("write to devpool mcp");
    }

    fn rpc(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        self.answer(id)
    }

    /// The result of request `id` (notifications before it are skipped).
    fn answer(&mut self, id: u64) -> Value {
        loop {
            let mut line = String::new();
            assert!(self.input.read_line(&mut line).unwrap() > 0, "mcp ended");
            let v: Value = serde_json::from_str(&line).expect("JSON-RPC line");
            if v["id"] == id {
                return v["result"].clone();
            }
        }
    }

    /// A tool call that must succeed; its structured result.
    fn tool(&mut self, name: &str, args: Value) -> Value {
        let r = self.rpc("tools/call", json!({"name": name, "arguments": args}));
        assert_eq!(r["isError"], false, "{name}: {r}");
        r["structuredContent"].clone()
    }
}

impl Drop for RawMcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_mcp_server_keeps_its_daemon_connection_and_copes_when_the_daemon_restarts() {
    let Some((lab, pool, _img, daemon)) = image_pool_with_daemon("m") else {
        return;
    };
    let last_committer = || journal_pids(&lab).last().copied();
    let mut mcp = RawMcp::start(&lab);
    let acquire = json!({"volumes": "test:4M", "pool_name": pool});
    let release = |s: &Value| json!({"session": s["session"], "pool_name": pool});
    // Several calls over the kept connection, all through the daemon.
    for _ in 0..3 {
        let l = mcp.tool("device_pool_lease_acquire", acquire.clone());
        assert_eq!(last_committer(), Some(u64::from(daemon.pid())));
        mcp.tool("device_pool_lease_release", release(&l));
        assert_eq!(last_committer(), Some(u64::from(daemon.pid())));
    }
    let l = mcp.tool("device_pool_lease_acquire", acquire.clone());
    // The daemon stops: the kept connection is closed, so the server does
    // the work itself.
    let (clean, log) = daemon.stop();
    assert!(clean, "{log}");
    mcp.tool("device_pool_lease_release", release(&l));
    assert_eq!(last_committer(), Some(u64::from(mcp.child.id())));
    // A new daemon: the server finds it.
    let daemon = Daemon::start(&lab);
    let l = mcp.tool("device_pool_lease_acquire", acquire.clone());
    assert_eq!(last_committer(), Some(u64::from(daemon.pid())));
    mcp.tool("device_pool_lease_release", release(&l));
    assert_eq!(last_committer(), Some(u64::from(daemon.pid())));
    drop(mcp);
    stop_and_tear_down(&lab, daemon, &pool);
}
