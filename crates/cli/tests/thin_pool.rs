//! Thin provisioning end to end, with the real tools as oracles: LVM2 sees
//! devpool's thin pool and thin volumes (and vgck accepts them),
//! thin_check passes on the pool's dm-thin metadata after every step —
//! including after a crash injected at each write of a thin lease — and
//! thin_dump shows the devices and mappings devpool made. Served over NBD,
//! thin volumes provision on write, thin snapshots share blocks until
//! written, discards give blocks back, and a full pool fails writes with
//! ENOSPC while keeping what was written. A thin snapshot merge rolls the
//! volume back in one transaction (crash-cut at every write, too).

mod common;
use common::serving::*;
use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// The pool's `_tmeta` LV copied out of the image (located by LVM2).
fn tmeta_copy(lab: &Lab, image: &Path) -> PathBuf {
    let lo = Loop::attach(image);
    let dev = lo.dev.as_path();
    let es = num(&lvm_report(&[dev], "vgs", "vg_extent_size")[0]["vg_extent_size"]);
    let pe_start = num(&lvm_report(&[dev], "pvs", "pe_start")[0]["pe_start"]);
    let rows = lvm_report(&[dev], "lvs", "lv_name,seg_pe_ranges");
    let ranges = rows
        .iter()
        .find(|r| r["lv_name"] == "[thinpool_tmeta]")
        .unwrap_or_else(|| panic!("no thinpool_tmeta: {rows:?}"))["seg_pe_ranges"]
        .as_str()
        .unwrap()
        .to_string();
    drop(lo);
    // "/dev/loopN:A-B": one run (devpool makes the metadata LV contiguous).
    let (a, b) = ranges.rsplit_once(':').unwrap().1.split_once('-').unwrap();
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    let f = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; ((b - a + 1) * es) as usize];
    f.read_exact_at(&mut buf, pe_start + a * es).unwrap();
    let out = lab.path("tmeta.bin");
    std::fs::write(&out, &buf).unwrap();
    out
}

/// thin_check must pass; thin_dump's XML.
fn check_and_dump(lab: &Lab, image: &Path) -> String {
    let t = tmeta_copy(lab, image);
    let c = Command::new("thin_check").arg(&t).output().unwrap();
    assert!(
        c.status.success(),
        "thin_check failed:\n{}{}",
        String::from_utf8_lossy(&c.stdout),
        String::from_utf8_lossy(&c.stderr)
    );
    let d = Command::new("thin_dump").arg(&t).output().unwrap();
    assert!(d.status.success());
    String::from_utf8_lossy(&d.stdout).into_owned()
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let i = tag.find(&key)? + key.len();
    Some(&tag[i..i + tag[i..].find('"')?])
}

/// thin_dump's devices: id → every (virtual block, data block).
fn dumped(xml: &str) -> std::collections::BTreeMap<u64, Vec<(u64, u64)>> {
    let mut out = std::collections::BTreeMap::new();
    let mut cur = None;
    for line in xml.lines() {
        let l = line.trim();
        if l.starts_with("<device ") {
            let id: u64 = attr(l, "dev_id").unwrap().parse().unwrap();
            out.insert(id, Vec::new());
            cur = Some(id);
        } else if let Some(id) = cur
            && (l.starts_with("<single_mapping") || l.starts_with("<range_mapping"))
        {
            let o: u64 = attr(l, "origin_block")
                .or(attr(l, "origin_begin"))
                .unwrap()
                .parse()
                .unwrap();
            let d: u64 = attr(l, "data_block")
                .or(attr(l, "data_begin"))
                .unwrap()
                .parse()
                .unwrap();
            let n: u64 = attr(l, "length").map_or(1, |v| v.parse().unwrap());
            let v = out.get_mut(&id).unwrap();
            for i in 0..n {
                v.push((o + i, d + i));
            }
        }
    }
    out
}

fn sorted_ids(thins: &std::collections::BTreeMap<String, u64>) -> Vec<u64> {
    let mut v: Vec<u64> = thins.values().copied().collect();
    v.sort();
    v
}

fn superblock_transaction(xml: &str) -> u64 {
    let l = xml.lines().find(|l| l.contains("<superblock")).unwrap();
    attr(l, "transaction").unwrap().parse().unwrap()
}

/// LVM2's view: (pool transaction_id, thin LV name → thin_id).
fn lvm2_thin_view(image: &Path) -> (u64, std::collections::BTreeMap<String, u64>) {
    let lo = Loop::attach(image);
    let dev = lo.dev.as_path();
    let rows = lvm_report(
        &[dev],
        "lvs",
        "lv_name,segtype,pool_lv,transaction_id,thin_id,lv_when_full",
    );
    let vg = lvm_report(&[dev], "vgs", "vg_name")[0]["vg_name"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, out) = vgck(&[dev], &vg);
    assert!(ok, "vgck: {out}");
    let mut trans = None;
    let mut thins = std::collections::BTreeMap::new();
    for r in &rows {
        match r["segtype"].as_str().unwrap() {
            "thin-pool" => {
                // devpool's pools fail writes when full, for LVM2 too.
                assert_eq!(r["lv_when_full"], "error", "{r}");
                trans = Some(num(&r["transaction_id"]));
            }
            "thin" => {
                assert_eq!(r["pool_lv"], "thinpool", "{r}");
                thins.insert(
                    r["lv_name"].as_str().unwrap().to_string(),
                    num(&r["thin_id"]),
                );
            }
            _ => {}
        }
    }
    (trans.expect("a thin-pool LV"), thins)
}

/// Pool names are global on the machine (the tests attach images to loop
/// devices, which every scan sees): one per test and run.
fn pool_of(test: &str) -> String {
    format!("{}{}", test.replace('_', ""), std::process::id())
}

/// A pool on an image file with a thin pool (`thin_args` for `pool thin
/// enable`); None when a tool (the oracles, or the test's `tools`) is missing.
fn thin_pool_lab(
    test: &str,
    tools: &[&str],
    image_size: &str,
    thin_args: &[&str],
) -> Option<(Lab, PathBuf)> {
    let mut all = vec!["thin_check", "thin_dump", "lvm"];
    all.extend_from_slice(tools);
    if need_tools(test, &all) {
        return None;
    }
    let lab = Lab::new();
    let pool = pool_of(test);
    let image = lab.image_pool("pool.img", &pool, image_size, &[]);
    let mut args = vec!["--pool", pool.as_str(), "pool", "thin", "enable"];
    args.extend_from_slice(thin_args);
    lab.dp(&[], &args);
    std::fs::write(lab.path("pool-name"), &pool).unwrap();
    Some((lab, image))
}

/// The lab's pool (named in its state dir's only pool record).
fn tp(lab: &Lab) -> String {
    std::fs::read_to_string(lab.path("pool-name")).unwrap()
}

fn acquire(lab: &Lab, owner: &Sleeper, volumes: &str) -> Value {
    lab.dp_json(
        &[],
        &[
            "--pool",
            &tp(lab),
            "lease",
            "acquire",
            "--volumes",
            volumes,
            "--owner-pid",
            &owner.pid(),
        ],
    )
}

fn release(lab: &Lab, lease: &Value) {
    lab.dp(
        &[],
        &[
            "--pool",
            &tp(lab),
            "lease",
            "release",
            lease["session"].as_str().unwrap(),
        ],
    );
}

fn thin_status(lab: &Lab) -> Value {
    lab.dp_json(&[], &["--pool", &tp(lab), "pool", "status"])["thin"].clone()
}

#[test]
fn lvm2_sees_thin_leases_and_thin_check_passes_after_a_crash_at_every_write() {
    let Some((lab, image)) = thin_pool_lab("thin_lvm2", &[], "1G", &[]) else {
        return;
    };
    let owner = Sleeper::new();
    // Overcommitted: 4 GiB of thin volumes in a pool of under 1 GiB.
    let lease = acquire(&lab, &owner, "test:2G,scratch:2G");
    assert!(lease["devices"][0].get("device").is_none(), "{lease}");
    let xml = check_and_dump(&lab, &image);
    let (trans, thins) = lvm2_thin_view(&image);
    assert_eq!(superblock_transaction(&xml), trans);
    let devices = dumped(&xml);
    assert_eq!(
        devices.keys().copied().collect::<Vec<_>>(),
        sorted_ids(&thins)
    );
    assert_eq!(thins.len(), 2);

    // A crash after each write of another thin lease: LVM2 and thin_check
    // accept whatever is left, and the next change puts the two in line.
    let mut n = 0;
    loop {
        let o = lab.devpool_env(
            &[],
            &[
                "--pool",
                &tp(&lab),
                "lease",
                "acquire",
                "--volumes",
                "x:1G",
                "--owner-pid",
                &owner.pid(),
            ],
            &[("DEVPOOL_FAULT_CRASH_AFTER_WRITES", &n.to_string())],
        );
        let xml = check_and_dump(&lab, &image);
        let (trans_now, thins_now) = lvm2_thin_view(&image);
        if o.status.success() {
            assert_eq!(superblock_transaction(&xml), trans_now);
            assert_eq!(thins_now.len(), 3);
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("injected crash"), "{err}");
        // Either no new LV (dm-thin may hold an extra device) or all of it.
        assert!(
            thins_now.len() == 2 || thins_now.len() == 3,
            "{thins_now:?}"
        );
        n += 1;
        assert!(n < 50, "the lease never completed");
    }
    assert!(n >= 3, "only {n} writes in a thin lease?");
    // Another change reconciles: dm-thin holds exactly the VG's devices.
    lab.dp(&[], &["--pool", &tp(&lab), "cleanup"]);
    let extra = acquire(&lab, &owner, "y:1G");
    let xml = check_and_dump(&lab, &image);
    let (trans, thins) = lvm2_thin_view(&image);
    assert_eq!(superblock_transaction(&xml), trans);
    assert_eq!(
        dumped(&xml).keys().copied().collect::<Vec<_>>(),
        sorted_ids(&thins)
    );
    // Release: the devices go from both.
    release(&lab, &lease);
    release(&lab, &extra);
    drop(owner);
    lab.dp(&[], &["--pool", &tp(&lab), "cleanup"]);
    let xml = check_and_dump(&lab, &image);
    let (trans, thins) = lvm2_thin_view(&image);
    assert!(thins.is_empty(), "{thins:?}");
    assert!(dumped(&xml).is_empty(), "{xml}");
    assert_eq!(superblock_transaction(&xml), trans);
}

fn stop(srv: Server) {
    // SAFETY: signalling the server we started, by its pid.
    unsafe { libc::kill(srv.pid(), libc::SIGTERM) };
    let (st, err) = srv.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "server: {err}");
}

fn serve(lab: &Lab, lv: &str, sock: &str) -> (Server, PathBuf) {
    let path = lab.path(sock);
    let srv = Server::start(
        lab,
        &tp(lab),
        &[lv, "--nbd", &format!("unix:{}", path.display())],
    );
    (srv, path)
}

fn data_used(lab: &Lab) -> u64 {
    num(&thin_status(lab)["usage"]["data_used"])
}

#[test]
fn thin_volumes_provision_on_write_snapshots_share_and_discard_gives_back() {
    let Some((lab, image)) = thin_pool_lab("thin_serve", &["qemu-io", "nbdcopy"], "1G", &[]) else {
        return;
    };
    let owner = Sleeper::new();
    let lease = acquire(&lab, &owner, "t:64M");
    let lv = first_lv(&lease);
    let size = 64 * MIB as usize;
    let chunk = num(&thin_status(&lab)["chunk_bytes"]) as usize;
    assert_eq!(data_used(&lab), 0, "nothing written, nothing used");

    // Writes at odd offsets and sizes; a model of the volume beside them.
    let mut model = vec![0u8; size];
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    let writes: [(usize, usize, u8); 4] = [
        (0, 4096, 0xab),
        (100_000, 70_000, 0xcd),
        (5 * MIB as usize + 511, 3 * chunk + 7, 0x11),
        (size - 4096, 4096, 0xee),
    ];
    for (off, len, p) in writes {
        qemu_io_ok(&sock, &[&format!("write -P {p} {off} {len}")]);
        model[off..off + len].fill(p);
    }
    let got = read_all(&sock, &lab.path("t1.raw"));
    assert!(got == model, "the volume differs from what was written");
    // Unwritten chunks read as zeroes and cost nothing.
    let touched: std::collections::BTreeSet<usize> = writes
        .iter()
        .flat_map(|&(o, l, _)| (o / chunk)..(o + l).div_ceil(chunk))
        .collect();
    stop(srv);
    assert_eq!(data_used(&lab), touched.len() as u64);
    let xml = check_and_dump(&lab, &image);
    let devs = dumped(&xml);
    let mapped: Vec<u64> = devs.values().next().unwrap().iter().map(|m| m.0).collect();
    assert_eq!(
        mapped,
        touched.iter().map(|&c| c as u64).collect::<Vec<_>>(),
        "thin_dump shows exactly the chunks written"
    );

    // A thin snapshot: instant, no data copied, blocks shared.
    let snap = lab.dp_json(
        &[],
        &[
            "--pool",
            &tp(&lab),
            "snapshot",
            "create",
            &lv,
            "--name",
            "before",
        ],
    );
    assert_eq!(snap["origin"], lv.as_str());
    assert_eq!(data_used(&lab), touched.len() as u64);
    let xml = check_and_dump(&lab, &image);
    let devs = dumped(&xml);
    assert_eq!(devs.len(), 2);
    let mut maps = devs.values();
    assert_eq!(maps.next(), maps.next(), "snapshot shares every block");

    // Overwrite the origin: the snapshot keeps the old data.
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    qemu_io_ok(
        &sock,
        &["write -P 0x77 0 8192", "write -P 0x78 200000 4096"],
    );
    let mut origin_model = model.clone();
    origin_model[..8192].fill(0x77);
    origin_model[200_000..204_096].fill(0x78);
    assert!(read_all(&sock, &lab.path("t2.raw")) == origin_model);
    stop(srv);
    // Two chunks got blocks of their own.
    assert_eq!(data_used(&lab), touched.len() as u64 + 2);
    let (srv, snap_sock) = serve(&lab, "before", "s.sock");
    assert!(
        read_all(&snap_sock, &lab.path("s.raw")) == model,
        "the snapshot must still show the data from before"
    );
    stop(srv);

    // Discard all of the origin: its blocks go, the snapshot's stay.
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    qemu_io_ok(
        &sock,
        &[&format!("discard 0 {size}"), &format!("read -P 0 0 {size}")],
    );
    stop(srv);
    assert_eq!(data_used(&lab), touched.len() as u64);
    let xml = check_and_dump(&lab, &image);
    let devs = dumped(&xml);
    assert!(devs.values().any(Vec::is_empty), "the origin maps nothing");

    // The snapshot belongs to the lease: release takes both.
    let st = lab.dp_json(&[], &["--pool", &tp(&lab), "pool", "status"]);
    assert_eq!(st["thin_snapshots"][0]["lease"], lease["session"]);
    let written = allocated(&image);
    release(&lab, &lease);
    assert_eq!(data_used(&lab), 0);
    // The blocks the release freed went back to the image's filesystem
    // (a few new metadata blocks are written meanwhile).
    let freed = (touched.len() * chunk) as u64;
    assert!(
        allocated(&image) + freed / 2 <= written,
        "{freed} bytes of data blocks punched out: {written} -> {}",
        allocated(&image)
    );
    let xml = check_and_dump(&lab, &image);
    assert!(dumped(&xml).is_empty());
}

#[test]
fn a_full_thin_pool_fails_writes_with_enospc_and_keeps_what_was_written() {
    // 8 MiB of data: 128 blocks of 64 KiB, under a 64 MiB thin volume.
    let Some((lab, image)) =
        thin_pool_lab("thin_full", &["qemu-io"], "256M", &["--data-size", "8M"])
    else {
        return;
    };
    let owner = Sleeper::new();
    let lease = acquire(&lab, &owner, "t:64M");
    let lv = first_lv(&lease);
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    qemu_io_ok(&sock, &["write -P 0x42 0 6M"]);
    // 4 MiB more needs 64 blocks where 32 are left: refused whole.
    let out = qemu_io(&sock, &["write -P 0x43 6M 4M"]);
    assert!(
        out.contains("No space left on device"),
        "a write past the pool's space must fail with ENOSPC: {out}"
    );
    assert_eq!(data_used(&lab), 96);
    // The last 32 blocks fill it; then any new block fails.
    qemu_io_ok(&sock, &["write -P 0x43 6M 2M"]);
    let out = qemu_io(&sock, &["write -P 0x45 8M 4k"]);
    assert!(out.contains("No space left on device"), "{out}");
    // What was written stays; the server keeps serving, overwrites work.
    qemu_io_ok(
        &sock,
        &[
            "read -P 0x42 0 6M",
            "read -P 0x43 6M 2M",
            "read -P 0 8M 1M",
            "write -P 0x44 0 64k",
            "read -P 0x44 0 64k",
        ],
    );
    stop(srv);
    let st = lab.dp_json(&[], &["--pool", &tp(&lab), "pool", "status"]);
    let health = st["health"].to_string();
    assert!(health.contains("is full"), "{health}");
    assert!(health.contains("ENOSPC"), "{health}");
    assert!(health.contains("pool thin extend"), "{health}");
    check_and_dump(&lab, &image);

    // Grown (refused while served, and never shrunk): the pool takes
    // writes again, LVM2 sees the bigger pool, thin_check the bigger map.
    let pool = tp(&lab);
    let extend = |size: &str| {
        lab.devpool(
            &[],
            &[
                "--pool",
                &pool,
                "--json",
                "pool",
                "thin",
                "extend",
                "--data-size",
                size,
            ],
        )
    };
    let (srv, _sock) = serve(&lab, &lv, "t.sock");
    let o = extend("+8M");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("being served"), "{err}");
    stop(srv);
    let o = extend("4M");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("only grow"), "{err}");
    let o = extend("+8M");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["data_bytes_before"], 8 * MIB);
    assert_eq!(r["data_bytes"], 16 * MIB);
    assert_eq!(r["data_blocks"], 256);
    let t = thin_status(&lab);
    assert_eq!(t["usage"]["data_blocks"], 256);
    let xml = check_and_dump(&lab, &image);
    assert!(xml.contains("nr_data_blocks=\"256\""), "{xml}");
    let lo = Loop::attach(&image);
    let rows = lvm_report(&[lo.dev.as_path()], "lvs", "lv_name,lv_size");
    let size_of = |n: &str| {
        rows.iter()
            .find(|r| {
                r["lv_name"]
                    .as_str()
                    .is_some_and(|x| x.trim_matches(['[', ']']) == n)
            })
            .map(|r| r["lv_size"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {n} in {rows:?}"))
    };
    assert_eq!(size_of("thinpool"), "16777216");
    assert_eq!(size_of("thinpool_tdata"), "16777216");
    let (ok, out) = vgck(&[lo.dev.as_path()], &format!("devpool-{pool}"));
    assert!(ok, "vgck: {out}");
    drop(lo);
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    qemu_io_ok(
        &sock,
        &[
            "write -P 0x46 8M 4M",
            "read -P 0x46 8M 4M",
            "read -P 0x42 64k 5M",
        ],
    );
    stop(srv);
    assert_eq!(data_used(&lab), 128 + 64);
    check_and_dump(&lab, &image);
}

#[test]
fn guest_dm_thin_activates_devpools_thin_volumes_and_devpool_reads_what_dm_wrote() {
    use common::guest::{DM_GUEST_HELPERS, assert_no_qemu_left, guest_or_skip, run_lvm_guest};
    let t = "guest_dm_thin_activates_devpools_thin_volumes_and_devpool_reads_what_dm_wrote";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let Some((lab, image)) =
        thin_pool_lab("guest_thin", &["qemu-io"], "512M", &["--data-size", "256M"])
    else {
        return;
    };
    let owner = Sleeper::new();
    let lease = acquire(&lab, &owner, "test:32M");
    let lv = first_lv(&lease);
    // The host's data plane writes blocks 0..8 (one thin chunk) and 1000.
    let (srv, sock) = serve(&lab, &lv, "o.sock");
    let mut script: Vec<String> = (0..8u64)
        .map(|k| format!("write -P {:#04x} {} 4096", 0xa0 + k, k * 4096))
        .collect();
    script.push(format!("write -P 0x77 {} 4096", 1000 * 4096));
    let s: Vec<&str> = script.iter().map(String::as_str).collect();
    qemu_io_ok(&sock, &s);
    stop(srv);
    // A thin snapshot taken by devpool: shares both chunks.
    thin_snapshot(&lab, &lv, "tsnap");

    // The guest: LVM2 activates the pool (running thin_check on devpool's
    // metadata first), dm-thin reads devpool's mappings, then writes: an
    // overwrite of a shared block (dm breaks the sharing) and a block
    // never written (dm provisions it).
    let vg = format!("devpool-{}", tp(&lab));
    let (o, sn) = (format!("/dev/{vg}/{lv}"), format!("/dev/{vg}/tsnap"));
    let mut g = String::from(DM_GUEST_HELPERS);
    g.push_str(&format!("lvm_c vgchange -ay -K {vg} || exit 10\n"));
    for k in 0..8u64 {
        g.push_str(&format!(
            "chk {o} {k} {:03o}\nchk {sn} {k} {:03o}\n",
            0xa0 + k,
            0xa0 + k
        ));
    }
    g.push_str(&format!(
        "chk {o} 1000 167\nchk {o} 500 000\nchk {sn} 1000 167\n"
    ));
    g.push_str(&format!(
        "fill {o} 2 356\nfill {o} 3000 303\nchk {sn} 2 242\nchk {o} 2 356\n"
    ));
    g.push_str("sync; echo \"STATUS $(dmsetup status | grep ' thin-pool ')\"\n");
    // Without udev, LVM2 may find the pool's parts still open on its first
    // pass; whatever it leaves, dmsetup removes (dm-thin commits on the
    // pool's removal).
    g.push_str(&format!(
        "lvm_c vgchange -an {vg} >/dev/null 2>&1; dmsetup remove_all\n\
[ -z \"$(dmsetup ls | grep -v 'No devices')\" ] || {{ dmsetup ls; exit 12; }}\nexit $bad\n"
    ));
    let console = run_lvm_guest(
        &lab,
        &kernel,
        &[],
        &image,
        &["/usr/sbin/thin_check"],
        "dm_thin_pool",
        &g,
    );
    let status = console
        .lines()
        .find(|l| l.starts_with("STATUS "))
        .unwrap_or_else(|| panic!("no thin-pool status:\n{console}"));
    assert!(status.contains("thin-pool"), "{status}");

    // The host: thin_check accepts what dm committed; devpool's data plane
    // reads dm's writes in the origin and the old data in the snapshot.
    let xml = check_and_dump(&lab, &image);
    assert_eq!(dumped(&xml).len(), 2, "{xml}");
    let (srv, sock) = serve(&lab, &lv, "o.sock");
    assert!(block_holds(&sock, 2, 0xee), "dm's overwrite");
    assert!(block_holds(&sock, 3000, 0xc3), "dm's new block");
    assert!(block_holds(&sock, 1000, 0x77));
    assert!(block_holds(&sock, 500, 0));
    stop(srv);
    let (srv, sock) = serve(&lab, "tsnap", "s.sock");
    assert!(
        block_holds(&sock, 2, 0xa2),
        "the snapshot kept the old block"
    );
    assert!(block_holds(&sock, 3000, 0));
    stop(srv);
    assert_no_qemu_left(&lab);
}

/// `devpool lv activate` of thin volumes in a guest with device-mapper:
/// the pool's devices come up once, under LVM2's names, shared by the
/// volume and its thin snapshot; dm-thin reads what devpool's data plane
/// wrote and writes beside it; a thin volume's deactivation leaves the pool
/// to the other, the last one takes the pool's devices with it. Meanwhile
/// the pool's changes go to dm-thin as messages: a thin snapshot of the
/// active volume (suspended around it) has its data of that moment, a
/// lease's thin volume comes and goes (served meanwhile over NBD and as a
/// block device, both dm-thin's device: what qemu-io writes over NBD is on
/// the block device), and the kernel's
/// transaction follows the VG's. A crash between the kernel's commit and
/// the VG's leaves the kernel ahead: the next change is refused, naming
/// both transactions, and once the pool is let go devpool's next change
/// repairs the metadata. A lease's thin volumes get dm-thin devices at
/// acquire (`devpool run` sets TEST_DEV to one), removed at release. Then
/// the host's thin_check accepts what dm-thin committed and devpool's data
/// plane reads the kernel's writes.
#[test]
fn guest_lv_activate_gives_thin_volumes_dm_thin_over_their_shared_pool() {
    use common::guest::{
        DM_GUEST_HELPERS, assert_no_qemu_left, devpool_for_guest, guest_or_skip, run_lvm_guest,
    };
    let t = "guest_lv_activate_gives_thin_volumes_dm_thin_over_their_shared_pool";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let Some((lab, image)) = thin_pool_lab(
        "guest_thin_act",
        &["qemu-io"],
        "512M",
        &["--data-size", "256M"],
    ) else {
        return;
    };
    let owner = Sleeper::new();
    let lease = acquire(&lab, &owner, "test:32M");
    let lv = first_lv(&lease);
    let (srv, sock) = serve(&lab, &lv, "o.sock");
    qemu_io_ok(
        &sock,
        &["write -P 0xa1 0 4096", "write -P 0x77 4096000 4096"],
    );
    stop(srv);
    thin_snapshot(&lab, &lv, "tsnap");
    let vg = format!("devpool-{}", tp(&lab));
    let mut g = String::from(DM_GUEST_HELPERS);
    g.push_str(&format!(
        r#"export DEVPOOL_STATE_DIR=/tmp/state HOME=/tmp DEVPOOL_DEVICES=/dev/vda
mkdir -p /run/lock/lvm /run/lvm
dms() {{ ls /sys/block | grep -c '^dm-'; }}
loops() {{ ls -d /sys/block/loop*/loop 2>/dev/null | wc -l; }}
tpool_table() {{ dmsetup table {vg_dm}-thinpool-tpool | cut -d' ' -f3-; }}
node() {{ sed 's/.*"device":"\([^"]*\)".*/\1/' $1; }}
devpool --json lv activate {vg}/{lv} > /tmp/o.json || {{ cat /tmp/o.json; exit 10; }}
echo "ORIGIN $(cat /tmp/o.json)"
devpool --json lv activate {vg}/tsnap --read-only > /tmp/s.json || exit 11
echo "SNAPSHOT $(cat /tmp/s.json)"
O=$(node /tmp/o.json); S=$(node /tmp/s.json)
echo "DEVICES $(dms)"
echo "POOL-TABLE $(tpool_table)"
echo "TABLES $(dmsetup table | awk '{{print $4}}' | sort | tr '
' ' ')"
echo "ATTR $(lvm_c lvs --noheadings -o lv_attr {vg}/{lv} | tr -d ' ')"
chk $O 0 241; chk $S 0 241; chk $O 1000 167; chk $O 500 000
fill $O 0 356; fill $O 3000 303; chk $S 0 241; chk $O 0 356
dd if=/dev/zero of=$S bs=4096 count=1 oflag=direct 2>/dev/null && echo "WROTE-READ-ONLY"
# While dm-thin holds the pool, the pool's changes go to it as messages:
# a thin snapshot of the active origin (suspended meanwhile), a lease
# acquired and released.
mkdir -p /tmp/state/pools
echo '{{"name":"{pool}","vg":"{vg}","devices":["/dev/vda"],"created_image":false}}' > /tmp/state/pools/{pool}.json
trans() {{ echo "$(dmsetup status {vg_dm}-thinpool-tpool | awk '{{print $4}}') $(lvm_c lvs --noheadings -o transaction_id {vg}/thinpool | tr -d ' ')"; }}
echo "TRANS-BEFORE $(trans)"
devpool --pool {pool} snapshot create {lv} --name live > /tmp/live.log 2>&1 || {{ cat /tmp/live.log; exit 14; }}
devpool --json lv activate {vg}/live > /tmp/l.json || exit 15
L=$(node /tmp/l.json)
chk $L 0 356; chk $L 3000 303; fill $O 0 021; chk $L 0 356; chk $O 0 021
devpool --pool {pool} --json lease acquire --volumes n:8M --owner-pid $$ > /tmp/n.json 2> /tmp/n.err || {{ cat /tmp/n.err; exit 16; }}
N=$(sed -n 's/.*"lv": *"\([^"]*\)".*/\1/p' /tmp/n.json | head -1)
echo "LEASED $(tr -d ' \n' < /tmp/n.json)"
# Served over NBD and as a block device: both are dm-thin's device, until
# the server stops.
devpool --pool {pool} --json serve $N --nbd unix:/tmp/n.sock --block-device > /tmp/srv.json 2> /tmp/srv.err &
SRV=$!
n=0; while [ ! -s /tmp/srv.json ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "SERVE $(cat /tmp/srv.json) $(cat /tmp/srv.err)"
qemu-io -f raw 'nbd+unix:///?socket=/tmp/n.sock' -c 'write -P 0x55 28672 4096' > /tmp/qio.log 2>&1 || {{ cat /tmp/qio.log; echo "NBD-WRITE-FAILED"; }}
chk $(sed -n 's/.*"block_device": *"\([^"]*\)".*/\1/p' /tmp/srv.json) 7 125
# A thin snapshot of the served volume: the kernel's, while it serves.
devpool --pool {pool} snapshot create $N --name nsnap > /tmp/ns.log 2>&1 || {{ cat /tmp/ns.log; exit 23; }}
devpool --json lv activate {vg}/nsnap > /tmp/ns.json || exit 24
chk $(node /tmp/ns.json) 7 125
devpool lv deactivate {vg}/nsnap > /dev/null || exit 25
echo "SERVING $(dms)"
kill -TERM $SRV; wait $SRV; echo "SERVER-EXIT $?"
echo "SERVED-GONE $(dms)"
# A server killed with SIGKILL leaves its device; the release removes it.
devpool --pool {pool} --json serve $N --block-device > /tmp/srv2.json 2>&1 &
SRV=$!
n=0; while [ ! -s /tmp/srv2.json ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
kill -KILL $SRV; wait $SRV
echo "KILLED-LEFT $(dms)"
# A program with the lease's dm-thin device open stops its release (named).
D=$(tr -d ' \n' < /tmp/n.json | sed 's/.*"device":"\([^"]*\)".*/\1/')
echo "HOLDING $D"
sleep 600 < $D &
HOLD=$!
n=0; while [ "$(readlink /proc/$HOLD/fd/0)" != "$D" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
devpool --pool {pool} lease release $(sed -n 's/.*"session": *"\([^"]*\)".*/\1/p' /tmp/n.json | head -1) > /tmp/held.log 2>&1 && echo "RELEASED-WHILE-OPEN"
echo "HELD $HOLD $(tr '\n' ' ' < /tmp/held.log)"
kill $HOLD; wait $HOLD 2>/dev/null
devpool --pool {pool} lease release $(sed -n 's/.*"session": *"\([^"]*\)".*/\1/p' /tmp/n.json | head -1) > /tmp/nr.log 2>&1 || {{ cat /tmp/nr.log; exit 19; }}
echo "RELEASE-CLEANED $(dms)"
echo "TRANS-AFTER $(trans)"
echo "STATUS $(devpool --pool {pool} --json pool status | tr -d ' \n')"
# A crash between the kernel's commit and the VG's leaves the kernel ahead:
# the next change is refused until the pool is let go.
DEVPOOL_FAULT_CRASH_AFTER_WRITES=0 devpool --no-daemon --pool {pool} lease acquire --volumes c:8M --owner-pid $$ > /tmp/c.log 2>&1 && echo "CRASH-NOT-INJECTED"
echo "AHEAD $(trans)"
devpool --pool {pool} --json lease acquire --volumes d:8M --owner-pid $$ > /tmp/d.log 2>&1 && echo "ACQUIRED-OUT-OF-STEP"
echo "OUT-OF-STEP $(tr '\n' ' ' < /tmp/d.log)"
devpool lv deactivate {vg}/{lv} > /dev/null || exit 12
echo "AFTER-ONE $(dms)"
chk $S 0 241
devpool lv deactivate {vg}/tsnap > /dev/null || exit 13
devpool lv deactivate {vg}/live > /dev/null || exit 20
echo "AFTER-ALL $(dms) $(loops)"
# devpool's own next change repairs the metadata (the orphan device goes).
devpool --pool {pool} --json lease acquire --volumes e:8M,f:8M --owner-pid $$ > /tmp/e.json 2> /tmp/e.err || {{ cat /tmp/e.err; exit 21; }}
# Two servers start at once: one makes the pool's devices, the other
# finds them (devpool's thin lock orders the two).
for v in $(sed -n 's/.*"lv": *"\([^"]*\)".*/\1/p' /tmp/e.json); do
  devpool --pool {pool} --json serve $v --block-device > /tmp/s-$v.json 2>&1 &
done
n=0; while [ $(cat /tmp/s-*.json 2>/dev/null | grep -c '"path"') -lt 2 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "TOGETHER $(cat /tmp/s-*.json | grep -c '"path":"dm"') $(dms)"
kill -TERM $(jobs -p); wait
echo "TOGETHER-GONE $(dms)"
devpool --pool {pool} lease release $(sed -n 's/.*"session": *"\([^"]*\)".*/\1/p' /tmp/e.json | head -1) > /dev/null || exit 22
echo "RELEASED-ALL $(dms)"
echo "REPAIRED $(lvm_c lvs --noheadings -o transaction_id {vg}/thinpool | tr -d ' ')"
# LVM2 deactivates what devpool activated, as its own.
devpool --json lv activate {vg}/tsnap > /dev/null || exit 26
lvm_c lvchange -an {vg}/tsnap > /tmp/lvc.log 2>&1 || cat /tmp/lvc.log
echo "LVM2-DEACTIVATED $(dms) $(loops)"
# devpool run: TEST_DEV is the thin volume's dm-thin device, gone after.
devpool --pool {pool} run --volumes test:8M -- sh -c 'echo "RUN-DEV $TEST_DEV"; dd if=/dev/zero of=$TEST_DEV bs=4096 count=1 oflag=direct 2>/dev/null && echo RUN-WROTE' || echo "RUN-FAILED"
echo "RUN-LEFT $(dms)"
# A full thin pool on an image file, held by dm-thin: writes fail at once
# (error_if_no_space); pool thin extend reloads the data LV and the pool
# (a loop device for the new extents), and the same writes then land.
devpool pool setup /tmp/tp.img --name tp --image-size 160M --yes > /tmp/tp.log 2>&1 || {{ cat /tmp/tp.log; exit 27; }}
devpool --pool tp pool thin enable --data-size 32M > /tmp/tp.log 2>&1 || {{ cat /tmp/tp.log; exit 28; }}
devpool --pool tp --json lease acquire --volumes big:64M --owner-pid $$ > /tmp/tp.json 2> /tmp/tp.err || {{ cat /tmp/tp.err; exit 29; }}
B=$(sed -n 's/.*"device": *"\([^"]*\)".*/\1/p' /tmp/tp.json | head -1)
fill40() {{ dd if=/dev/zero bs=1M count=40 2>/dev/null | tr '\000' '\125' | dd of=$B bs=1M oflag=direct 2>/dev/null; }}
fill40 && echo "FULL-WROTE" || echo "FULL-REFUSED"
echo "TP-BEFORE $(dmsetup status devpool--tp-thinpool-tpool | awk '{{print $6}}') $(loops)"
devpool --pool tp pool thin extend --data-size +32M > /tmp/ext.log 2>&1 && echo "EXTENDED" || cat /tmp/ext.log
echo "TP-AFTER $(dmsetup status devpool--tp-thinpool-tpool | awk '{{print $6}}') $(loops)"
fill40 && echo "AFTER-WROTE"
chk $B 10239 125
# A second image-file PV: the pool grows past the first one's free space,
# its data LV spans both PVs (a loop device over each), and dm-thin
# writes into the second: 40 + 150 MiB used, where the first PV holds 140.
DEVPOOL_DEVICES=/tmp/tp.img devpool vg extend devpool-tp /tmp/tp2.img --image-size 128M --yes > /tmp/vx.log 2>&1 || {{ cat /tmp/vx.log; exit 31; }}
devpool --pool tp pool thin extend --data-size 100%FREE > /tmp/ext2.log 2>&1 && echo "EXTENDED-2" || cat /tmp/ext2.log
echo "TP-SPAN $(dmsetup table devpool--tp-thinpool_tdata | awk '{{print $4}}' | sort -u | wc -l) $(dmsetup status devpool--tp-thinpool-tpool | awk '{{print $6}}') $(loops)"
devpool --pool tp --json lease acquire --volumes big2:200M --owner-pid $$ > /tmp/tp2.json 2> /tmp/tp2.err || {{ cat /tmp/tp2.err; exit 32; }}
B2=$(sed -n 's/.*"device": *"\([^"]*\)".*/\1/p' /tmp/tp2.json | head -1)
dd if=/dev/zero bs=1M count=150 2>/dev/null | tr '\000' '\132' | dd of=$B2 bs=1M oflag=direct 2>/dev/null && echo "SECOND-PV-WROTE"
echo "TP-USED $(dmsetup status devpool--tp-thinpool-tpool | awk '{{print $6}}')"
chk $B2 38000 132; chk $B 10239 125
devpool --pool tp lease release $(sed -n 's/.*"session": *"\([^"]*\)".*/\1/p' /tmp/tp2.json | head -1) > /dev/null || exit 33
devpool --pool tp lease release $(sed -n 's/.*"session": *"\([^"]*\)".*/\1/p' /tmp/tp.json | head -1) > /dev/null || exit 30
echo "TP-LEFT $(dms) $(loops)"
exit $bad
"#,
        pool = tp(&lab),
        vg_dm = vg.replace('-', "--"),
    ));
    let stripped = devpool_for_guest(&lab, env!("CARGO_BIN_EXE_devpool"));
    let devpool = format!("{}:/usr/bin/devpool", stripped.display());
    let console = run_lvm_guest(
        &lab,
        &kernel,
        &[],
        &image,
        &[&devpool, "/usr/bin/qemu-io"],
        "dm_thin_pool,loop",
        &g,
    );
    let line = |tag: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag}:\n{console}"))
            .to_string()
    };
    let tpool = format!("{}-thinpool-tpool", vg.replace('-', "--"));
    let origin: Value = serde_json::from_str(&line("ORIGIN ")).unwrap();
    let names: Vec<&str> = origin["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{origin}");
    assert_eq!(names[2], tpool, "{origin}");
    assert_eq!(
        names[3],
        format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
    );
    // The snapshot reuses the pool's three devices: one more device.
    assert_eq!(line("DEVICES "), "5", "{console}");
    assert_eq!(
        line("TABLES ").split_whitespace().collect::<Vec<_>>(),
        ["linear", "linear", "thin", "thin", "thin-pool"]
    );
    assert_eq!(&line("ATTR ")[4..5], "a", "LVM2 sees it active: {console}");
    // 64 KiB blocks, no low-water event, zeroed blocks, ENOSPC when full.
    let table: Vec<String> = line("POOL-TABLE ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(table[0], "thin-pool", "{table:?}");
    assert_eq!(
        table[3..],
        ["128", "0", "1", "error_if_no_space"],
        "{table:?}"
    );
    assert!(!console.contains("WROTE-READ-ONLY"), "{console}");
    // Two snapshots, a creation and a deletion (of the lease's volume and
    // its snapshot): four transactions, each in the kernel as in the VG.
    let before: Vec<u64> = line("TRANS-BEFORE ")
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(before[0], before[1], "{console}");
    let after = format!("{0} {0}", before[0] + 4);
    assert_eq!(line("TRANS-AFTER "), after, "{console}");
    // pool status gives the kernel's figures while dm-thin holds the pool.
    let status = line("STATUS ");
    assert!(
        status.contains(&format!(r#""held_by_kernel":"{tpool}""#))
            && status.contains(&format!(r#""transaction_id":{}"#, before[0] + 4)),
        "{status}"
    );
    // Its dm devices, with what holds them: the thin pool's under the
    // lease's volume.
    assert!(
        status.contains(r#""held_by":"thinpool""#) && status.contains(r#""held_by":"lease"#),
        "{status}"
    );
    let served = line("SERVE ");
    assert!(served.contains(r#""path":"dm""#), "{served}");
    assert!(!console.contains("NBD-WRITE-FAILED"), "{console}");
    assert_eq!(line("SERVING "), "7", "{console}");
    assert_eq!(line("SERVER-EXIT "), "0", "{console}");
    // The lease's own dm-thin device (made at acquire) stays with the
    // lease after its server, until the release.
    assert!(
        line("LEASED ").contains(r#""device":"/dev/dm-"#),
        "{console}"
    );
    assert_eq!(line("SERVED-GONE "), "7", "{console}");
    assert_eq!(line("KILLED-LEFT "), "7", "{console}");
    assert!(!console.contains("RELEASED-WHILE-OPEN"), "{console}");
    let held = line("HELD ");
    let (pid, refusal) = held.split_once(' ').unwrap_or_default();
    assert!(
        refusal.contains("release refused")
            && refusal.contains(&format!("is open in process {pid} (sleep)")),
        "{console}"
    );
    assert_eq!(line("RELEASE-CLEANED "), "6", "{console}");
    let k = before[0] + 4;
    assert!(!console.contains("CRASH-NOT-INJECTED"), "{console}");
    assert_eq!(line("AHEAD "), format!("{} {k}", k + 1), "{console}");
    assert!(!console.contains("ACQUIRED-OUT-OF-STEP"), "{console}");
    let refused = line("OUT-OF-STEP ");
    assert!(
        refused.contains(&format!("is at transaction {}, the VG records {k}", k + 1)),
        "{refused}"
    );
    assert_eq!(line("REPAIRED "), (k + 2).to_string(), "{console}");
    assert_eq!(line("TOGETHER "), "2 5", "{console}");
    assert_eq!(
        line("TOGETHER-GONE "),
        "5",
        "the lease's devices stay: {console}"
    );
    assert_eq!(line("RELEASED-ALL "), "0", "{console}");
    assert_eq!(line("LVM2-DEACTIVATED "), "0 0", "{console}");
    assert!(line("RUN-DEV ").starts_with("/dev/dm-"), "{console}");
    assert!(
        console.contains("RUN-WROTE") && !console.contains("RUN-FAILED"),
        "{console}"
    );
    assert_eq!(line("RUN-LEFT "), "0", "{console}");
    // 32 MiB of 64 KiB blocks, then 64 MiB; one more loop device for the
    // new extents, none left after the release.
    assert!(console.contains("FULL-REFUSED"), "{console}");
    let before = line("TP-BEFORE ");
    assert!(before.starts_with("512/512 "), "{before}\n{console}");
    assert!(console.contains("EXTENDED"), "{console}");
    let after = line("TP-AFTER ");
    let (used, loops_after) = after.split_once(' ').unwrap();
    assert!(used.ends_with("/1024"), "{after}\n{console}");
    assert_eq!(
        loops_after.parse::<u32>().unwrap(),
        before.split(' ').nth(1).unwrap().parse::<u32>().unwrap() + 1,
        "{console}"
    );
    assert!(console.contains("AFTER-WROTE"), "{console}");
    // Grown onto a second PV: two devices under the data LV, more blocks
    // than the first PV holds (140 MiB: 2240), the second PV's loop device
    // in place of the first extend's, and dm-thin's writes land there.
    assert!(console.contains("EXTENDED-2"), "{console}");
    let span: Vec<u64> = line("TP-SPAN ")
        .split([' ', '/'])
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(span[0], 2, "{console}");
    assert!(span[2] > 2240, "{console}");
    assert_eq!(
        span[3],
        loops_after.parse::<u64>().unwrap() + 1,
        "{console}"
    );
    assert!(console.contains("SECOND-PV-WROTE"), "{console}");
    let used: u64 = line("TP-USED ").split('/').next().unwrap().parse().unwrap();
    assert!(
        used > 2240,
        "used {used} blocks, past the first PV:\n{console}"
    );
    assert_eq!(line("TP-LEFT "), "0 0", "{console}");
    // The pool stays for the snapshots.
    assert_eq!(line("AFTER-ONE "), "5", "{console}");
    assert_eq!(line("AFTER-ALL "), "0 0", "{console}");

    let xml = check_and_dump(&lab, &image);
    assert_eq!(dumped(&xml).len(), 3, "the released volume is gone: {xml}");
    let (srv, sock) = serve(&lab, &lv, "o.sock");
    assert!(block_holds(&sock, 0, 0x11), "dm's last overwrite");
    assert!(block_holds(&sock, 3000, 0xc3), "dm's new block");
    assert!(block_holds(&sock, 1000, 0x77));
    stop(srv);
    let (srv, sock) = serve(&lab, "live", "l.sock");
    assert!(block_holds(&sock, 0, 0xee), "the live snapshot's block");
    assert!(block_holds(&sock, 3000, 0xc3));
    stop(srv);
    let (srv, sock) = serve(&lab, "tsnap", "s.sock");
    assert!(
        block_holds(&sock, 0, 0xa1),
        "the snapshot kept the old block"
    );
    assert!(block_holds(&sock, 3000, 0));
    stop(srv);
    assert_no_qemu_left(&lab);
}

/// `devpool --pool POOL snapshot create OF --name NAME` (a thin snapshot).
fn thin_snapshot(lab: &Lab, of: &str, name: &str) {
    lab.dp(
        &[],
        &["--pool", &tp(lab), "snapshot", "create", of, "--name", name],
    );
}

/// `devpool … snapshot merge NAME` with extra arguments and environment.
fn merge(lab: &Lab, snap: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let pool = tp(lab);
    let mut a = vec!["--pool", pool.as_str()];
    a.extend_from_slice(args);
    a.extend(["snapshot", "merge", snap]);
    lab.devpool_env(&[], &a, env)
}

#[test]
fn a_thin_snapshot_merge_rolls_the_volume_back_in_one_transaction() {
    let Some((lab, image)) = thin_pool_lab("thin_merge", &["qemu-io", "nbdcopy"], "1G", &[]) else {
        return;
    };
    let owner = Sleeper::new();
    let lease = acquire(&lab, &owner, "t:16M");
    let lv = first_lv(&lease);
    let chunk = num(&thin_status(&lab)["chunk_bytes"]) as usize;
    let size = 16 * MIB as usize;
    let snapshot = |of: &str, name: &str| thin_snapshot(&lab, of, name);
    let write = |writes: &[(usize, usize, u8)], model: &mut Vec<u8>| {
        let (srv, sock) = serve(&lab, &lv, "t.sock");
        for &(off, len, p) in writes {
            qemu_io_ok(&sock, &[&format!("write -P {p} {off} {len}")]);
            model[off..off + len].fill(p);
        }
        stop(srv);
    };

    // before: 1 MiB of 0xab. after: two chunks overwritten, one more written.
    let mut before = vec![0u8; size];
    write(&[(0, MIB as usize, 0xab)], &mut before);
    snapshot(&lv, "before");
    snapshot("before", "child");
    let mut after = before.clone();
    write(
        &[(0, 8192, 0x77), (4 * MIB as usize, chunk, 0x55)],
        &mut after,
    );
    snapshot(&lv, "after");
    // Written only to the volume: its block goes back to the pool on merge.
    let mut latest = after.clone();
    write(&[(8 * MIB as usize, chunk, 0x99)], &mut latest);
    let (_, ids) = lvm2_thin_view(&image);
    let (old_id, snap_id) = (ids[&lv], ids["before"]);

    // Refused while the volume is served; without --yes; on --dry-run.
    let (srv, _sock) = serve(&lab, &lv, "busy.sock");
    let o = merge(&lab, "before", &["--yes"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("being served"), "{err}");
    stop(srv);
    let o = merge(&lab, "before", &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("needs confirmation") && err.contains("no data is copied"),
        "{err}"
    );
    let o = merge(&lab, "before", &["--dry-run"], &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("dry run"));
    assert_eq!(
        lvm2_thin_view(&image).1,
        ids,
        "refused merges changed nothing"
    );
    let used_before = data_used(&lab);

    // A crash after each write of the merge: LVM2 and thin_check accept
    // what is left, which is the old state or the merged one.
    let mut n = 0;
    loop {
        let o = merge(
            &lab,
            "before",
            &["--yes"],
            &[("DEVPOOL_FAULT_CRASH_AFTER_WRITES", &n.to_string())],
        );
        check_and_dump(&lab, &image);
        let (_, now) = lvm2_thin_view(&image);
        let merged = !now.contains_key("before");
        if merged {
            assert_eq!(now[&lv], snap_id, "{now:?}");
        } else {
            assert_eq!(now, ids);
        }
        if o.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("injected crash"), "{err}");
        if merged {
            // Cut after the VG commit: dm-thin still holds the old device
            // until the next change reconciles it.
            break;
        }
        n += 1;
        assert!(n < 50, "the merge never completed");
    }
    assert!(n >= 2, "only {n} writes in a merge?");
    let extra = acquire(&lab, &owner, "y:16M");
    let xml = check_and_dump(&lab, &image);
    let (trans, thins) = lvm2_thin_view(&image);
    assert_eq!(superblock_transaction(&xml), trans);
    assert_eq!(
        dumped(&xml).keys().copied().collect::<Vec<_>>(),
        sorted_ids(&thins)
    );
    assert!(
        !dumped(&xml).contains_key(&old_id),
        "the old device is gone"
    );
    assert_eq!(thins[&lv], snap_id);
    // The volume's block of its own went back; everything else is shared.
    assert_eq!(data_used(&lab), used_before - 1);

    // The volume shows the snapshot's data; its other snapshot and the
    // merged snapshot's child show what they showed.
    for (name, want) in [
        (lv.as_str(), &before),
        ("after", &after),
        ("child", &before),
    ] {
        let (srv, sock) = serve(&lab, name, "r.sock");
        let got = read_all(&sock, &lab.path("r.raw"));
        stop(srv);
        assert!(&got == want, "{name} does not show what it should");
    }
    // The child is now a snapshot of the volume, and belongs to its lease.
    let st = lab.dp_json(&[], &["--pool", &tp(&lab), "pool", "status"]);
    let child = st["thin_snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "child")
        .unwrap_or_else(|| panic!("no child in {st:#}"));
    assert_eq!(child["origin"], lv.as_str(), "{st:#}");
    assert_eq!(child["lease"], lease["session"]);

    // A merge that runs through deletes the old device itself, at once.
    snapshot(&lv, "again");
    let mut ignored = before.clone();
    write(&[(12 * MIB as usize, chunk, 0x42)], &mut ignored);
    let used = data_used(&lab);
    let (_, ids) = lvm2_thin_view(&image);
    let r: Value = serde_json::from_slice(&merge(&lab, "again", &["--yes", "--json"], &[]).stdout)
        .expect("merge --json");
    assert_eq!(r["old_device_id"], ids[&lv]);
    assert_eq!(r["device_id"], ids["again"]);
    let xml = check_and_dump(&lab, &image);
    let (trans, thins) = lvm2_thin_view(&image);
    assert_eq!(superblock_transaction(&xml), trans);
    assert_eq!(
        dumped(&xml).keys().copied().collect::<Vec<_>>(),
        sorted_ids(&thins)
    );
    assert_eq!(data_used(&lab), used - 1);
    assert_eq!(r["data_used_after"], used - 1);
    let (srv, sock) = serve(&lab, &lv, "r.sock");
    let got = read_all(&sock, &lab.path("r.raw"));
    stop(srv);
    assert!(got == before, "the volume is back to the snapshot");

    release(&lab, &lease);
    release(&lab, &extra);
    assert_eq!(data_used(&lab), 0);
    assert!(dumped(&check_and_dump(&lab, &image)).is_empty());
}

#[test]
fn pool_trim_punches_the_thin_pools_unmapped_blocks_and_keeps_mapped_ones() {
    let Some((lab, image)) = thin_pool_lab("thin_trim", &["qemu-io"], "512M", &[]) else {
        return;
    };
    let owner = Sleeper::new();
    let lease = acquire(&lab, &owner, "t:16M");
    let lv = first_lv(&lease);
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    qemu_io_ok(&sock, &["write -P 0x5a 0 1M"]);
    stop(srv);
    // Old data in blocks no thin device maps (the data LV fills from its
    // start): left by an earlier pool, or written before discards existed.
    let vg = format!("devpool-{}", tp(&lab));
    let lvs = lab.dp_json(&[&image], &["lv", "list", &vg]);
    let tdata = lvs["lvs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lv_name"].as_str().is_some_and(|n| n.ends_with("_tdata")))
        .expect("the data LV")
        .clone();
    let area = &tdata["segments"][0]["areas"][0];
    let end = num(&area["offset"]) + num(&tdata["segments"][0]["seg_size"]);
    let junk_at = end - (4 * MIB);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&vec![0x99u8; 4 * MIB as usize], junk_at)
        .unwrap();
    f.sync_all().unwrap();
    let before = allocated(&image);
    let r = lab.dp_json(&[], &["--pool", &tp(&lab), "pool", "trim"]);
    assert!(num(&r["discarded_bytes"]) > 0, "{r}");
    assert!(
        allocated(&image) + 4 * MIB <= before,
        "the unmapped blocks went back: {before} -> {}",
        allocated(&image)
    );
    let mut b = vec![1u8; 4096];
    f.read_exact_at(&mut b, junk_at).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // The mapped blocks keep their data, and the metadata is sound.
    let (srv, sock) = serve(&lab, &lv, "t.sock");
    qemu_io_ok(&sock, &["read -P 0x5a 0 1M"]);
    stop(srv);
    check_and_dump(&lab, &image);
    release(&lab, &lease);
}
