//! `devpool serve --nbd` with real clients (nbdinfo, nbdcopy, qemu-img,
//! qemu-io, fio with the nbd engine) on a real pool. Every test fills the
//! neighbouring volumes with sentinel bytes and checks, through the pool's
//! image file, that not one of them changed.

mod common;
use common::serving::*;
use common::*;
use serde_json::Value;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Serve `b`'s second volume over NBD on a Unix socket in its lab (pool
/// `pool`, more `serve` arguments in `extra`): the server and the socket.
fn serve_over_nbd(b: &Bench, pool: &str, extra: &[&str]) -> (Server, std::path::PathBuf) {
    let sock = b.lab.path("b.sock");
    let nbd = format!("unix:{}", sock.display());
    let lv = b.lv(1);
    let mut args = vec![lv.as_str(), "--nbd", &nbd];
    args.extend_from_slice(extra);
    (Server::start(&b.lab, pool, &args), sock)
}

#[test]
fn nbdinfo_sees_the_volume_size_flags_and_block_sizes_on_a_private_socket() {
    if need_tools("nbdinfo", &["nbdinfo"]) {
        return;
    }
    let b = Bench::new("nbdinfo", 16);
    let (srv, sock) = serve_over_nbd(&b, "nbdinfo", &[]);
    let s = sock.display().to_string();
    let lv = b.lv(1);
    assert!(srv.line.contains(&lv), "{}", srv.line);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let info: Value = serde_json::from_str(&run_ok(
        Command::new("nbdinfo").args(["--json", &uri(&sock)]),
    ))
    .unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(16 << 20));
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], Value::Bool(true), "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], Value::Bool(false));
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20));
    // The volume's name is the export; another name is an error.
    let named = format!("nbd+unix:///{lv}?socket={s}");
    run_ok(Command::new("nbdinfo").arg("--size").arg(&named));
    let wrong = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///nosuch?socket={s}"))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("nosuch"));
    // A second server on the same socket path is refused, not hijacked.
    let mut c = devpool_command(&b.lab.state_dir());
    let o = c
        .args([
            "--pool",
            "nbdinfo",
            "serve",
            &lv,
            "--nbd",
            &format!("unix:{s}"),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    drop(srv);
    b.assert_neighbours_intact();
}

#[test]
fn nbdcopy_and_qemu_img_round_trip_a_known_image() {
    if need_tools("nbdcopy", &["nbdcopy", "qemu-img"]) {
        return;
    }
    let b = Bench::new("copy", 32);
    let (_srv, sock) = serve_over_nbd(&b, "copy", &[]);
    let known = b.lab.path("known.img");
    std::fs::write(&known, pattern(32 << 20, 7)).unwrap();
    let k = known.display().to_string();
    run_ok(Command::new("nbdcopy").args([&k, &uri(&sock)]));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &k, &uri(&sock)]));
    let back = b.lab.path("back.img");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri(&sock),
        &back.display().to_string(),
    ]));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&known).unwrap());
    // qemu-img convert in the other direction, then compare again.
    let other = b.lab.path("other.img");
    std::fs::write(&other, pattern(32 << 20, 99)).unwrap();
    let o = other.display().to_string();
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &o,
        &uri(&sock),
    ]));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &o, &uri(&sock)]));
    // And the bytes are where LVM2 says the volume is.
    let (off, size) = b.windows[1];
    let mut inplace = vec![0u8; size as usize];
    std::fs::File::open(&b.image)
        .unwrap()
        .read_exact_at(&mut inplace, off)
        .unwrap();
    assert!(inplace == std::fs::read(&other).unwrap());
    b.assert_neighbours_intact();
}

#[test]
fn qemu_io_reads_and_writes_odd_offsets_discards_and_zeroes() {
    if need_tools("qemu-io", &["qemu-io"]) {
        return;
    }
    let b = Bench::new("qio", 16);
    let (_srv, sock) = serve_over_nbd(&b, "qio", &[]);
    let end = (16u64 << 20).to_string();
    let last = ((16u64 << 20) - 3).to_string();
    let script = [
        "write -P 0x11 1 4097".to_string(),
        "read -P 0x11 1 4097".into(),
        "read -P 0x5a 0 1".into(),
        "read -P 0x5a 4098 10".into(),
        "write -P 0x22 12345 777777".into(),
        "read -P 0x22 12345 777777".into(),
        "write -z 1048576 65536".into(),
        "read -P 0 1048576 65536".into(),
        "write -z -u 2097152 1048576".into(),
        "read -P 0 2097152 1048576".into(),
        "write -P 0x33 -f 4096 4096".into(),
        "read -P 0x33 4096 4096".into(),
        "discard 4194304 1048576".into(),
        // The punched range reads back as zeroes from the image file.
        "read -P 0 4194304 1048576".into(),
        format!("write -P 0x44 {last} 3"),
        format!("read -P 0x44 {last} 3"),
        "flush".into(),
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in &script {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri(&sock));
    let out = run_ok(&mut cmd);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    // Past the end is refused, not written.
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x55 {end} 512"),
            &uri(&sock),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!text.contains("wrote 512/512"), "{text}");
    b.assert_neighbours_intact();
}

fn fio_verify(sock: &Path, name: &str, extra: &[&str]) {
    let out = run_ok(
        Command::new("fio")
            .args([
                "--name",
                name,
                "--ioengine=nbd",
                &format!("--uri={}", uri(sock)),
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .args(extra),
    );
    let start = out.find('{').expect("fio JSON");
    let v: Value = serde_json::from_str(&out[start..]).expect("fio JSON");
    for job in v["jobs"].as_array().unwrap() {
        assert_eq!(job["error"].as_u64(), Some(0), "{name}: {job}");
        let bytes = job["read"]["io_bytes"].as_u64().unwrap_or(0)
            + job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 0, "{name}: no I/O done");
    }
}

#[test]
fn fio_verifies_random_sequential_and_mixed_patterns_over_several_connections() {
    if need_tools("fio", &["fio"]) {
        return;
    }
    let b = Bench::new("fio", 32);
    let (_srv, sock) = serve_over_nbd(&b, "fio", &[]);
    fio_verify(
        &sock,
        "rand4k",
        &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    );
    fio_verify(&sock, "seq1m", &["--rw=write", "--bs=1M", "--iodepth=8"]);
    fio_verify(
        &sock,
        "mixed",
        &[
            "--rw=randrw",
            "--bsrange=512-128k",
            "--iodepth=16",
            "--verify=md5",
        ],
    );
    // Two jobs: two connections at once, each on its own half.
    fio_verify(
        &sock,
        "multiconn",
        &[
            "--rw=randwrite",
            "--bs=8k",
            "--iodepth=16",
            "--numjobs=2",
            "--offset_increment=16M",
        ],
    );
    b.assert_neighbours_intact();
}

#[test]
fn serving_refuses_unleased_volumes_and_ends_with_the_lease() {
    if need_tools("serve lifetime", &["nbdinfo"]) {
        return;
    }
    let mut b = Bench::new("life", 8);
    let lab = &b.lab;
    // Not a leased volume: refused, naming it.
    let img = b.image.display().to_string();
    lab.dp(
        &[&b.image],
        &["lv", "create", "devpool-life/handmade", "--size", "8M"],
    );
    let _ = img;
    let err = lab.dp_err(
        &[],
        &b.pool_args("life", &["serve", "handmade", "--nbd", "unix:/tmp/x"]),
    );
    assert!(err.contains("not leased"), "{err}");
    // Non-loopback TCP needs --listen.
    let err = lab.dp_err(
        &[],
        &b.pool_args("life", &["serve", &b.lv(0), "--nbd", "tcp:0.0.0.0:10999"]),
    );
    assert!(err.contains("--listen"), "{err}");

    // SIGTERM: exits 0 after flushing.
    let sock = lab.path("t.sock");
    let nbd = format!("unix:{}", sock.display());
    let srv = Server::start(lab, "life", &[&b.lv(1), "--nbd", &nbd]);
    // SAFETY: signalling the server we started, by its PID.
    unsafe { libc::kill(srv.pid(), libc::SIGTERM) };
    let (st, err) = srv.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(!sock.exists(), "socket left behind");

    // TCP on loopback works.
    let srv = Server::start(
        lab,
        "life",
        &[&b.lv(1), "--nbd", "tcp:127.0.0.1:0", "--json"],
    );
    let info: Value = serde_json::from_str(&srv.line).unwrap();
    let tcp_uri = info["nbd"].as_str().unwrap().to_string();
    assert!(tcp_uri.starts_with("nbd://127.0.0.1:"), "{tcp_uri}");
    run_ok(Command::new("nbdinfo").arg("--size").arg(&tcp_uri));
    drop(srv);

    // Releasing the lease stops the server first (release waits for it).
    let srv = Server::start(lab, "life", &[&b.lv(1), "--nbd", &nbd]);
    let session = b.session();
    lab.dp(&[], &b.pool_args("life", &["lease", "release", &session]));
    let (st, err) = srv.wait_exit(Duration::from_secs(5));
    assert!(st.success(), "{err}");

    // The owner dying stops the server too.
    let lease = lab.dp_json(
        &[],
        &b.pool_args(
            "life",
            &[
                "lease",
                "acquire",
                "--volumes",
                "x:8M",
                "--owner-pid",
                &b.owner.pid(),
            ],
        ),
    );
    let lv = first_lv(&lease);
    let srv = Server::start(lab, "life", &[&lv, "--nbd", &nbd]);
    let _ = b.owner.0.kill();
    let _ = b.owner.0.wait();
    let (st, err) = srv.wait_exit(Duration::from_secs(5));
    assert!(st.success(), "{err}");
    assert!(err.contains("owner is gone"), "{err}");
    b.lab.dp(&[], &["--pool", "life", "cleanup"]);
}

#[test]
fn run_export_serves_every_volume_for_the_command_and_stops_after() {
    if need_tools("run --export", &["nbdinfo", "qemu-io"]) {
        return;
    }
    let lab = Lab::new();
    lab.image_pool("pool.img", "runx", "1G", &[]);
    let script = "nbdinfo --size \"$DEVPOOL_NBD_TEST\" > \"$OUT.test\" && \
                  nbdinfo --size \"$DEVPOOL_NBD_SCRATCH\" > \"$OUT.scratch\" && \
                  qemu-io -f raw -c 'write -P 0x66 0 65536' \"$DEVPOOL_NBD_TEST\" >/dev/null && \
                  qemu-io -f raw -c 'read -P 0x66 0 65536' \"$DEVPOOL_NBD_TEST\" | grep -q 'read 65536' && \
                  test -S \"$DEVPOOL_NBD_SOCKET_TEST\" && echo \"$DEVPOOL_NBD_SOCKET_TEST\" > \"$OUT.sock\"";
    let out = lab.path("out");
    let o = devpool_command(&lab.state_dir())
        .args([
            "--pool",
            "runx",
            "run",
            "--volumes",
            "test:16M,scratch:32M",
            "--export",
            "nbd",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("OUT", &out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", out.display())).unwrap();
    assert_eq!(read("test").trim(), (16u64 << 20).to_string());
    assert_eq!(read("scratch").trim(), (32u64 << 20).to_string());
    // The servers are gone with the run, and so is the lease.
    assert!(!Path::new(read("sock").trim()).exists());
    let leases = lab.dp_json(&[], &["--pool", "runx", "lease", "list"]);
    assert_eq!(leases.as_array().map(Vec::len), Some(0), "{leases}");
}

#[test]
fn a_read_only_export_refuses_writes_and_still_reads() {
    if need_tools("read-only export", &["nbdinfo", "qemu-io"]) {
        return;
    }
    let b = Bench::new("ro", 8);
    let (_srv, sock) = serve_over_nbd(&b, "ro", &["--read-only"]);
    let info = run_ok(Command::new("nbdinfo").arg(uri(&sock)));
    assert!(info.contains("is_read_only: true"), "{info}");
    let read = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 65536",
        &uri(&sock),
    ]));
    assert!(read.contains("read 65536/65536"), "{read}");
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4096", &uri(&sock)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(!text.contains("wrote 4096/4096"), "{text}");
    // Nothing changed, in the volume or around it.
    let (off, _) = b.windows[1];
    let mut buf = [0u8; 4096];
    std::fs::File::open(&b.image)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    assert!(buf.iter().all(|&x| x == SENTINEL));
    b.assert_neighbours_intact();
}

/// A minimal NBD client: the fixed newstyle handshake with `NBD_OPT_GO` on
/// the default export, then simple requests.
struct RawClient(std::os::unix::net::UnixStream);

impl RawClient {
    fn connect(sock: &Path) -> RawClient {
        use devpool_serve::nbd::proto::{CLIENT_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT_GO, REP_ACK};
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], NBDMAGIC);
        // Client flags: fixed newstyle, no zeroes.
        s.write_all(&(1 | CLIENT_NO_ZEROES).to_be_bytes()).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&6u32.to_be_bytes()); // name length + name + no info requests
        opt.extend_from_slice(&0u32.to_be_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head).unwrap();
            let typ = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            assert!(
                typ & 0x8000_0000 == 0,
                "option GO refused: reply type {typ:#x}"
            );
            if typ == REP_ACK {
                return RawClient(s);
            }
        }
    }

    /// `count` 4 KiB reads spread over the first `span` bytes, `depth` in
    /// flight at a time.
    fn reads(&mut self, count: u64, depth: u64, span: u64) {
        use devpool_serve::nbd::proto::{CMD_READ, SIMPLE_REPLY_MAGIC};
        use std::io::{Read, Write};
        let mut sent = 0u64;
        let mut done = 0u64;
        while done < count {
            while sent < count && sent - done < depth {
                let at = (sent * 7919 * 4096) % span;
                let req = Self::request(CMD_READ, 0, sent, at, 4096, &[]);
                self.0.write_all(&req).unwrap();
                sent += 1;
            }
            let mut reply = [0u8; 16 + 4096];
            self.0.read_exact(&mut reply).unwrap();
            assert_eq!(reply[..4], SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
            assert_eq!(&reply[4..8], &[0, 0, 0, 0], "read failed");
            done += 1;
        }
    }
}

/// The CPU time a process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_busy_connection_spins_briefly_and_an_idle_one_costs_no_cpu() {
    if need_tools("idle cpu", &[]) {
        return;
    }
    let b = Bench::new("idlecpu", 16);
    let (srv, sock) = serve_over_nbd(&b, "idlecpu", &[]);
    let mut client = RawClient::connect(&sock);
    // Busy: the connection's thread spins between requests and completions.
    client.reads(4000, 8, 16 << 20);
    // Idle, still connected: each spin ends and the thread sleeps.
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(srv.pid());
    std::thread::sleep(Duration::from_millis(1500));
    let idle = cpu_ticks(srv.pid()) - before;
    // A thread that kept spinning would use all 150 ticks of a CPU.
    assert!(
        idle <= 8,
        "the server used {idle} ticks of CPU in 1.5 s idle"
    );
    // The connection still answers after sleeping.
    client.reads(16, 4, 16 << 20);
    drop(client);
    drop(srv);
    b.assert_neighbours_intact();
}

impl RawClient {
    /// One request's bytes: header, then the payload of a write.
    fn request(typ: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
        use devpool_serve::nbd::proto::RequestHeader;
        let head = RequestHeader {
            flags,
            typ,
            handle,
            offset,
            len,
        };
        let mut r = head.encode().to_vec();
        r.extend_from_slice(data);
        r
    }

    /// Read `count` simple replies; `reads` gives the data length of each
    /// read's handle. Every reply must succeed; the read data by handle.
    fn replies(
        &mut self,
        count: usize,
        reads: &std::collections::HashMap<u64, usize>,
    ) -> std::collections::HashMap<u64, Vec<u8>> {
        use devpool_serve::nbd::proto::SIMPLE_REPLY_MAGIC;
        use std::io::Read;
        let mut data = std::collections::HashMap::new();
        for _ in 0..count {
            let mut head = [0u8; 16];
            self.0.read_exact(&mut head).unwrap();
            assert_eq!(head[..4], SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
            let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
            assert_eq!(&head[4..8], &[0, 0, 0, 0], "request {handle} failed");
            if let Some(&len) = reads.get(&handle) {
                let mut d = vec![0u8; len];
                self.0.read_exact(&mut d).unwrap();
                data.insert(handle, d);
            }
        }
        data
    }
}

/// The first 16 MiB of the export, read in 256 KiB requests.
fn read_all(client: &mut RawClient) -> Vec<u8> {
    use devpool_serve::nbd::proto::CMD_READ;
    use std::io::Write;
    let mut all = Vec::with_capacity(16 << 20);
    for chunk in 0..(16u64 << 20) / (256 << 10) {
        let mut reads = std::collections::HashMap::new();
        reads.insert(chunk, 256usize << 10);
        let req = RawClient::request(CMD_READ, 0, chunk, chunk * (256 << 10), 256 << 10, &[]);
        client.0.write_all(&req).unwrap();
        all.extend_from_slice(&client.replies(1, &reads)[&chunk]);
    }
    all
}

/// The connection receives a run of same-sized writes straight into
/// aligned buffers, guessing that more of them follow (`nbd::spec`).
/// Every way the guess can be wrong must leave the stream intact: a read,
/// a flush and a longer write inside a run, a header and a payload cut
/// across two sends, a FUA write. A model of the volume checks every byte
/// read back, over a fresh connection too.
#[test]
fn writes_guessed_in_a_run_and_every_miss_keep_the_stream_intact() {
    use devpool_serve::nbd::proto::{CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE};
    use std::collections::HashMap;
    use std::io::Write;
    if need_tools("guessed writes", &[]) {
        return;
    }
    let b = Bench::new("guess", 16);
    let (srv, sock) = serve_over_nbd(&b, "guess", &[]);
    let mut client = RawClient::connect(&sock);
    let mut model = read_all(&mut client);
    let mut handle = 0u64;
    let next = |len: usize, seed: u64| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 131 + seed * 7) as u8)
            .collect()
    };
    let write = |model: &mut Vec<u8>, handle: &mut u64, offset: u64, data: &[u8], flags| {
        *handle += 1;
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        RawClient::request(CMD_WRITE, flags, *handle, offset, data.len() as u32, data)
    };
    for round in 0..40u64 {
        // A run of 4 KiB writes, sent as one stream (the guess's case). The
        // server may run a stream's requests in any order, so none of them
        // overlaps another of its round.
        let mut stream = Vec::new();
        for i in 0..12u64 {
            let at = ((round * 12 + i) * 7919 % 2048) * 4096;
            stream.extend(write(
                &mut model,
                &mut handle,
                at,
                &next(4096, round * 100 + i),
                0,
            ));
        }
        // Misses inside the run: a read, an 8 KiB write, a flush, then 4 KiB
        // writes again, one of them FUA.
        let mut reads = HashMap::new();
        handle += 1;
        // What the previous round wrote last (answered already).
        let read_at = (12 << 20) + round.saturating_sub(1) * 3 * 4096;
        stream.extend(RawClient::request(CMD_READ, 0, handle, read_at, 4096, &[]));
        reads.insert(handle, 4096usize);
        let expect_read = (
            handle,
            model[read_at as usize..read_at as usize + 4096].to_vec(),
        );
        let at = (round % 1000) * 8192 + (8 << 20);
        stream.extend(write(&mut model, &mut handle, at, &next(8192, round), 0));
        handle += 1;
        stream.extend(RawClient::request(CMD_FLUSH, 0, handle, 0, 0, &[]));
        for i in 0..3u64 {
            let flags = if i == 1 { CMD_FLAG_FUA } else { 0 };
            let at = (12 << 20) + (round * 3 + i) * 4096;
            stream.extend(write(
                &mut model,
                &mut handle,
                at,
                &next(4096, round + i),
                flags,
            ));
        }
        client.0.write_all(&stream).unwrap();
        let got = client.replies(12 + 1 + 1 + 1 + 3, &reads);
        assert_eq!(
            got[&expect_read.0], expect_read.1,
            "round {round}: read inside a run"
        );
        // A header cut across two sends, then a payload cut across two.
        let at = (14 << 20) + round * 4096;
        let one = write(&mut model, &mut handle, at, &next(4096, round * 3), 0);
        client.0.write_all(&one[..10]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        client.0.write_all(&one[10..]).unwrap();
        let two = write(
            &mut model,
            &mut handle,
            at + (1 << 20),
            &next(4096, round * 5),
            0,
        );
        client.0.write_all(&two[..28 + 100]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        client.0.write_all(&two[28 + 100..]).unwrap();
        client.replies(2, &HashMap::new());
    }
    // Everything reads back as the model says, over a new connection.
    drop(client);
    let mut check = RawClient::connect(&sock);
    let volume = read_all(&mut check);
    for at in (0..model.len()).step_by(4096) {
        assert!(
            volume[at..at + 4096] == model[at..at + 4096],
            "volume bytes at {at} differ from what was written"
        );
    }
    drop(check);
    drop(srv);
    b.assert_neighbours_intact();
}
