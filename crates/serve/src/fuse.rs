//! The FUSE frontend: a volume as one file (`volume`) in a FUSE mount, for
//! hosts whose kernel has neither an NBD client nor ublk. A loop device on
//! that file is then a host block device for any layout (striped,
//! multi-segment). Each request goes through the same
//! [`Queue`](crate::queue::Queue) as NBD; the file is opened `direct_io`, so
//! the kernel caches nothing and every path to the volume sees the same bytes.

use crate::device::Volume;
use crate::queue::{Event, Op, Queue, Request};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request as FuseRequest, WriteFlags,
};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const ROOT: u64 = 1;
const FILE: u64 = 2;
pub const FILE_NAME: &str = "volume";
const TTL: Duration = Duration::from_secs(1);
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

struct VolumeFs {
    vol: Arc<Volume>,
    /// Idle rings, one per concurrent request (FUSE runs several threads).
    rings: Mutex<Vec<Queue>>,
    uid: u32,
    gid: u32,
}

impl VolumeFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let now = SystemTime::now();
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            let perm = if self.vol.read_only { 0o400 } else { 0o600 };
            (FileType::RegularFile, perm, self.vol.size(), 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size / 512,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Run one request through a ring and wait for it.
    fn io(&self, op: Op, offset: u64, len: u64, iov: Vec<libc::iovec>) -> Result<(), Errno> {
        let mut q = match self.rings.lock().ok().and_then(|mut r| r.pop()) {
            Some(q) => q,
            None => Queue::new(Arc::clone(&self.vol), 8).map_err(|_| Errno::EIO)?,
        };
        let req = Request {
            op,
            offset,
            len,
            iov,
        };
        // SAFETY: the caller's buffer outlives this call, and we wait below
        // until the request has completed.
        let r = match unsafe { q.submit(0, req) } {
            Err(e) => Err(Errno::from_i32(e)),
            Ok(()) => {
                let mut ev = Vec::new();
                loop {
                    if q.wait(1, &mut ev).is_err() {
                        break Err(Errno::EIO);
                    }
                    if let Some(Event::Done(c)) = ev.iter().find(|e| matches!(e, Event::Done(_))) {
                        break if c.errno == 0 {
                            Ok(())
                        } else {
                            Err(Errno::from_i32(c.errno))
                        };
                    }
                }
            }
        };
        if let Ok(mut rings) = self.rings.lock() {
            rings.push(q);
        }
        r
    }
}

impl Filesystem for VolumeFs {
    fn lookup(&self, _req: &FuseRequest, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &FuseRequest, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &FuseRequest, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if self.vol.read_only && acc != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        // Reads at or past the end return what exists (EOF), as files do.
        let len = (size as u64).min(self.vol.size().saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        if len == 0 {
            reply.data(&[]);
            return;
        }
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut _,
            iov_len: buf.len(),
        }];
        match self.io(Op::Read, offset, len, iov) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let iov = vec![libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        }];
        // A file cannot grow: writes past the end fail with ENOSPC.
        match self.io(Op::Write { fua }, offset, data.len() as u64, iov) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is cached here; durability is fsync's job.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &FuseRequest,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.io(Op::Flush, 0, 0, Vec::new()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &FuseRequest,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let op = if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE {
            Op::Discard
        } else if mode & !FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE {
            Op::WriteZeroes {
                may_trim: false,
                fua: false,
            }
        } else if mode == 0 || mode == FALLOC_FL_KEEP_SIZE {
            // Preallocation inside the volume: already allocated.
            if self.vol.check(offset, length).is_ok() {
                reply.ok();
            } else {
                reply.error(Errno::from_i32(libc::EFBIG));
            }
            return;
        } else {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        };
        match self.io(op, offset, length, Vec::new()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted volume file; unmounted when dropped.
pub struct Mounted {
    pub file: PathBuf,
    pub mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    pub fn unmount(mut self) -> std::io::Result<()> {
        if let Some(s) = self.session.take() {
            s.umount_and_join()?;
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

/// Mount `vol` as `mountpoint/volume`.
pub fn mount(vol: Arc<Volume>, mountpoint: &Path) -> std::io::Result<Mounted> {
    std::fs::create_dir_all(mountpoint)?;
    let fs = VolumeFs {
        vol: Arc::clone(&vol),
        rings: Mutex::new(Vec::new()),
        // SAFETY: getuid/getgid have no preconditions.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("devpool:{}", vol.name)),
        MountOption::Subtype("devpool".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    config.n_threads = Some(2);
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    Ok(Mounted {
        file: mountpoint.join(FILE_NAME),
        mountpoint: mountpoint.to_path_buf(),
        session: Some(session),
    })
}
