//! Every safety check of `pool setup` refuses a real loop device prepared to
//! trip it, says what it found and where, and writes nothing to it.

mod common;
use common::*;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The first and last MiB of a device.
fn ends(dev: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut f = std::fs::File::open(dev).unwrap();
    let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap();
    let mut head = vec![0u8; 1 << 20];
    let mut tail = vec![0u8; 1 << 20];
    f.read_exact_at(&mut head, 0).unwrap();
    f.read_exact_at(&mut tail, size - (1 << 20)).unwrap();
    (head, tail)
}

fn sh<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(cmd: &str, args: &[S]) {
    let o = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        o.status.success(),
        "{cmd} {args:?} exited {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn stdout(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `pool setup` (with --yes) must fail with `expect` and leave the device untouched.
fn refused(lab: &Lab, dev: &Path, expect: &[&str], env: &[(&str, &str)]) -> String {
    // A mounted file system writes its own dirty data at any time: settle it.
    sh::<&str>("sync", &[]);
    let before = ends(dev);
    let d = dev.display().to_string();
    let o = lab.devpool_env(
        &[],
        &["pool", "setup", &d, "--name", "safety", "--yes"],
        env,
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "setup on {d} succeeded");
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(ends(dev) == before, "{d} was written to");
    err
}

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A mounted file system frozen (`fsfreeze`) until dropped.
struct Frozen(PathBuf);
impl Frozen {
    fn new(dir: &Path) -> Frozen {
        sh(
            "fsfreeze",
            &[std::ffi::OsStr::new("--freeze"), dir.as_os_str()],
        );
        Frozen(dir.to_path_buf())
    }
}
impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0)
            .status();
    }
}

fn mount(dev: &str, dir: &Path) -> Mounted {
    std::fs::create_dir_all(dir).unwrap();
    sh(
        "mount",
        &[
            std::ffi::OsStr::new("-o"),
            "noatime".as_ref(),
            dev.as_ref(),
            dir.as_os_str(),
        ],
    );
    Mounted(dir.to_path_buf())
}

#[test]
fn mounted_and_stacked_devices_are_refused() {
    if skip_unless_real("safety_mounted") {
        return;
    }
    let mut lab = Lab::new();
    let dev = lab.loop_dev("m.img", 64);
    let d = dev.display().to_string();
    // No lazy init: ext4lazyinit would zero inode tables in the background
    // while the checks below compare the device's bytes.
    sh(
        "mkfs.ext4",
        &["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", &d],
    );
    // A mount point whose name is not UTF-8 (this one, or any other on the
    // host) must not hide the mounts: mountinfo is read as bytes.
    let mnt = mount(
        &d,
        &lab.path("mnt")
            .join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff")),
    );
    // Frozen, the file system writes nothing (journal, lazy init), so
    // whatever changes on the device was written by the setup.
    let frozen = Frozen::new(&mnt.0);
    let err = refused(
        &lab,
        &dev,
        &["is mounted at", &mnt.0.display().to_string()],
        &[],
    );
    drop(frozen);
    // Loop stacking: a loop device over a file on that file system is found too.
    let inner = mnt.0.join("inner.img");
    std::fs::File::create(&inner)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let stacked = Loop::attach(&inner);
    // ext4 finishes setting up what creating the file started (bitmaps)
    // on its own schedule; frozen, it writes nothing, so whatever changes
    // on the device now was written by the setup.
    let frozen = Frozen::new(&mnt.0);
    let err2 = refused(&lab, &dev, &["loop device over"], &[]);
    drop(frozen);
    assert!(
        err2.contains(&stacked.dev.display().to_string().replace("/dev/", "")),
        "{err2}"
    );
    drop(stacked);
    drop(mnt);
    assert!(err.contains("refusing to use"));

    // A partition of the device is mounted: the whole disk is refused.
    let img = lab.image("p.img", 64);
    let mut sf = Command::new("sfdisk")
        .args(["-q", &img.display().to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(sf.stdin.as_mut().unwrap(), b"label: dos\n,32M\n,\n").unwrap();
    assert!(sf.wait().unwrap().success());
    let dd = stdout(
        "losetup",
        &["--find", "--show", "--partscan", &img.display().to_string()],
    );
    lab.loops.push(Loop {
        dev: PathBuf::from(&dd),
        image: img,
    });
    let disk = PathBuf::from(&dd);
    // This kernel parses no partition tables itself; partx adds them (BLKPG).
    sh("partx", &["-a", &dd]);
    let part = format!("{dd}p1");
    for _ in 0..50 {
        if Path::new(&part).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Without udev nobody creates the partition's node: make it from sysfs.
    let kname = part.trim_start_matches("/dev/").to_string();
    let base = kname
        .rsplit_once('p')
        .map(|(b, _)| b.to_string())
        .unwrap_or_default();
    let sys = format!("/sys/block/{base}/{kname}/dev");
    let mut made_node = false;
    if !Path::new(&part).exists() {
        let mm = std::fs::read_to_string(&sys).expect("partition in sysfs");
        let (ma, mi) = mm.trim().split_once(':').unwrap();
        sh("mknod", &[&part, "b", ma, mi]);
        made_node = true;
    }
    sh("mkfs.ext4", &["-q", &part]);
    let m2 = mount(&part, &lab.path("mnt2"));
    refused(&lab, &disk, &["partition of", "is mounted at"], &[]);
    drop(m2);
    if made_node {
        let _ = std::fs::remove_file(&part);
    }
}

#[test]
fn fstab_entries_by_path_and_uuid_are_refused() {
    if skip_unless_real("safety_fstab") {
        return;
    }
    let mut lab = Lab::new();
    let dev = lab.loop_dev("f.img", 64);
    let d = dev.display().to_string();
    sh("mkfs.ext4", &["-q", "-L", "dpfstab", &d]);
    let uuid = stdout("blkid", &["-p", "-s", "UUID", "-o", "value", &d]);
    let fstab = lab.path("fstab");
    for (line, what) in [
        (format!("UUID={uuid} /data ext4 defaults 0 2\n"), "UUID="),
        (
            "LABEL=dpfstab /data ext4 defaults 0 2\n".to_string(),
            "LABEL=",
        ),
        (
            format!("# comment\n{d} /data ext4 defaults 0 2\n"),
            "line 2",
        ),
    ] {
        std::fs::write(&fstab, line).unwrap();
        let f = fstab.display().to_string();
        refused(
            &lab,
            &dev,
            &["is listed in", &f, what],
            &[("DEVPOOL_FSTAB", &f)],
        );
    }
}

#[test]
fn pvs_luks_swap_and_programs_holding_the_device_are_refused() {
    if skip_unless_real("safety_signatures") {
        return;
    }
    let mut lab = Lab::new();
    // Another LVM2 PV.
    let pv = lab.loop_dev("pv.img", 64);
    lvm_ok(&[&pv], &["pvcreate", "-q", &pv.display().to_string()]);
    refused(&lab, &pv, &["already an LVM2 PV"], &[]);

    // A LUKS header.
    let luks = lab.loop_dev("luks.img", 64);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&luks)
        .unwrap()
        .write_all_at(b"LUKS\xba\xbe\x00\x01", 0)
        .unwrap();
    refused(&lab, &luks, &["LUKS container"], &[]);

    // Active swap.
    let swap = lab.loop_dev("swap.img", 64);
    let s = swap.display().to_string();
    sh("mkswap", &["-q", &s]);
    if Command::new("swapon")
        .arg(&s)
        .status()
        .map(|x| x.success())
        .unwrap_or(false)
    {
        refused(&lab, &swap, &["in use as swap"], &[]);
        sh("swapoff", &[&s]);
    } else {
        eprintln!("note: swapon refused a loop device here; swap check not exercised");
    }

    // Held open exclusively by another program.
    let held = lab.loop_dev("held.img", 64);
    let h = held.display().to_string();
    let holder = DeviceHolder::exclusive(&h);
    let pid = holder.pid();
    refused(
        &lab,
        &held,
        &[
            "open exclusively",
            &format!("{h} is open in process {pid} (python3)"),
        ],
        &[],
    );
    drop(holder);

    // Merely open in another program (a dd, a QEMU using it as a disk): no
    // exclusive open shows it, the scan of processes does.
    let holder = DeviceHolder::open(&h);
    let pid = holder.pid();
    let err = refused(
        &lab,
        &held,
        &[&format!("{h} is open in process {pid} (python3)")],
        &[],
    );
    assert!(!err.contains("open exclusively"), "{err}");
    drop(holder);
}

#[test]
fn signatures_need_confirmation_and_a_failed_setup_restores_the_device() {
    if skip_unless_real("safety_confirm") {
        return;
    }
    let mut lab = Lab::new();
    let dev = lab.loop_dev("c.img", 64);
    let d = dev.display().to_string();
    sh("mkfs.ext4", &["-q", &d]);
    let before = ends(&dev);
    // No --yes and no terminal: the signature is shown and nothing is written.
    let o = lab.devpool(&[], &["pool", "setup", &d, "--name", "confirm"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(err.contains("ext2/3/4 signature at byte 1080"), "{err}");
    assert!(err.contains("needs confirmation"), "{err}");
    assert!(ends(&dev) == before);
    // A dry run shows the whole plan, the signature among what it wipes.
    let plan = lab.dp(
        &[],
        &["pool", "setup", &d, "--name", "confirm", "--dry-run"],
    );
    assert!(
        plan.contains("vg create devpool-confirm") && plan.contains("ext2/3/4 signature"),
        "{plan}"
    );
    assert!(ends(&dev) == before, "a dry run writes nothing");
    let img = lab.path("new.img");
    let i = img.display().to_string();
    let plan = lab.dp(
        &[],
        &[
            "pool",
            "setup",
            &i,
            "--name",
            "n",
            "--image-size",
            "64M",
            "--dry-run",
        ],
    );
    assert!(plan.contains("create sparse image"), "{plan}");
    assert!(!img.exists(), "a dry run creates no image");

    // Setup cut after its second write: the first and last MiB come back.
    let o = lab.devpool_env(
        &[],
        &["pool", "setup", &d, "--name", "confirm", "--yes"],
        &[("DEVPOOL_FAULT_CRASH_AFTER_WRITES", "2")],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(err.contains("were restored"), "{err}");
    assert!(ends(&dev) == before, "the device was not restored");
    assert!(stdout("blkid", &["-p", "-s", "TYPE", "-o", "value", &d]).contains("ext4"));

    // Confirmed: the pool is made; a second setup is a no-op.
    lab.dp(&[], &["pool", "setup", &d, "--name", "confirm", "--yes"]);
    let again = lab.dp(&[], &["pool", "setup", &d, "--name", "confirm", "--yes"]);
    assert!(again.contains("already set up"), "{again}");
    let (good, why) = vgck(&[&dev], "devpool-confirm");
    assert!(good, "{why}");
    // Not a block device or image: a clear error.
    let e = lab.dp_err(&[], &["pool", "setup", "/dev/null", "--name", "x", "--yes"]);
    assert!(
        e.contains("not a block device or a regular image file"),
        "{e}"
    );
    lab.dp(&[], &["pool", "teardown", "confirm", "--yes", "--wipe"]);
    assert!(
        ends(&dev).0.iter().all(|&b| b == 0),
        "--wipe left data behind"
    );
}
