//! `devpool daemon`: leases over a Unix socket, with group commit.
//!
//! The socket is `<state dir>/daemon.sock` (mode 0600: root's clients only).
//! The protocol is one JSON object per line each way, many requests per
//! connection, answered in order:
//!
//! ```text
//! {"op":"acquire","pool":"default","profile":"fstests","size":"10G"}
//! {"op":"acquire","volumes":"test:10G,scratch:10G","keep":true,"owner_pid":4242}
//! {"op":"acquire","volumes":"vda:20G","loop_devices":false}
//! {"op":"release","pool":"default","session":"20261121133846-c51f15"}
//! {"op":"ping"}
//! ```
//!
//! Each answer is `{"ok":true,"result":…}` (for acquire, what `devpool
//! --json lease acquire` prints; for release, what `lease release` prints)
//! or `{"ok":false,"error":"…"}`. A lease is owned by `owner_pid`, or by the
//! connecting process when it is absent, exactly as `lease acquire` records
//! it: it stays when the connection closes and is reaped when its owner
//! dies. `"prefix"` sets the first part of the LV names (the CLI sends its
//! `DEVPOOL_PREFIX`); without it the daemon's own settings apply.

use crate::group::{GroupStats, LeaseService};
use crate::owner::Owner;
use crate::pool::DeviceOptions;
use crate::spec;
use crate::{PoolError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub const SOCKET_NAME: &str = "daemon.sock";
/// The longest request line accepted.
const MAX_REQUEST: u64 = 64 << 10;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    Acquire {
        #[serde(default = "default_pool")]
        pool: String,
        /// `ROLE:SIZE,…`, as `--volumes`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volumes: Option<String>,
        /// A profile (`fstests`), as `--profile`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<String>,
        /// The profile's volume size, as `--size`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<String>,
        #[serde(default)]
        keep: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner_pid: Option<u32>,
        /// Give the loop devices to this `[uid, gid]`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chown: Option<(u32, u32)>,
        /// `false`: no host loop devices (volumes for a VM, which attaches
        /// them itself, or for a server).
        #[serde(default = "yes")]
        loop_devices: bool,
        /// First part of the LV names (the client's `DEVPOOL_PREFIX`),
        /// else the daemon's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    Release {
        #[serde(default = "default_pool")]
        pool: String,
        session: String,
    },
}

fn yes() -> bool {
    true
}

fn default_pool() -> String {
    "default".into()
}

/// What `ping` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    #[serde(flatten)]
    pub stats: GroupStats,
}

#[derive(Debug, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Listen on `path`: a socket left by a daemon that is gone is replaced;
/// one a daemon still answers on is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(PoolError::Refused(format!(
                "a daemon already listens on {} ('devpool daemon --status' asks it)",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| PoolError::io(path, "remove stale socket", e))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PoolError::io(dir, "create", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| PoolError::io(path, "bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| PoolError::io(path, "chmod 0600", e))?;
    Ok(l)
}

/// Answer connections until `stopped()` is true and the listener has been
/// shut down (which wakes `accept`). Then no more requests are read;
/// requests under way finish and are answered.
pub fn serve(
    listener: &UnixListener,
    service: Arc<LeaseService>,
    stopped: &dyn Fn() -> bool,
) -> std::io::Result<()> {
    let open: Arc<Mutex<HashMap<u64, UnixStream>>> = Arc::default();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next = 0u64;
    for conn in listener.incoming() {
        if stopped() {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("devpool daemon: accept: {e}");
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        let id = next;
        next += 1;
        if let Ok(c) = conn.try_clone() {
            lock(&open).insert(id, c);
        }
        let (service, open) = (Arc::clone(&service), Arc::clone(&open));
        threads.push(
            std::thread::Builder::new()
                .name(format!("client-{id}"))
                .spawn(move || {
                    if let Err(e) = answer(&service, conn) {
                        eprintln!("devpool daemon: connection {id}: {e}");
                    }
                    lock(&open).remove(&id);
                })?,
        );
    }
    for c in lock(&open).values() {
        let _ = c.shutdown(Shutdown::Read);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read requests from one connection and answer each in turn.
fn answer(service: &LeaseService, conn: UnixStream) -> std::io::Result<()> {
    let peer = peer_pid(&conn);
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    loop {
        let mut line = String::new();
        // A request is a few hundred bytes: a longer line is refused, and
        // the connection closed, instead of growing without bound.
        let n = (&mut input).take(MAX_REQUEST).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 == MAX_REQUEST {
            let resp = failure(format!("request longer than {MAX_REQUEST} bytes"));
            let mut text = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
            text.push(b'\n');
            return out.write_all(&text);
        }
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match handle(service, req, peer) {
                Ok(v) => Response {
                    ok: true,
                    result: Some(v),
                    error: None,
                },
                Err(e) => failure(e.to_string()),
            },
            Err(e) => failure(format!("bad request: {e}")),
        };
        let mut text = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
        text.push(b'\n');
        out.write_all(&text)?;
    }
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        result: None,
        error: Some(error),
    }
}

fn handle(service: &LeaseService, req: Request, peer: Option<u32>) -> Result<serde_json::Value> {
    match req {
        Request::Ping => to_json(&DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            stats: service.stats(),
        }),
        Request::Acquire {
            pool,
            volumes,
            profile,
            size,
            keep,
            owner_pid,
            chown,
            loop_devices,
            prefix,
        } => {
            let specs = match (&volumes, &profile) {
                (Some(v), _) => spec::parse_volumes(v)?,
                (None, Some(p)) => spec::profile(p, size.as_deref())?,
                (None, None) => {
                    return Err(PoolError::Invalid(
                        "acquire needs \"volumes\" (ROLE:SIZE,…) or \"profile\"".into(),
                    ));
                }
            };
            let pid = owner_pid.or(peer).ok_or_else(|| {
                PoolError::Invalid("no owner_pid, and the peer's PID is unknown".into())
            })?;
            let owner = Owner::of_pid(pid)
                .map_err(|why| PoolError::Invalid(format!("owner_pid {pid}: {why}")))?;
            let devices = DeviceOptions {
                loops: loop_devices,
                chown,
            };
            let lease = service.acquire(&pool, &specs, &owner, keep, devices, prefix.as_deref())?;
            to_json(&lease)
        }
        Request::Release { pool, session } => {
            let removed = service.release(&pool, &session)?;
            Ok(serde_json::json!({"pool": pool, "session": session, "removed": removed}))
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| PoolError::Invalid(format!("answer: {e}")))
}

/// The connecting process (SO_PEERCRED).
fn peer_pid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing and sized for SO_PEERCRED.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// A connection to a running daemon.
pub struct Client {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Client {
    /// Connect to the daemon of `state_dir`; None when none answers.
    pub fn connect(state_dir: &Path) -> Option<Client> {
        let s = UnixStream::connect(socket_path(state_dir)).ok()?;
        let input = BufReader::new(s.try_clone().ok()?);
        Some(Client { out: s, input })
    }

    /// Whether this connection can carry another request: the daemon has
    /// not closed it (it does when it stops) and nothing unasked-for waits
    /// on it.
    pub fn is_open(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.out.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, without waiting.
        let ready = unsafe { libc::poll(&mut p, 1, 0) };
        ready == 0 && self.input.buffer().is_empty()
    }

    /// Send one request; its result, or the daemon's error message.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value> {
        let io = |e: std::io::Error| PoolError::io("devpool daemon socket", "talk to", e);
        let mut text =
            serde_json::to_vec(req).map_err(|e| PoolError::Invalid(format!("request: {e}")))?;
        text.push(b'\n');
        self.out.write_all(&text).map_err(io)?;
        let mut line = String::new();
        if self.input.read_line(&mut line).map_err(io)? == 0 {
            return Err(PoolError::Refused(
                "the daemon closed the connection without answering (is it stopping?)".into(),
            ));
        }
        let resp: Response = serde_json::from_str(&line)
            .map_err(|e| PoolError::Invalid(format!("daemon answer: {e}")))?;
        match (resp.ok, resp.result, resp.error) {
            (true, Some(v), _) => Ok(v),
            (_, _, Some(e)) => Err(PoolError::Refused(e)),
            _ => Err(PoolError::Invalid("daemon answer without result".into())),
        }
    }
}
