//! Block-device topology as the kernel reports it: device numbers, partitions,
//! holders (device-mapper, md, and loop devices whose backing file lives on
//! a file system of the device), mounts and swaps. Devices are compared by
//! number, never by name.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use devpool_engine::hostfs::{
    DevNum, Mount, backing_file, mount_of, mounts, mounts_cached, read_devnum, unescape,
};
use devpool_engine::hostfs::{path_of, unescape_bytes};

pub fn devnum_of_rdev(rdev: u64) -> DevNum {
    (libc::major(rdev), libc::minor(rdev))
}

/// The device number of a block device node.
pub fn block_devnum(path: &Path) -> Option<DevNum> {
    let m = std::fs::metadata(path).ok()?;
    m.file_type()
        .is_block_device()
        .then(|| devnum_of_rdev(m.rdev()))
}

/// The device `path` (an open descriptor's `/proc/PID/fd/N`) is, if a
/// block device, from the attributes the kernel holds for it:
/// `AT_STATX_DONT_SYNC` keeps FUSE and network file systems from being
/// asked, so a stuck server cannot hang the caller.
fn cached_block_devnum(path: &Path) -> Option<DevNum> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: all-zero is a valid statx buffer.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a buffer of the right type.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut st,
        )
    };
    (r == 0 && u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFBLK)
        .then_some((st.stx_rdev_major, st.stx_rdev_minor))
}

fn sys_dir(d: DevNum) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", d.0, d.1))
}

/// The kernel's name for a device (`loop3`, `loop3p1`, `dm-0`).
pub fn kname(d: DevNum) -> String {
    std::fs::canonicalize(sys_dir(d))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| format!("{}:{}", d.0, d.1))
}

pub fn partitions(d: DevNum) -> Vec<DevNum> {
    let Ok(rd) = std::fs::read_dir(sys_dir(d)) else {
        return vec![];
    };
    rd.flatten()
        .filter(|e| e.path().join("partition").exists())
        .filter_map(|e| read_devnum(&e.path()))
        .collect()
}

fn links(d: DevNum, which: &str) -> Vec<DevNum> {
    let Ok(rd) = std::fs::read_dir(sys_dir(d).join(which)) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| read_devnum(&e.path()))
        .collect()
}

/// Devices built directly on `d` (device-mapper, md).
pub fn holders(d: DevNum) -> Vec<DevNum> {
    links(d, "holders")
}

/// Devices `d` is built on.
pub fn slaves(d: DevNum) -> Vec<DevNum> {
    links(d, "slaves")
}

/// Bound loop devices with their backing files.
pub fn loops() -> Vec<(DevNum, PathBuf)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let back = backing_file(&e.path().join("loop/backing_file"))?;
            Some((read_devnum(&e.path())?, back))
        })
        .collect()
}

/// Active swap areas: (name, the device it is, or the device its file is on).
pub fn swaps() -> Vec<(PathBuf, DevNum)> {
    swap_names(&std::fs::read("/proc/swaps").unwrap_or_default())
        .into_iter()
        .filter_map(|name| {
            let m = std::fs::metadata(&name).ok()?;
            let d = if m.file_type().is_block_device() {
                devnum_of_rdev(m.rdev())
            } else {
                devnum_of_rdev(m.dev())
            };
            Some((name, d))
        })
        .collect()
}

/// The paths in /proc/swaps, exactly (its first column, escaped like
/// mountinfo's).
fn swap_names(text: &[u8]) -> Vec<PathBuf> {
    text.split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|l| {
            let name = l
                .split(|b| b.is_ascii_whitespace())
                .find(|f| !f.is_empty())?;
            Some(path_of(unescape_bytes(name)))
        })
        .collect()
}

/// Whether someone holds block device `dev` exclusively (a mount, in any
/// mount namespace, swap, a device built on it, a program's claim): the
/// kernel refuses an exclusive open while it or a partition of it is.
pub fn held_exclusively(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// A process with a block device open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opener {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
    pub dev: DevNum,
    /// The device node it opened, when that is not under `/dev/` (one made
    /// with `mknod` elsewhere).
    pub via: Option<PathBuf>,
}

impl std::fmt::Display for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "/dev/{} is open in process {} ({})",
            kname(self.dev),
            self.pid,
            self.comm
        )?;
        if let Some(node) = &self.via {
            write!(f, " through {}", node.display())?;
        }
        Ok(())
    }
}

/// The processes other than this one and `except` that have one of `devs`
/// open, as `fuser` finds them: every descriptor in `/proc/PID/fd` that
/// names a file. Descriptors outside `/dev/` (a device node made with
/// `mknod` elsewhere) are looked at from the attributes the kernel has
/// cached ([`cached_block_devnum`]): asking the file system could hang on a
/// stuck FUSE server. This catches what an exclusive-open probe cannot: a
/// `dd`, a QEMU or a shell with the device merely open.
pub fn openers(devs: &[DevNum], except: &[u32]) -> Vec<Opener> {
    let me = std::process::id();
    let mut out = Vec::new();
    if devs.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || except.contains(&pid) {
            continue;
        }
        // A process that ends (or is not ours to read) meanwhile is skipped.
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut seen = BTreeSet::new();
        for fd in fds.flatten() {
            let path = fd.path();
            // Sockets, pipes and anonymous inodes read as `socket:[…]`.
            let Some(target) = std::fs::read_link(&path).ok().filter(|t| t.is_absolute()) else {
                continue;
            };
            let (dev, via) = if target.starts_with("/dev/") {
                (block_devnum(&path), None)
            } else {
                (cached_block_devnum(&path), Some(target))
            };
            if let Some(d) = dev.filter(|d| devs.contains(d)) {
                seen.insert((d, via));
            }
        }
        if seen.is_empty() {
            continue;
        }
        let comm = std::fs::read_to_string(p.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        out.extend(seen.into_iter().map(|(dev, via)| Opener {
            pid,
            comm: comm.clone(),
            dev,
            via,
        }));
    }
    out
}

/// [`openers`] that stay: a device opened for a moment (udev's `blkid`
/// after a change, a probe by another tool) is not a user. While anything
/// is found, looks again every 75 ms, five times, and returns what every
/// look found.
pub fn lasting_openers(devs: &[DevNum], except: &[u32]) -> Vec<Opener> {
    lasting(
        || openers(devs, except),
        5,
        std::time::Duration::from_millis(75),
    )
}

/// What every one of `1 + again` calls of `look` (`pause` apart) returned;
/// stops looking once nothing is left.
fn lasting<T: PartialEq>(
    mut look: impl FnMut() -> Vec<T>,
    again: usize,
    pause: std::time::Duration,
) -> Vec<T> {
    let mut found = look();
    for _ in 0..again {
        if found.is_empty() {
            break;
        }
        std::thread::sleep(pause);
        let now = look();
        found.retain(|o| now.contains(o));
    }
    found
}

/// What uses block device `d`, or a partition of it, besides the devices
/// `ours` (stacked on it by devpool, going with it): mounts, active swap,
/// and devices built on it. Empty: none of these (a descriptor that is
/// merely open does not show here).
pub fn users(
    d: DevNum,
    ours: &[DevNum],
    mounts: &[Mount],
    swaps: &[(PathBuf, DevNum)],
) -> Vec<String> {
    let mut out = Vec::new();
    for x in std::iter::once(d).chain(partitions(d)) {
        for m in mounts.iter().filter(|m| m.dev == x) {
            out.push(format!("{} is mounted at {}", kname(x), m.mountpoint));
        }
        for (name, _) in swaps.iter().filter(|(_, s)| *s == x) {
            out.push(format!(
                "{} is in use as swap ({})",
                kname(x),
                name.display()
            ));
        }
        for h in holders(x).into_iter().filter(|h| !ours.contains(h)) {
            out.push(format!("{} is built on {}", kname(h), kname(x)));
        }
    }
    out
}

/// How a device of the closure relates to the candidate, for messages.
#[derive(Debug, Clone)]
pub struct Above {
    pub dev: DevNum,
    pub how: String,
}

/// The candidate, its partitions, and everything stacked on any of them:
/// holders (dm, md) and loop devices backed by files on their file systems,
/// transitively.
pub fn stacked_on(d: DevNum) -> Vec<Above> {
    let mut seen: BTreeSet<DevNum> = BTreeSet::new();
    let mut out: Vec<Above> = Vec::new();
    let mut todo = vec![Above {
        dev: d,
        how: kname(d),
    }];
    let all_loops = loops();
    let mounted = mounts();
    while let Some(a) = todo.pop() {
        if !seen.insert(a.dev) {
            continue;
        }
        for p in partitions(a.dev) {
            todo.push(Above {
                dev: p,
                how: format!("{} (partition of {})", kname(p), a.how),
            });
        }
        for h in holders(a.dev) {
            todo.push(Above {
                dev: h,
                how: format!("{} (built on {})", kname(h), a.how),
            });
        }
        // Loop devices whose backing file lives on a file system of `a`.
        for m in mounted.iter().filter(|m| m.dev == a.dev) {
            for (l, back) in &all_loops {
                let on = std::fs::metadata(back)
                    .map(|md| devnum_of_rdev(md.dev()) == a.dev)
                    .unwrap_or(false);
                if on {
                    todo.push(Above {
                        dev: *l,
                        how: format!(
                            "{} (loop device over {} on the file system of {} at {})",
                            kname(*l),
                            back.display(),
                            a.how,
                            m.mountpoint
                        ),
                    });
                }
            }
        }
        out.push(a);
    }
    out
}

pub fn is_file_type_block(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Whether `marker` exists, after loading `module` if it did not (the
/// kernel NBD client, ublk and device-mapper are modules on most kernels).
/// modprobe runs only where the running kernel has a module tree
/// (`/lib/modules/<release>`): without one nothing can be loaded, and the
/// failing modprobe cost each thin lease about 3 ms on such a host.
pub fn loaded_or_probed(module: &str, marker: &Path) -> bool {
    probed(module, marker, running_module_tree().as_deref(), |m| {
        let _ = std::process::Command::new("modprobe")
            .arg(m)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    })
}

/// `/lib/modules/<release>` of the running kernel, if its release can be read.
fn running_module_tree() -> Option<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(Path::new("/lib/modules").join(release.trim()))
}

/// [`loaded_or_probed`] with the module tree given (unknown: try anyway)
/// and `load` in modprobe's place.
fn probed(module: &str, marker: &Path, tree: Option<&Path>, load: impl FnOnce(&str)) -> bool {
    if marker.exists() {
        return true;
    }
    if tree.is_some_and(|t| !t.is_dir()) {
        return false;
    }
    load(module);
    marker.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modprobe_runs_only_where_the_kernel_has_a_module_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("loaded");
        let tree = dir.path().join("lib/modules/6.99.0");
        let mut calls = Vec::new();
        // Stands in for modprobe: records the module and "loads" it.
        let mut load = |m: &str| {
            calls.push(m.to_string());
            std::fs::write(&marker, "").expect("marker");
        };

        // No module tree: nothing is run, nothing is loaded.
        assert!(!probed("dm_mod", &marker, Some(&tree), &mut load));
        // A tree: modprobe runs and the marker then shows the module.
        std::fs::create_dir_all(&tree).expect("tree");
        assert!(probed("dm_mod", &marker, Some(&tree), &mut load));
        // Loaded already: modprobe is not run again.
        assert!(probed("dm_mod", &marker, Some(&tree), &mut load));
        assert_eq!(calls, ["dm_mod"]);
    }

    #[test]
    fn an_unknown_module_tree_still_tries_modprobe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tried = false;
        assert!(!probed("nbd", &dir.path().join("absent"), None, |_| {
            tried = true
        }));
        assert!(tried);
    }

    #[test]
    fn a_swap_file_that_is_not_utf8_hides_nothing() {
        let swaps = b"Filename\tType\tSize\tUsed\tPriority\n\
            /swap\xfe\\040file                          file\t1024\t0\t-2\n\
            /dev/vdb2                               partition\t1024\t0\t-3\n";
        use std::os::unix::ffi::OsStrExt;
        let names = swap_names(swaps);
        assert_eq!(names.len(), 2);
        assert_eq!(names[0].as_os_str().as_bytes(), b"/swap\xfe file");
        assert_eq!(names[1], PathBuf::from("/dev/vdb2"));
    }

    #[test]
    fn only_what_every_look_finds_lasts() {
        let zero = std::time::Duration::ZERO;
        // A probe seen once, then gone; a user seen every time.
        let mut looks = vec![vec![1, 2], vec![1], vec![1, 3], vec![1]].into_iter();
        assert_eq!(
            lasting(|| looks.next().unwrap_or_default(), 3, zero),
            vec![1]
        );
        // Nothing left: no more looks.
        let mut n = 0;
        let none: Vec<u32> = lasting(
            || {
                n += 1;
                if n == 1 { vec![7] } else { vec![] }
            },
            5,
            zero,
        );
        assert!(none.is_empty());
        assert_eq!(n, 2, "stopped looking once nothing was left");
        // Nothing found at first: one look only.
        let mut m = 0;
        let _: Vec<u32> = lasting(
            || {
                m += 1;
                vec![]
            },
            5,
            zero,
        );
        assert_eq!(m, 1);
    }
}
