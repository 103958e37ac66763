//! `devpool vm run` boots Debian's 6.12 kernel under TCG with leased volumes
//! attached: the guest sees them as /dev/vda, /dev/vdb in role order with
//! TEST_DEV/SCRATCH_DEV set, what it writes lands at the volume's range of the
//! pool image (raw offset/size and vhost-user-blk alike), devpool returns the
//! command's exit status, a timeout kills the VM, and the lease is released
//! every time.

mod common;
use common::Lab;
use common::guest::*;
use serde_json::Value;
use std::path::Path;

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

/// The guest writes "<tag> <device>" into sector 8 of TEST_DEV and SCRATCH_DEV.
const WRITE_BOTH: &str = "echo \"guest sees TEST_DEV=$TEST_DEV SCRATCH_DEV=$SCRATCH_DEV\"; \
for d in $TEST_DEV $SCRATCH_DEV; do printf 'devpool-vm %s' $d | dd of=$d bs=512 seek=8 conv=sync 2>/dev/null; done; \
echo sizes $(cat /sys/block/vda/size) $(cat /sys/block/vdb/size); exit 7";

/// `vm run` arguments: WRITE_BOTH with two volumes over vhost-user-blk.
fn vhost_write_both(kernel_args: &[String]) -> Vec<&str> {
    let mut args: Vec<&str> = kernel_args.iter().map(String::as_str).collect();
    args.extend([
        "--attach",
        "vhost-user-blk",
        "--keep",
        "--volumes",
        "test:16M,scratch:8M",
        "--",
        "sh",
        "-c",
        WRITE_BOTH,
    ]);
    args
}

/// After a `--keep` run: the guest's data is where its volumes are in the
/// image; releasing the kept lease then gives the volumes' space back
/// (their ranges read as zeroes) and leaves no lease.
fn assert_written_then_release(lab: &Lab, img: &Path, pool: &str, report: &Value) {
    assert_eq!(report["kept"], true, "{report}");
    assert_eq!(report["released"], false, "{report}");
    assert_written(report, img);
    let session = report["session"].as_str().expect("the kept session");
    lab.dp(&[img], &["--pool", pool, "lease", "release", session]);
    for d in report["disks"].as_array().unwrap() {
        let off = d["extent"]["offset"].as_u64().unwrap();
        assert!(
            read_at(img, off, 8192).iter().all(|&b| b == 0),
            "the release discarded {d}"
        );
    }
    no_leases(lab, img, pool);
}

fn assert_written(report: &Value, img: &Path) {
    for (i, dev) in ["/dev/vda", "/dev/vdb"].iter().enumerate() {
        let d = &report["disks"][i];
        assert_eq!(d["guest_device"], *dev);
        assert_eq!(d["extent"]["path"], img.display().to_string());
        let off = d["extent"]["offset"].as_u64().unwrap();
        let want = format!("devpool-vm {dev}");
        let got = read_at(img, off + 8 * 512, want.len());
        assert_eq!(
            String::from_utf8_lossy(&got),
            want,
            "{dev} data not at its volume's offset {off}"
        );
        // Nothing before the sector the guest wrote (the lease zeroed 4 KiB).
        assert!(read_at(img, off, 4096).iter().all(|&b| b == 0));
    }
}

fn no_leases(lab: &Lab, img: &Path, pool: &str) {
    let l = lab.dp_json(&[img], &["--pool", pool, "lease", "list"]);
    assert_eq!(l.as_array().map(Vec::len), Some(0), "leases left: {l}");
}

#[test]
fn guest_vm_run_attaches_raw_ranges_and_returns_the_exit_status() {
    let t = "guest_vm_run_attaches_raw_ranges_and_returns_the_exit_status";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let img = image_pool(&lab, "vmraw");
    // The .deb path: unpacked into the state directory by devpool itself.
    let deb = std::fs::read_dir(cache_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            n.starts_with(&format!("linux-image-{}", kernel.version)) && n.ends_with(".deb")
        })
        .expect("the cached kernel package");
    let deb = deb.display().to_string();
    let (code, report, stderr) = vm_json(
        &lab,
        &img,
        "vmraw",
        "run",
        &[
            "--kernel-deb",
            &deb,
            "--keep",
            "--volumes",
            "test:16M,scratch:8M",
            "--",
            "sh",
            "-c",
            WRITE_BOTH,
        ],
    );
    assert_eq!(code, 7, "{report}\n{stderr}");
    assert_eq!(report["ending"], "exited");
    assert_eq!(report["exit_code"], 7);
    assert_eq!(report["accel"], "tcg");
    for d in report["disks"].as_array().unwrap() {
        assert_eq!(d["attach"], "raw", "{d}");
    }
    // The console streams to stderr under --json.
    assert!(
        stderr.contains("guest sees TEST_DEV=/dev/vda SCRATCH_DEV=/dev/vdb"),
        "{stderr}"
    );
    assert!(stderr.contains("sizes 32768 16384"), "{stderr}");
    assert!(report["timings"]["boot_ms"].as_u64().unwrap() > 0);
    assert_written_then_release(&lab, &img, "vmraw", &report);
}

#[test]
fn guest_vm_run_serves_vhost_user_blk_and_kills_a_vm_that_overruns() {
    let t = "guest_vm_run_serves_vhost_user_blk_and_kills_a_vm_that_overruns";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let img = image_pool(&lab, "vmvhost");
    let k = kernel_args(&kernel);
    let base: Vec<&str> = k.iter().map(String::as_str).collect();
    let args = vhost_write_both(&k);
    let (code, report, stderr) = vm_json(&lab, &img, "vmvhost", "run", &args);
    assert_eq!(code, 7, "{report}\n{stderr}");
    for d in report["disks"].as_array().unwrap() {
        assert_eq!(d["attach"], "vhost-user-blk", "{d}");
    }
    assert_written_then_release(&lab, &img, "vmvhost", &report);

    // A command that outlives --timeout: the VM is killed, 124, released.
    let mut args = base.clone();
    args.extend([
        "--timeout",
        "25",
        "--volumes",
        "test:8M",
        "--",
        "sh",
        "-c",
        "echo about-to-hang; sleep 600",
    ]);
    let (code, report, stderr) = vm_json(&lab, &img, "vmvhost", "run", &args);
    assert_eq!(code, 124, "{report}\n{stderr}");
    assert_eq!(report["ending"], "timed_out");
    assert_eq!(report["released"], true);
    assert!(stderr.contains("about-to-hang"), "{stderr}");
    assert!(stderr.contains("TIMED OUT"), "{stderr}");
    no_leases(&lab, &img, "vmvhost");
    assert_no_qemu_left(&lab);
}

/// QEMU 10.0's multi-threaded TCG sometimes aborts while the guest boots (a
/// failed assertion in `iotlb_to_section`). A stand-in qemu-system-x86_64
/// first in PATH makes the first vhost-user-blk boot abort 3 s in, after
/// QEMU has connected to devpool's servers: devpool boots again, the same
/// servers take the new QEMU, and the command runs once.
#[test]
fn guest_vm_run_boots_again_when_qemu_crashes_before_the_command() {
    let t = "guest_vm_run_boots_again_when_qemu_crashes_before_the_command";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let img = image_pool(&lab, "vmcrash");
    let real = std::process::Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    assert!(!real.is_empty(), "qemu-system-x86_64 not in PATH");
    let bin = lab.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let boots = lab.path("boots.log");
    let wrapper = bin.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
case \"$*\" in *vhost-user-blk*)\n\
  echo boot >> {boots}\n\
  if [ $(wc -l < {boots}) = 1 ]; then (sleep 3; kill -ABRT $$) </dev/null >/dev/null 2>&1 & fi;;\n\
esac\n\
ulimit -c 0\n\
exec {real} \"$@\"\n",
            boots = boots.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let k = kernel_args(&kernel);
    let args = vhost_write_both(&k);
    let env = [("PATH", path.as_str())];
    let (code, report, stderr) = vm_json_env(&lab, &img, "vmcrash", "run", &args, &env);
    assert_eq!(code, 7, "{report}\n{stderr}");
    assert_eq!(
        std::fs::read_to_string(&boots).unwrap().lines().count(),
        2,
        "{stderr}"
    );
    let crashes = report["qemu_crashes"].as_array().expect("qemu_crashes");
    assert_eq!(crashes.len(), 1, "{report}");
    assert_eq!(crashes[0]["signal"], "SIGABRT");
    assert!(crashes[0]["after_ms"].as_u64().unwrap() >= 3000);
    assert!(stderr.contains("QEMU crashed (SIGABRT)"), "{stderr}");
    assert!(stderr.contains("booted 2 times"), "{stderr}");
    assert_eq!(
        stderr.matches("guest sees TEST_DEV=").count(),
        1,
        "{stderr}"
    );
    assert_written_then_release(&lab, &img, "vmcrash", &report);

    // With retries off, the crash is the run's end: 125, and it says QEMU crashed.
    std::fs::remove_file(&boots).unwrap();
    let mut args = args.clone();
    args.retain(|a| *a != "--keep");
    args.splice(0..0, ["--boot-retries", "0"]);
    let (code, report, stderr) = vm_json_env(&lab, &img, "vmcrash", "run", &args, &env);
    assert_eq!(code, 125, "{report}\n{stderr}");
    assert_eq!(report["ending"], "died");
    assert_eq!(report["qemu_signal"], "SIGABRT");
    assert!(report.get("qemu_crashes").is_none(), "{report}");
    assert!(
        stderr.contains("QEMU crashed (SIGABRT) without the guest reporting"),
        "{stderr}"
    );
    assert!(!stderr.contains("guest sees"), "{stderr}");
    no_leases(&lab, &img, "vmcrash");
    assert_no_qemu_left(&lab);
}

#[test]
fn guest_vm_run_releases_the_lease_on_sigterm_and_when_the_guest_panics() {
    let t = "guest_vm_run_releases_the_lease_on_sigterm_and_when_the_guest_panics";
    let Some(kernel) = guest_or_skip(t) else {
        return;
    };
    let lab = Lab::new();
    let img = image_pool(&lab, "vmend");
    let image = kernel.image.display().to_string();
    let modules = kernel.modules.as_ref().unwrap().display().to_string();

    // The guest panics: QEMU stops, devpool says the guest died (125).
    let (code, report, stderr) = vm_json(
        &lab,
        &img,
        "vmend",
        "run",
        &[
            "--kernel",
            &image,
            "--modules",
            &modules,
            "--volumes",
            "test:8M",
            "--",
            "sh",
            "-c",
            "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 60",
        ],
    );
    assert_eq!(code, 125, "{report}\n{stderr}");
    assert_eq!(report["ending"], "died");
    assert_eq!(report["released"], true);
    assert!(stderr.contains("Kernel panic"), "{stderr}");
    no_leases(&lab, &img, "vmend");

    // SIGTERM while the command runs: the VM is killed, 130, released.
    let mut c = common::devpool_command(&lab.state_dir());
    c.args([
        "--devices",
        &img.display().to_string(),
        "--pool",
        "vmend",
        "vm",
        "run",
    ])
    .args(["--kernel", &image, "--modules", &modules, "--mem", "512M"])
    .args([
        "--volumes",
        "test:8M",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        use std::io::BufRead;
        if out.read_line(&mut line).unwrap() == 0 {
            let st = child.wait().unwrap();
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the guest never started the command ({st}):\n{err}");
        }
        if line.contains("started") {
            break;
        }
    }
    // SAFETY: signalling the child we started, by its id.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130));
    no_leases(&lab, &img, "vmend");
    assert_no_qemu_left(&lab);
}
