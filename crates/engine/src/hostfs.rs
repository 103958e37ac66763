//! Files as the host's mount table places them, and reads that may wait on
//! a server. FUSE and network file systems answer only while their server
//! does: a stopped FUSE server holds any `stat` of its files, and any read
//! of a loop device whose backing file is on it, in a wait that nothing but
//! the server can end (a block read is not even killable). So before a scan
//! reads a device whose data comes through such a file system, it asks the
//! server for the file's attributes on a helper thread, for a bounded time,
//! and leaves the device unread, with why, when no answer comes.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub type DevNum = (u32, u32);

/// How long a scan waits for a server to answer before it leaves a device
/// whose data comes from that server unread.
pub const SERVER_WAIT: Duration = Duration::from_millis(500);

/// A loop device's backing file as sysfs names it (`/sys/block/loopN/loop/
/// backing_file`): the path exactly, whatever bytes it holds.
pub fn backing_file(attr: &Path) -> Option<PathBuf> {
    let mut b = std::fs::read(attr).ok()?;
    if b.last() == Some(&b'\n') {
        b.pop();
    }
    Some(path_of(b))
}

/// A path of exactly these bytes.
pub fn path_of(bytes: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

#[derive(Debug, Clone)]
pub struct Mount {
    pub dev: DevNum,
    pub mountpoint: String,
    pub source: String,
    /// The file system type (`ext4`, `fuse.sshfs`, `nfs4`).
    pub fstype: String,
}

impl Mount {
    /// A file system whose attributes come from a server (FUSE, network
    /// file systems): asking it may wait for as long as that server does.
    pub fn asks_a_server(&self) -> bool {
        const NETWORK: &[&str] = &[
            "nfs",
            "nfs4",
            "cifs",
            "smb3",
            "9p",
            "ceph",
            "glusterfs",
            "afs",
            "virtiofs",
            "lustre",
        ];
        // `fusectl` is the kernel's own FUSE control file system: no server.
        let fuse = ["fuse", "fuseblk"].iter().any(|f| {
            self.fstype == *f
                || self
                    .fstype
                    .strip_prefix(f)
                    .is_some_and(|t| t.starts_with('.'))
        });
        fuse || NETWORK.contains(&self.fstype.as_str())
    }

    /// "`file` is on a fuse file system (/mnt/x) whose server did not
    /// answer within 500 ms".
    pub fn silent_about(&self, file: &Path, wait: Duration) -> String {
        format!(
            "{} is on a {} file system ({}) whose server did not answer within {} ms",
            file.display(),
            self.fstype,
            self.mountpoint,
            wait.as_millis()
        )
    }
}

/// The mount `path` (absolute) is on: the longest mount point it is under.
pub fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.len())
}

/// [`mounts`], kept between calls while the mount table stays the same.
pub fn mounts_cached() -> Vec<Mount> {
    with_kept_mounts(<[Mount]>::to_vec)
}

/// `f` of the mount table, kept between calls while it stays the same:
/// `/proc/self/mountinfo` reports a change with `POLLPRI`, so a call costs
/// one `poll` instead of a read and parse (about 70 µs here, on every loop
/// device listing and scan) when nothing was mounted or unmounted since.
pub fn with_kept_mounts<R>(f: impl FnOnce(&[Mount]) -> R) -> R {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    static KEPT: Mutex<Option<(std::fs::File, Vec<Mount>)>> = Mutex::new(None);
    let mut kept = KEPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((file, m)) = kept.as_mut() {
        let mut p = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        if unsafe { libc::poll(&mut p, 1, 0) } == 0 {
            return f(m);
        }
        let mut text = Vec::new();
        if file.rewind().is_ok() && file.read_to_end(&mut text).is_ok() {
            *m = parse_mountinfo(&text);
            return f(m);
        }
    }
    let mut text = Vec::new();
    let Ok(mut file) = std::fs::File::open("/proc/self/mountinfo") else {
        return f(&mounts());
    };
    if file.read_to_end(&mut text).is_err() {
        return f(&mounts());
    }
    let m = parse_mountinfo(&text);
    let r = f(&m);
    *kept = Some((file, m));
    r
}

pub fn mounts() -> Vec<Mount> {
    // Bytes, not a String: one mount point that is not UTF-8 must not hide
    // every mount.
    parse_mountinfo(&std::fs::read("/proc/self/mountinfo").unwrap_or_default())
}

fn parse_mountinfo(text: &[u8]) -> Vec<Mount> {
    text.split(|&b| b == b'\n')
        .filter_map(|l| {
            let f: Vec<&[u8]> = l.split(|&b| b == b' ').collect();
            let dev = std::str::from_utf8(f.get(2)?).ok()?;
            let (a, b) = dev.split_once(':')?;
            let sep = f.iter().position(|x| *x == b"-")?;
            Some(Mount {
                dev: (a.parse().ok()?, b.parse().ok()?),
                mountpoint: unescape(f.get(4)?),
                source: unescape(f.get(sep + 2).copied().unwrap_or(b"")),
                fstype: unescape(f.get(sep + 1).copied().unwrap_or(b"")),
            })
        })
        .collect()
}

/// mountinfo and fstab escape blanks as `\040` and friends; as text (what
/// is not UTF-8 shown as U+FFFD).
pub fn unescape(s: impl AsRef<[u8]>) -> String {
    String::from_utf8_lossy(&unescape_bytes(s.as_ref())).into_owned()
}

/// [`unescape`], as bytes.
pub fn unescape_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Keys of the [`within`] calls whose helper is still waiting.
static WAITING: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// `f` run on a helper thread, waited for at most `wait`; `None` when it
/// has not returned by then. The helper, left waiting on its server, ends
/// when the server answers or with the process (FUSE and NFS waits are
/// killable). While one for `key` is still waiting, no second is started:
/// a resident process (`devpool daemon`) asking again gets `None` at once
/// instead of one more stuck thread.
pub fn within<T: Send + 'static>(
    key: &Path,
    wait: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let lock = || {
        WAITING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if !lock().insert(key.to_path_buf()) {
        return None;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = key.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("server-wait".into())
        .spawn(move || {
            let answer = f();
            // Before the send: whoever receives may ask again at once.
            lock().remove(&owned);
            let _ = tx.send(answer);
        });
    if spawned.is_err() {
        lock().remove(key);
        return None;
    }
    rx.recv_timeout(wait).ok()
}

/// Whether the file system holding `path` answers for it within `wait`:
/// its attributes read from the file system itself (`AT_STATX_FORCE_SYNC`:
/// FUSE and NFS ask their server), on a helper thread. An error (a file
/// since deleted) is an answer too.
fn answers(path: &Path, wait: Duration) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return true;
    };
    within(path, wait, move || {
        // SAFETY: all-zero is a valid statx buffer.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a buffer of the right type.
        unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::AT_STATX_FORCE_SYNC,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        }
    })
    .is_some()
}

/// Why `path` cannot be looked at now: it is on FUSE or a network file
/// system whose server did not answer within `wait` (see [`answers`]).
/// `None`: it is on no such file system, or its server answered.
pub fn unanswered(path: &Path, wait: Duration) -> Option<String> {
    let abs = std::path::absolute(path).ok()?;
    let m = with_kept_mounts(|m| mount_of(m, &abs).filter(|m| m.asks_a_server()).cloned())?;
    (!answers(path, wait)).then(|| m.silent_about(path, wait))
}

/// `std::fs::metadata(path)` (`None`: it does not exist or cannot be
/// read), without waiting on a stopped server: `Err` says which server
/// did not answer within `wait`.
pub fn metadata_bounded(path: &Path, wait: Duration) -> Result<Option<std::fs::Metadata>, String> {
    match unanswered(path, wait) {
        Some(why) => Err(why),
        None => Ok(std::fs::metadata(path).ok()),
    }
}

/// Why reading `path` (a block device or an image file) could wait on a
/// server that is not answering: it, or the backing file of a loop device
/// under it (the device itself, the disk a partition is on, what a
/// device-mapper or md device is built on), is on FUSE or a network file
/// system whose server did not answer within `wait`. `None`: nothing under
/// `path` asks a server, or every server asked answered.
pub fn unanswered_server(path: &Path, wait: Duration) -> Option<String> {
    // Most hosts have no such mount: then nothing needs looking at.
    if !with_kept_mounts(|m| m.iter().any(Mount::asks_a_server)) {
        return None;
    }
    let meta = match metadata_bounded(path, wait) {
        Err(why) => return Some(why),
        Ok(meta) => meta?,
    };
    if !meta.file_type().is_block_device() {
        return None;
    }
    let dev = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    loop_files_under(dev).iter().find_map(|back| {
        unanswered(back, wait)
            .map(|why| format!("it reads through a loop device whose backing file {why}"))
    })
}

/// The backing files of the loop devices block device `d` reads through:
/// itself, the disk it is a partition of, and (through sysfs `slaves`)
/// everything it is built on, all the way down.
fn loop_files_under(d: DevNum) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![d];
    let mut seen = BTreeSet::new();
    // A bound on the walk, whatever sysfs says.
    while let Some(d) = todo.pop()
        && seen.len() < 256
    {
        if !seen.insert(d) {
            continue;
        }
        let Ok(dir) = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", d.0, d.1)) else {
            continue;
        };
        if dir.join("partition").exists()
            && let Some(disk) = dir.parent().and_then(read_devnum)
        {
            todo.push(disk);
        }
        if let Some(b) = backing_file(&dir.join("loop/backing_file")) {
            out.push(b);
        }
        if let Ok(rd) = std::fs::read_dir(dir.join("slaves")) {
            todo.extend(rd.flatten().filter_map(|e| read_devnum(&e.path())));
        }
    }
    out
}

/// The device number in a sysfs block device directory's `dev`.
pub fn read_devnum(dir: &Path) -> Option<DevNum> {
    let s = std::fs::read_to_string(dir.join("dev")).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mount_point_above_a_path_says_whether_a_server_answers_for_it() {
        let info = b"22 1 254:0 / / rw - ext4 /dev/vda rw\n\
            40 22 0:50 / /mnt/remote rw - fuse.sshfs host:/ rw\n\
            41 40 254:0 /local /mnt/remote/local rw - ext4 /dev/vda rw\n\
            42 22 0:51 / /srv/nfs rw - nfs4 host:/export rw\n\
            43 22 0:52 / /sys/fs/fuse/connections rw - fusectl fusectl rw\n\
            44 22 0:53 / /mnt/plain rw - fuse devpool:v rw\n\
            45 22 0:54 / /mnt/blk rw - fuseblk /dev/sdb1 rw\n";
        let m = parse_mountinfo(info);
        let on =
            |p: &str| mount_of(&m, Path::new(p)).map(|m| (m.fstype.as_str(), m.asks_a_server()));
        assert_eq!(on("/var/pool.img"), Some(("ext4", false)));
        assert_eq!(on("/mnt/remote/img"), Some(("fuse.sshfs", true)));
        assert_eq!(on("/mnt/remote/local/img"), Some(("ext4", false)));
        assert_eq!(
            on("/mnt/remoteX/img"),
            Some(("ext4", false)),
            "by components"
        );
        assert_eq!(on("/srv/nfs/a (deleted)"), Some(("nfs4", true)));
        assert_eq!(
            on("/sys/fs/fuse/connections/1/abort"),
            Some(("fusectl", false))
        );
        assert_eq!(on("/mnt/plain/volume"), Some(("fuse", true)));
        assert_eq!(on("/mnt/blk/f"), Some(("fuseblk", true)));
    }

    #[test]
    fn kept_mounts_follow_a_mount_and_an_unmount() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().to_str().unwrap().to_string();
        let listed = || mounts_cached().iter().any(|m| m.mountpoint == at);
        assert!(!listed());
        let mount = |args: &[&str]| {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
        };
        if !mount(&["mount", "-t", "tmpfs", "none", &at]).is_ok_and(|s| s.success()) {
            eprintln!("SKIP kept_mounts_follow_a_mount_and_an_unmount: cannot mount (not root?)");
            return;
        }
        let seen = listed();
        let _ = mount(&["umount", &at]);
        assert!(seen, "a new mount is seen");
        assert!(!listed(), "an unmount is seen");
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("plain\\"), "plain\\");
    }

    #[test]
    fn a_mount_point_that_is_not_utf8_hides_nothing() {
        let info = b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            30 22 7:3 / /mnt/\xff\\040x rw - ext4 /dev/loop3 rw\n\
            31 22 7:4 / /srv rw - xfs /dev/loop4 rw\n";
        let m = parse_mountinfo(info);
        assert_eq!(m.len(), 3);
        assert_eq!((m[1].dev, m[1].source.as_str()), ((7, 3), "/dev/loop3"));
        assert_eq!(m[1].mountpoint, "/mnt/\u{fffd} x");
        assert_eq!((m[2].dev, m[2].mountpoint.as_str()), ((7, 4), "/srv"));
    }

    #[test]
    fn a_helper_still_waiting_is_not_started_again() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let started = Arc::new(AtomicUsize::new(0));
        let slow = |started: &Arc<AtomicUsize>| {
            let started = Arc::clone(started);
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
                7
            }
        };
        let key = Path::new("/test/within");
        let short = Duration::from_millis(20);
        assert_eq!(within(key, short, slow(&started)), None);
        assert_eq!(within(key, short, slow(&started)), None);
        assert_eq!(started.load(Ordering::SeqCst), 1, "one helper waits");
        // Another key is not held up by it.
        assert_eq!(within(Path::new("/test/other"), short, || 8), Some(8));
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(within(key, Duration::from_secs(2), slow(&started)), Some(7));
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn root_file_system_is_in_mountinfo() {
        assert!(mounts().iter().any(|m| m.mountpoint == "/"));
    }
}
