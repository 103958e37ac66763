//! The kernel's NBD client as a host block device: devpool's own server on
//! one end of a socketpair, `/dev/nbdN` on the other, set up with the classic
//! ioctls (the connection is already in the transmission phase, so there is
//! no handshake). `NBD_DO_IT` blocks in its own thread for the life of the
//! device; disconnecting makes it return.

use super::{conn, proto};
use crate::device::Volume;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;
const BLOCK: u64 = 4096;

/// Whether this kernel has an NBD client (loading the module if it can).
pub fn available() -> bool {
    devpool_pool::sysblk::loaded_or_probed("nbd", Path::new("/sys/module/nbd"))
}

/// A free `/dev/nbdN`: present, not connected (no `pid`), size 0.
fn free_device() -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nbd"))
        .collect();
    names.sort_by_key(|n| n[3..].parse::<u32>().unwrap_or(u32::MAX));
    names.into_iter().find_map(|n| {
        let sys = Path::new("/sys/block").join(&n);
        let size = std::fs::read_to_string(sys.join("size")).unwrap_or_default();
        (!sys.join("pid").exists() && size.trim() == "0")
            .then(|| PathBuf::from(format!("/dev/{n}")))
    })
}

pub struct KernelNbd {
    pub device: PathBuf,
    dev: File,
    doit: Option<JoinHandle<()>>,
    server: Option<JoinHandle<io::Result<()>>>,
    stop: Arc<crate::lifetime::Stopper>,
}

fn ioctl(fd: &File, req: libc::c_ulong, arg: libc::c_ulong, what: &str) -> io::Result<()> {
    // SAFETY: NBD ioctls take an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Connect a free `/dev/nbdN` to `vol`.
pub fn connect(vol: &Arc<Volume>) -> io::Result<KernelNbd> {
    let device = free_device()
        .ok_or_else(|| io::Error::other("no free /dev/nbdN (all connected, or nbd not loaded)"))?;
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    let (client, server) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let dev = OpenOptions::new().read(true).write(true).open(&device)?;
    let blocks = vol.size() / BLOCK;
    ioctl(
        &dev,
        NBD_SET_BLKSIZE,
        BLOCK as libc::c_ulong,
        "NBD_SET_BLKSIZE",
    )?;
    ioctl(
        &dev,
        NBD_SET_SIZE_BLOCKS,
        blocks as libc::c_ulong,
        "NBD_SET_SIZE_BLOCKS",
    )?;
    let mut flags = proto::TF_HAS_FLAGS
        | proto::TF_SEND_FLUSH
        | proto::TF_SEND_FUA
        | proto::TF_SEND_TRIM
        | proto::TF_SEND_WRITE_ZEROES;
    if vol.read_only {
        flags |= proto::TF_READ_ONLY;
    }
    ioctl(&dev, NBD_SET_FLAGS, flags as libc::c_ulong, "NBD_SET_FLAGS")?;
    let stop = crate::lifetime::Stopper::new()?;
    let (v, s) = (Arc::clone(vol), Arc::clone(&stop));
    let server = std::thread::Builder::new()
        .name("nbd-kernel".into())
        .spawn(move || {
            let r = conn::serve(server.as_raw_fd(), v, s.fd());
            drop(server);
            r
        })?;
    ioctl(
        &dev,
        NBD_SET_SOCK,
        client.as_raw_fd() as libc::c_ulong,
        "NBD_SET_SOCK",
    )?;
    // The kernel holds its own reference to the socket now.
    drop(client);
    let dev2 = dev.try_clone()?;
    let doit = std::thread::Builder::new()
        .name("nbd-do-it".into())
        .spawn(move || {
            // Returns when the device is disconnected.
            let _ = ioctl(&dev2, NBD_DO_IT, 0, "NBD_DO_IT");
            let _ = ioctl(&dev2, NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
        })?;
    // Wait until the kernel reports the device connected.
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let t = std::time::Instant::now();
    while !Path::new(&format!("/sys/block/{name}/pid")).exists() {
        if t.elapsed() > std::time::Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(KernelNbd {
        device,
        dev,
        doit: Some(doit),
        server: Some(server),
        stop,
    })
}

impl KernelNbd {
    /// Disconnect (the kernel sends NBD_CMD_DISC after its in-flight I/O) and
    /// wait for both threads.
    pub fn close(mut self) {
        self.shutdown();
    }
    fn shutdown(&mut self) {
        if self.doit.is_none() {
            return;
        }
        let _ = ioctl(&self.dev, NBD_DISCONNECT, 0, "NBD_DISCONNECT");
        if let Some(h) = self.doit.take() {
            let _ = h.join();
        }
        self.stop.stop("the NBD device was disconnected");
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
    }
}

impl Drop for KernelNbd {
    fn drop(&mut self) {
        self.shutdown();
    }
}
