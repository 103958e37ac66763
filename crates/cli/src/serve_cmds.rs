//! `devpool serve`: export a leased volume over NBD and/or vhost-user-blk.

use crate::args::{ExportKind, Global};
use crate::pool_cmds::{pool_name, pools};
use anyhow::{Result, anyhow};
use devpool_serve::export::{self, ExportSpec};
use devpool_serve::lifetime::{self, Stopper};
use devpool_serve::nbd::server::Endpoint;
use std::io::Write;
use std::path::PathBuf;

pub struct Exports {
    pub nbd: Option<String>,
    pub vhost_user_blk: Option<PathBuf>,
    pub listen: Option<std::net::IpAddr>,
    pub read_only: bool,
    pub queues: usize,
    pub block_device: bool,
}

pub fn spec(e: &Exports) -> Result<ExportSpec> {
    let nbd = e
        .nbd
        .as_deref()
        .map(|s| Endpoint::parse(s, e.listen).map_err(|m| anyhow!("--nbd: {m}")))
        .transpose()?;
    if e.queues == 0 || e.queues > devpool_serve::vhost::MAX_QUEUES {
        return Err(anyhow!(
            "--queues: {} is not between 1 and {}",
            e.queues,
            devpool_serve::vhost::MAX_QUEUES
        ));
    }
    Ok(ExportSpec {
        nbd,
        vhost_user_blk: e.vhost_user_blk.clone(),
        read_only: e.read_only,
        queues: e.queues,
        block_device: e.block_device,
    })
}

pub fn serve(g: &Global, volume: &str, e: &Exports) -> Result<()> {
    let spec = spec(e)?;
    let p = pools(g)?;
    let name = pool_name(g);
    let stopper = Stopper::new()?;
    // Before any worker thread starts, so they all inherit the blocked mask.
    lifetime::stop_on_signals(stopper.clone())?;
    let running = export::start(&p, &name, volume, &spec, stopper)?;
    let info = running.info.clone();
    if g.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        let mut what = Vec::new();
        if let Some(n) = &info.nbd {
            what.push(format!("NBD {n}"));
        }
        if let Some(v) = &info.vhost_user_blk {
            what.push(format!("vhost-user-blk {}", v.display()));
        }
        if let (Some(d), Some(c)) = (&info.block_device, &info.block_device_path) {
            let how = match c.path {
                devpool_serve::hostdev::HostPath::Loop => "a loop device over the PV".to_string(),
                devpool_serve::hostdev::HostPath::Dm => {
                    "device-mapper, served by the kernel".to_string()
                }
                devpool_serve::hostdev::HostPath::Ublk => "ublk, served by devpool".to_string(),
                devpool_serve::hostdev::HostPath::Nbd => {
                    format!("the kernel's NBD client ({})", c.skipped.join("; "))
                }
                devpool_serve::hostdev::HostPath::FuseLoop => format!(
                    "FUSE + loop (faster paths unavailable: {})",
                    c.skipped.join("; ")
                ),
            };
            what.push(format!("block device {} via {how}", d.display()));
        }
        println!(
            "serving {} ({} bytes, lease {}) on {}",
            info.volume,
            info.size_bytes,
            info.lease,
            what.join(" and ")
        );
    }
    // Scripts wait for this line before connecting.
    std::io::stdout().flush()?;
    let why = running.wait()?;
    eprintln!(
        "devpool serve: stopped ({}); in-flight requests finished, devices flushed",
        why.unwrap_or_else(|| "all clients are done".into())
    );
    Ok(())
}

/// The servers of a `devpool run --export`, owned by the run.
pub struct RunExports {
    running: Vec<export::Running>,
    stopper: std::sync::Arc<Stopper>,
    dir: PathBuf,
    /// What the command gets: DEVPOOL_NBD_<ROLE> etc.
    pub env: Vec<(String, String)>,
}

impl RunExports {
    /// Stop every server (in-flight requests finish, devices are flushed).
    pub fn stop(self, why: &str) {
        self.stopper.stop(why);
        for r in self.running {
            if let Err(e) = r.wait() {
                eprintln!("devpool: a server of the run failed: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serve every volume of a fresh lease for `devpool run --export`.
pub fn export_lease(
    p: &devpool_pool::pool::Pools,
    pool: &str,
    a: &devpool_pool::pool::Acquired,
    kind: ExportKind,
) -> Result<RunExports> {
    let dir = p.state_dir.join("run").join(&a.session);
    std::fs::create_dir_all(&dir)?;
    let mut ex = RunExports {
        running: Vec::new(),
        stopper: Stopper::new()?,
        dir,
        env: Vec::new(),
    };
    for d in &a.devices {
        let sock = ex.dir.join(format!("{}.sock", d.role));
        let var = d.role.to_uppercase().replace(['-', '.'], "_");
        let spec = match kind {
            ExportKind::Nbd => ExportSpec {
                nbd: Some(Endpoint::Unix(sock.clone())),
                queues: 1,
                ..ExportSpec::default()
            },
            ExportKind::VhostUserBlk => ExportSpec {
                vhost_user_blk: Some(sock.clone()),
                queues: 2,
                ..ExportSpec::default()
            },
        };
        let r = match export::start(p, pool, &d.lv, &spec, ex.stopper.clone()) {
            Ok(r) => r,
            Err(e) => {
                ex.stop("a server failed to start");
                return Err(anyhow!("serving {}: {e}", d.lv));
            }
        };
        let socket = sock.display().to_string();
        match &r.info.nbd {
            Some(uri) => {
                ex.env.push((format!("DEVPOOL_NBD_{var}"), uri.clone()));
                ex.env.push((format!("DEVPOOL_NBD_SOCKET_{var}"), socket));
            }
            None => ex.env.push((format!("DEVPOOL_VHOST_{var}"), socket)),
        }
        ex.running.push(r);
    }
    eprintln!(
        "devpool: serving {} volume(s) over {kind:?}",
        ex.running.len()
    );
    Ok(ex)
}
