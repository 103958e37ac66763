//! A Debian guest for tests: Debian's 6.12 kernel from bookworm-backports
//! (fetched with `apt-get download` into a cache shared by runs of the
//! suite), an initramfs from devpool-vm with busybox and the modules a test
//! names, and QEMU under TCG with the console captured.

use devpool_vm::initramfs::Initramfs;
use devpool_vm::kernel::Kernel;
use devpool_vm::qemu::{Accel, Disk, Machine};
use devpool_vm::runner::{self, Ending};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn cache_dir() -> PathBuf {
    std::env::var_os("DEVPOOL_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/devpool-test"))
}

static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Debian's newest `linux-image-6.12.*-amd64-unsigned`, downloaded once.
pub fn debian_kernel() -> Result<Kernel, String> {
    let _g = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let find = || -> Option<PathBuf> {
        let mut debs: Vec<PathBuf> = std::fs::read_dir(&cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                n.starts_with("linux-image-6.12.")
                    && n.contains("-amd64-unsigned_")
                    && n.ends_with(".deb")
            })
            .collect();
        debs.sort();
        debs.pop()
    };
    let deb = match find() {
        Some(d) => d,
        None => {
            let names = Command::new("apt-cache")
                .args(["pkgnames", "linux-image-6.12."])
                .output()
                .map_err(|e| format!("apt-cache: {e}"))?;
            let mut pkgs: Vec<String> = String::from_utf8_lossy(&names.stdout)
                .lines()
                .filter(|n| {
                    n.ends_with("-amd64-unsigned") && !n.contains("cloud") && !n.contains("-rt-")
                })
                .map(str::to_string)
                .collect();
            pkgs.sort_by_key(|p| {
                p.trim_start_matches("linux-image-6.12.")
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0)
            });
            let pkg = pkgs
                .pop()
                .ok_or("no linux-image-6.12.*-amd64-unsigned in apt (add bookworm-backports)")?;
            let o = Command::new("apt-get")
                .args(["download", "-q", &pkg])
                .current_dir(&cache)
                .output()
                .map_err(|e| format!("apt-get download: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "apt-get download {pkg}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            find().ok_or("downloaded kernel package not found")?
        }
    };
    Kernel::from_deb(&deb, &cache.join("kernels")).map_err(|e| e.to_string())
}

/// Skip (or fail on CI) when the guest cannot be built or booted here.
pub fn guest_or_skip(test: &str) -> Option<Kernel> {
    let fail = |why: String| -> Option<Kernel> {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: guest test cannot run: {why}");
        }
        eprintln!("SKIPPED: {test}: {why}");
        None
    };
    for tool in ["qemu-system-x86_64", "busybox", "depmod", "dpkg-deb"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return fail(format!("'{tool}' is not installed"));
        }
    }
    match debian_kernel() {
        Ok(k) => Some(k),
        Err(e) => fail(e),
    }
}

/// An initramfs whose /init loads `modules`, runs `script` (sh) and powers off;
/// `host_bins` are host programs copied in with their libraries. A module
/// named `later:NAME` is packed (as `/lib/modules/NAME.ko`, its dependencies
/// loaded at init) but not loaded: the guest kernel cannot load it on its
/// own (no modules.dep), so until the script does `insmod`, the guest is a
/// host without it.
pub fn initramfs(kernel: &Kernel, modules: &[&str], host_bins: &[&str], script: &str, out: &Path) {
    let mut i = Initramfs::new();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("busybox-static");
    i.busybox(busybox).unwrap();
    let (later, now): (Vec<&str>, Vec<&str>) =
        modules.iter().partition(|m| m.starts_with("later:"));
    let later: Vec<&str> = later.iter().map(|m| &m["later:".len()..]).collect();
    let with_later = kernel
        .resolve(&now.iter().chain(&later).copied().collect::<Vec<_>>())
        .unwrap();
    let later_files = kernel.resolve(&later).unwrap();
    let is_later = |f: &PathBuf| {
        let name = devpool_vm::kernel::module_name(&f.to_string_lossy());
        later.iter().any(|l| l.replace('-', "_") == name)
    };
    assert_eq!(
        later_files.iter().filter(|f| is_later(f)).count(),
        later.len(),
        "a later module is missing: {later:?}"
    );
    let (packed_only, files): (Vec<PathBuf>, Vec<PathBuf>) =
        with_later.into_iter().partition(|f| is_later(f));
    i.modules(&packed_only).unwrap();
    let guest_mods = i.modules(&files).unwrap();
    // "SRC" lands at its own path, "SRC=DST" at DST.
    for b in host_bins {
        match b.split_once('=') {
            Some((src, dst)) => i.host_binary_as(Path::new(src), dst).unwrap(),
            None => i.host_binary(Path::new(b)).unwrap(),
        }
    }
    if host_bins.contains(&"/sbin/mke2fs") {
        i.symlink("sbin/mkfs.ext4", "mke2fs");
    }
    if Path::new("/etc/mke2fs.conf").exists() {
        i.file(Path::new("/etc/mke2fs.conf"), "etc/mke2fs.conf", 0o644)
            .unwrap();
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         export PATH=/sbin:/usr/sbin:/bin:/usr/bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         for m in {}; do insmod $m || echo \"DEVPOOL-INSMOD-FAILED $m\"; done\n\
         n=0; while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done\n\
         echo '{ready}'\n\
         {script}\n\
         echo DEVPOOL-GUEST-DONE\n\
         sync; poweroff -f\n",
        guest_mods.join(" "),
        ready = devpool_vm::guest::READY_MARKER,
    );
    i.bytes("init", init.as_bytes(), 0o755).unwrap();
    std::fs::write(out, i.finish().unwrap()).unwrap();
}

/// Boot and return the console (QEMU's error output after it); the VM is
/// killed after `limit`. QEMU 10.0's multi-threaded TCG now and then aborts
/// while the guest boots: like `devpool vm run`, boot again (twice at most)
/// when QEMU crashed before the script started (the init prints the ready
/// marker just before it).
pub fn boot(kernel: &Kernel, initrd: &Path, disks: Vec<Disk>, limit: Duration) -> String {
    let m = Machine {
        kernel: kernel.image.clone(),
        initrd: initrd.to_path_buf(),
        append: "console=ttyS0 panic=-1 quiet loglevel=4".into(),
        mem_mib: 512,
        cpus: 2,
        accel: Accel::Tcg,
        disks,
        shares: Vec::new(),
    };
    let o = runner::run_retrying(&m, limit, 2, &|| false, &mut |_| {}, &mut |o, _| {
        eprintln!(
            "QEMU crashed ({:?}) before the script started; booting again:\n{}{}",
            o.signal, o.console, o.qemu_stderr
        )
    })
    .expect("start qemu-system-x86_64");
    let console = o.console + &o.qemu_stderr;
    assert!(
        o.ending != Ending::TimedOut,
        "guest timed out after {limit:?}:\n{console}"
    );
    console
}

/// Debian's headers for `kernel` (linux-headers-<ver>, its -common part and
/// linux-kbuild), downloaded with `apt-get download` and unpacked into the
/// cache (never installed); returns the directory to pass to `make -C`.
pub fn debian_headers(kernel: &Kernel) -> Result<PathBuf, String> {
    let _g = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    let ver = &kernel.version; // 6.12.95+deb12-amd64
    let base = ver
        .strip_suffix("-amd64")
        .ok_or_else(|| format!("kernel {ver} is not an amd64 Debian kernel"))?;
    let root = cache_dir().join("headers").join(ver);
    let build = root.join(format!("usr/src/linux-headers-{ver}"));
    if root.join(".devpool-unpacked").exists() {
        return Ok(build);
    }
    let dl = cache_dir().join("headers-debs");
    std::fs::create_dir_all(&dl).map_err(|e| e.to_string())?;
    let pkgs = [
        format!("linux-headers-{ver}"),
        format!("linux-headers-{base}-common"),
        format!("linux-kbuild-{base}"),
    ];
    let o = Command::new("apt-get")
        .args(["download", "-q"])
        .args(&pkgs)
        .current_dir(&dl)
        .output()
        .map_err(|e| format!("apt-get download: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "apt-get download {pkgs:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(&dl).map_err(|e| e.to_string())?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if pkgs.iter().any(|p| n.starts_with(&format!("{p}_"))) {
            let st = Command::new("dpkg-deb")
                .arg("-x")
                .arg(e.path())
                .arg(&root)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("dpkg-deb -x {n} failed"));
            }
        }
    }
    // The arch Makefile includes the -common one by its installed path.
    let mk = build.join("Makefile");
    let text = std::fs::read_to_string(&mk).map_err(|e| format!("{}: {e}", mk.display()))?;
    let fixed = text.replace(
        "include /usr/src/",
        &format!("include {}/usr/src/", root.display()),
    );
    std::fs::write(&mk, fixed).map_err(|e| e.to_string())?;
    std::fs::write(root.join(".devpool-unpacked"), b"").map_err(|e| e.to_string())?;
    Ok(build)
}

/// A pool named `name` on a 512 MiB sparse image in the lab.
pub fn image_pool(lab: &super::Lab, name: &str) -> PathBuf {
    lab.image_pool(&format!("{name}.img"), name, "512M", &[])
}

/// Guest shell helpers for LVM2 and device-mapper checks: `lvm_c` runs LVM2
/// without udev or dmeventd; `chk DEV BLK OCT` checks that 4 KiB block BLK of DEV holds
/// only byte \OCT (else prints MISMATCH and sets bad=1); `fill DEV BLK OCT`
/// writes such a block with direct I/O; `bad=0`.
pub const DM_GUEST_HELPERS: &str = "lvm_c() { lvm \"$@\" --config 'activation{udev_sync=0 udev_rules=0 monitoring=0} \
devices{obtain_device_list_from_udev=0} backup{backup=0 archive=0}'; }\n\
chk() { t=$(dd if=$1 bs=4096 skip=$2 count=1 2>/dev/null | wc -c); \
n=$(dd if=$1 bs=4096 skip=$2 count=1 2>/dev/null | tr -d \"\\\\$3\" | wc -c); \
[ \"$t\" = 4096 ] && [ \"$n\" = 0 ] || { echo \"MISMATCH $1 block $2: $n of $t bytes are not \\\\$3\"; bad=1; }; }\n\
fill() { dd if=/dev/zero bs=4096 count=1 2>/dev/null | tr '\\000' \"\\\\$3\" | \
dd of=$1 bs=4096 seek=$2 oflag=direct conv=notrunc 2>/dev/null || { echo \"WRITE FAILED $1 $2\"; bad=1; }; }\n\
bad=0\n";

/// The devpool binary `exe` stripped (a smaller initramfs), in the lab.
pub fn devpool_for_guest(lab: &super::Lab, exe: &str) -> std::path::PathBuf {
    let stripped = lab.path("devpool");
    let o = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(exe)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "strip: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stripped
}

/// A guest run that must succeed and print no MISMATCH: its console.
pub fn guest_console(out: &std::process::Output) -> String {
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "guest failed ({:?}):\n{console}\n{stderr}",
        out.status.code()
    );
    assert!(!console.contains("MISMATCH"), "{console}");
    console
}

/// `devpool vm run` of `sh -c SCRIPT` on `disk` (512 MiB of guest memory)
/// with LVM2, dmsetup and the host programs `more` in the guest and `module`
/// loaded; see [`guest_console`] for what must hold. `devices` are the
/// lab's `--devices`.
pub fn run_lvm_guest(
    lab: &super::Lab,
    kernel: &Kernel,
    devices: &[&Path],
    disk: &Path,
    more: &[&str],
    module: &str,
    script: &str,
) -> String {
    let ka = kernel_args(kernel);
    let d = disk.display().to_string();
    let mut args: Vec<&str> = vec!["vm", "run"];
    args.extend(ka.iter().map(String::as_str));
    args.extend([
        "--mem",
        "512M",
        "--disk",
        &d,
        "--add",
        "/sbin/lvm",
        "--add",
        "/sbin/dmsetup",
    ]);
    for m in more {
        args.extend(["--add", m]);
    }
    args.extend(["--load-module", module, "--", "sh", "-c", script]);
    guest_console(&lab.devpool(devices, &args))
}

/// `--kernel IMAGE --modules DIR` for a kernel from the cache.
pub fn kernel_args(kernel: &Kernel) -> Vec<String> {
    vec![
        "--kernel".into(),
        kernel.image.display().to_string(),
        "--modules".into(),
        kernel
            .modules
            .as_ref()
            .map(|m| m.display().to_string())
            .unwrap_or_default(),
    ]
}

/// `devpool --pool POOL --json vm SUB --mem 512M ARGS…` on the pool image:
/// (exit code, the JSON report, stderr with the console).
pub fn vm_json(
    lab: &super::Lab,
    img: &Path,
    pool: &str,
    sub: &str,
    args: &[&str],
) -> (i32, serde_json::Value, String) {
    vm_json_env(lab, img, pool, sub, args, &[])
}

/// [`vm_json`] with more environment for devpool.
pub fn vm_json_env(
    lab: &super::Lab,
    img: &Path,
    pool: &str,
    sub: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, serde_json::Value, String) {
    let mut a = vec!["--pool", pool, "--json", "vm", sub, "--mem", "512M"];
    a.extend_from_slice(args);
    let out = lab.devpool_env(&[img], &a, env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stdout}\n{stderr}"));
    (out.status.code().unwrap_or(-1), report, stderr)
}

/// No QEMU started from this lab's state directory is still running.
pub fn assert_no_qemu_left(lab: &super::Lab) {
    let left = Command::new("pgrep")
        .args(["-f", &format!("initrd {}", lab.state_dir().display())])
        .output()
        .expect("pgrep");
    assert!(left.stdout.is_empty(), "a QEMU is still running");
}

/// A small out-of-tree module: it loads and unloads cleanly, and with the
/// parameter `warn=1` it hits a WARN_ON at load.
pub const PROBE_MODULE_C: &str = r#"
#include <linux/module.h>
#include <linux/init.h>
static bool warn;
module_param(warn, bool, 0444);
static int __init probe_init(void)
{
	WARN_ON(warn);
	pr_info("devpool_probe_mod: loaded\n");
	return 0;
}
static void __exit probe_exit(void) { pr_info("devpool_probe_mod: unloaded\n"); }
module_init(probe_init);
module_exit(probe_exit);
MODULE_LICENSE("GPL");
"#;

/// `devpool_probe_mod.ko` built in the lab against Debian's headers for
/// `kernel`; `None` (test skipped, or a failure under CI) without headers.
pub fn probe_module(lab: &super::Lab, kernel: &Kernel, test: &str) -> Option<PathBuf> {
    let headers = match debian_headers(kernel) {
        Ok(h) => h,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{test}: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: {test}: {e}");
            return None;
        }
    };
    let src = lab.path("mod");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("devpool_probe_mod.c"), PROBE_MODULE_C).unwrap();
    std::fs::write(src.join("Kbuild"), "obj-m := devpool_probe_mod.o\n").unwrap();
    // No pahole here: skip BTF for the module.
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", src.display()))
        .args(["CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"])
        .output()
        .expect("make (apt-get install make gcc-12)");
    assert!(
        out.status.success(),
        "building the module failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(src.join("devpool_probe_mod.ko"))
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// A copy in the lab of `tests/data/fstests-mimic`: a `check` that reads
/// fstests' configuration and prints check's format, with three tests that
/// use TEST_DEV and SCRATCH_DEV (001 passes, 002 is not run, 003 fails).
pub fn fstests_mimic(lab: &super::Lab) -> PathBuf {
    let tree = lab.path("fstests");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fstests-mimic"),
        &tree,
    );
    tree
}
