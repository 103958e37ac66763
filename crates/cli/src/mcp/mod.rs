//! `devpool mcp`: an MCP server on stdio, so coding agents drive pools,
//! leases, snapshots and VM test runs. Tool names and argument names are
//! kerneldev-mcp's where it has them (`device_pool_*`), so an agent set up
//! for it works unchanged.
//!
//! Every tool runs the same library calls as the CLI, on a blocking thread;
//! failures are tool errors (`isError`) carrying the CLI's messages, and a
//! bad argument never ends the server. Destructive tools return their plan
//! and change nothing without `confirm: true`. Long calls (VM runs, wipes)
//! report progress when the client asks for it (a progress token) and stop
//! when the client cancels them; a cancelled VM run releases its volumes.
//! Leases taken through the server belong to the server process: they are
//! released when the client disconnects or the server is told to stop, and
//! a killed server's leases are orphans `cleanup` reaps.

mod tools;

use crate::args::Global;
use anyhow::Result;
use devpool_pool::owner::Owner;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ProgressToken,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::{Peer, RequestContext, RoleServer};
use rmcp::{ErrorData as McpError, ServerHandler, ServiceExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Leases this server took (pool, session), released when it ends.
type Owned = Arc<Mutex<Vec<(String, String)>>>;

#[derive(Clone)]
struct Server {
    g: Global,
    /// This process, the owner of the leases taken here (read once).
    owner: Owner,
    owned: Owned,
    idle: IdleConnections,
    /// Cancel flags of the calls in flight (set all when the server stops).
    running: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

/// Connections to `devpool daemon` that earlier calls kept for later ones
/// (a connection costs the daemon a thread, and the server a connect and a
/// close, per call otherwise).
type IdleConnections = Arc<Mutex<Vec<devpool_pool::daemon::Client>>>;

/// What a tool call may use besides its arguments.
pub struct Call {
    pub g: Global,
    /// The server process: it owns the leases its calls take.
    pub owner: Owner,
    pub owned: Owned,
    pub idle: IdleConnections,
    pub cancel: Arc<AtomicBool>,
    pub progress: Progress,
}

/// Progress notifications for one call (nothing when the client gave no
/// progress token).
#[derive(Clone)]
pub struct Progress {
    to: Option<(Peer<RoleServer>, ProgressToken, tokio::runtime::Handle)>,
    step: Arc<Mutex<f64>>,
}

impl Progress {
    /// Report `done` of `total` (or a step count when `total` is unknown).
    pub fn report(&self, done: Option<f64>, total: Option<f64>, message: &str) {
        let Some((peer, token, rt)) = &self.to else {
            return;
        };
        let progress = match done {
            Some(d) => d,
            None => {
                let mut s = self.step.lock().unwrap_or_else(|p| p.into_inner());
                *s += 1.0;
                *s
            }
        };
        let mut p = ProgressNotificationParam::new(token.clone(), progress).with_message(message);
        if let Some(t) = total {
            p = p.with_total(t);
        }
        let peer = peer.clone();
        rt.spawn(async move {
            let _ = peer.notify_progress(p).await;
        });
    }
}

impl Call {
    /// Run `f` on the leases of this call's pools, through a daemon
    /// connection an earlier call kept when one is still open; the
    /// connection is kept again for the next call when `f` succeeded.
    pub fn with_leases<T>(
        &self,
        f: impl FnOnce(&crate::pool_cmds::Leases) -> Result<T>,
    ) -> Result<T> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let leases = crate::pool_cmds::Leases::reusing(&self.g, idle)?;
        let r = f(&leases)?;
        if let Some(c) = leases.into_daemon() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
        Ok(r)
    }
}

/// A tool's outcome: a readable summary and the structured result.
pub struct Reply {
    pub summary: String,
    pub value: serde_json::Value,
}

fn tool_result(r: Result<Reply>) -> CallToolResult {
    match r {
        Ok(Reply { summary, value }) => {
            let mut out = CallToolResult::structured(value);
            out.content = vec![ContentBlock::text(summary)];
            out
        }
        Err(e) => CallToolResult::error(vec![ContentBlock::text(format!("{e:#}"))]),
    }
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("devpool", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "devpool: LVM device pools for kernel and filesystem testing. Lease \
volumes (device_pool_lease_acquire) for a test run, boot kernels with them \
(vm_run, vm_module_test, fstests_vm_boot_and_run), snapshot and roll back. \
Destructive tools (setup, teardown, shrinking resize, snapshot merge) return \
their plan unless called with confirm: true.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(tools::list()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let cancel = Arc::new(AtomicBool::new(false));
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cancel.clone());
        let token = request
            .meta
            .as_ref()
            .and_then(|m| m.get_progress_token())
            .or_else(|| context.meta.get_progress_token());
        let call = Call {
            g: self.g.clone(),
            owner: self.owner.clone(),
            owned: self.owned.clone(),
            idle: self.idle.clone(),
            cancel: cancel.clone(),
            progress: Progress {
                to: token.map(|t| (context.peer.clone(), t, tokio::runtime::Handle::current())),
                step: Arc::new(Mutex::new(0.0)),
            },
        };
        let name = request.name.to_string();
        let args = request.arguments.unwrap_or_default();
        let task = tokio::task::spawn_blocking(move || tools::call(&name, args, &call));
        // A cancelled call is told to stop; its result (after the cleanup
        // it does, e.g. releasing a VM's volumes) is still awaited.
        let ct = context.ct.clone();
        let flag = cancel.clone();
        let watch = tokio::spawn(async move {
            ct.cancelled().await;
            flag.store(true, Ordering::SeqCst);
        });
        let r = task.await;
        watch.abort();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| !Arc::ptr_eq(c, &cancel));
        let r = match r {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the tool failed: {e}")),
        };
        Ok(CallToolResponse::Complete(tool_result(r)))
    }
}

type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// stdin and stdout for the protocol. Pipes and Unix sockets (what agents
/// start servers with: Python's subprocess makes pipes, Node's socket
/// pairs) are read and written by the runtime itself, without blocking;
/// tokio's own stdin and stdout hand every read and write to a blocking
/// thread, more thread switches per message. Anything else (a terminal, a
/// file) keeps the plain streams: making it non-blocking would change it
/// for whoever else shares it.
fn stdio() -> (Reader, Writer) {
    use tokio::net::UnixStream;
    use tokio::net::unix::pipe;
    let reader: Reader = match kind(0) {
        Kind::Fifo => dup_fd(0)
            .and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok())
            .map(|r| Box::new(r) as Reader),
        Kind::UnixSocket => dup_fd(0)
            .and_then(unix_stream)
            .map(|s| Box::new(s) as Reader),
        Kind::Other => None,
    }
    .unwrap_or_else(|| Box::new(tokio::io::stdin()));
    let writer: Writer = match kind(1) {
        Kind::Fifo => dup_fd(1)
            .and_then(|fd| pipe::Sender::from_owned_fd(fd).ok())
            .map(|w| Box::new(w) as Writer),
        Kind::UnixSocket => dup_fd(1)
            .and_then(unix_stream)
            .map(|s| Box::new(s) as Writer),
        Kind::Other => None,
    }
    .unwrap_or_else(|| Box::new(tokio::io::stdout()));
    return (reader, writer);

    fn unix_stream(fd: std::os::fd::OwnedFd) -> Option<UnixStream> {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true).ok()?;
        UnixStream::from_std(s).ok()
    }
}

enum Kind {
    Fifo,
    UnixSocket,
    Other,
}

fn kind(fd: i32) -> Kind {
    // SAFETY: fstat and getsockopt fill buffers we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Kind::Other;
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => {
                let mut domain: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                let r = libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_DOMAIN,
                    &mut domain as *mut libc::c_int as *mut libc::c_void,
                    &mut len,
                );
                if r == 0 && domain == libc::AF_UNIX {
                    Kind::UnixSocket
                } else {
                    Kind::Other
                }
            }
            _ => Kind::Other,
        }
    }
}

fn dup_fd(fd: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: d is a fresh descriptor owned by nobody else.
    (d >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(d) })
}

/// Run the server on stdin/stdout until the client disconnects or a
/// signal asks it to stop; then release the leases it took.
pub fn serve(g: &Global) -> Result<i32> {
    // A client that goes away must not kill us before its leases are released.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // One thread is plenty for the protocol (tools run on blocking threads),
    // and saves the thread switches of handing messages between workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let server = Server {
        g: g.clone(),
        owner: Owner::of_this_process().map_err(anyhow::Error::msg)?,
        owned: Arc::new(Mutex::new(Vec::new())),
        idle: IdleConnections::default(),
        running: Arc::new(Mutex::new(Vec::new())),
    };
    let owned = server.owned.clone();
    let running = server.running.clone();
    rt.block_on(async move {
        let service = match server.serve(stdio()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("devpool mcp: the client's handshake failed: {e}");
                return;
            }
        };
        let ct = service.cancellation_token();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            r = service.waiting() => {
                if let Err(e) = r {
                    eprintln!("devpool mcp: {e}");
                }
            }
            _ = tokio::signal::ctrl_c() => ct.cancel(),
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => ct.cancel(),
        }
    });
    // Calls still running (a VM) are told to stop and given a moment to
    // release what they hold.
    for c in running.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        c.store(true, Ordering::SeqCst);
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(30));
    let left = std::mem::take(&mut *owned.lock().unwrap_or_else(|p| p.into_inner()));
    let p = crate::pool_cmds::Leases::new(g)?;
    let mut status = 0;
    for (pool, session) in left {
        match p.release(&pool, &session) {
            Ok(_) => eprintln!("devpool mcp: released lease {session} (pool '{pool}')"),
            Err(e) => {
                eprintln!(
                    "devpool mcp: releasing lease {session} failed: {e}; 'devpool cleanup' reaps it"
                );
                status = 1;
            }
        }
    }
    Ok(status)
}
