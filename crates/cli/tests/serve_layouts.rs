//! Volumes no loop device can cover — striped over two PVs, and split into
//! several segments — served over NBD: data written through devpool lands
//! exactly where LVM2 (the oracle, `lvs --segments`) says each extent is.
//! In Debian 6.12 guests, `serve --block-device` of such volumes (and of
//! snapshots and thin volumes) through ublk and the kernel's NBD client.

mod common;
use common::serving::{Server, need_tools, pattern};
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn owner_tags(pid: u32, session: &str, role: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let start = rest.split_whitespace().nth(19).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let safe: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+.-/=!:#&".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    vec![
        format!("devpool.lease={session}"),
        format!("devpool.role={role}"),
        format!("devpool.pid={pid}"),
        format!("devpool.start={start}"),
        format!("devpool.boot={}", boot.trim()),
        format!("devpool.host={safe}"),
    ]
}

/// Where LVM2 says each logical byte of `lv` is: (device path, byte offset).
/// One segment: first extent, extent count, stripe size in bytes, and each
/// stripe area's (device, byte offset).
type Seg = (u64, u64, u64, Vec<(PathBuf, u64)>);

struct Layout {
    segs: Vec<Seg>,
    extent: u64,
}

impl Layout {
    fn of(devs: &[&Path], vg: &str, lv: &str) -> Layout {
        let pvs = lvm_report(devs, "pvs", "pv_name,pe_start");
        let pe_start = |name: &str| -> u64 {
            let p = pvs.iter().find(|p| p["pv_name"] == name).expect("pv");
            num(&p["pe_start"])
        };
        let vgs = lvm_report(devs, "vgs", "vg_name,vg_extent_size");
        let extent = num(&vgs.iter().find(|v| v["vg_name"] == vg).unwrap()["vg_extent_size"]);
        let a = vec![
            "lvs".to_string(),
            "--segments".into(),
            "--reportformat".into(),
            "json".into(),
            "--units".into(),
            "b".into(),
            "--nosuffix".into(),
            "-o".into(),
            "lv_name,seg_start_pe,seg_size_pe,stripe_size,seg_pe_ranges".into(),
            format!("{vg}/{lv}"),
        ];
        let args: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = lvm_ok(devs, &args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut segs = Vec::new();
        for s in v["report"][0]["seg"].as_array().unwrap() {
            let areas = s["seg_pe_ranges"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .map(|r| {
                    let (dev, range) = r.rsplit_once(':').unwrap();
                    let first: u64 = range.split('-').next().unwrap().parse().unwrap();
                    (PathBuf::from(dev), pe_start(dev) + first * extent)
                })
                .collect();
            segs.push((
                num(&s["seg_start_pe"]),
                num(&s["seg_size_pe"]),
                num(&s["stripe_size"]),
                areas,
            ));
        }
        Layout { segs, extent }
    }

    fn locate(&self, logical: u64) -> (PathBuf, u64) {
        let le = logical / self.extent;
        for (start, len, stripe, areas) in &self.segs {
            if le >= *start && le < start + len {
                let off = logical - start * self.extent;
                if areas.len() == 1 {
                    return (areas[0].0.clone(), areas[0].1 + off);
                }
                let n = areas.len() as u64;
                let chunk = off / stripe;
                let (dev, base) = &areas[(chunk % n) as usize];
                return (dev.clone(), base + (chunk / n) * stripe + off % stripe);
            }
        }
        panic!("byte {logical} outside the LV");
    }

    /// sha256sum of the first `len` bytes of the LV, read from its PVs
    /// where LVM2 says they are (`scratch` holds the copy).
    fn sha256(&self, len: usize, scratch: &Path) -> String {
        let mut data = vec![0u8; len];
        for (i, chunk) in data.chunks_mut(4096).enumerate() {
            let (d, off) = self.locate(i as u64 * 4096);
            let f = std::fs::File::open(&d).unwrap();
            f.read_exact_at(chunk, off).unwrap();
        }
        std::fs::write(scratch, &data).unwrap();
        let out = Command::new("sha256sum").arg(scratch).output().unwrap();
        first_word(&String::from_utf8_lossy(&out.stdout))
    }
}

fn check_volume(lab: &Lab, devs: &[&Path], pool: &str, lv: &str, size: usize, seed: u64) {
    let sock = lab.path(&format!("{lv}.sock"));
    let nbd = format!("unix:{}", sock.display());
    let _srv = Server::start(lab, pool, &[lv, "--nbd", &nbd]);
    let data = pattern(size, seed);
    let src = lab.path(&format!("{lv}.src"));
    std::fs::write(&src, &data).unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = Command::new("nbdcopy")
        .arg(&src)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every 4 KiB block, at its first and last byte, where LVM2 says it is.
    let layout = Layout::of(devs, &format!("devpool-{pool}"), lv);
    let files: Vec<(PathBuf, std::fs::File)> = devs
        .iter()
        .map(|d| (d.to_path_buf(), std::fs::File::open(d).unwrap()))
        .collect();
    for block in (0..size as u64).step_by(4096) {
        for logical in [block, block + 4095] {
            let (dev, off) = layout.locate(logical);
            let f = &files.iter().find(|(p, _)| *p == dev).unwrap().1;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).unwrap();
            assert_eq!(
                b[0],
                data[logical as usize],
                "{lv}: logical byte {logical} should be at {}:{off}",
                dev.display()
            );
        }
    }
}

fn check_block_device(lab: &Lab, devs: &[&Path], pool: &str, lv: &str, size: usize, seed: u64) {
    let srv = Server::start(lab, pool, &[lv, "--block-device", "--json"]);
    let line = srv.line.clone();
    let info: serde_json::Value = serde_json::from_str(&line).expect("serve --json line");
    assert_eq!(info["block_device_path"]["path"], "fuse-loop", "{info}");
    let skipped = info["block_device_path"]["skipped"].to_string();
    assert!(
        skipped.contains("nbd") && skipped.contains("ublk"),
        "{skipped}"
    );
    let dev = info["block_device"].as_str().unwrap().to_string();
    let bytes = std::process::Command::new("blockdev")
        .args(["--getsize64", &dev])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&bytes.stdout).trim(),
        size.to_string()
    );
    let data = pattern(size, seed);
    let src = lab.path("blk.src");
    std::fs::write(&src, &data).unwrap();
    let o = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={dev}"))
        .args(["bs=1M", "oflag=direct", "conv=fsync", "status=none"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Stopping detaches the loop device and unmounts FUSE.
    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(srv.pid(), libc::SIGTERM) };
    let (st, err) = srv.wait_exit(std::time::Duration::from_secs(10));
    assert!(st.success(), "{err}");
    let name = Path::new(&dev)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        !Path::new(&format!("/sys/block/{name}/loop")).exists()
            || std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .map(|b| !b.contains(".devpool") && !b.contains("/fuse/"))
                .unwrap_or(true),
        "loop device {dev} left attached"
    );
    let layout = Layout::of(devs, &format!("devpool-{pool}"), lv);
    for logical in (0..size as u64).step_by(65536 / 4 + 1) {
        let (d, off) = layout.locate(logical);
        let mut b = [0u8; 1];
        std::fs::File::open(&d)
            .unwrap()
            .read_exact_at(&mut b, off)
            .unwrap();
        assert_eq!(b[0], data[logical as usize], "block device byte {logical}");
    }
}

/// A pool NAME over two loop devices of `mib` MiB each (a.img, b.img), for
/// striped and multi-segment volumes; the two devices.
fn two_pv_pool(lab: &mut Lab, name: &str, mib: u64) -> (PathBuf, PathBuf) {
    let a = lab.loop_dev("a.img", mib);
    let b = lab.loop_dev("b.img", mib);
    let (sa, sb) = (a.display().to_string(), b.display().to_string());
    lab.dp(&[], &["pool", "setup", &sa, "--name", name, "--yes"]);
    lab.dp(
        &[&a, &b],
        &["vg", "extend", &format!("devpool-{name}"), &sb],
    );
    (a, b)
}

#[test]
fn striped_and_multi_segment_volumes_land_where_lvm2_says() {
    if need_tools("striped and multi-segment volumes", &["nbdcopy"]) {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = two_pv_pool(&mut lab, "lay", 128);
    let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
    let tags = owner_tags(owner.id(), "20261121000000-abcdef", "test");
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec!["lv", "create", name];
        args.extend_from_slice(extra);
        for t in &tags {
            args.push("--tag");
            args.push(t);
        }
        lab.dp(&[&a, &b], &args);
    };
    create(
        "devpool-lay/striped",
        &["--size", "32M", "--stripes", "2", "--stripe-size", "64K"],
    );
    // A volume that grows past a neighbour gets a second segment elsewhere.
    create("devpool-lay/multi", &["--size", "8M"]);
    create("devpool-lay/neighbour", &["--size", "4M"]);
    lab.dp(
        &[&a, &b],
        &["lv", "resize", "devpool-lay/multi", "--size", "+8M"],
    );
    let devs = [a.as_path(), b.as_path()];
    let segs = Layout::of(&devs, "devpool-lay", "multi").segs.len();
    assert!(
        segs >= 2,
        "the test needs a multi-segment volume, got {segs} segment(s)"
    );
    // The volume between multi's two segments holds sentinels throughout.
    let neighbour = Layout::of(&devs, "devpool-lay", "neighbour");
    let fill = |check: bool| {
        for logical in (0..4u64 << 20).step_by(512) {
            let (d, off) = neighbour.locate(logical);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&d)
                .unwrap();
            let mut b = [0u8; 512];
            if check {
                f.read_exact_at(&mut b, off).unwrap();
                assert!(
                    b.iter().all(|&x| x == 0xa5),
                    "neighbour changed at {logical}"
                );
            } else {
                f.write_all_at(&[0xa5; 512], off).unwrap();
            }
        }
    };
    fill(false);
    // A loop device cannot express these: the pool refuses, the server serves.
    check_volume(&lab, &devs, "lay", "striped", 32 << 20, 3);
    check_volume(&lab, &devs, "lay", "multi", 16 << 20, 5);
    // On the host, as a block device: FUSE + loop here (no nbd, no ublk).
    check_block_device(&lab, &devs, "lay", "striped", 32 << 20, 11);
    fill(true);
    let _ = owner.kill();
    let _ = owner.wait();
}

/// The scan for a device's openers (`sysblk::openers`, behind the names
/// in "release refused: … is open in process N") looks at every open file
/// of every process, also outside /dev (a device node made with mknod
/// elsewhere), and must not ask a file system that cannot answer: a
/// program with a file open on a FUSE mount whose server is stopped. Here
/// that server is devpool's own (`serve --block-device` of a striped
/// volume: FUSE + loop), stopped with SIGSTOP past its attribute timeout
/// (1 s), when a plain `stat` would ask it. A lease release in another
/// pool, refused because a program has its volume open, answers too: the
/// listing of the host's loop devices waits only briefly for the one over
/// the stopped server's file. So do a `vg list` and a `pool setup`, which
/// read every block device: the one over the stopped server's file is left
/// unread, and named; a `pool setup` of an image file, whose checks
/// compare it with every loop device's backing file and every fstab line
/// (one names the stopped server's file); and a disk's setup with that
/// fstab line, refused because what the line names cannot be told. Last,
/// the server is killed outright, and the cleanup of its lease removes the
/// FUSE mount it left.
#[test]
fn a_stopped_fuse_server_does_not_hang_the_scan_for_a_devices_openers() {
    if skip_unless_real("fuse_stall") {
        return;
    }
    let mut lab = Lab::new();
    let (a, b) = two_pv_pool(&mut lab, "stall", 64);
    let disk = lab.loop_dev("disk.img", 16);
    let fresh = lab.loop_dev("fresh.img", 64);
    let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
    let mut args = vec![
        "lv",
        "create",
        "devpool-stall/striped",
        "--size",
        "8M",
        "--stripes",
        "2",
    ];
    let tags = owner_tags(owner.id(), "20261122000000-abcdef", "test");
    for t in &tags {
        args.extend(["--tag", t.as_str()]);
    }
    lab.dp(&[&a, &b], &args);
    // Another pool, on an image file, with a leased volume a program has open.
    lab.image_pool("busy.img", "busy", "64M", &[]);
    let pid = owner.id().to_string();
    let lease = lab.dp_json(
        &[],
        &[
            "--pool",
            "busy",
            "lease",
            "acquire",
            "--volumes",
            "v:8M",
            "--owner-pid",
            &pid,
        ],
    );
    let session = lease["session"].as_str().unwrap().to_string();
    let volume = lease["devices"][0]["device"].as_str().unwrap().to_string();
    let volume_user = DeviceHolder::open(&volume);
    let srv = Server::start(&lab, "stall", &["striped", "--block-device", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&srv.line).expect("serve --json line");
    assert_eq!(info["block_device_path"]["path"], "fuse-loop", "{info}");
    let dev = info["block_device"].as_str().unwrap().to_string();
    let name = Path::new(&dev)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let fuse_file = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .unwrap()
        .trim()
        .to_string();
    let on_fuse = DeviceHolder::open(&fuse_file);
    // The disk, open through a node outside /dev.
    let node = lab.path("disk-node");
    node_outside_dev(&disk, &node);
    let user = DeviceHolder::open(node.to_str().unwrap());
    let disk_num = devpool_pool::sysblk::block_devnum(&disk).unwrap();

    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(srv.pid(), libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(devpool_pool::sysblk::openers(&[disk_num], &[]));
    });
    let found = rx.recv_timeout(std::time::Duration::from_secs(10));
    // The release in the other pool lists the host's loop devices, the one
    // over the stopped server's file too, and names its volume's user.
    let mut release = spawn_piped(&lab, &["--pool", "busy", "lease", "release", &session]);
    let released_in_time = exits_within(&mut release, 20);
    // Commands that scan every block device (no --devices) leave the one
    // over the stopped server's file unread, and say so.
    let mut vg_list = spawn_piped(&lab, &["--json", "vg", "list"]);
    let listed_in_time = exits_within(&mut vg_list, 20);
    let fresh_arg = fresh.display().to_string();
    let mut setup = spawn_piped(
        &lab,
        &["pool", "setup", &fresh_arg, "--name", "fresh", "--yes"],
    );
    let set_up_in_time = exits_within(&mut setup, 20);
    // On an image file, setup's checks compare it with every loop device's
    // backing file, the one on the stopped server too.
    let image = lab.path("fresh-image.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let image = image.display().to_string();
    // An fstab line names a file on the stopped server's mount: not the
    // image (another file system), but what it names cannot be told for a
    // disk's setup, which is refused rather than left waiting.
    let fstab = lab.path("fstab");
    std::fs::write(&fstab, format!("{fuse_file} /mnt/x auto loop 0 0\n")).unwrap();
    let fstab_env = [("DEVPOOL_FSTAB", fstab.to_str().unwrap())];
    let fresh2_arg = lab.loop_dev("fresh2.img", 64).display().to_string();
    let mut refused_setup = spawn_piped_env(
        &lab,
        &["pool", "setup", &fresh2_arg, "--name", "fresh2", "--yes"],
        &fstab_env,
    );
    let refused_in_time = exits_within(&mut refused_setup, 20);
    let mut image_setup = spawn_piped_env(
        &lab,
        &["pool", "setup", &image, "--name", "image", "--yes"],
        &fstab_env,
    );
    let image_set_up_in_time = exits_within(&mut image_setup, 20);
    // SAFETY: as above. What is stuck goes on once its server does.
    unsafe { libc::kill(srv.pid(), libc::SIGCONT) };
    let out = release.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        released_in_time,
        "the release hung on the stopped FUSE server: {err}"
    );
    let listed = vg_list.wait_with_output().unwrap();
    assert!(listed_in_time, "vg list hung on the stopped FUSE server");
    let vgs: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("vg list --json");
    let names: Vec<&str> = vgs["vgs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["vg_name"].as_str())
        .collect();
    assert!(names.contains(&"devpool-stall"), "{vgs}");
    let skipped = format!(
        "{dev}: not read: it reads through a loop device whose backing file {fuse_file} is on a fuse"
    );
    assert!(
        vgs["unreadable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u.as_str().is_some_and(|u| u.starts_with(&skipped))),
        "{vgs}"
    );
    let set_up = setup.wait_with_output().unwrap();
    assert!(
        set_up_in_time && set_up.status.success(),
        "pool setup beside the stopped FUSE server: {}",
        String::from_utf8_lossy(&set_up.stderr)
    );
    let image_set_up = image_setup.wait_with_output().unwrap();
    assert!(
        image_set_up_in_time && image_set_up.status.success(),
        "pool setup of an image file beside the stopped FUSE server: {}",
        String::from_utf8_lossy(&image_set_up.stderr)
    );
    let refused = refused_setup.wait_with_output().unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        refused_in_time && !refused.status.success(),
        "pool setup with an fstab line on the stopped FUSE server: {why}"
    );
    assert!(
        why.contains(&format!(
            "cannot tell what {} line 1 ({fuse_file} on /mnt/x) names: {fuse_file} is on a fuse file system",
            fstab.display()
        )),
        "{why}"
    );
    let said = String::from_utf8_lossy(&set_up.stdout);
    assert!(
        said.contains(&format!(
            "note: not searched for an existing pool 'fresh': {skipped}"
        )),
        "{said}"
    );
    let named = format!(
        "{volume} is open in process {} (python3)",
        volume_user.pid()
    );
    assert!(!out.status.success() && err.contains(&named), "{err}");
    drop(volume_user);
    lab.dp(&[], &["--pool", "busy", "lease", "release", &session]);
    let found = found.expect("the scan for openers hung on the stopped FUSE server");
    let named: Vec<String> = found.iter().map(ToString::to_string).collect();
    let expected = format!(
        "{} is open in process {} (python3) through {}",
        disk.display(),
        user.pid(),
        node.display()
    );
    assert!(named.contains(&expected), "{named:?}");
    drop(on_fuse);
    drop(user);
    // A server killed outright leaves its FUSE mount, cut off; the cleanup
    // of its lease (its owner gone too) unmounts and removes it.
    let fuse_dir = lab.state_dir().join("fuse");
    let fuse_mounted = || {
        devpool_pool::sysblk::mounts()
            .iter()
            .any(|m| Path::new(&m.mountpoint).starts_with(&fuse_dir))
    };
    // SAFETY: as above.
    unsafe { libc::kill(srv.pid(), libc::SIGKILL) };
    let _ = srv.wait_exit(std::time::Duration::from_secs(10));
    assert!(fuse_mounted(), "a killed server's FUSE mount stays");
    let _ = owner.kill();
    let _ = owner.wait();
    lab.dp(&[], &["--pool", "stall", "cleanup"]);
    assert!(
        !fuse_mounted(),
        "cleanup left the killed server's FUSE mount"
    );
    let left: Vec<_> = std::fs::read_dir(&fuse_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// In a guest whose kernel has an NBD client (and no ublk), `serve
/// --block-device` of a two-segment volume picks the kernel's NBD client
/// (connected to devpool's server); data written to /dev/nbdN lands where
/// LVM2 says.
#[test]
fn guest_with_nbd_gives_a_multi_segment_volume_a_kernel_nbd_device() {
    guest_block_device_for_a_multi_segment_volume(
        "kernel NBD client in a guest",
        &["virtio_blk", "loop", "nbd"],
        "nbd",
        "/dev/nbd",
    );
}

/// In a guest whose kernel has ublk, `serve --block-device` of a two-segment
/// volume makes a ublk device served by devpool itself (before the NBD
/// client, which this guest has too); data written to /dev/ublkbN lands
/// where LVM2 says, and the device is gone after the server stops.
#[test]
fn guest_with_ublk_gives_a_multi_segment_volume_a_ublk_device() {
    guest_block_device_for_a_multi_segment_volume(
        "ublk in a guest",
        &["virtio_blk", "loop", "nbd", "ublk_drv"],
        "ublk",
        "/dev/ublkb",
    );
}

/// In a guest whose kernel has device-mapper, `serve --block-device` of a
/// two-segment volume activates it as LVM2 would (`dm-linear`, LVM2's name
/// and uuid), before ublk and NBD, which this guest has too: no server
/// sits in the I/O path. Data written to /dev/dm-N lands where LVM2 says;
/// the device goes when the server stops, and one a killed server left
/// behind goes when the lease is released.
#[test]
fn guest_with_device_mapper_gives_a_multi_segment_volume_a_dm_device() {
    guest_block_device_for_a_multi_segment_volume(
        "device-mapper in a guest",
        &["virtio_blk", "loop", "nbd", "ublk_drv", "dm_mod"],
        "dm",
        "/dev/dm-",
    );
}

fn guest_block_device_for_a_multi_segment_volume(
    what: &str,
    modules: &[&str],
    path: &str,
    dev_prefix: &str,
) {
    let Some((kernel, mut lab)) = guest_lab(what) else {
        return;
    };
    let disk = lab.loop_dev("guest-pool.img", 256);
    let script = r#"
export DEVPOOL_STATE_DIR=/tmp/state DEVPOOL_FSTAB=/tmp/fstab HOME=/tmp
touch /tmp/fstab
devpool pool setup /dev/vda --name g --yes >/tmp/setup.log 2>&1 || { cat /tmp/setup.log; echo GUEST-STEP-FAILED setup; }
devpool --pool g --json lease acquire --volumes a:8M,b:4M --owner-pid $$ > /tmp/lease.json || echo GUEST-STEP-FAILED acquire
A=$(grep '"lv"' /tmp/lease.json | head -1 | sed 's/.*"lv": *"\([^"]*\)".*/\1/')
echo "VOLUME $A"
devpool --devices /dev/vda lv resize devpool-g/$A --size +8M --yes > /dev/null || echo GUEST-STEP-FAILED resize
devpool --pool g --json serve $A --block-device > /tmp/serve.out 2>/tmp/serve.err &
SRV=$!
n=0; while [ ! -s /tmp/serve.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
cat /tmp/serve.err
echo "SERVE $(cat /tmp/serve.out)"
DEV=$(sed 's/.*"block_device":"\([^"]*\)".*/\1/' /tmp/serve.out)
echo "HWQUEUES $(ls /sys/block/${DEV#/dev/}/mq | wc -l)"
test -e /sys/block/${DEV#/dev/}/dm && echo "DMNAME $(cat /sys/block/${DEV#/dev/}/dm/name) $(cat /sys/block/${DEV#/dev/}/dm/uuid)"
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
echo "DATASUM $(sha256sum /tmp/data)"
dd if=/tmp/data of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED write
dd if=$DEV of=/tmp/back bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED read
echo "BACKSUM $(sha256sum /tmp/back)"
# Through ublk, also write zeroes (a MiB at 1 MiB) and a FUA write: what
# the host finds on disk is the data with that MiB zeroed.
case $DEV in /dev/ublkb*)
  /opt/blkdiscard -z -o 1048576 -l 1048576 $DEV || echo GUEST-STEP-FAILED write-zeroes
  dd if=/dev/zero of=/tmp/data bs=1M seek=1 count=1 conv=notrunc 2>/dev/null
  /opt/dd if=/tmp/data of=$DEV bs=4k count=1 seek=8 skip=8 oflag=direct,dsync conv=notrunc status=none || echo GUEST-STEP-FAILED fua-write
  ;;
esac
echo "FINALSUM $(sha256sum /tmp/data)"
# While device-mapper maps the volume, its extents stay as they are.
case $DEV in /dev/dm-*)
  devpool --devices /dev/vda lv resize devpool-g/$A --size +4M --yes > /tmp/r1.log 2>&1 && echo "RESIZED-UNDER-DM"
  devpool --pool g resize $A +4M > /tmp/r2.log 2>&1 && echo "RESIZED-UNDER-DM"
  echo "RESIZE-REFUSED $(grep -c 'device-mapper has it active' /tmp/r1.log /tmp/r2.log | grep -c ':1')"
  ;;
esac
kill -TERM $SRV; wait $SRV; echo "SERVER-EXIT $?"
case $DEV in /dev/ublkb*|/dev/dm-*) test -e /sys/block/${DEV#/dev/} && GONE=" $DEV exists" ;; esac
echo "STILL $(cat /sys/block/${DEV#/dev/}/pid 2>/dev/null)$GONE"
# Through device-mapper: LVM2's name and uuid. A killed server leaves its
# device; releasing the lease (a second one, with its own two-segment
# volume) removes it before the extents are freed.
case $DEV in /dev/dm-*)
  devpool --pool g --json lease acquire --volumes c:4M,d:4M --owner-pid $$ > /tmp/lease2.json || echo GUEST-STEP-FAILED acquire2
  C=$(grep '"lv"' /tmp/lease2.json | head -1 | sed 's/.*"lv": *"\([^"]*\)".*/\1/')
  devpool --devices /dev/vda lv resize devpool-g/$C --size +4M --yes > /dev/null || echo GUEST-STEP-FAILED resize2
  devpool --pool g --json serve $C --block-device > /tmp/serve2.out 2>/tmp/serve2.err &
  SRV=$!
  n=0; while [ ! -s /tmp/serve2.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  DEV2=$(sed 's/.*"block_device":"\([^"]*\)".*/\1/' /tmp/serve2.out)
  kill -9 $SRV; wait $SRV
  test -e /sys/block/${DEV2#/dev/} && echo "LEFT-BEHIND $DEV2"
  S=$(grep '"session"' /tmp/lease2.json | head -1 | sed 's/.*"session": *"\([^"]*\)".*/\1/')
  devpool --pool g lease release $S > /tmp/release.log 2>&1 || { cat /tmp/release.log; echo GUEST-STEP-FAILED release; }
  test -e /sys/block/${DEV2#/dev/} && echo "AFTER-RELEASE $DEV2 exists"
  echo "DM-DEVICES-LEFT $(ls /sys/block | grep -c '^dm-')"
  ;;
esac
"#;
    // util-linux's blkdiscard (-z: write zeroes) and coreutils' dd (dsync:
    // FUA writes), beside busybox's.
    let bins = [
        "/usr/sbin/blkdiscard=/opt/blkdiscard",
        "/usr/bin/dd=/opt/dd",
    ];
    let console = devpool_in_guest(&lab, &kernel, &[&disk], modules, &bins, script);
    let serve_line = console
        .lines()
        .find(|l| l.starts_with("SERVE "))
        .unwrap_or_else(|| panic!("no serve line:\n{console}"));
    assert!(
        serve_line.contains(&format!(r#""path":"{path}""#)),
        "{console}"
    );
    assert!(serve_line.contains(dev_prefix), "{console}");
    let sum = |tag: &str| first_word(&tagged(&console, tag));
    assert_eq!(sum("DATASUM "), sum("BACKSUM "), "{console}");
    assert!(console.contains("SERVER-EXIT 0"), "{console}");
    assert!(
        console.lines().any(|l| l.trim() == "STILL"),
        "the block device is still there:\n{console}"
    );
    // The host reads the volume back where LVM2 says its extents are.
    let lv = console
        .lines()
        .find_map(|l| l.strip_prefix("VOLUME "))
        .unwrap()
        .trim()
        .to_string();
    let devs = [disk.as_path()];
    let layout = Layout::of(&devs, "devpool-g", &lv);
    assert!(layout.segs.len() >= 2, "expected two segments");
    let host_sum = layout.sha256(16 << 20, &lab.path("vol.bin"));
    assert_eq!(host_sum, sum("FINALSUM "));
    if path == "dm" {
        let lvm2_name = format!("devpool--g-{}", lv.replace('-', "--"));
        let dm = sum("DMNAME ");
        assert_eq!(dm, lvm2_name, "{console}");
        assert!(
            console
                .lines()
                .any(|l| l.starts_with("DMNAME ") && l.contains(" LVM-")),
            "{console}"
        );
        assert!(console.contains("LEFT-BEHIND /dev/dm-"), "{console}");
        assert!(!console.contains("AFTER-RELEASE"), "{console}");
        assert_eq!(sum("DM-DEVICES-LEFT "), "0", "{console}");
        assert!(!console.contains("RESIZED-UNDER-DM"), "{console}");
        assert_eq!(sum("RESIZE-REFUSED "), "2", "{console}");
    }
    if path == "ublk" {
        // One queue per guest vCPU (two).
        assert_eq!(sum("HWQUEUES "), "2", "{console}");
        assert_ne!(sum("FINALSUM "), sum("DATASUM "), "the zeroed MiB");
    }
}

/// In a guest with device-mapper: a two-segment volume of a pool on an
/// image file becomes a dm device over a loop window of the image (the
/// window starts at the volume's first extent, so no PV label shows), and
/// its data lands in the image where the metadata says; a striped volume
/// over /dev/vda and /dev/vdb becomes a `dm-stripe` device, and the host
/// finds its data where LVM2 says.
#[test]
fn guest_with_device_mapper_serves_image_file_pools_and_striped_volumes() {
    use common::guest::*;
    let Some((kernel, mut lab)) =
        guest_lab("device-mapper over image files and stripes in a guest")
    else {
        return;
    };
    let a = lab.loop_dev("guest-a.img", 256);
    let b = lab.loop_dev("guest-b.img", 256);
    let script = r#"
export DEVPOOL_STATE_DIR=/tmp/state DEVPOOL_FSTAB=/tmp/fstab HOME=/tmp
touch /tmp/fstab
serve_bd() {
  rm -f /tmp/serve.out
  devpool --pool $2 --json serve $1 --block-device > /tmp/serve.out 2>/tmp/serve.err &
  SRV=$!
  n=0; while [ ! -s /tmp/serve.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  cat /tmp/serve.err
  echo "SERVE-$2 $(cat /tmp/serve.out)"
  DEV=$(sed 's/.*"block_device":"\([^"]*\)".*/\1/' /tmp/serve.out)
}
# 1. A pool on an image file.
devpool pool setup /tmp/pool.img --name img --image-size 64M --yes > /tmp/s1.log 2>&1 || { cat /tmp/s1.log; echo GUEST-STEP-FAILED setup-image; }
devpool --pool img --json lease acquire --volumes a:8M,b:4M --owner-pid $$ > /tmp/l1.json || echo GUEST-STEP-FAILED acquire-image
A=$(grep '"lv"' /tmp/l1.json | head -1 | sed 's/.*"lv": *"\([^"]*\)".*/\1/')
devpool lv resize devpool-img/$A --size +8M --yes > /dev/null || echo GUEST-STEP-FAILED resize-image
LOOPS=$(ls -d /sys/block/loop*/loop 2>/dev/null | wc -l)
serve_bd $A img
for u in /sys/block/${DEV#/dev/}/slaves/*; do echo "UNDER ${u##*/} $(cat $u/loop/offset)"; done
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
echo "IMG-DATASUM $(sha256sum < /tmp/data)"
dd if=/tmp/data of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED write-image
kill -TERM $SRV; wait $SRV; echo "IMG-SERVER-EXIT $?"
echo "IMG-LOOPS-LEFT $(( $(ls -d /sys/block/loop*/loop 2>/dev/null | wc -l) - LOOPS ))"
# Each segment's bytes of the image, where the metadata says they are.
devpool --json lv list devpool-img --segments > /tmp/segs.json || echo GUEST-STEP-FAILED segments
awk -v lv="$A" '/"lv_name"/ { inlv = index($0, "\"" lv "\"") > 0 } inlv && /"offset"/ { gsub(/[^0-9]/, ""); off = $0 } inlv && /"seg_size"/ { gsub(/[^0-9]/, ""); print off, $0 }' /tmp/segs.json > /tmp/segs.txt
: > /tmp/back
while read off size; do dd if=/tmp/pool.img bs=1M skip=$((off / 1048576)) count=$((size / 1048576)) >> /tmp/back 2>/dev/null; done < /tmp/segs.txt
echo "IMG-SEGMENTS $(wc -l < /tmp/segs.txt)"
echo "IMG-BACKSUM $(sha256sum < /tmp/back)"
# 2. A striped volume over two disks, leased to this shell.
devpool pool setup /dev/vda --name s --yes > /tmp/s2.log 2>&1 || { cat /tmp/s2.log; echo GUEST-STEP-FAILED setup-disk; }
devpool --devices /dev/vda,/dev/vdb vg extend devpool-s /dev/vdb > /tmp/ext.log 2>&1 || { cat /tmp/ext.log; echo GUEST-STEP-FAILED extend; }
START=$(sed 's/^.*) //' /proc/$$/stat | cut -d' ' -f20)
# The host tag as devpool writes it, from a lease of its own.
devpool --pool s --json lease acquire --volumes x:4M --owner-pid $$ > /tmp/l2.json || echo GUEST-STEP-FAILED acquire-disk
HOST=$(devpool --devices /dev/vda,/dev/vdb --json lv list devpool-s | grep -o 'devpool.host=[^"]*' | head -1 | cut -d= -f2)
devpool --devices /dev/vda,/dev/vdb lv create devpool-s/striped --size 16M --stripes 2 --stripe-size 64K \
  --tag devpool.lease=20261122000000-abcdef --tag devpool.role=test --tag devpool.pid=$$ \
  --tag devpool.start=$START --tag devpool.boot=$(cat /proc/sys/kernel/random/boot_id) \
  --tag devpool.host=$HOST > /tmp/c.log 2>&1 || { cat /tmp/c.log; echo GUEST-STEP-FAILED create-striped; }
serve_bd striped s
# LVM2 sees the LV devpool activated as active (lv_attr's fifth letter).
mkdir -p /run/lock/lvm /run/lvm
echo "LVM2-ATTR $(lvm lvs --noheadings -o lv_attr devpool-s/striped --config 'activation{udev_sync=0 udev_rules=0} devices{obtain_device_list_from_udev=0} backup{backup=0 archive=0}' 2>/tmp/lvs.err)"
cat /tmp/lvs.err
echo "STRIPED-UNDER $(ls /sys/block/${DEV#/dev/}/slaves | tr '\n' ' ')"
dd if=/dev/urandom of=/tmp/data2 bs=1M count=16 2>/dev/null
echo "STRIPED-DATASUM $(sha256sum < /tmp/data2)"
dd if=/tmp/data2 of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED write-striped
kill -TERM $SRV; wait $SRV; echo "STRIPED-SERVER-EXIT $?"
echo "DM-DEVICES-LEFT $(ls /sys/block | grep -c '^dm-')"
# 3. A snapshotted volume LVM2 has active (dm-snapshot) is served through
# LVM2's own devices, which the server neither makes nor removes: what
# qemu-io writes over NBD is on LVM2's origin. Once LVM2 lets go, the
# server makes the family's stack itself.
X=$(grep '"lv"' /tmp/l2.json | head -1 | sed 's/.*"lv": *"\([^"]*\)".*/\1/')
devpool --pool s snapshot create $X --name before --size 4M > /tmp/snap.log 2>&1 || { cat /tmp/snap.log; echo GUEST-STEP-FAILED snapshot; }
lvm_c vgchange -ay devpool-s > /tmp/vgc.log 2>&1 || { cat /tmp/vgc.log; echo GUEST-STEP-FAILED vgchange-ay; }
echo "LVM2-ACTIVE $(ls /sys/block | grep -c '^dm-')"
devpool --pool s serve $X --nbd unix:/tmp/x.sock > /tmp/beside.out 2>&1 &
SRV=$!
n=0; while [ ! -S /tmp/x.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
qemu-io -f raw 'nbd+unix:///?socket=/tmp/x.sock' -c 'write -P 0x3c 0 65536' > /tmp/qio.log 2>&1 || { cat /tmp/qio.log /tmp/beside.out; echo "GUEST-STEP-FAILED qemu-io"; }
kill -TERM $SRV; wait $SRV; echo "BESIDE-EXIT $?"
echo "LVM2-KEPT $(ls /sys/block | grep -c '^dm-')"
XDM=devpool--s-$(echo $X | sed 's/-/--/g')
for d in /sys/block/dm-*; do [ "$(cat $d/dm/name)" = "$XDM" ] && XNODE=/dev/${d##*/}; done
dd if=$XNODE of=/tmp/x64 bs=64k count=1 iflag=direct 2>/dev/null
echo "ON-LVM2-ORIGIN $(wc -c < /tmp/x64) bytes, $(tr -d '\074' < /tmp/x64 | wc -c) not 0x3c"
lvm_c vgchange -an devpool-s > /tmp/vgc.log 2>&1 || { cat /tmp/vgc.log; echo GUEST-STEP-FAILED vgchange-an; }
devpool --pool s --json serve $X --nbd unix:/tmp/x2.sock > /tmp/x.out 2>&1 &
SRV=$!
n=0; while [ ! -s /tmp/x.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "SERVED-AFTER $(cat /tmp/x.out)"
echo "OWN-STACK $(ls /sys/block | grep -c '^dm-')"
kill -TERM $SRV; wait $SRV
echo "OWN-STACK-LEFT $(ls /sys/block | grep -c '^dm-')"
"#;
    let script = format!("{DM_GUEST_HELPERS}{script}");
    let modules = ["virtio_blk", "loop", "dm_mod", "dm_snapshot"];
    let console = devpool_in_guest(
        &lab,
        &kernel,
        &[&a, &b],
        &modules,
        &["/sbin/lvm", "/usr/bin/qemu-io"],
        &script,
    );
    let line = |tag: &str| tagged(&console, tag);
    let first = |tag: &str| first_word(&line(tag));
    // The image-file pool: dm over one loop window that starts past the label.
    assert!(line("SERVE-img ").contains(r#""path":"dm""#), "{console}");
    let under: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("UNDER loop"))
        .collect();
    assert_eq!(
        under.len(),
        1,
        "one loop device under the dm device:\n{console}"
    );
    let offset: u64 = under[0].split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(
        offset >= 1 << 20,
        "the window starts at the first extent: {offset}"
    );
    assert_eq!(line("IMG-SERVER-EXIT "), "0", "{console}");
    assert_eq!(line("IMG-LOOPS-LEFT "), "0", "{console}");
    assert_eq!(line("IMG-SEGMENTS "), "2", "{console}");
    assert_eq!(first("IMG-DATASUM "), first("IMG-BACKSUM "), "{console}");
    // The striped volume: dm-stripe over both disks, data where LVM2 says.
    assert!(line("SERVE-s ").contains(r#""path":"dm""#), "{console}");
    let attr = line("LVM2-ATTR ");
    assert_eq!(
        attr.chars().nth(4),
        Some('a'),
        "LVM2 sees it active: {attr}\n{console}"
    );
    let slaves = line("STRIPED-UNDER ");
    assert!(
        slaves.contains("vda") && slaves.contains("vdb"),
        "{console}"
    );
    assert_eq!(line("STRIPED-SERVER-EXIT "), "0", "{console}");
    assert_eq!(line("DM-DEVICES-LEFT "), "0", "{console}");
    let devs = [a.as_path(), b.as_path()];
    let layout = Layout::of(&devs, "devpool-s", "striped");
    let host_sum = layout.sha256(16 << 20, &lab.path("striped.bin"));
    assert_eq!(host_sum, first("STRIPED-DATASUM "), "{console}");
    // LVM2 activated the VG (origin, -real, snapshot, -cow, striped, x's
    // neighbours…): devpool served the origin through LVM2's dm-snapshot
    // stack, leaving it as it was.
    let active = line("LVM2-ACTIVE ");
    assert!(active.parse::<u32>().unwrap() >= 4, "{console}");
    assert_eq!(line("BESIDE-EXIT "), "0", "{console}");
    assert_eq!(line("LVM2-KEPT "), active, "{console}");
    assert_eq!(
        line("ON-LVM2-ORIGIN "),
        "65536 bytes, 0 not 0x3c",
        "{console}"
    );
    // After LVM2: the server's own stack (-real, -cow, snapshot, origin),
    // gone with it.
    assert!(line("SERVED-AFTER ").contains(r#""nbd""#), "{console}");
    assert_eq!(line("OWN-STACK "), "4", "{console}");
    assert_eq!(line("OWN-STACK-LEFT "), "0", "{console}");
}

/// The start of the snapshot guest tests: helpers (`step CMD…` reports a
/// failed step, `field NAME FILE` reads a JSON string, `serve LV` serves it
/// as a block device in the background and sets DEV and SRV, `stop` ends
/// it), a pool on /dev/vda, a leased 8 MiB volume A (loop device LOOP)
/// filled with /tmp/old, and its snapshot `s`. (A COW store for all 8 MiB
/// of the volume needs room for its header and exception areas too: 12M.)
const SNAPSHOT_PRELUDE: &str = r#"
export DEVPOOL_STATE_DIR=/tmp/state DEVPOOL_FSTAB=/tmp/fstab HOME=/tmp
touch /tmp/fstab
step() { "$@" > /tmp/step.log 2>&1 || { cat /tmp/step.log; echo "GUEST-STEP-FAILED $*"; }; }
field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" $2 | head -1; }
# Serve $1 as a block device in the background: sets DEV and SRV.
serve() {
  rm -f /tmp/serve.out
  devpool --pool g --json serve $1 --block-device > /tmp/serve.out 2>/tmp/serve.err &
  SRV=$!
  n=0; while [ ! -s /tmp/serve.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  cat /tmp/serve.err
  echo "SERVE $1 $(cat /tmp/serve.out)"
  DEV=$(sed 's/.*"block_device":"\([^"]*\)".*/\1/' /tmp/serve.out)
}
stop() { kill -TERM $SRV; wait $SRV || echo "GUEST-STEP-FAILED server exit $?"; }
step devpool pool setup /dev/vda --name g --yes
devpool --pool g --json lease acquire --volumes a:8M --owner-pid $$ > /tmp/lease.json || echo GUEST-STEP-FAILED acquire
A=$(field lv /tmp/lease.json); LOOP=$(field device /tmp/lease.json)
dd if=/dev/urandom of=/tmp/old bs=1M count=8 2>/dev/null
dd if=/tmp/old of=$LOOP bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED fill
step devpool --pool g snapshot create $A --name s --size 12M
"#;

/// In a guest with device-mapper, a snapshotted origin and its snapshot
/// served as block devices are the kernel's dm-snapshot, stacked as LVM2
/// stacks them (`-real`, `-cow`, `snapshot`, `snapshot-origin`): a write
/// through the origin leaves the snapshot showing the old data, every
/// device goes with its server, and devpool's own copy-on-write then takes
/// the store over as the kernel left it (a merge rolls the origin back).
#[test]
fn guest_with_device_mapper_serves_snapshots_with_dm_snapshot() {
    let Some((kernel, mut lab)) = guest_lab("dm-snapshot for devpool snapshots in a guest") else {
        return;
    };
    let disk = lab.loop_dev("guest-dmsnap.img", 256);
    let script = format!(
        "{SNAPSHOT_PRELUDE}{ACTIVATE_BESIDE_SERVER}{}",
        r#"
# Serve $1 over NBD at socket $2 in the background: sets NSRV.
nbd_serve() {
  devpool --pool g serve $1 --nbd unix:$2 > /tmp/nbd.log 2>&1 &
  NSRV=$!
  n=0; while [ ! -S $2 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  [ -S $2 ] || { cat /tmp/nbd.log; echo "GUEST-STEP-FAILED nbd_serve $1"; }
}
# The node of dm device $1 (no udev here: no /dev/mapper links).
node_of() { for d in /sys/block/dm-*; do [ "$(cat $d/dm/name)" = "$1" ] && echo /dev/${d##*/}; done; }
# No dm-snapshot target yet: an NBD server of the origin does devpool's own
# copy-on-write, and the family does not go to the kernel beside it.
nbd_serve $A /tmp/o.sock
echo "USER-STACK $(ls /sys/block | grep -c '^dm-')"
insmod /lib/modules/dm_snapshot.ko || echo "GUEST-STEP-FAILED insmod dm_snapshot"
activate_beside_server devpool-g/s
kill -TERM $NSRV; wait $NSRV || echo "GUEST-STEP-FAILED nbd server exit $?"
dd if=/dev/urandom of=/tmp/new bs=1M count=8 2>/dev/null
serve $A
echo "STACK $(for d in /sys/block/dm-*/dm/name; do cat $d; done | sort | tr '\n' ' ')"
dd if=/tmp/new of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED origin-write
dd if=$DEV of=/tmp/origin bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED origin-read
stop
echo "AFTER-ORIGIN $(ls /sys/block | grep -c '^dm-')"
serve s
dd if=$DEV of=/tmp/snap bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED snapshot-read
stop
echo "AFTER-SNAPSHOT $(ls /sys/block | grep -c '^dm-')"
# Over NBD the family is the kernel's too. A family `lv activate` made is
# used as it is: the NBD server makes and removes nothing, and what
# qemu-io writes lands on the kernel's origin, the snapshot unchanged.
step env DEVPOOL_DEVICES=/dev/vda devpool lv activate devpool-g/s
echo "ACT-FAMILY $(ls /sys/block | grep -c '^dm-')"
nbd_serve $A /tmp/o2.sock
qemu-io -f raw 'nbd+unix:///?socket=/tmp/o2.sock' -c 'write -P 0x5a 0 65536' > /tmp/qio.log 2>&1 || { cat /tmp/qio.log; echo "GUEST-STEP-FAILED qemu-io"; }
kill -TERM $NSRV; wait $NSRV || echo "GUEST-STEP-FAILED nbd server exit $?"
echo "NBD-KEPT $(ls /sys/block | grep -c '^dm-')"
dd if=$(node_of devpool--g-$(echo $A | sed 's/-/--/g')) of=/tmp/o64 bs=64k count=1 iflag=direct 2>/dev/null
echo "NBD-ORIGIN $(wc -c < /tmp/o64) bytes, $(tr -d '\132' < /tmp/o64 | wc -c) not 0x5a"
echo "NBD-SNAP $(dd if=$(node_of devpool--g-s) bs=1M iflag=direct 2>/dev/null | sha256sum)"
step env DEVPOOL_DEVICES=/dev/vda devpool lv deactivate devpool-g/s
echo "DEACT-LEFT $(ls /sys/block | grep -c '^dm-')"
# An NBD server alone makes the family's stack and takes it down.
nbd_serve $A /tmp/o3.sock
echo "NBD-STACK $(ls /sys/block | grep -c '^dm-')"
# pool status: the server holds them, nothing for health to name.
devpool --pool g --json pool status > /tmp/st.json
echo "SERVER-HELD $(grep -o '"held_by": *"server [0-9]*"' /tmp/st.json | wc -l) $(grep -c 'device-mapper has' /tmp/st.json)"
# The family is not taken apart under its server (the snapshot's device
# would go, the origin's stay open without copying out to it).
DEVPOOL_DEVICES=/dev/vda devpool lv deactivate devpool-g/s > /tmp/deact.log 2>&1 && echo "DEACTIVATED-UNDER-SERVER"
echo "IN-USE $(grep -c 'is in use' /tmp/deact.log) $(ls /sys/block | grep -c '^dm-')"
echo "ACT-SERVERS $(DEVPOOL_DEVICES=/dev/vda devpool lv activate devpool-g/s 2>&1)"
kill -TERM $NSRV; wait $NSRV || echo "GUEST-STEP-FAILED nbd server exit $?"
echo "NBD-LEFT $(ls /sys/block | grep -c '^dm-')"
# Servers of the snapshot and of its origin started at once. The
# snapshot's server makes the family's stack and pauses before it
# registers; the origin's server, started meanwhile, must not take the
# family (it waits for the first to register, finds it there and is
# refused, having made nothing), or the first, refused, would remove the
# snapshot's device from under the origin's server: origin writes would
# no longer copy out to the snapshot.
DEVPOOL_FAULT_PAUSE_BEFORE_REGISTER_MS=2500 devpool --pool g serve s --nbd unix:/tmp/r1.sock > /tmp/r1.log 2>&1 &
R1=$!
n=0; while [ $(ls /sys/block | grep -c '^dm-') -lt 4 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
devpool --pool g serve $A --nbd unix:/tmp/r2.sock > /tmp/r2.log 2>&1 &
R2=$!
n=0; while [ ! -S /tmp/r1.sock ] && [ ! -S /tmp/r2.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
sleep 5
echo "RACE $(ls /tmp/r1.sock /tmp/r2.sock 2>/dev/null | wc -l) $(cat /tmp/r1.log /tmp/r2.log | grep -c 'already serves it') $(ls /sys/block | grep -c '^dm-')"
kill -TERM $R1 $R2 2>/dev/null; wait $R1; wait $R2
echo "RACE-LEFT $(ls /sys/block | grep -c '^dm-')"
# devpool's own copy-on-write reads the store dm-snapshot wrote.
step devpool --pool g snapshot merge s --yes
serve $A
dd if=$DEV of=/tmp/merged bs=1M count=8 iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED merged-read
stop
echo "OLD $(sha256sum < /tmp/old)"
echo "NEW $(sha256sum < /tmp/new)"
echo "ORIGIN $(sha256sum < /tmp/origin)"
echo "SNAP $(sha256sum < /tmp/snap)"
echo "MERGED $(sha256sum < /tmp/merged)"
# A stack a killed server leaves behind: no new snapshot joins the origin
# (the kernel would not copy out for it), and the release removes it all.
step devpool --pool g snapshot create $A --name t --size 12M
serve $A
kill -9 $SRV; wait $SRV
echo "KILLED-LEFT $(ls /sys/block | grep -c '^dm-')"
devpool --pool g snapshot create $A --name u --size 4M > /tmp/u.log 2>&1 && echo "SNAPSHOT-BESIDE-DM"
echo "REFUSED $(tr '\n' ' ' < /tmp/u.log)"
echo "STATUS-DM $(devpool --pool g --json pool status | grep -c 'device-mapper has 4 of this pool')"
step devpool --pool g lease release $(field session /tmp/lease.json)
echo "RELEASED-LEFT $(ls /sys/block | grep -c '^dm-')"
"#
    );
    let modules = ["virtio_blk", "loop", "dm_mod", "later:dm_snapshot"];
    let console = devpool_in_guest(
        &lab,
        &kernel,
        &[&disk],
        &modules,
        &["/usr/bin/qemu-io"],
        &script,
    );
    let line = |tag: &str| tagged(&console, tag);
    let sum = |tag: &str| first_word(&line(tag));
    assert_eq!(line("USER-STACK "), "0", "{console}");
    assert_refused_beside_server(
        &console,
        &[
            "cannot go to dm-snapshot",
            "with devpool's own copy-on-write",
        ],
    );
    let serves: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("SERVE "))
        .collect();
    assert_eq!(serves.len(), 4, "{console}");
    assert!(serves[0].contains(r#""path":"dm""#), "{console}");
    assert!(serves[1].contains(r#""path":"dm""#), "{console}");
    // The stack LVM2 would make, with its names.
    let stack = line("STACK ");
    for part in ["-real", "-s-cow", "devpool--g-s"] {
        assert!(stack.contains(part), "{part} missing from {stack}");
    }
    assert_eq!(stack.split_whitespace().count(), 4, "{stack}");
    assert_eq!(line("AFTER-ORIGIN "), "0", "{console}");
    assert_eq!(line("AFTER-SNAPSHOT "), "0", "{console}");
    assert_eq!(line("ACT-FAMILY "), "4", "{console}");
    assert_eq!(line("NBD-KEPT "), "4", "{console}");
    assert_eq!(
        line("NBD-ORIGIN "),
        "65536 bytes, 0 not 0x5a",
        "qemu-io's write is on the kernel's origin:\n{console}"
    );
    assert_eq!(sum("NBD-SNAP "), sum("OLD "), "{console}");
    assert_eq!(line("DEACT-LEFT "), "0", "{console}");
    assert_eq!(line("NBD-STACK "), "4", "{console}");
    assert_eq!(line("SERVER-HELD "), "4 0", "{console}");
    assert!(!console.contains("DEACTIVATED-UNDER-SERVER"), "{console}");
    assert_eq!(line("IN-USE "), "1 4", "{console}");
    // lv activate uses the server's stack as it is, and says whose it is.
    assert!(
        line("ACT-SERVERS ").contains("is active already")
            && line("ACT-SERVERS ").contains("it goes when that server stops"),
        "{console}"
    );
    assert_eq!(line("RACE "), "1 1 4", "{console}");
    assert_eq!(line("RACE-LEFT "), "0", "{console}");
    assert_eq!(line("NBD-LEFT "), "0", "{console}");
    assert_eq!(sum("ORIGIN "), sum("NEW "), "{console}");
    assert_eq!(
        sum("SNAP "),
        sum("OLD "),
        "the snapshot keeps the old data:\n{console}"
    );
    assert_eq!(
        sum("MERGED "),
        sum("OLD "),
        "the merge rolled back:\n{console}"
    );
    assert_eq!(line("KILLED-LEFT "), "4", "{console}");
    assert!(!console.contains("SNAPSHOT-BESIDE-DM"), "{console}");
    assert!(line("REFUSED ").contains("device-mapper has"), "{console}");
    assert_eq!(
        line("STATUS-DM "),
        "1",
        "pool status names them:\n{console}"
    );
    assert_eq!(line("RELEASED-LEFT "), "0", "{console}");
}

/// A host with device-mapper but without dm-thin (the module is packed,
/// not loaded): a thin lease gets no dm device (a note says so) and its
/// server does devpool's own thin mappings. Once dm-thin is there, the
/// pool does not go to the kernel beside that server (`lv activate` is
/// refused, naming it); after the server, it does, and dm-thin reads what
/// devpool's mappings wrote.
#[test]
fn guest_a_thin_pool_does_not_go_to_dm_thin_beside_devpools_own_thin_mappings() {
    let Some((kernel, mut lab)) = guest_lab("dm-thin beside devpool's thin mappings in a guest")
    else {
        return;
    };
    let disk = lab.loop_dev("guest-thinbeside.img", 256);
    let script = ACTIVATE_BESIDE_SERVER.to_string()
        + r#"
export DEVPOOL_STATE_DIR=/tmp/state DEVPOOL_FSTAB=/tmp/fstab HOME=/tmp
touch /tmp/fstab
step() { "$@" > /tmp/step.log 2>&1 || { cat /tmp/step.log; echo "GUEST-STEP-FAILED $*"; }; }
field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" $2 | head -1; }
dms() { ls /sys/block | grep -c '^dm-'; }
step devpool pool setup /dev/vda --name g --yes
step devpool --pool g pool thin enable --data-size 64M
devpool --pool g --json lease acquire --volumes t:16M --owner-pid $$ > /tmp/l.json || echo "GUEST-STEP-FAILED acquire"
T=$(field lv /tmp/l.json)
echo "NOTE $(grep -c 'has no device-mapper device' /tmp/l.json) $(dms)"
devpool --pool g serve $T --nbd unix:/tmp/t.sock > /tmp/srv.log 2>&1 &
SRV=$!
n=0; while [ ! -S /tmp/t.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
qemu-io -f raw 'nbd+unix:///?socket=/tmp/t.sock' -c 'write -P 0x61 0 65536' > /tmp/qio.log 2>&1 || { cat /tmp/qio.log /tmp/srv.log; echo "GUEST-STEP-FAILED qemu-io"; }
insmod /lib/modules/dm_thin_pool.ko || echo "GUEST-STEP-FAILED insmod dm_thin_pool"
activate_beside_server devpool-g/$T
kill -TERM $SRV; wait $SRV || echo "GUEST-STEP-FAILED server exit $?"
DEVPOOL_DEVICES=/dev/vda devpool --json lv activate devpool-g/$T > /tmp/act2.json 2>&1 || { cat /tmp/act2.json; echo "GUEST-STEP-FAILED activate"; }
D=$(field device /tmp/act2.json)
dd if=$D of=/tmp/t64 bs=64k count=1 iflag=direct 2>/dev/null
echo "DM-THIN-READS $(wc -c < /tmp/t64) bytes, $(tr -d '\141' < /tmp/t64 | wc -c) not 0x61"
step env DEVPOOL_DEVICES=/dev/vda devpool lv deactivate devpool-g/$T
step devpool --pool g lease release $(field session /tmp/l.json)
echo "LEFT $(dms)"
"#;
    let modules = [
        "virtio_blk",
        "loop",
        "crc32c_generic",
        "dm_mod",
        "later:dm_thin_pool",
    ];
    let console = devpool_in_guest(
        &lab,
        &kernel,
        &[&disk],
        &modules,
        &["/usr/bin/qemu-io"],
        &script,
    );
    let line = |tag: &str| tagged(&console, tag);
    assert_eq!(line("NOTE "), "1 0", "{console}");
    assert_refused_beside_server(
        &console,
        &["cannot go to dm-thin", "with devpool's own thin mappings"],
    );
    assert_eq!(
        line("DM-THIN-READS "),
        "65536 bytes, 0 not 0x61",
        "{console}"
    );
    assert_eq!(line("LEFT "), "0", "{console}");
}

/// A thin volume LVM2 has activated (dm-thin holds the pool's metadata in
/// the kernel) is served through LVM2's own dm device (over NBD and as the
/// block device), which devpool neither makes nor removes. Meanwhile
/// devpool's lease changes go to dm-thin as messages (an orphan device id
/// an interrupted change left in the kernel is replaced; LVM2 activates
/// the new volume at once, and the kernel's transaction follows the VG's);
/// `vg trim` leaves the pool's free data blocks to dm-thin; once LVM2 lets go, devpool serves the volume with
/// its own activation; LVM2 activates the pool again at the end
/// (thin_check, transaction ids).
#[test]
fn guest_a_thin_volume_lvm2_activated_is_served_through_lvm2s_dm_thin_device() {
    use common::guest::*;
    let Some((kernel, mut lab)) = guest_lab("dm-thin activated by LVM2 in a guest") else {
        return;
    };
    let disk = lab.loop_dev("guest-thin.img", 256);
    let script = r#"
export DEVPOOL_STATE_DIR=/tmp/state DEVPOOL_FSTAB=/tmp/fstab HOME=/tmp
touch /tmp/fstab
mkdir -p /run/lock/lvm /run/lvm
field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" $2 | head -1; }
devpool pool setup /dev/vda --name g --yes > /tmp/s.log 2>&1 || { cat /tmp/s.log; echo GUEST-STEP-FAILED setup; }
devpool --pool g pool thin enable --data-size 64M > /tmp/t.log 2>&1 || { cat /tmp/t.log; echo GUEST-STEP-FAILED thin; }
devpool --pool g --json lease acquire --volumes t:16M --owner-pid $$ > /tmp/lease.json || echo GUEST-STEP-FAILED acquire
T=$(grep '"lv"' /tmp/lease.json | head -1 | sed 's/.*"lv": *"\([^"]*\)".*/\1/')
lvm_c vgchange -ay -K devpool-g > /tmp/vgc.log 2>&1 || { cat /tmp/vgc.log; echo GUEST-STEP-FAILED vgchange-ay; }
echo "ACTIVE $(ls /sys/block | grep -c '^dm-')"
# Served through LVM2's own dm-thin device: devpool makes and removes nothing.
devpool --pool g --json serve $T --nbd unix:/tmp/k.sock --block-device > /tmp/k.out 2> /tmp/k.err &
SRV=$!
n=0; while [ ! -s /tmp/k.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "SERVED-BY-DM $(tr -d ' \n' < /tmp/k.out) $(cat /tmp/k.err)"
for d in /sys/block/dm-*; do [ "$(cat $d/dm/name)" = "devpool--g-$(echo $T | sed 's/-/--/g')" ] && echo "LVM2-NODE /dev/${d##*/}"; done
kill -TERM $SRV; wait $SRV; echo "KERNEL-SERVER-EXIT $?"
echo "LVM2-KEEPS $(ls /sys/block | grep -c '^dm-')"
# dm-thin holds the pool's metadata: devpool's changes go to it as
# messages (as LVM2's do): a new thin volume LVM2 can activate at once,
# and its release while LVM2 has it active.
tpool_trans() { dmsetup status devpool--g-thinpool-tpool | awk '{print $4}'; }
vg_trans() { lvm_c lvs --noheadings -o transaction_id devpool-g/thinpool | tr -d ' '; }
# An interrupted change left thin device 2 in the kernel, unknown to the VG:
# the acquire that takes id 2 deletes it and creates it again.
dmsetup message devpool--g-thinpool-tpool 0 "create_thin 2" && echo "ORPHAN-MADE"
devpool --pool g --json lease acquire --volumes u:8M --owner-pid $$ > /tmp/a2.json 2> /tmp/a2.err || { cat /tmp/a2.err; echo GUEST-STEP-FAILED acquire-beside-dm; }
U=$(field lv /tmp/a2.json)
echo "TRANS $(tpool_trans) $(vg_trans)"
lvm_c lvchange -ay -K devpool-g/$U > /tmp/u.log 2>&1 && echo "LVM2-ACTIVATED-NEW" || cat /tmp/u.log
dd if=/dev/zero bs=1M count=1 2>/dev/null | tr '\000' '\125' > /tmp/u.data
dd if=/tmp/u.data of=/dev/mapper/devpool--g-$(echo $U | sed 's/-/--/g') bs=1M oflag=direct 2>/dev/null && echo "WROTE-NEW"
# The deletion was done already (an interrupted change): nothing to delete.
dmsetup remove devpool--g-$(echo $U | sed 's/-/--/g') && dmsetup message devpool--g-thinpool-tpool 0 "delete 2" && echo "PRE-DELETED"
devpool --pool g lease release $(field session /tmp/a2.json) > /tmp/r.out 2>&1 || { cat /tmp/r.out; echo GUEST-STEP-FAILED release-beside-dm; }
echo "TRANS-AFTER $(tpool_trans) $(vg_trans)"
devpool vg trim devpool-g > /tmp/trim.out 2>&1 && echo "TRIMMED-BESIDE-DM"
echo "TRIM-OUTPUT $(tr '\n' ' ' < /tmp/trim.out)"
echo "STILL-ACTIVE $(ls /sys/block | grep -c '^dm-')"
echo "THIN-LVS $(lvm_c lvs --noheadings -o lv_name -S segtype=thin devpool-g | wc -l)"
lvm_c vgchange -an devpool-g > /dev/null 2>&1; dmsetup remove_all
echo "INACTIVE $(ls /sys/block | grep -c '^dm-')"
devpool --pool g --json serve $T --nbd unix:/tmp/t.sock > /tmp/ok.out 2>&1 &
SRV=$!
n=0; while [ ! -s /tmp/ok.out ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "SERVED-AFTER $(cat /tmp/ok.out)"
kill -TERM $SRV; wait $SRV
devpool --pool g lease release $(field session /tmp/lease.json) > /tmp/r2.out 2>&1 && echo "RELEASED-AFTER"
# LVM2 checks the pool (thin_check, transaction ids) as it activates it.
lvm_c vgchange -ay -K devpool-g > /tmp/vgc2.log 2>&1 && echo "REACTIVATED" || cat /tmp/vgc2.log
lvm_c vgchange -an devpool-g > /dev/null 2>&1
"#;
    let script = format!("{DM_GUEST_HELPERS}{script}");
    let modules = [
        "virtio_blk",
        "loop",
        "crc32c_generic",
        "dm_mod",
        "dm_thin_pool",
    ];
    let bins = ["/sbin/lvm", "/sbin/dmsetup", "/usr/sbin/thin_check"];
    let console = devpool_in_guest(&lab, &kernel, &[&disk], &modules, &bins, &script);
    let line = |tag: &str| tagged(&console, tag);
    assert!(line("ACTIVE ").parse::<u32>().unwrap() >= 3, "{console}");
    let served = line("SERVED-BY-DM ");
    let node = line("LVM2-NODE ");
    assert!(
        served.contains(r#""nbd_socket":"/tmp/k.sock""#)
            && served.contains(&format!(r#""block_device":"{node}""#))
            && served.contains(r#""path":"dm""#),
        "{served}\n{console}"
    );
    assert_eq!(line("KERNEL-SERVER-EXIT "), "0", "{console}");
    assert_eq!(line("LVM2-KEEPS "), line("ACTIVE "), "{console}");
    assert!(console.contains("ORPHAN-MADE"), "{console}");
    assert!(console.contains("PRE-DELETED"), "{console}");
    // Each message committed in the kernel: its transaction is the VG's.
    assert_eq!(line("TRANS "), "2 2", "{console}");
    assert!(console.contains("LVM2-ACTIVATED-NEW"), "{console}");
    assert!(console.contains("WROTE-NEW"), "{console}");
    assert_eq!(line("TRANS-AFTER "), "3 3", "{console}");
    // vg trim trims the free extents and leaves the pool's free data
    // blocks to dm-thin, and says so.
    assert!(console.contains("TRIMMED-BESIDE-DM"), "{console}");
    let trimmed = line("TRIM-OUTPUT ");
    assert!(
        trimmed.contains("free data blocks are left alone")
            && trimmed.contains("devpool--g-thinpool"),
        "{trimmed}\n{console}"
    );
    // The release removed the new volume's device (LVM2 made it) only.
    assert_eq!(line("STILL-ACTIVE "), line("ACTIVE "), "{console}");
    assert_eq!(line("THIN-LVS "), "1", "{console}");
    assert_eq!(line("INACTIVE "), "0", "{console}");
    assert!(line("SERVED-AFTER ").contains(r#""nbd""#), "{console}");
    assert!(console.contains("RELEASED-AFTER"), "{console}");
    assert!(console.contains("REACTIVATED"), "{console}");
}

/// `lv activate` / `lv deactivate` in a guest with device-mapper, as
/// LVM2's `lvchange -ay/-an`: a striped LV over two disks becomes
/// `dm-stripe` (LVM2 sees it active, devpool will not remove it meanwhile,
/// the host finds its data where LVM2 says); a snapshot activates its whole
/// family, the origin's writes copy out to it, and deactivating the
/// snapshot removes all four devices.
#[test]
fn guest_lv_activate_and_deactivate_as_lvchange_does() {
    let Some((kernel, mut lab)) = guest_lab("lv activate in a guest") else {
        return;
    };
    let a = lab.loop_dev("guest-act-a.img", 256);
    let b = lab.loop_dev("guest-act-b.img", 256);
    let script = r#"
export DEVPOOL_STATE_DIR=/tmp/state HOME=/tmp DEVPOOL_DEVICES=/dev/vda,/dev/vdb
mkdir -p /run/lock/lvm /run/lvm
step() { "$@" > /tmp/step.log 2>&1 || { cat /tmp/step.log; echo "GUEST-STEP-FAILED $*"; }; }
attr() { lvm_c lvs --noheadings -o lv_attr $1 2>/dev/null | tr -d ' '; }
node_of() { for d in /sys/block/dm-*; do [ "$(cat $d/dm/name)" = "$1" ] && echo /dev/${d##*/}; done; }
step devpool vg create vgx /dev/vda /dev/vdb
step devpool lv create vgx/st --size 16M --stripes 2 --stripe-size 64K
devpool --json lv activate vgx/st > /tmp/act.json || echo GUEST-STEP-FAILED activate
echo "ACTIVATED $(cat /tmp/act.json)"
DEV=$(sed 's/.*"device":"\([^"]*\)".*/\1/' /tmp/act.json)
echo "ATTR-ACTIVE $(attr vgx/st)"
echo "DP-ACTIVE $(devpool --json lv list vgx | grep -c '"lv_active": "active"')"
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
echo "DATASUM $(sha256sum < /tmp/data)"
dd if=/tmp/data of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED write
devpool lv remove vgx/st --yes > /tmp/rm.log 2>&1 && echo "REMOVED-WHILE-ACTIVE"
echo "REMOVE-REFUSED $(grep -c 'device-mapper has it active' /tmp/rm.log)"
step devpool lv deactivate vgx/st
echo "ATTR-INACTIVE $(attr vgx/st)"
echo "DP-INACTIVE $(devpool --json lv list vgx | grep -c '"lv_active": "active"')"
echo "LEFT-1 $(ls /sys/block | grep -c '^dm-')"
# A snapshot family.
step devpool lv create vgx/o --size 8M
devpool --json lv activate vgx/o > /tmp/o.json || echo GUEST-STEP-FAILED activate-o
O=$(sed 's/.*"device":"\([^"]*\)".*/\1/' /tmp/o.json)
dd if=/dev/urandom of=/tmp/old bs=1M count=8 2>/dev/null
dd if=/tmp/old of=$O bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED write-o
step devpool lv deactivate vgx/o
step devpool lv snapshot vgx/o --name s --size 12M
devpool --json lv activate vgx/s > /tmp/s.json || echo GUEST-STEP-FAILED activate-s
echo "FAMILY $(ls /sys/block | grep -c '^dm-')"
S=$(sed 's/.*"device":"\([^"]*\)".*/\1/' /tmp/s.json)
O=$(node_of vgx-o)
dd if=/dev/urandom of=/tmp/new bs=1M count=8 2>/dev/null
dd if=/tmp/new of=$O bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED write-origin
dd if=$S of=/tmp/snap bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED read-snapshot
dd if=$O of=/tmp/origin bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED read-origin
echo "OLD $(sha256sum < /tmp/old)"
echo "NEW $(sha256sum < /tmp/new)"
echo "SNAP $(sha256sum < /tmp/snap)"
echo "ORIGIN $(sha256sum < /tmp/origin)"
step devpool lv deactivate vgx/s
echo "LEFT-2 $(ls /sys/block | grep -c '^dm-')"
"#;
    let script = format!("{}{script}", common::guest::DM_GUEST_HELPERS);
    let modules = ["virtio_blk", "loop", "dm_mod", "dm_snapshot"];
    let console = devpool_in_guest(&lab, &kernel, &[&a, &b], &modules, &["/sbin/lvm"], &script);
    let line = |tag: &str| tagged(&console, tag);
    let sum = |tag: &str| first_word(&line(tag));
    assert!(
        line("ACTIVATED ").contains(r#""devices":["vgx-st"]"#),
        "{console}"
    );
    assert_eq!(line("ATTR-ACTIVE ").chars().nth(4), Some('a'), "{console}");
    assert!(!console.contains("REMOVED-WHILE-ACTIVE"), "{console}");
    assert_eq!(line("REMOVE-REFUSED "), "1", "{console}");
    assert_eq!(
        line("ATTR-INACTIVE ").chars().nth(4),
        Some('-'),
        "{console}"
    );
    assert_eq!(
        line("DP-ACTIVE "),
        "1",
        "devpool's lv list agrees:\n{console}"
    );
    assert_eq!(line("DP-INACTIVE "), "0", "{console}");
    assert_eq!(line("LEFT-1 "), "0", "{console}");
    assert_eq!(line("FAMILY "), "4", "{console}");
    assert_eq!(sum("SNAP "), sum("OLD "), "{console}");
    assert_eq!(sum("ORIGIN "), sum("NEW "), "{console}");
    assert_eq!(line("LEFT-2 "), "0", "{console}");
    let devs = [a.as_path(), b.as_path()];
    let layout = Layout::of(&devs, "vgx", "st");
    assert_eq!(
        layout.sha256(16 << 20, &lab.path("st.bin")),
        sum("DATASUM "),
        "{console}"
    );
}

/// `serve --block-device` of the volumes only devpool's data plane can
/// serve: a snapshotted origin and its snapshot (copy-on-write), and a thin
/// volume. In a guest with ublk each becomes a /dev/ublkbN: a write through
/// the origin's device leaves the snapshot's device showing the old data,
/// and a thin volume's data is there again when it is served again. The
/// ublk device a killed server leaves behind is deleted by the next one.
#[test]
fn guest_with_ublk_serves_snapshots_and_thin_volumes_as_block_devices() {
    let Some((kernel, mut lab)) = guest_lab("ublk snapshots and thin volumes in a guest") else {
        return;
    };
    let disk = lab.loop_dev("guest-cow.img", 256);
    let script = format!(
        "{SNAPSHOT_PRELUDE}{}",
        r#"dd if=/dev/urandom of=/tmp/new bs=1M count=8 2>/dev/null
serve $A
dd if=/tmp/new of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED origin-write
dd if=$DEV of=/tmp/origin bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED origin-read
stop
serve s
dd if=$DEV of=/tmp/snap bs=1M iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED snapshot-read
stop
echo "OLD $(sha256sum < /tmp/old)"
echo "NEW $(sha256sum < /tmp/new)"
echo "ORIGIN $(sha256sum < /tmp/origin)"
echo "SNAP $(sha256sum < /tmp/snap)"
step devpool --pool g lease release $(field session /tmp/lease.json)
step devpool --pool g pool thin enable --data-size 64M
devpool --pool g --json lease acquire --volumes t:32M --owner-pid $$ > /tmp/thin.json || echo GUEST-STEP-FAILED thin-acquire
T=$(field lv /tmp/thin.json)
dd if=/dev/urandom of=/tmp/tdata bs=1M count=4 2>/dev/null
serve $T
dd if=/tmp/tdata of=$DEV bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || echo GUEST-STEP-FAILED thin-write
stop
serve $T
dd if=$DEV of=/tmp/tback bs=1M skip=8 count=4 iflag=direct 2>/dev/null || echo GUEST-STEP-FAILED thin-read
stop
echo "TDATA $(sha256sum < /tmp/tdata)"
echo "TBACK $(sha256sum < /tmp/tback)"
# A server killed outright leaves its ublk device stopped but not deleted;
# the next server deletes it.
serve $T
kill -9 $SRV; wait $SRV
echo "LEFT $(ls /sys/class/ublk-char | tr '\n' ' ')"
serve $T
echo "BESIDE $(ls /sys/class/ublk-char | tr '\n' ' ')"
stop
echo "FINALLY $(ls /sys/class/ublk-char | tr '\n' ' ')."
devpool --pool g --json pool status > /tmp/status.json
echo "THINUSED $(sed -n 's/.*"data_used": *\([0-9]*\).*/\1/p' /tmp/status.json | head -1)"
"#
    );
    let modules = ["virtio_blk", "loop", "ublk_drv"];
    let console = devpool_in_guest(&lab, &kernel, &[&disk], &modules, &[], &script);
    let serves: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("SERVE "))
        .collect();
    assert_eq!(serves.len(), 6, "{console}");
    for s in &serves {
        assert!(s.contains(r#""path":"ublk""#), "{s}\n{console}");
    }
    let sum = |tag: &str| first_word(&tagged(&console, tag));
    assert_ne!(sum("OLD "), sum("NEW "));
    assert_eq!(sum("ORIGIN "), sum("NEW "), "the origin shows the new data");
    assert_eq!(sum("SNAP "), sum("OLD "), "the snapshot keeps the old data");
    assert_eq!(sum("TBACK "), sum("TDATA "), "the thin volume's data");
    let line = |tag: &str| tagged(&console, tag);
    assert_eq!(line("LEFT "), "ublkc0", "the killed server's device stays");
    assert_eq!(
        line("BESIDE "),
        "ublkc0",
        "the next server deleted it (and took its id)"
    );
    assert_eq!(line("FINALLY "), ".", "no device after a clean stop");
    // 4 MiB written: at least 64 of the pool's 64 KiB blocks provisioned.
    let used: u64 = sum("THINUSED ").parse().unwrap();
    assert!(used >= 64, "4 MiB provisioned, {used} blocks used");
}

/// The guest kernel and a lab for a guest test, unless the test must skip
/// (it says why).
fn guest_lab(what: &str) -> Option<(devpool_vm::kernel::Kernel, Lab)> {
    if skip_unless_real(what) {
        return None;
    }
    let kernel = common::guest::guest_or_skip(what)?;
    Some((kernel, Lab::new()))
}

/// The rest of the console line that starts with `tag`, trimmed.
/// Guest shell: `activate_beside_server VG/LV` runs `lv activate` while a
/// devpool server does for the volume what the kernel would (its own
/// copy-on-write or thin mappings). Prints BESIDE-REFUSED (the error) and
/// BESIDE-LEFT (dm devices left); see [`assert_refused_beside_server`].
const ACTIVATE_BESIDE_SERVER: &str = r#"
activate_beside_server() {
  DEVPOOL_DEVICES=/dev/vda devpool lv activate "$1" > /tmp/act.log 2>&1 && echo "ACTIVATED-BESIDE-SERVER"
  echo "BESIDE-REFUSED $(tr '\n' ' ' < /tmp/act.log)"
  echo "BESIDE-LEFT $(ls /sys/block | grep -c '^dm-')"
}
"#;

/// The activation of [`ACTIVATE_BESIDE_SERVER`] was refused, saying each of
/// `says`, and left no dm device.
fn assert_refused_beside_server(console: &str, says: &[&str]) {
    assert!(!console.contains("ACTIVATED-BESIDE-SERVER"), "{console}");
    let refusal = tagged(console, "BESIDE-REFUSED ");
    for s in says {
        assert!(refusal.contains(s), "no '{s}' in the refusal: {console}");
    }
    assert_eq!(tagged(console, "BESIDE-LEFT "), "0", "{console}");
}

fn tagged(console: &str, tag: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .unwrap_or_else(|| panic!("{tag} missing:\n{console}"))
        .trim()
        .to_string()
}

/// The first word of `s` (a checksum before its file name).
fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").to_string()
}

/// Boot a guest with `disks` (each 256 MiB) as /dev/vda, /dev/vdb…, `modules`
/// loaded, devpool (this build, stripped) as /usr/bin/devpool and `bins`
/// ("SRC=DST"); run `script` and return the console, checked for failed
/// steps and modules.
fn devpool_in_guest(
    lab: &Lab,
    kernel: &devpool_vm::kernel::Kernel,
    disks: &[&Path],
    modules: &[&str],
    bins: &[&str],
    script: &str,
) -> String {
    use common::guest::*;
    let stripped = devpool_for_guest(lab, env!("CARGO_BIN_EXE_devpool"));
    let bin = format!("{}=/usr/bin/devpool", stripped.display());
    let mut all = vec![bin.as_str()];
    all.extend_from_slice(bins);
    let initrd = lab.path("initrd.cpio");
    initramfs(kernel, modules, &all, script, &initrd);
    let console = boot(
        kernel,
        &initrd,
        disks
            .iter()
            .map(|d| devpool_vm::qemu::Disk::Raw {
                path: d.to_path_buf(),
                offset: 0,
                size: 256 << 20,
            })
            .collect(),
        std::time::Duration::from_secs(300),
    );
    assert!(!console.contains("GUEST-STEP-FAILED"), "{console}");
    assert!(!console.contains("DEVPOOL-INSMOD-FAILED"), "{console}");
    console
}

/// `devpool ARGS` in the lab, started with stdout and stderr piped.
fn spawn_piped(lab: &Lab, args: &[&str]) -> std::process::Child {
    spawn_piped_env(lab, args, &[])
}

/// [`spawn_piped`] with more environment.
fn spawn_piped_env(lab: &Lab, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    devpool_command(&lab.state_dir())
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Whether `child` exits within `secs` seconds (its output, short, waits
/// in the pipes).
fn exits_within(child: &mut std::process::Child, secs: u64) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(secs) {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
