//! The NBD listener: a Unix socket (mode 0600) or TCP (loopback unless the
//! user names another address with `--listen`), one thread per client.

use super::{conn, proto};
use crate::device::Volume;
use crate::lifetime::Stopper;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
            Endpoint::Tcp(a) => write!(f, "nbd://{a}"),
        }
    }
}

impl Endpoint {
    /// `unix:PATH` or `tcp:HOST:PORT`. A TCP address that is not loopback
    /// must be the one `listen` names (the user asked for it explicitly).
    pub fn parse(s: &str, listen: Option<IpAddr>) -> Result<Endpoint, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/devpool/vol.sock".into());
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(format!(
                "'{s}': expected unix:PATH or tcp:HOST:PORT (e.g. tcp:127.0.0.1:10809)"
            ));
        };
        let addr: SocketAddr = rest
            .parse()
            .or_else(|_| {
                use std::net::ToSocketAddrs;
                rest.to_socket_addrs()
                    .map_err(|e| e.to_string())?
                    .next()
                    .ok_or_else(|| "no address".to_string())
            })
            .map_err(|e| format!("'{rest}' is not HOST:PORT: {e}"))?;
        if !addr.ip().is_loopback() && listen != Some(addr.ip()) {
            return Err(format!(
                "refusing to serve on {} (not loopback): anyone who can reach it could read and write the volume; pass --listen {} to mean it",
                addr,
                addr.ip()
            ));
        }
        Ok(Endpoint::Tcp(addr))
    }
}

pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub fn bind(ep: &Endpoint) -> io::Result<Listener> {
        match ep {
            Endpoint::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a)?)),
            Endpoint::Unix(p) => {
                remove_stale_socket(p)?;
                Ok(Listener::Unix(bind_private(p)?, p.clone()))
            }
        }
    }

    pub fn endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
            Listener::Tcp(t) => Endpoint::Tcp(t.local_addr()?),
        })
    }

    fn raw_fd(&self) -> i32 {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A socket file left by a server that is gone is replaced; one that still
/// answers, or anything that is not a socket, is an error.
pub(crate) fn remove_stale_socket(p: &std::path::Path) -> io::Result<()> {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return Ok(());
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; choose another path",
                p.display()
            ),
        ));
    }
    if UnixStream::connect(p).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", p.display()),
        ));
    }
    std::fs::remove_file(p)
}

/// Bind a Unix socket that only its owner can connect to: the mode is set
/// on the socket before bind, so the file never exists with a wider mode.
pub(crate) fn bind_private(p: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket/fchmod/bind/listen on a descriptor we own, with a
    // sockaddr_un filled within its bounds.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let l = <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        if libc::fchmod(fd, 0o600) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = p.as_os_str().as_bytes();
        if bytes.len() >= addr.sun_path.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "socket path {} is longer than {} bytes",
                    p.display(),
                    addr.sun_path.len() - 1
                ),
            ));
        }
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        if libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("bind {}: {e}", p.display()),
            ));
        }
        // Belt and braces: some file systems ignore the socket inode's mode.
        let c = std::ffi::CString::new(bytes).map_err(|e| io::Error::other(e.to_string()))?;
        libc::chmod(c.as_ptr(), 0o600);
        if libc::listen(fd, 128) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(l)
    }
}

/// Accept clients until `stopper` is set; then let every connection finish
/// its in-flight requests, flush the devices and return.
pub fn serve(listener: &Listener, vol: Arc<Volume>, stopper: Arc<Stopper>) -> io::Result<()> {
    let export = proto::Export {
        name: vol.name.clone(),
        description: format!("devpool volume {}", vol.name),
        size: vol.size(),
        read_only: vol.read_only,
        preferred_block: vol.align().max(4096) as u32,
    };
    stopper.shutdown_on_stop(listener.raw_fd());
    let mut workers = Vec::new();
    while !stopper.is_stopped() {
        let stream: Box<dyn ClientStream> = match listener {
            Listener::Unix(l, _) => match l.accept() {
                Ok((s, _)) => Box::new(s),
                Err(e) => {
                    if stopper.is_stopped() {
                        break;
                    }
                    accept_failed(e)?;
                    continue;
                }
            },
            Listener::Tcp(l) => match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    Box::new(s)
                }
                Err(e) => {
                    if stopper.is_stopped() {
                        break;
                    }
                    accept_failed(e)?;
                    continue;
                }
            },
        };
        workers.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
        let vol = Arc::clone(&vol);
        let export = export.clone();
        let stopper = Arc::clone(&stopper);
        workers.push(
            std::thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || client(stream, vol, export, stopper))?,
        );
    }
    for w in workers {
        let _ = w.join();
    }
    flush_all(&vol)
}

fn accept_failed(e: io::Error) -> io::Result<()> {
    match e.raw_os_error() {
        // Transient: a client gave up, or descriptors ran out for a moment.
        Some(libc::ECONNABORTED | libc::EINTR | libc::EMFILE | libc::ENFILE) => {
            std::thread::sleep(Duration::from_millis(10));
            Ok(())
        }
        _ => Err(e),
    }
}

trait ClientStream: io::Read + io::Write + AsRawFd + Send {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()>;
}
impl ClientStream for UnixStream {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
}
impl ClientStream for std::net::TcpStream {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
}

fn client(
    mut s: Box<dyn ClientStream>,
    vol: Arc<Volume>,
    export: proto::Export,
    stop: Arc<Stopper>,
) {
    // A client that stalls in the handshake must not hold a thread forever.
    let _ = s.set_timeout(Some(Duration::from_secs(30)));
    match proto::handshake(&mut s, &export) {
        Ok(proto::Handshake::Transmission) => {
            let _ = s.set_timeout(None);
            if let Err(e) = conn::serve(s.as_raw_fd(), vol, stop.fd()) {
                eprintln!("devpool serve: connection ended with an error: {e}");
            }
        }
        Ok(proto::Handshake::Closed) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) => eprintln!("devpool serve: handshake failed: {e}"),
    }
}

/// fdatasync every device of the volume.
pub fn flush_all(vol: &Volume) -> io::Result<()> {
    for d in &vol.devs {
        // SAFETY: fdatasync on an open descriptor.
        if unsafe { libc::fdatasync(d.any_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_non_loopback_tcp_needs_listen() {
        assert_eq!(
            Endpoint::parse("unix:/tmp/x.sock", None).unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        assert!(Endpoint::parse("tcp:127.0.0.1:10809", None).is_ok());
        let e = Endpoint::parse("tcp:0.0.0.0:10809", None).unwrap_err();
        assert!(e.contains("--listen 0.0.0.0"), "{e}");
        assert!(Endpoint::parse("tcp:0.0.0.0:10809", Some("0.0.0.0".parse().unwrap())).is_ok());
        assert!(Endpoint::parse("nbd:x", None).is_err());
        assert!(Endpoint::parse("tcp:nonsense", None).is_err());
    }
}
