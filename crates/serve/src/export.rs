//! Exporting a leased volume: open it, register as its server, start the
//! frontends, and watch the lease so serving ends when the lease does.

use crate::device::Volume;
use crate::lifetime::{self, Stopper};
use crate::nbd::server::{Endpoint, Listener};
use crate::open::open_volume;
use devpool_pool::PoolError;
use devpool_pool::owner::Liveness;
use devpool_pool::pool::Pools;
use devpool_pool::servers::{self, Registration};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct ExportSpec {
    pub nbd: Option<Endpoint>,
    pub vhost_user_blk: Option<PathBuf>,
    pub read_only: bool,
    /// vhost-user-blk queues.
    pub queues: usize,
    /// Give the host a block device for the volume (any layout).
    pub block_device: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    pub pool: String,
    pub volume: String,
    pub lease: String,
    pub size_bytes: u64,
    /// NBD URI (`nbd+unix:///?socket=…` or `nbd://host:port`).
    pub nbd: Option<String>,
    pub nbd_socket: Option<PathBuf>,
    pub vhost_user_blk: Option<PathBuf>,
    /// The host block device, and which path made it.
    pub block_device: Option<PathBuf>,
    pub block_device_path: Option<crate::hostdev::Choice>,
    /// Whether the devices take direct I/O.
    pub direct_io: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Open(#[from] crate::open::OpenError),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Running {
    pub info: ExportInfo,
    pub volume: Arc<Volume>,
    pub stopper: Arc<Stopper>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
    host: Option<crate::hostdev::HostDevice>,
    _registration: Registration,
    _family: Option<Family>,
}

/// The uuids of origins and COW stores this process serves: copy-on-write
/// state lives in one server, so an origin and its snapshots are served by
/// one export at a time, in any process.
static SERVED_FAMILIES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub(crate) struct Family(Vec<String>);

impl Family {
    pub(crate) fn claim(pools: &Pools, lv: &str, uuids: &[String]) -> Result<Family, ExportError> {
        let mut mine = SERVED_FAMILIES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let me = std::process::id();
        let attached = devpool_pool::loopdev::list();
        for u in uuids {
            let others: Vec<u32> = servers::serving(&pools.state_dir, u)
                .into_iter()
                .filter(|p| *p != me)
                .collect();
            if !others.is_empty() || mine.contains(u) {
                let who = others
                    .first()
                    .map_or("this process".into(), |p| format!("process {p}"));
                return Err(ExportError::Refused(format!(
                    "'{lv}' has snapshots (or is one) and {who} already serves it or a volume of its snapshot family; copy-on-write state lives in one server, so serve them one at a time"
                )));
            }
            if let Some(a) = attached.iter().find(|a| a.lv_uuid == *u) {
                return Err(ExportError::Refused(format!(
                    "{} is a plain loop device over the extents of '{lv}''s snapshot family: writes through it would bypass copy-on-write; detach it first (losetup -d {})",
                    a.device.display(),
                    a.device.display()
                )));
            }
        }
        mine.extend(uuids.iter().cloned());
        Ok(Family(uuids.to_vec()))
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        let mut mine = SERVED_FAMILIES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for u in &self.0 {
            if let Some(i) = mine.iter().position(|x| x == u) {
                mine.swap_remove(i);
            }
        }
    }
}

/// How often the owner's liveness is checked; the VG is read every 4th time.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Start serving `lv` of pool `pool`. It must belong to a live lease.
pub fn start(
    pools: &Pools,
    pool: &str,
    lv: &str,
    spec: &ExportSpec,
    stopper: Arc<Stopper>,
) -> Result<Running, ExportError> {
    let loc = pools.locate(pool, lv)?;
    let lease = loc.lease.clone().ok_or_else(|| {
        ExportError::Refused(format!(
            "volume '{lv}' is not leased; devpool serves only leased volumes (devpool lease acquire)"
        ))
    })?;
    if let Liveness::Dead(why) = &lease.liveness {
        return Err(ExportError::Refused(format!(
            "the lease {} of '{lv}' is an orphan ({why}); 'devpool cleanup' reaps it",
            lease.session
        )));
    }
    let uuid = loc.lv.id.raw_str().to_string();
    // Declared before the lock: on an early return the lock goes first (a
    // thin volume's kernel stack takes it again as it is removed).
    let volume: Arc<Volume>;
    // The volume opens (a kernel activation included), registers and
    // claims its snapshot family under the VG's thin lock: an activation
    // of a thin pool or a family with device-mapper looks for servers of
    // devpool's own mappings under it (`activate::activate_lv`), and two
    // servers of a family starting at once cannot both pass.
    let handover =
        devpool_engine::lock::lock_thin(&devpool_engine::lock::default_dir(), &loc.meta.name)
            .map_err(PoolError::from)?;
    // A thin volume or a volume of a snapshot family, on a host with
    // device-mapper, is dm-thin's or dm-snapshot's: every frontend reads
    // and writes the kernel's device.
    let family_lvs = devpool_pool::activate::family(&loc.meta, lv);
    let mut dm_skipped = None;
    let mut in_kernel = None;
    if (devpool_engine::ops::thin::thin_volume(&loc.meta, lv).is_some() || family_lvs.len() > 1)
        && devpool_pool::dmdev::available()
    {
        match crate::open::open_in_kernel(&loc, spec.read_only, &pools.state_dir, &handover) {
            Ok(v) => in_kernel = Some(v),
            Err(why) => dm_skipped = Some(format!("dm: {why}")),
        }
    }
    volume = Arc::new(match in_kernel {
        Some(v) => v,
        None => open_volume(&loc, spec.read_only)?,
    });
    // Fault injection for tests: widen the window between opening the
    // volume and registering (two servers of a family starting at once).
    if let Some(ms) = std::env::var("DEVPOOL_FAULT_PAUSE_BEFORE_REGISTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    // A snapshot registers as its COW store (what release stops).
    let registration = servers::register(&pools.state_dir, &volume.uuid)?;
    // One server per snapshot family, whoever does the copy-on-write: a
    // server's stack of the family's devices goes with it whole.
    let family = match &volume.cow {
        Some(cow) => Some(Family::claim(pools, lv, &cow.family)?),
        None if family_lvs.len() > 1 => {
            let uuids: Vec<String> = family_lvs
                .iter()
                .filter_map(|n| loc.meta.lv(n))
                .map(|l| l.id.raw_str().to_string())
                .collect();
            Some(Family::claim(pools, lv, &uuids)?)
        }
        None => None,
    };
    drop(handover);
    let mut threads = Vec::new();
    let mut info = ExportInfo {
        pool: pool.to_string(),
        volume: lv.to_string(),
        lease: lease.session.clone(),
        size_bytes: volume.size(),
        nbd: None,
        nbd_socket: None,
        vhost_user_blk: None,
        block_device: None,
        block_device_path: None,
        direct_io: volume.direct(),
    };
    if let Some(ep) = &spec.nbd {
        let listener = Listener::bind(ep)?;
        let ep = listener.endpoint()?;
        info.nbd = Some(ep.to_string());
        if let Endpoint::Unix(p) = &ep {
            info.nbd_socket = Some(p.clone());
        }
        let (v, s) = (Arc::clone(&volume), Arc::clone(&stopper));
        threads.push(
            std::thread::Builder::new()
                .name("nbd-listen".into())
                .spawn(move || crate::nbd::server::serve(&listener, v, s))?,
        );
    }
    if let Some(path) = &spec.vhost_user_blk {
        let (v, s, p) = (Arc::clone(&volume), Arc::clone(&stopper), path.clone());
        let queues = spec.queues.max(1);
        let ready = crate::vhost::bind(&p)?;
        info.vhost_user_blk = Some(p);
        threads.push(
            std::thread::Builder::new()
                .name("vhost-user-blk".into())
                .spawn(move || crate::vhost::serve(ready, v, queues, s))?,
        );
    }
    let mut host = None;
    if spec.block_device {
        let existing = devpool_pool::loopdev::list()
            .into_iter()
            .find(|a| a.lv_uuid == uuid && a.size == volume.size())
            .map(|a| a.device);
        let mut h = crate::hostdev::attach(&volume, &loc, existing, &pools.state_dir)?;
        // The dm-thin attempt says more than attach's own dm probe.
        if let Some(why) = dm_skipped.take() {
            match h.choice.skipped.iter().position(|s| s.starts_with("dm:")) {
                Some(i) => h.choice.skipped[i] = why,
                None => h.choice.skipped.insert(0, why),
            }
        }
        info.block_device = Some(h.device.clone());
        info.block_device_path = Some(h.choice.clone());
        host = Some(h);
    }
    // The lease watch: the owner's liveness often, the VG less often.
    let owner = lease.owner.clone();
    let (p2, pool2, lv2, session) = (
        pools.clone(),
        pool.to_string(),
        lv.to_string(),
        lease.session,
    );
    let tick = AtomicU32::new(0);
    lifetime::watch(Arc::clone(&stopper), WATCH_INTERVAL, move || {
        if let Some(o) = &owner
            && let Liveness::Dead(why) = o.liveness()
        {
            return Some(format!("the lease's owner is gone ({why})"));
        }
        if tick.fetch_add(1, Ordering::Relaxed) % 4 != 3 {
            return None;
        }
        match p2.locate(&pool2, &lv2) {
            Ok(l)
                if l.lv.id.raw_str() == uuid
                    && l.lease.as_ref().is_some_and(|x| x.session == session) =>
            {
                None
            }
            Ok(_) | Err(PoolError::Invalid(_) | PoolError::NoPool(_)) => {
                Some(format!("lease {session} was released"))
            }
            // Anything else (a busy lock, an I/O hiccup): look again later.
            Err(_) => None,
        }
    })?;
    Ok(Running {
        info,
        volume,
        stopper,
        threads,
        host,
        _registration: registration,
        _family: family,
    })
}

impl Running {
    /// Wait until every frontend has stopped (in-flight I/O done, flushed).
    pub fn wait(mut self) -> Result<Option<String>, ExportError> {
        // Only a block device: serve until told to stop.
        if self.threads.is_empty() {
            while !self.stopper.wait_timeout(Duration::from_secs(3600)) {}
        }
        let mut first_err = None;
        for t in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // A frontend failed: stop the others too.
                    self.stopper.stop(&format!("a frontend failed: {e}"));
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    self.stopper.stop("a frontend panicked");
                }
            }
        }
        // The host's loop device goes before the FUSE file under it.
        if let Some(h) = self.host.take() {
            h.close();
        }
        crate::nbd::server::flush_all(&self.volume)?;
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(self.stopper.reason()),
        }
    }
}
