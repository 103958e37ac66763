//! The engine: which devices to scan, operations turned into plans under
//! LVM2's locks, plans verified against the disks and executed.

use crate::commit::{self, AreaTarget};
use crate::device::{Device, WriteGate};
use crate::error::{EngineError, Result};
use crate::hostfs;
use crate::journal;
use crate::lock::{self, LockGuard};
use crate::ops::{self, Layout, NewLv};
use crate::plan::{Locks, Plan, Step, new_transaction_id};
use crate::pvlayout::PvLayout;
use crate::scan::{self, ParseCache, ScannedPv};
use crate::vg::{Assembly, LoadedVg, assemble};
use devpool_format::crc::lvm_crc;
use devpool_format::label::{DiskLocn, PV_EXT_USED, PV_EXT_VERSION, PvHeaderExt, PvLabel};
use devpool_format::mda::MdaHeader;
use devpool_format::metadata::VgMetadata;
use devpool_format::names;
use devpool_format::signature;
use devpool_format::units::{Bytes, ExtentSize, Extents, Sectors, SizeArg};
use devpool_format::uuid::LvmUuid;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the engine looks for PVs.
#[derive(Debug, Clone)]
pub enum DeviceSource {
    /// Exactly these block devices and image files.
    List(Vec<PathBuf>),
    /// Every block device in /proc/partitions, plus the image files devpool
    /// registered in its state directory.
    System,
}

#[derive(Debug, Clone)]
pub struct Engine {
    pub devices: DeviceSource,
    pub lock_dir: PathBuf,
    pub state_dir: PathBuf,
    pub gate: WriteGate,
    /// Build plans and stop there: every change ends in
    /// [`EngineError::DryRun`] with its plan, before any write.
    pub dry_run: bool,
}

/// What follows a device's path in [`Scan::unreadable`] when the scan left
/// it unread because its server did not answer (see [`hostfs`]).
pub const NOT_READ: &str = ": not read: ";

/// A scan of all devices.
#[derive(Debug)]
pub struct Scan {
    pub assembly: Assembly,
    /// Devices that could not be opened or read, with why.
    pub unreadable: Vec<String>,
}

impl Scan {
    pub fn vg(&self, name: &str) -> Result<&LoadedVg> {
        self.assembly
            .vgs
            .iter()
            .find(|v| v.meta.name == name)
            .ok_or_else(|| EngineError::VgNotFound(name.into()))
    }
    pub fn pv_at(&self, path: &Path) -> Option<(&ScannedPv, Option<&LoadedVg>)> {
        for vg in &self.assembly.vgs {
            for d in vg.devices.iter().flatten() {
                if same_file(&d.path, path) {
                    return Some((d, Some(vg)));
                }
            }
        }
        self.assembly
            .orphans
            .iter()
            .find(|o| same_file(&o.path, path))
            .map(|o| (o, None))
    }
}

/// Whether two paths name the same file or device node.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino(), x.rdev()) == (y.dev(), y.ino(), y.rdev()),
        _ => a == b,
    }
}

/// Options for new PVs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PvOptions {
    /// Metadata area size; default: 128 MiB on devices of 8 GiB and more
    /// (room for 65,536 volumes), LVM2's 1020 KiB on smaller ones.
    pub metadata_size: Option<Bytes>,
    /// 1 (start of device) or 2 (start and end).
    pub metadata_copies: u8,
    /// Size of a new image file, when the path does not exist yet.
    pub image_size: Option<Bytes>,
}

#[derive(Debug, Clone)]
pub enum Operation {
    PvCreate {
        path: PathBuf,
        options: PvOptions,
    },
    PvRemove {
        path: PathBuf,
    },
    VgCreate {
        name: String,
        pvs: Vec<PathBuf>,
        extent_size: Bytes,
        pv_options: PvOptions,
        /// Whether LVM2 may activate the VG's LVs by itself (`vgchange
        /// -aay`, at boot and when its PVs appear); `false` writes LVM2's
        /// `NOAUTOACTIVATE` VG flag (`vgcreate --setautoactivation n`).
        autoactivation: bool,
    },
    VgRemove {
        name: String,
    },
    VgExtend {
        name: String,
        pvs: Vec<PathBuf>,
        pv_options: PvOptions,
    },
    VgReduce {
        name: String,
        pvs: Vec<PathBuf>,
    },
    VgRename {
        old: String,
        new: String,
    },
    /// Discard every free extent of the VG (punch holes in image files,
    /// `BLKDISCARD` on block devices), and a thin pool's unmapped data
    /// blocks in image files, as `fstrim` does for a filesystem:
    /// for space an earlier change did not give back (LVM2's `lvremove`
    /// without `issue_discards`, devpool before it discarded).
    VgTrim {
        name: String,
    },
    LvCreate {
        vg: String,
        name: String,
        size: SizeArg,
        stripes: u32,
        stripe_size: Bytes,
        tags: Vec<String>,
        wipe: bool,
        /// Create `NAME-0` … `NAME-(count-1)` in one commit.
        count: Option<u32>,
    },
    /// Several LVs of their own sizes and tags, in one commit (a lease).
    LvCreateBatch {
        vg: String,
        volumes: Vec<NewVolume>,
        wipe: bool,
        /// Each LV in one run on one PV (or no space).
        contiguous: bool,
        /// When the VG has a thin pool, make thin volumes there instead
        /// (leases of a thin pool).
        thin_when_pooled: bool,
        /// LVs removed in the same commit, first (leases given back while
        /// others are taken; not in a VG with a thin pool).
        remove_first: Vec<String>,
    },
    LvRemove {
        vg: String,
        names: Vec<String>,
    },
    LvRename {
        vg: String,
        old: String,
        new: String,
    },
    LvResize {
        vg: String,
        name: String,
        size: SizeArg,
    },
    LvTags {
        vg: String,
        name: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// A copy-on-write snapshot of `origin` named `name`: a COW store of
    /// `size` (default: a fifth of the origin) initialised in dm-snapshot's
    /// format, committed with the LVM2 metadata that ties them.
    SnapshotCreate {
        vg: String,
        origin: String,
        name: String,
        size: Option<SizeArg>,
        chunk_size: Bytes,
    },
    /// A thin pool `thinpool` (hidden `thinpool_tdata` and `thinpool_tmeta`)
    /// of `data_size`, its dm-thin metadata formatted.
    ThinPoolCreate {
        vg: String,
        data_size: SizeArg,
        /// Default: 64 bytes per data block, at least 16 MiB (each thin volume
        /// needs a metadata block of its own, twice while a commit is written).
        metadata_size: Option<SizeArg>,
        chunk_size: Bytes,
    },
    /// Thin volumes in the VG's thin pool (virtual sizes), in one
    /// transaction; with `origin`, thin snapshots of that thin volume.
    ThinCreate {
        vg: String,
        volumes: Vec<NewVolume>,
        origin: Option<String>,
    },
    /// Merge a thin snapshot into its origin: the origin takes the
    /// snapshot's thin device, its own is deleted (one transaction).
    ThinMerge {
        vg: String,
        snapshot: String,
    },
    /// Grow the thin pool's data space (the data LV, then dm-thin's data
    /// space map).
    ThinPoolExtend {
        vg: String,
        data_size: SizeArg,
    },
}

impl Operation {
    pub fn describe(&self) -> String {
        let paths = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            Operation::PvCreate { path, .. } => format!("pv create {}", path.display()),
            Operation::PvRemove { path } => format!("pv remove {}", path.display()),
            Operation::VgCreate { name, pvs, .. } => format!("vg create {name} {}", paths(pvs)),
            Operation::VgRemove { name } => format!("vg remove {name}"),
            Operation::VgExtend { name, pvs, .. } => format!("vg extend {name} {}", paths(pvs)),
            Operation::VgReduce { name, pvs } => format!("vg reduce {name} {}", paths(pvs)),
            Operation::VgRename { old, new } => format!("vg rename {old} {new}"),
            Operation::VgTrim { name } => format!("vg trim {name}"),
            Operation::LvCreate {
                vg,
                name,
                count: None,
                ..
            } => format!("lv create {vg}/{name}"),
            Operation::LvCreate {
                vg,
                name,
                count: Some(c),
                ..
            } => {
                format!("lv create {vg}/{name}-0..{}", c.saturating_sub(1))
            }
            Operation::LvCreateBatch {
                vg,
                volumes,
                remove_first,
                ..
            } => {
                let names = |v: &mut dyn Iterator<Item = &String>| {
                    v.map(|n| format!("{vg}/{n}")).collect::<Vec<_>>().join(" ")
                };
                let created = names(&mut volumes.iter().map(|v| &v.name));
                if remove_first.is_empty() {
                    format!("lv create {created}")
                } else {
                    format!(
                        "lv remove {}; lv create {created}",
                        names(&mut remove_first.iter())
                    )
                }
            }
            Operation::LvRemove { vg, names } => format!(
                "lv remove {}",
                names
                    .iter()
                    .map(|n| format!("{vg}/{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Operation::LvRename { vg, old, new } => format!("lv rename {vg}/{old} {new}"),
            Operation::LvResize { vg, name, .. } => format!("lv resize {vg}/{name}"),
            Operation::LvTags { vg, name, .. } => format!("lv tag {vg}/{name}"),
            Operation::SnapshotCreate {
                vg, origin, name, ..
            } => format!("snapshot create {vg}/{origin} --name {name}"),
            Operation::ThinPoolCreate { vg, .. } => format!("thin pool create {vg}/thinpool"),
            Operation::ThinMerge { vg, snapshot } => {
                format!("thin snapshot merge {vg}/{snapshot} into its origin")
            }
            Operation::ThinPoolExtend { vg, .. } => format!("thin pool extend {vg}"),
            Operation::ThinCreate {
                vg,
                volumes,
                origin,
            } => format!(
                "thin {} {}",
                match origin {
                    Some(o) => format!("snapshot of {vg}/{o}:"),
                    None => "create".into(),
                },
                volumes
                    .iter()
                    .map(|v| format!("{vg}/{}", v.name))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }

    fn locks(&self) -> Locks {
        let mut l = Locks::default();
        match self {
            Operation::PvCreate { .. } | Operation::PvRemove { .. } => l.global = true,
            Operation::VgCreate { name, .. } | Operation::VgRemove { name } => {
                l.global = true;
                l.vgs.push(name.clone());
            }
            Operation::VgExtend { name, .. } | Operation::VgReduce { name, .. } => {
                l.global = true;
                l.vgs.push(name.clone());
            }
            Operation::VgRename { old, new } => {
                l.global = true;
                l.vgs.push(old.clone());
                l.vgs.push(new.clone());
            }
            Operation::VgTrim { name } => l.vgs.push(name.clone()),
            Operation::LvCreate { vg, .. }
            | Operation::LvCreateBatch { vg, .. }
            | Operation::LvRemove { vg, .. }
            | Operation::LvRename { vg, .. }
            | Operation::LvResize { vg, .. }
            | Operation::LvTags { vg, .. }
            | Operation::SnapshotCreate { vg, .. }
            | Operation::ThinPoolCreate { vg, .. }
            | Operation::ThinCreate { vg, .. }
            | Operation::ThinMerge { vg, .. }
            | Operation::ThinPoolExtend { vg, .. } => l.vgs.push(vg.clone()),
        }
        l.vgs.sort();
        l.vgs.dedup();
        l
    }
}

/// What an executed plan did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Executed {
    pub transaction: String,
    pub operation: String,
    pub vg: Option<String>,
    pub seqno_after: Option<u64>,
    pub steps: usize,
}

/// Held locks, released on drop (global last, as LVM2 orders them).
pub struct Held(#[allow(dead_code)] Vec<LockGuard>);

/// One LV of an [`Operation::LvCreateBatch`] (linear).
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub size: SizeArg,
    pub tags: Vec<String>,
}

pub fn random_uuid() -> LvmUuid {
    LvmUuid::from_random(crate::plan::random_bytes::<32>())
}

/// This host's name (uname's nodename: one system call, where reading
/// /proc/sys/kernel/hostname took five; a lease asks for it several times).
/// LVM2's VG flag that keeps `vgchange -aay` (boot, udev's pvscan) off it.
pub const NOAUTOACTIVATE: &str = "NOAUTOACTIVATE";

pub fn hostname() -> String {
    // SAFETY: utsname is plain bytes; uname fills it or fails.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "localhost".into();
    }
    let name: Vec<u8> = u
        .nodename
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    match String::from_utf8_lossy(&name).trim() {
        "" => "localhost".into(),
        n => n.to_string(),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const SIGNATURE_SCAN_BYTES: u64 = 68 * 1024;

impl Engine {
    pub fn new(devices: DeviceSource, state_dir: PathBuf) -> Engine {
        Engine {
            devices,
            lock_dir: crate::lock::default_dir(),
            state_dir,
            gate: WriteGate::from_env(),
            dry_run: false,
        }
    }

    fn registry(&self) -> PathBuf {
        self.state_dir.join("devices")
    }

    /// Image files devpool made PVs on.
    pub fn registered_images(&self) -> Vec<PathBuf> {
        std::fs::read_to_string(self.registry())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(PathBuf::from)
            .collect()
    }

    fn register_image(&self, path: &Path, add: bool) -> Result<()> {
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut list = self.registered_images();
        list.retain(|p| p != &abs);
        if add {
            list.push(abs);
        }
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| EngineError::io(&self.state_dir, "create state directory", e))?;
        let text: String = list.iter().map(|p| format!("{}\n", p.display())).collect();
        let tmp = self.registry().with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| EngineError::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, self.registry())
            .map_err(|e| EngineError::io(self.registry(), "rename", e))
    }

    pub fn device_paths(&self) -> Vec<PathBuf> {
        match &self.devices {
            DeviceSource::List(v) => v.clone(),
            DeviceSource::System => {
                let mut v: Vec<PathBuf> = std::fs::read_to_string("/proc/partitions")
                    .unwrap_or_default()
                    .lines()
                    .skip(2)
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.len() == 4 && f[2] != "0")
                            .then(|| PathBuf::from(format!("/dev/{}", f[3])))
                    })
                    .collect();
                v.extend(self.registered_images().into_iter().filter(|p| p.exists()));
                v
            }
        }
    }

    /// Read every device: labels, metadata areas, VGs.
    pub fn scan(&self) -> Scan {
        let mut cache = ParseCache::default();
        let mut pvs = Vec::new();
        let mut unreadable = Vec::new();
        let explicit = matches!(self.devices, DeviceSource::List(_));
        for path in self.device_paths() {
            // A read that waits on a stopped FUSE or network server could
            // not be interrupted: such a device is left unread, with why.
            if let Some(why) = hostfs::unanswered_server(&path, hostfs::SERVER_WAIT) {
                unreadable.push(format!("{}{NOT_READ}{why}", path.display()));
                continue;
            }
            match scan::scan_path(&path, &mut cache) {
                Ok(Some(pv)) => {
                    if let Some(dup) = pvs
                        .iter()
                        .find(|p: &&ScannedPv| p.label.uuid == pv.label.uuid)
                    {
                        unreadable.push(format!(
                            "{}: same PV id {} as {} (a copy or another path to it); ignored",
                            path.display(),
                            pv.label.uuid,
                            dup.path.display()
                        ));
                        continue;
                    }
                    pvs.push(pv)
                }
                Ok(None) => {}
                // On a system-wide scan, devices we cannot open are not our business.
                Err(e) if explicit => unreadable.push(e),
                Err(_) => {}
            }
        }
        Scan {
            assembly: assemble(pvs),
            unreadable,
        }
    }

    pub(crate) fn take_locks(&self, l: &Locks, exclusive: bool) -> Result<Held> {
        let mut held = Vec::new();
        if l.global {
            held.push(lock::lock_global(&self.lock_dir, exclusive)?);
        }
        for vg in &l.vgs {
            held.push(lock::lock_vg(&self.lock_dir, vg, exclusive)?);
        }
        Ok(Held(held))
    }

    /// Hold VG `name`'s shared lock (LVM2's `V_<vg>` flock) until the guard
    /// drops: no commit can happen meanwhile.
    pub fn hold_vg_shared(&self, name: &str) -> Result<Held> {
        self.take_locks(&Locks::vg(name), false)
    }

    /// Read-only access to one VG under its shared lock.
    pub fn read_vg(&self, name: &str) -> Result<(LoadedVg, Scan)> {
        let _l = self.take_locks(&Locks::vg(name), false)?;
        let scan = self.scan();
        let vg = scan.vg(name)?.clone();
        Ok((vg, scan))
    }

    /// Plan under shared locks (for showing, or before an interactive YES).
    pub fn plan(&self, op: &Operation) -> Result<Plan> {
        let _l = self.take_locks(&op.locks(), false)?;
        let scan = self.scan();
        self.build(op, &scan)
    }

    /// Verify a plan against the disks under exclusive locks, then execute it.
    pub fn execute(&self, plan: &Plan) -> Result<Executed> {
        if self.dry_run {
            return Err(EngineError::DryRun(Box::new(plan.clone())));
        }
        let _l = self.take_locks(&plan.locks, true)?;
        self.verify(plan)?;
        self.run(plan)
    }

    /// Plan and execute under one exclusive lock. Plans that need confirmation
    /// run only with `confirmed`.
    pub fn apply(&self, op: &Operation, confirmed: bool) -> Result<(Plan, Executed)> {
        let (_l, plan) = self.plan_locked(op, confirmed)?;
        let done = self.run(&plan)?;
        Ok((plan, done))
    }

    /// The exclusive locks `op` needs, and its plan built under them
    /// (refused when it needs a confirmation not given).
    fn plan_locked(&self, op: &Operation, confirmed: bool) -> Result<(Held, Plan)> {
        let held = self.take_locks(&op.locks(), true)?;
        let scan = self.scan();
        let plan = self.build(op, &scan)?;
        if self.dry_run {
            return Err(EngineError::DryRun(Box::new(plan)));
        }
        if !plan.confirm.is_empty() && !confirmed {
            return Err(EngineError::NeedsConfirmation(Box::new(plan)));
        }
        Ok((held, plan))
    }

    fn verify(&self, plan: &Plan) -> Result<()> {
        for (path, state) in &plan.fingerprint {
            let now = device_state(path);
            if &now != state {
                if let (Some(vg), Some(planned)) = (&plan.vg, plan.seqno_before) {
                    let now_seqno = self.scan().vg(vg).map(|v| v.meta.seqno).unwrap_or(0);
                    return Err(EngineError::Changed {
                        vg: vg.clone(),
                        planned,
                        now: now_seqno,
                    });
                }
                return Err(EngineError::Refused(format!(
                    "{} changed since the plan was built ({state} -> {now}); build the plan again",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// [`Self::apply`], with `work` running beside the commit: it starts
    /// on its own thread once the plan's data writes (a new volume's wiped
    /// start) are done, while the metadata commit is written. The locks
    /// are held until the commit is durable, so no one sees `work`'s
    /// effects before the commit (a lease's loop devices attach during its
    /// commit, not after it); `work` may go on after that, and the caller
    /// joins it. When the commit fails, `undo` gets what `work` returned
    /// before the locks are released.
    pub fn apply_overlapped<T: Send + 'static>(
        &self,
        op: &Operation,
        confirmed: bool,
        work: impl FnOnce(&Plan) -> T + Send + 'static,
        undo: impl FnOnce(T),
    ) -> Result<(Arc<Plan>, Executed, Overlapped<T>)> {
        let (_l, plan) = self.plan_locked(op, confirmed)?;
        let plan = Arc::new(plan);
        let mut work = Some(work);
        let mut start = || {
            work.take().map(|w| {
                let plan = Arc::clone(&plan);
                crate::workers::spawn(move || w(&plan))
            })
        };
        let mut handle = None;
        let done = self.run_observed(&plan, &mut || {
            if handle.is_none() {
                handle = start();
            }
        });
        match done {
            Ok(done) => {
                // No commit to overlap with: the work follows the steps.
                let handle = match handle.or_else(start) {
                    Some(h) => h,
                    None => {
                        return Err(EngineError::Invalid("overlapped work did not start".into()));
                    }
                };
                Ok((plan, done, Overlapped(handle)))
            }
            Err(e) => {
                if let Some(h) = handle {
                    undo(Overlapped(h).join());
                }
                Err(e)
            }
        }
    }

    fn run(&self, plan: &Plan) -> Result<Executed> {
        self.run_observed(plan, &mut || {})
    }

    /// Run the plan's steps; `at_commit` is called once, just before the
    /// first metadata commit starts (when every earlier step succeeded).
    fn run_observed(&self, plan: &Plan, at_commit: &mut dyn FnMut()) -> Result<Executed> {
        let started = journal::now_rfc3339();
        let mut result = Ok(());
        let mut i = 0;
        while i < plan.steps.len() {
            if matches!(plan.steps[i], Step::CommitMetadata { .. }) {
                at_commit();
            }
            // Wipes of several new volumes' starts go to the device together.
            let zeros = zero_run(&plan.steps[i..]);
            result = if zeros > 0 {
                self.run_zero_ranges(plan, i, zeros)
            } else {
                self.run_step(plan, i, &plan.steps[i])
            };
            if result.is_err() {
                break;
            }
            i += zeros.max(1);
        }
        let touched_labels = plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::WriteLabel { .. } | Step::WipeLabel { .. }));
        if touched_labels {
            invalidate_lvm_hints();
        }
        let outcome = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        let entry = journal::JournalEntry {
            transaction: &plan.transaction,
            started,
            finished: journal::now_rfc3339(),
            operation: &plan.operation,
            vg: plan.vg.as_deref(),
            seqno_before: plan.seqno_before,
            seqno_after: plan.seqno_after,
            steps: &plan.steps,
            outcome,
            pid: std::process::id(),
        };
        // An injected crash stops like a real one: nothing more is written.
        if !matches!(result, Err(EngineError::InjectedCrash(_))) {
            journal::append(&self.state_dir, &entry)?;
        }
        result?;
        Ok(Executed {
            transaction: plan.transaction.clone(),
            operation: plan.operation.clone(),
            vg: plan.vg.clone(),
            seqno_after: plan.seqno_after,
            steps: plan.steps.len(),
        })
    }

    /// Steps `first..first + n`, all `ZeroRange` on one device.
    fn run_zero_ranges(&self, plan: &Plan, first: usize, n: usize) -> Result<()> {
        let steps = &plan.steps[first..first + n];
        let mut ranges = Vec::with_capacity(n);
        let mut device = None;
        for s in steps {
            if let Step::ZeroRange {
                device: d,
                offset,
                len,
                ..
            } = s
            {
                device = Some(d);
                ranges.push((*offset, *len));
            }
        }
        let Some(device) = device else {
            return Ok(());
        };
        let dev = Device::open(device, true)?;
        dev.zero_ranges(&self.gate, &ranges)?;
        if flushed_by_later_commit(&plan.steps[first + n..], device) {
            Ok(())
        } else {
            dev.sync()
        }
    }

    fn run_step(&self, plan: &Plan, index: usize, step: &Step) -> Result<()> {
        let gate = &self.gate;
        match step {
            Step::CreateImage { path, size } => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| EngineError::io(path, "create image file", e))?;
                f.set_len(*size)
                    .map_err(|e| EngineError::io(path, "set image size", e))?;
                self.register_image(path, true)
            }
            Step::ZeroRange { .. } => self.run_zero_ranges(plan, index, 1),
            Step::DiscardRange {
                device,
                offset,
                len,
                ..
            } => Device::open(device, true)?.discard(gate, *offset, *len),
            Step::TrimThinPool {
                vg,
                pool,
                meta,
                data,
                data_bytes,
            } => crate::thinplan::run_trim(&self.lock_dir, vg, pool, meta, data, *data_bytes, gate),
            Step::InitCowStore {
                device,
                offset,
                chunk_sectors,
                ..
            } => {
                // The header chunk, then area 0's metadata chunk zeroed (an
                // empty exception table), as dm-snapshot initialises a store.
                let chunk = *chunk_sectors as usize * 512;
                let mut buf = vec![0u8; 2 * chunk];
                buf[..16].copy_from_slice(
                    &devpool_format::cow::CowHeader::new(*chunk_sectors).to_bytes(),
                );
                let dev = Device::open(device, true)?;
                dev.write_at(gate, *offset, &buf)?;
                // The header must be durable before the VG names the
                // snapshot: the commit's own flush of this PV does it.
                if flushed_by_later_commit(&plan.steps[index + 1..], device) {
                    Ok(())
                } else {
                    dev.sync()
                }
            }
            Step::FormatThinPool {
                pool,
                meta,
                chunk_sectors,
                data_bytes,
            } => crate::thinplan::run_format(pool, meta, *chunk_sectors, *data_bytes, gate),
            Step::MessageThinPool {
                vg,
                pool,
                device,
                known_trans,
                changes,
                suspend,
            } => crate::thinplan::run_messages(
                &self.lock_dir,
                vg,
                pool,
                device,
                *known_trans,
                changes,
                suspend,
            ),
            Step::UpdateThinPool {
                vg,
                pool,
                meta,
                data,
                data_bytes,
                known,
                known_trans,
                changes,
            } => crate::thinplan::run_update(
                crate::thinplan::Update {
                    lock_dir: &self.lock_dir,
                    vg,
                    pool,
                    meta,
                    data,
                    data_bytes: *data_bytes,
                    known,
                    known_trans: *known_trans,
                    changes,
                },
                gate,
            ),
            Step::InitMetadataArea {
                device,
                offset,
                size,
            } => {
                let dev = Device::open(device, true)?;
                dev.write_at(gate, *offset, &MdaHeader::new(*offset, *size).to_bytes())?;
                dev.sync()
            }
            Step::WriteLabel {
                device,
                pv_uuid,
                device_size,
                pe_start,
                metadata_areas,
                in_vg,
            } => {
                let dev = Device::open(device, true)?;
                let uuid =
                    LvmUuid::parse(pv_uuid).map_err(|e| EngineError::Invalid(e.to_string()))?;
                let label = PvLabel {
                    sector: 1,
                    uuid,
                    device_size: *device_size,
                    data_areas: vec![DiskLocn {
                        offset: *pe_start,
                        size: 0,
                    }],
                    metadata_areas: metadata_areas
                        .iter()
                        .map(|a| DiskLocn {
                            offset: a[0],
                            size: a[1],
                        })
                        .collect(),
                    ext: Some(PvHeaderExt {
                        version: PV_EXT_VERSION,
                        flags: if *in_vg { PV_EXT_USED } else { 0 },
                        bootloader_areas: vec![],
                    }),
                };
                let sector = label.to_sector().map_err(|e| EngineError::Format {
                    path: device.clone(),
                    err: e,
                })?;
                dev.write_at(gate, 512, &sector)?;
                dev.sync()?;
                if !dev.is_block {
                    self.register_image(device, true)?;
                }
                Ok(())
            }
            Step::CommitMetadata { devices, .. } => {
                let text = plan
                    .new_text
                    .as_deref()
                    .ok_or_else(|| EngineError::Invalid("plan has no metadata text".into()))?;
                let mut opened = Vec::new();
                for p in devices {
                    let dev = Device::open(p, true)?;
                    let head = scan::Head::read(&dev)?;
                    let label = head.label(&dev)?.ok_or_else(|| {
                        EngineError::Refused(format!("{}: the PV label is gone", p.display()))
                    })?;
                    let mut headers = Vec::new();
                    for a in &label.metadata_areas {
                        let h = head.area_header(&dev, a.offset)?;
                        if !h.committed.is_ignored() {
                            headers.push(h);
                        }
                    }
                    opened.push((dev, headers));
                }
                let mut targets: Vec<AreaTarget<'_>> = Vec::new();
                for (dev, headers) in &opened {
                    for h in headers {
                        targets.push(AreaTarget {
                            dev,
                            header: h.clone(),
                        });
                    }
                }
                if targets.is_empty() {
                    return Err(EngineError::Refused(
                        "no PV of this VG has a metadata area".into(),
                    ));
                }
                commit::commit_text(gate, &mut targets, text)?;
                if let Some(meta) = plan.new_meta.as_ref().filter(|_| scan::keeping()) {
                    // What this commit wrote is what the next scan would parse.
                    debug_assert_eq!(
                        VgMetadata::parse(text).ok().as_ref(),
                        Some(meta.as_ref()),
                        "committed text does not parse back to the planned metadata"
                    );
                    scan::keep(lvm_crc(text), text.len() as u64, meta);
                }
                Ok(())
            }
            Step::ClearMetadata { device } => {
                let dev = Device::open(device, true)?;
                if let Some(label) = scan::read_label(&dev)? {
                    for a in &label.metadata_areas {
                        let buf = dev.read_at(a.offset, 512)?;
                        let h = MdaHeader::parse(&buf, a.offset)
                            .unwrap_or_else(|_| MdaHeader::new(a.offset, a.size));
                        commit::clear_slots(gate, &dev, &h)?;
                    }
                }
                Ok(())
            }
            Step::ListInDevicesFile {
                file,
                device,
                pv_uuid,
                idtype,
                idname,
                part,
            } => {
                let id = crate::devicesfile::DeviceId {
                    idtype: idtype.clone(),
                    idname: idname.clone(),
                    part: *part,
                };
                crate::devicesfile::list_pv(&self.lock_dir, file, device, &id, pv_uuid)
            }
            Step::UnlistInDevicesFile { file, pv_uuid, .. } => {
                crate::devicesfile::unlist_pv(&self.lock_dir, file, pv_uuid)
            }
            Step::WipeLabel { device } => {
                let dev = Device::open(device, true)?;
                dev.write_at(gate, 0, &[0u8; 2048][..dev.size.min(2048) as usize])?;
                dev.sync()?;
                if !dev.is_block {
                    self.register_image(device, false)?;
                }
                Ok(())
            }
        }
    }

    // ---------------- planning ----------------

    fn build(&self, op: &Operation, scan: &Scan) -> Result<Plan> {
        let mut plan = Plan {
            transaction: new_transaction_id(),
            operation: op.describe(),
            vg: None,
            seqno_before: None,
            seqno_after: None,
            steps: vec![],
            confirm: vec![],
            notes: vec![],
            fingerprint: vec![],
            old_meta: None,
            new_text: None,
            new_meta: None,
            pv_paths: Default::default(),
            locks: op.locks(),
        };
        match op {
            Operation::PvCreate { path, options } => {
                self.plan_pv_create(&mut plan, scan, path, options)?;
            }
            Operation::PvRemove { path } => {
                let (pv, vg) = scan.pv_at(path).ok_or_else(|| {
                    EngineError::Invalid(format!("{} is not a PV", path.display()))
                })?;
                if let Some(vg) = vg {
                    return Err(EngineError::Refused(format!(
                        "{} belongs to VG {}: remove it with 'vg reduce' or remove the VG first",
                        path.display(),
                        vg.meta.name
                    )));
                }
                plan.steps.push(Step::ClearMetadata {
                    device: pv.path.clone(),
                });
                plan.steps.push(Step::WipeLabel {
                    device: pv.path.clone(),
                });
                if let Some(file) = crate::lvmconf::lvm_devices_file()
                    && crate::devicesfile::device_id(&pv.path).is_some()
                {
                    plan.steps.push(Step::UnlistInDevicesFile {
                        file,
                        device: pv.path.clone(),
                        pv_uuid: pv.label.uuid.raw_str().to_string(),
                    });
                }
                plan.fingerprint.push((pv.path.clone(), scanned_state(pv)));
            }
            Operation::VgCreate {
                name,
                pvs,
                extent_size,
                pv_options,
                autoactivation,
            } => {
                names::validate_vg_name(name).map_err(|e| EngineError::Invalid(e.to_string()))?;
                if scan.vg(name).is_ok() {
                    return Err(EngineError::Invalid(format!("VG {name} already exists")));
                }
                let es = ExtentSize::new_for_vg(*extent_size)
                    .map_err(|e| EngineError::Invalid(format!("--extent-size: {e}")))?;
                if pvs.is_empty() {
                    return Err(EngineError::Invalid("a VG needs at least one PV".into()));
                }
                let mut vg = VgMetadata::new_empty(name, random_uuid(), es);
                if !autoactivation {
                    vg.flags.push(NOAUTOACTIVATE.into());
                }
                if let Some(id) = crate::lvmconf::local_system_id() {
                    crate::access::stamp(&mut vg, &id);
                }
                let new_pvs = self.plan_add_pvs(&mut plan, scan, &mut vg, pvs, pv_options)?;
                plan.vg = Some(name.clone());
                plan.seqno_before = Some(0);
                self.finish_commit(&mut plan, vg, &new_pvs)?;
                self.push_label_flags(&mut plan, &new_pvs, true);
            }
            Operation::VgRemove { name } => {
                let vg = scan.vg(name)?;
                self.require_complete(vg)?;
                let visible = vg.meta.lvs.len();
                if visible > 0 {
                    plan.confirm.push(format!(
                        "VG {name} still holds {visible} LVs; their data is lost"
                    ));
                }
                self.base_on(&mut plan, vg);
                for d in vg.devices.iter().flatten() {
                    plan.steps.push(Step::ClearMetadata {
                        device: d.path.clone(),
                    });
                }
                let devs: Vec<NewPv> = vg
                    .devices
                    .iter()
                    .flatten()
                    .map(NewPv::from_scanned)
                    .collect();
                self.push_label_flags(&mut plan, &devs, false);
                plan.seqno_after = None;
            }
            Operation::VgExtend {
                name,
                pvs,
                pv_options,
            } => {
                let vg = scan.vg(name)?;
                self.require_complete(vg)?;
                self.base_on(&mut plan, vg);
                let mut meta = (*vg.meta).clone();
                let new_pvs = self.plan_add_pvs(&mut plan, scan, &mut meta, pvs, pv_options)?;
                let mut all = self.vg_devices(vg);
                all.extend(new_pvs.iter().cloned());
                self.finish_commit(&mut plan, meta, &all)?;
                self.push_label_flags(&mut plan, &new_pvs, true);
            }
            Operation::VgReduce { name, pvs } => {
                let vg = scan.vg(name)?;
                self.require_complete(vg)?;
                self.base_on(&mut plan, vg);
                let mut meta = (*vg.meta).clone();
                let mut removed = Vec::new();
                for p in pvs {
                    let dev = vg
                        .devices
                        .iter()
                        .flatten()
                        .find(|d| same_file(&d.path, p))
                        .ok_or_else(|| {
                            EngineError::Invalid(format!(
                                "{} is not a PV of VG {name}",
                                p.display()
                            ))
                        })?;
                    ops::remove_pv(&mut meta, dev.label.uuid, &p.display().to_string())?;
                    removed.push(NewPv::from_scanned(dev));
                }
                let keep: Vec<NewPv> = self
                    .vg_devices(vg)
                    .into_iter()
                    .filter(|d| !removed.iter().any(|r| r.path == d.path))
                    .collect();
                self.finish_commit(&mut plan, meta, &keep)?;
                for r in &removed {
                    plan.steps.push(Step::ClearMetadata {
                        device: r.path.clone(),
                    });
                }
                self.push_label_flags(&mut plan, &removed, false);
            }
            Operation::VgRename { old, new } => {
                names::validate_vg_name(new).map_err(|e| EngineError::Invalid(e.to_string()))?;
                if scan.vg(new).is_ok() {
                    return Err(EngineError::Invalid(format!("VG {new} already exists")));
                }
                let vg = scan.vg(old)?;
                self.require_complete(vg)?;
                self.base_on(&mut plan, vg);
                let mut meta = (*vg.meta).clone();
                meta.name = new.clone();
                let devs = self.vg_devices(vg);
                self.finish_commit(&mut plan, meta, &devs)?;
            }
            Operation::VgTrim { name } => {
                // No commit: the VG's exclusive lock, held from this plan
                // to its last discard, keeps every free extent free.
                let (loaded, meta) = self.change_of(&mut plan, scan, name)?;
                let es = meta.extent_size.bytes().0;
                for a in crate::alloc::free_areas(&meta) {
                    let pv = &meta.pvs[a.pv];
                    let Some(dev) = loaded.device_of(&pv.key) else {
                        continue;
                    };
                    plan.steps.push(Step::DiscardRange {
                        device: dev.path.clone(),
                        offset: pv.pe_start.0 * 512 + a.start * es,
                        len: a.len * es,
                        reason: format!("{} free extents of PV {}", a.len, pv.key),
                    });
                }
                if let Some(d) = crate::dm::thin_pool_held(&meta) {
                    // Its free data blocks are the kernel's to know:
                    // dm-thin passes its thin volumes' discards down.
                    plan.notes.push(format!(
                        "the thin pool's free data blocks are left alone: device-mapper holds the pool ({}), and dm-thin passes its volumes' discards down",
                        d.name
                    ));
                } else if let Some(pool) = ops::thin::the_thin_pool(&meta) {
                    let data_bytes = meta.lv(&pool.tdata).map_or(0, |l| l.extent_count() * es);
                    plan.steps.push(Step::TrimThinPool {
                        vg: name.clone(),
                        pool: format!("{name}/{}", pool.pool),
                        meta: crate::thinplan::lv_runs(loaded, &meta, &pool.tmeta)?,
                        data: crate::thinplan::lv_runs(loaded, &meta, &pool.tdata)?,
                        data_bytes,
                    });
                }
            }
            Operation::LvCreate {
                vg,
                name,
                size,
                stripes,
                stripe_size,
                tags,
                wipe,
                count,
            } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let n = (*stripes).max(1);
                let (extents, note) = ops::resolve_size(&meta, size, None, n as u64)?;
                plan.notes.extend(note);
                let layout = if n == 1 {
                    Layout::Linear
                } else {
                    Layout::Striped {
                        stripes: n,
                        stripe_size: Sectors(stripe_size.0 / 512),
                    }
                };
                let names: Vec<String> = match count {
                    None => vec![name.clone()],
                    Some(0) => {
                        return Err(EngineError::Invalid("--count must be at least 1".into()));
                    }
                    Some(c) => (0..*c).map(|i| format!("{name}-{i}")).collect(),
                };
                let (now, host) = (unix_now(), hostname());
                let news = names.iter().map(|lv| NewLv {
                    name: lv.clone(),
                    extents: Extents(extents),
                    layout,
                    tags: tags.clone(),
                    id: random_uuid(),
                    creation_time: now,
                    creation_host: host.clone(),
                });
                ops::create_lvs(&mut meta, news.collect())?;
                self.finish_create(&mut plan, loaded, meta, &names, *wipe, false)?;
            }
            Operation::LvCreateBatch {
                vg,
                volumes,
                wipe,
                contiguous,
                thin_when_pooled,
                remove_first,
            } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                if !remove_first.is_empty() && ops::thin::the_thin_pool(&meta).is_some() {
                    return Err(EngineError::Refused(format!(
                        "VG {vg} has a thin pool: remove its volumes in a commit of their own"
                    )));
                }
                for n in remove_first {
                    ops::remove_lv(&mut meta, n)?;
                }
                if *thin_when_pooled && ops::thin::the_thin_pool(&meta).is_some() {
                    self.plan_thin_create(&mut plan, loaded, meta, volumes, None)?;
                    return Ok(plan);
                }
                let (now, host) = (unix_now(), hostname());
                let mut news = Vec::with_capacity(volumes.len());
                for v in volumes {
                    let (extents, note) = ops::resolve_size(&meta, &v.size, None, 1)?;
                    plan.notes.extend(note);
                    news.push(NewLv {
                        name: v.name.clone(),
                        extents: Extents(extents),
                        layout: if *contiguous {
                            Layout::Contiguous
                        } else {
                            Layout::Linear
                        },
                        tags: v.tags.clone(),
                        id: random_uuid(),
                        creation_time: now,
                        creation_host: host.clone(),
                    });
                }
                ops::create_lvs(&mut meta, news)?;
                let names: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
                let frees = !remove_first.is_empty();
                self.finish_create(&mut plan, loaded, meta, &names, *wipe, frees)?;
            }
            Operation::LvRemove { vg, names } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let thin: Vec<String> = names
                    .iter()
                    .filter(|n| ops::thin::thin_volume(&meta, n).is_some())
                    .cloned()
                    .collect();
                for n in names.iter().filter(|n| !thin.contains(n)) {
                    if meta.lv(n).is_none() {
                        return Err(EngineError::LvNotFound {
                            vg: vg.clone(),
                            lv: n.clone(),
                        });
                    }
                    if ops::thin::is_thin_internal(&meta, n) {
                        return Err(EngineError::Refused(format!(
                            "{vg}/{n} is a thin-pool LV or part of one; remove its thin volumes, or tear the pool down"
                        )));
                    }
                    ops::remove_lv(&mut meta, n)?;
                }
                let update = if thin.is_empty() {
                    None
                } else {
                    let pool = ops::thin::the_thin_pool(&meta)
                        .ok_or_else(|| EngineError::Invalid("thin pool missing".into()))?;
                    let changes = ops::thin::remove_thins(&mut meta, &thin)?;
                    Some(self.thin_update_step(loaded, &meta, &pool, changes)?)
                };
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
                // Deletions reach dm-thin's metadata after the VG.
                plan.steps.extend(update);
            }
            Operation::LvRename { vg, old, new } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                if meta.lv(old).is_none() {
                    return Err(EngineError::LvNotFound {
                        vg: vg.clone(),
                        lv: old.clone(),
                    });
                }
                ops::rename_lv(&mut meta, old, new)?;
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
            }
            Operation::LvResize { vg, name, size } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let lv = meta.lv(name).ok_or_else(|| EngineError::LvNotFound {
                    vg: vg.clone(),
                    lv: name.clone(),
                })?;
                let current = lv.extent_count();
                if ops::thin::thin_volume(&meta, name).is_some() {
                    let (target, note) = ops::resolve_size(&meta, size, Some(current), 1)?;
                    plan.notes.extend(note);
                    ops::thin::resize_thin(&mut meta, name, target)?;
                    if target < current {
                        plan.confirm.push(format!(
                            "shrinking thin volume {vg}/{name} from {current} to {target} extents cuts off the data past the new end"
                        ));
                    }
                    plan.notes.push(format!(
                        "{vg}/{name}: {current} -> {target} extents (virtual: no space allocated)"
                    ));
                    let devs = self.vg_devices(loaded);
                    self.finish_commit(&mut plan, meta, &devs)?;
                    return Ok(plan);
                }
                let stripes = match lv.segments.last().map(|s| &s.kind) {
                    Some(devpool_format::metadata::SegmentKind::Striped { stripes, .. }) => {
                        stripes.len() as u64
                    }
                    _ => 1,
                };
                let (target, note) = ops::resolve_size(&meta, size, Some(current), 1)?;
                let target = if target > current {
                    current + (target - current).div_ceil(stripes) * stripes
                } else {
                    target
                };
                plan.notes.extend(note);
                ops::resize_lv(&mut meta, name, target)?;
                let after = meta.lv(name).map(|l| l.extent_count()).unwrap_or(target);
                if after < current {
                    plan.confirm.push(format!(
                        "shrinking {vg}/{name} from {current} to {after} extents discards the data in the last {} extents",
                        current - after
                    ));
                }
                plan.notes
                    .push(format!("{vg}/{name}: {current} -> {after} extents"));
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
            }
            Operation::SnapshotCreate {
                vg,
                origin,
                name,
                size,
                chunk_size,
            } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let origin_extents = meta
                    .lv(origin)
                    .ok_or_else(|| EngineError::LvNotFound {
                        vg: vg.clone(),
                        lv: origin.clone(),
                    })?
                    .extent_count();
                let extents = match size {
                    Some(s) => {
                        let (e, note) = ops::resolve_size(&meta, s, None, 1)?;
                        plan.notes.extend(note);
                        e
                    }
                    None => origin_extents.div_ceil(5).max(1),
                };
                let chunk_sectors = whole_sectors(*chunk_size)?;
                let (now, host) = (unix_now(), hostname());
                let snap = ops::snapshot::create_snapshot(
                    &mut meta,
                    ops::snapshot::NewSnapshot {
                        origin: origin.clone(),
                        // One run: the header and first area sit in its first chunks.
                        cow: NewLv {
                            name: name.clone(),
                            extents: Extents(extents),
                            layout: Layout::Contiguous,
                            tags: vec![],
                            id: random_uuid(),
                            creation_time: now,
                            creation_host: host,
                        },
                        chunk_sectors,
                        id: random_uuid(),
                    },
                )?;
                let (device, offset, _) = lv_start(loaded, &meta, name)?;
                plan.steps.push(Step::InitCowStore {
                    device,
                    offset,
                    chunk_sectors,
                    reason: format!("COW store of {vg}/{name} ({snap})"),
                });
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
            }
            Operation::ThinPoolCreate {
                vg,
                data_size,
                metadata_size,
                chunk_size,
            } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let chunk_sectors = whole_sectors(*chunk_size)?;
                ops::thin::check_chunk_sectors(chunk_sectors).map_err(EngineError::Invalid)?;
                let es = meta.extent_size.bytes().0;
                let (meta_extents, note) = match metadata_size {
                    Some(s) => ops::resolve_size(&meta, s, None, 1)?,
                    None => (0, None),
                };
                plan.notes.extend(note);
                let (mut data_extents, note) = ops::resolve_size(&meta, data_size, None, 1)?;
                plan.notes.extend(note);
                let meta_extents = if meta_extents > 0 {
                    meta_extents
                } else {
                    let blocks = data_extents * es / chunk_size.0;
                    (blocks * 64).max(16 << 20).div_ceil(es)
                };
                // A percentage of free space covers the metadata LV too.
                let free = ops::vg_free_extents(&meta);
                if data_extents + meta_extents > free && data_extents <= free {
                    data_extents = free.saturating_sub(meta_extents);
                    plan.notes.push(format!(
                        "data LV reduced to {data_extents} extents to leave room for the metadata LV"
                    ));
                }
                let (now, host) = (unix_now(), hostname());
                let lv = |name: &str, extents: u64, layout| NewLv {
                    name: name.into(),
                    extents: Extents(extents),
                    layout,
                    tags: vec![],
                    id: random_uuid(),
                    creation_time: now,
                    creation_host: host.clone(),
                };
                let link = ops::thin::create_thin_pool(
                    &mut meta,
                    ops::thin::NewThinPool {
                        name: "thinpool".into(),
                        meta: lv("thinpool_tmeta", meta_extents, Layout::Contiguous),
                        data: lv("thinpool_tdata", data_extents, Layout::Linear),
                        chunk_sectors,
                        id: random_uuid(),
                    },
                )?;
                let runs = crate::thinplan::lv_runs(loaded, &meta, &link.tmeta)?;
                plan.steps.push(Step::FormatThinPool {
                    pool: format!("{vg}/{}", link.pool),
                    meta: runs,
                    chunk_sectors,
                    data_bytes: data_extents * es,
                });
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
            }
            Operation::ThinCreate {
                vg,
                volumes,
                origin,
            } => {
                let (loaded, meta) = self.change_of(&mut plan, scan, vg)?;
                self.plan_thin_create(&mut plan, loaded, meta, volumes, origin.as_deref())?;
            }
            Operation::ThinMerge { vg, snapshot } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let pool = ops::thin::the_thin_pool(&meta)
                    .ok_or_else(|| EngineError::Refused(format!("{vg} has no thin pool")))?;
                let changes = ops::thin::merge_thin(&mut meta, snapshot)?;
                let update = self.thin_update_step(loaded, &meta, &pool, changes)?;
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
                // The origin's old device leaves dm-thin's metadata after
                // the VG stops naming it.
                plan.steps.push(update);
            }
            Operation::ThinPoolExtend { vg, data_size } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                let pool = ops::thin::the_thin_pool(&meta)
                    .ok_or_else(|| EngineError::Refused(format!("{vg} has no thin pool")))?;
                let current = meta.lv(&pool.tdata).map_or(0, |l| l.extent_count());
                let (target, note) = ops::resolve_size(&meta, data_size, Some(current), 1)?;
                plan.notes.extend(note);
                ops::thin::extend_thin_pool(&mut meta, &pool.pool, target)?;
                plan.notes.push(format!(
                    "{vg}/{} data: {current} -> {target} extents",
                    pool.pool
                ));
                // While dm-thin holds the pool, its space map grows when the
                // pool device resumes over the bigger data LV (the caller
                // reloads the two, as LVM2 does): only the VG changes here.
                let held = crate::dm::thin_pool_device(&loaded.meta).is_some();
                let update = if held {
                    plan.notes.push(format!(
                        "dm-thin holds {vg}/{}: its data device and pool device are reloaded after the commit",
                        pool.pool
                    ));
                    None
                } else {
                    Some(self.thin_update_step(
                        loaded,
                        &meta,
                        &pool,
                        ops::thin::ThinChanges {
                            trans_id: pool.transaction_id,
                            ..Default::default()
                        },
                    )?)
                };
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
                // dm-thin's space map grows once the VG holds the space.
                plan.steps.extend(update);
            }
            Operation::LvTags {
                vg,
                name,
                add,
                remove,
            } => {
                let (loaded, mut meta) = self.change_of(&mut plan, scan, vg)?;
                if meta.lv(name).is_none() {
                    return Err(EngineError::LvNotFound {
                        vg: vg.clone(),
                        lv: name.clone(),
                    });
                }
                ops::change_tags(&mut meta, name, add, remove)?;
                let devs = self.vg_devices(loaded);
                self.finish_commit(&mut plan, meta, &devs)?;
            }
        }
        Ok(plan)
    }

    /// Thin volumes (or thin snapshots of `origin`) in the VG's thin pool.
    fn plan_thin_create(
        &self,
        plan: &mut Plan,
        loaded: &LoadedVg,
        mut meta: VgMetadata,
        volumes: &[NewVolume],
        origin: Option<&str>,
    ) -> Result<()> {
        let vg = &meta.name;
        let pool = ops::thin::the_thin_pool(&meta).ok_or_else(|| {
            EngineError::Refused(format!("{vg} has no thin pool (devpool pool thin enable)"))
        })?;
        let (now, host) = (unix_now(), hostname());
        let mut news = Vec::with_capacity(volumes.len());
        for v in volumes {
            let extents = match (&v.size.amount, origin) {
                (devpool_format::units::Amount::Extents(Extents(0)), Some(o)) => {
                    meta.lv(o).map(|l| l.extent_count()).unwrap_or(0)
                }
                (devpool_format::units::Amount::Percent(..), _) => {
                    return Err(EngineError::Invalid(format!(
                        "thin volume {}: give a size, not a percentage (thin sizes are virtual)",
                        v.name
                    )));
                }
                _ => {
                    let (e, note) = ops::resolve_size(&meta, &v.size, None, 1)?;
                    plan.notes.extend(note);
                    e
                }
            };
            news.push(ops::thin::NewThin {
                name: v.name.clone(),
                extents,
                tags: v.tags.clone(),
                id: random_uuid(),
                creation_time: now,
                creation_host: host.clone(),
                origin: origin.map(str::to_string),
            });
        }
        let changes = ops::thin::create_thins(&mut meta, &pool.pool, news)?;
        // Creations reach dm-thin's metadata before the VG.
        let step = self.thin_update_step(loaded, &meta, &pool, changes)?;
        plan.steps.push(step);
        let devs = self.vg_devices(loaded);
        self.finish_commit(plan, meta, &devs)
    }

    /// The step that takes `changes` to pool `pool` (as the VG had it
    /// before the plan) into dm-thin's metadata; `after` is the VG after.
    fn thin_update_step(
        &self,
        loaded: &LoadedVg,
        after: &VgMetadata,
        pool: &ops::thin::ThinPoolLink,
        changes: ops::thin::ThinChanges,
    ) -> Result<Step> {
        let meta = &loaded.meta;
        // What the metadata must hold before the change: the VG's view.
        let (known, known_trans) = crate::thinplan::vg_view(meta, pool);
        // The data size the VG has after the change (an extend grows it).
        let data_bytes = after
            .lv(&pool.tdata)
            .map(|l| l.extent_count() * after.extent_size.bytes().0)
            .unwrap_or(0);
        let data_before = meta
            .lv(&pool.tdata)
            .map(|l| l.extent_count() * meta.extent_size.bytes().0)
            .unwrap_or(0);
        if let Some(device) = crate::dm::thin_pool_device(meta)
            && data_bytes == data_before
        {
            // dm-thin holds the pool: the change goes to it as messages.
            // Snapshot origins by their dm names: the ones active when the
            // messages go are suspended around them.
            let suspend = changes
                .snapshot
                .iter()
                .filter_map(|&(_, origin)| {
                    let lv = ops::thin::thin_volumes(meta)
                        .into_iter()
                        .find(|t| t.device_id == origin)?;
                    Some((origin, devpool_format::dm::name(&meta.name, &lv.lv)))
                })
                .collect();
            return Ok(Step::MessageThinPool {
                vg: meta.name.clone(),
                pool: format!("{}/{}", meta.name, pool.pool),
                device: device.name,
                known_trans,
                changes,
                suspend,
            });
        }
        let what = if data_bytes == data_before {
            "changing its thin volumes"
        } else {
            "growing its data space"
        };
        refuse_if_kernel_holds_thin_pool(meta, what)?;
        Ok(Step::UpdateThinPool {
            vg: meta.name.clone(),
            pool: format!("{}/{}", meta.name, pool.pool),
            meta: crate::thinplan::lv_runs(loaded, meta, &pool.tmeta)?,
            data: crate::thinplan::lv_runs(loaded, meta, &pool.tdata)?,
            data_bytes,
            known,
            known_trans,
            changes,
        })
    }

    /// The start of every change to an existing VG: the VG (complete),
    /// recorded as the plan's base, and a copy of its metadata to change.
    fn change_of<'s>(
        &self,
        plan: &mut Plan,
        scan: &'s Scan,
        vg: &str,
    ) -> Result<(&'s LoadedVg, VgMetadata)> {
        let loaded = scan.vg(vg)?;
        self.require_complete(loaded)?;
        self.base_on(plan, loaded);
        Ok((loaded, (*loaded.meta).clone()))
    }

    /// A VG this host may change: every PV present, and not exported,
    /// read-only, foreign or shared (see `access`).
    fn require_complete(&self, vg: &LoadedVg) -> Result<()> {
        if !vg.is_complete() {
            return Err(EngineError::MissingPvs {
                vg: vg.meta.name.clone(),
                missing: vg.health.missing_pvs.join(", "),
            });
        }
        match crate::access::refusal(&vg.meta, crate::lvmconf::local_system_id) {
            Some(why) => Err(EngineError::Refused(why)),
            None => Ok(()),
        }
    }

    /// Record what the plan is based on: seqno, and every PV's on-disk state.
    fn base_on(&self, plan: &mut Plan, vg: &LoadedVg) {
        plan.vg = Some(vg.meta.name.clone());
        plan.seqno_before = Some(vg.meta.seqno);
        plan.old_meta = Some(vg.meta.clone());
        for d in vg.devices.iter().flatten() {
            plan.fingerprint.push((d.path.clone(), scanned_state(d)));
        }
    }

    fn vg_devices(&self, vg: &LoadedVg) -> Vec<NewPv> {
        vg.devices
            .iter()
            .flatten()
            .map(NewPv::from_scanned)
            .collect()
    }

    /// After new LVs are in `meta`: wipe their first 4 KiB (if asked), commit.
    /// Only a change that also removed LVs (`frees`) looks for extents to
    /// discard: creating LVs frees none, and at 65,536 LVs the comparison
    /// of the two VGs is a tenth of an `lv create`.
    fn finish_create(
        &self,
        plan: &mut Plan,
        loaded: &LoadedVg,
        meta: VgMetadata,
        names: &[String],
        wipe: bool,
        frees: bool,
    ) -> Result<()> {
        if wipe {
            for lv in names {
                let (dev, off, len) = lv_start(loaded, &meta, lv)?;
                plan.steps.push(Step::ZeroRange {
                    device: dev,
                    offset: off,
                    len,
                    reason: format!("wipe the start of new LV {}/{lv}", meta.name),
                });
            }
        }
        let devs = self.vg_devices(loaded);
        if frees {
            self.finish_commit(plan, meta, &devs)
        } else {
            self.commit_step(plan, meta, &devs)
        }
    }

    /// The new metadata's commit (see [`Engine::commit_step`]) after
    /// discarding what it frees (see [`Step::DiscardRange`]).
    fn finish_commit(&self, plan: &mut Plan, meta: VgMetadata, devs: &[NewPv]) -> Result<()> {
        self.push_discards(plan, &meta, devs);
        self.commit_step(plan, meta, devs)
    }

    /// The new metadata: seqno + 1, trailer, checks, commit step.
    fn commit_step(&self, plan: &mut Plan, mut meta: VgMetadata, devs: &[NewPv]) -> Result<()> {
        meta.seqno += 1;
        meta.trailer.description = format!(
            "Written by devpool {}: {}",
            env!("CARGO_PKG_VERSION"),
            plan.operation
        );
        meta.trailer.creation_host = hostname();
        meta.trailer.creation_time = unix_now();
        meta.check().map_err(|e| {
            EngineError::Invalid(format!(
                "internal check of the planned metadata failed: {e}"
            ))
        })?;
        let text = meta.to_disk_text();
        plan.seqno_after = Some(meta.seqno);
        plan.vg = Some(meta.name.clone());
        plan.steps.push(Step::CommitMetadata {
            vg: meta.name.clone(),
            seqno: meta.seqno,
            devices: devs.iter().map(|d| d.path.clone()).collect(),
            bytes: text.len() as u64,
        });
        plan.new_text = Some(text);
        plan.pv_paths = meta
            .pvs
            .iter()
            .filter_map(|pv| {
                let d = devs.iter().find(|d| d.uuid == pv.id)?;
                Some((pv.key.clone(), d.path.clone()))
            })
            .collect();
        plan.new_meta = Some(std::sync::Arc::new(meta));
        Ok(())
    }

    /// Discard steps for the extents `meta` frees of the plan's base VG:
    /// always on image files (a sparse image then costs only what live
    /// volumes hold), on block devices when LVM2's `devices/issue_discards`
    /// is set (as `lvremove` and `lvreduce` do then). Each runs before the
    /// commit, while its extents still belong to the LV that had them, so
    /// no LV made by a later change can lose data to it.
    fn push_discards(&self, plan: &mut Plan, meta: &VgMetadata, devs: &[NewPv]) {
        let Some(old) = plan.old_meta.clone() else {
            return;
        };
        let on_blocks = crate::lvmconf::issue_discards();
        let es = old.extent_size.bytes().0;
        for f in crate::alloc::freed(&old, meta) {
            let (Some(pv), Some(dev)) = (
                old.pvs.iter().find(|p| p.id == f.pv),
                devs.iter().find(|d| d.uuid == f.pv),
            ) else {
                continue;
            };
            let is_image = std::fs::metadata(&dev.path).is_ok_and(|m| m.is_file());
            if !is_image && !on_blocks {
                continue;
            }
            let (Some(offset), Some(len)) = (
                f.start
                    .checked_mul(es)
                    .and_then(|b| b.checked_add(pv.pe_start.0 * 512)),
                f.len.checked_mul(es),
            ) else {
                continue;
            };
            plan.steps.push(Step::DiscardRange {
                device: dev.path.clone(),
                offset,
                len,
                reason: format!(
                    "give back the space LV {}/{} no longer uses{}",
                    old.name,
                    f.lv,
                    if is_image {
                        " to the filesystem under the image"
                    } else {
                        " (devices/issue_discards = 1)"
                    }
                ),
            });
        }
    }

    fn push_label_flags(&self, plan: &mut Plan, devs: &[NewPv], in_vg: bool) {
        for d in devs {
            plan.steps.push(Step::WriteLabel {
                device: d.path.clone(),
                pv_uuid: d.uuid.raw_str().to_string(),
                device_size: d.device_size,
                pe_start: d.pe_start,
                metadata_areas: d.mdas.clone(),
                in_vg,
            });
        }
    }

    /// Add devices to `vg` (creating PVs on those that are not PVs yet).
    fn plan_add_pvs(
        &self,
        plan: &mut Plan,
        scan: &Scan,
        vg: &mut VgMetadata,
        paths: &[PathBuf],
        opts: &PvOptions,
    ) -> Result<Vec<NewPv>> {
        let mut out = Vec::new();
        for p in paths {
            let pv = match scan.pv_at(p) {
                Some((_, Some(other))) => {
                    return Err(EngineError::Refused(format!(
                        "{} already belongs to VG {}",
                        p.display(),
                        other.meta.name
                    )));
                }
                Some((pv, None)) => {
                    plan.fingerprint.push((pv.path.clone(), scanned_state(pv)));
                    NewPv::from_scanned(pv)
                }
                None => self.plan_pv_create(plan, scan, p, opts)?,
            };
            let tail = pv.mdas.get(1).map(|m| pv.device_size - m[0]).unwrap_or(0);
            ops::add_pv(
                vg,
                pv.uuid,
                &pv.path.display().to_string(),
                Bytes(pv.device_size),
                Bytes(pv.pe_start),
                Bytes(tail),
            )?;
            out.push(pv);
        }
        Ok(out)
    }

    fn plan_pv_create(
        &self,
        plan: &mut Plan,
        scan: &Scan,
        path: &Path,
        opts: &PvOptions,
    ) -> Result<NewPv> {
        let exists = path.exists();
        let size = if exists {
            if let Some((pv, vg)) = scan.pv_at(path) {
                return Err(match vg {
                    Some(vg) => EngineError::Refused(format!(
                        "{} is already a PV of VG {}",
                        path.display(),
                        vg.meta.name
                    )),
                    None => EngineError::Refused(format!(
                        "{} is already a PV (id {}); remove it first with 'devpool pv remove'",
                        path.display(),
                        pv.label.uuid
                    )),
                });
            }
            let dev = Device::open(path, false)?;
            if let Some(want) = opts.image_size
                && !dev.is_block
                && want.0 != dev.size
            {
                return Err(EngineError::Invalid(format!(
                    "{} exists with {} bytes; --image-size {} only applies to new image files",
                    path.display(),
                    dev.size,
                    want.0
                )));
            }
            let head = dev.read_at(0, dev.size.min(SIGNATURE_SCAN_BYTES) as usize)?;
            for s in signature::detect(&head) {
                plan.confirm.push(format!(
                    "{} holds a {} signature at byte {}; it will be wiped",
                    path.display(),
                    s.name,
                    s.offset
                ));
            }
            plan.fingerprint
                .push((path.to_path_buf(), device_state(path)));
            dev.size
        } else {
            let size = opts.image_size.ok_or_else(|| {
                EngineError::Invalid(format!(
                    "{} does not exist; pass --image-size to create a sparse image file there",
                    path.display()
                ))
            })?;
            plan.steps.push(Step::CreateImage {
                path: path.to_path_buf(),
                size: size.0,
            });
            plan.fingerprint
                .push((path.to_path_buf(), device_state(path)));
            size.0
        };
        let layout =
            PvLayout::compute(Bytes(size), opts.metadata_size, opts.metadata_copies.max(1))
                .map_err(|e| EngineError::Invalid(format!("{}: {e}", path.display())))?;
        let uuid = random_uuid();
        plan.steps.push(Step::ZeroRange {
            device: path.to_path_buf(),
            offset: 0,
            len: layout.wipe_len(),
            reason: "wipe old signatures and labels".into(),
        });
        for m in &layout.mdas {
            plan.steps.push(Step::InitMetadataArea {
                device: path.to_path_buf(),
                offset: m[0],
                size: m[1],
            });
        }
        plan.steps.push(Step::WriteLabel {
            device: path.to_path_buf(),
            pv_uuid: uuid.raw_str().to_string(),
            device_size: size,
            pe_start: layout.pe_start,
            metadata_areas: layout.mdas.clone(),
            in_vg: false,
        });
        if let Some(file) = crate::lvmconf::lvm_devices_file()
            && let Some(id) = crate::devicesfile::device_id(path)
        {
            plan.notes.push(format!(
                "LVM2 here uses only the devices its devices file {} lists: {} is listed there as {} {}",
                file.display(),
                path.display(),
                id.idtype,
                id.idname
            ));
            plan.steps.push(Step::ListInDevicesFile {
                file,
                device: path.to_path_buf(),
                pv_uuid: uuid.raw_str().to_string(),
                idtype: id.idtype,
                idname: id.idname,
                part: id.part,
            });
        }
        if layout.small_device_default {
            plan.notes.push(format!(
                "{} is smaller than 8 GiB: using LVM2's default metadata area of 1020 KiB (about 1,800 volumes)",
                path.display()
            ));
        }
        Ok(NewPv {
            path: path.to_path_buf(),
            uuid,
            device_size: size,
            pe_start: layout.pe_start,
            mdas: layout.mdas,
        })
    }
}

/// A PV as a plan sees it (existing or about to be created).
#[derive(Debug, Clone)]
struct NewPv {
    path: PathBuf,
    uuid: LvmUuid,
    device_size: u64,
    pe_start: u64,
    mdas: Vec<[u64; 2]>,
}

impl NewPv {
    fn from_scanned(pv: &ScannedPv) -> NewPv {
        NewPv {
            path: pv.path.clone(),
            uuid: pv.label.uuid,
            device_size: pv.label.device_size,
            pe_start: pv.label.pe_start().unwrap_or(0),
            mdas: pv
                .label
                .metadata_areas
                .iter()
                .map(|a| [a.offset, a.size])
                .collect(),
        }
    }
}

/// A chunk size in sectors (it must be a whole number of them).
fn whole_sectors(b: Bytes) -> Result<u32> {
    u32::try_from(b.0 / 512)
        .ok()
        .filter(|_| b.0.is_multiple_of(512))
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "chunk size {} bytes is not a whole number of sectors",
                b.0
            ))
        })
}

/// Device, byte offset and length of an LV's first 4 KiB.
fn lv_start(vg: &LoadedVg, meta: &VgMetadata, lv: &str) -> Result<(PathBuf, u64, u64)> {
    let l = meta
        .lv(lv)
        .ok_or_else(|| EngineError::Invalid("new LV missing".into()))?;
    let seg = l
        .segments
        .first()
        .ok_or_else(|| EngineError::Invalid("new LV has no segments".into()))?;
    let devpool_format::metadata::SegmentKind::Striped { stripes, .. } = &seg.kind else {
        return Err(EngineError::Invalid("new LV is not striped".into()));
    };
    let st = &stripes[0];
    let pv = meta
        .pv(&st.pv)
        .ok_or_else(|| EngineError::Invalid("unknown PV".into()))?;
    let dev = vg
        .device_of(&st.pv)
        .ok_or_else(|| EngineError::Invalid(format!("PV {} missing", st.pv)))?;
    let es = meta.extent_size.bytes().0;
    let off = pv.pe_start.0 * 512 + st.start * es;
    let len = 4096u64.min(l.extent_count() * es);
    Ok((dev.path.clone(), off, len))
}

/// What a scanned PV holds, for plan verification: its id, size and every
/// metadata area's committed slot. Plans record it from the scan they were
/// built on, so building a plan costs no extra I/O.
fn scanned_state(pv: &ScannedPv) -> String {
    let mut s = format!("pv {} size {}", pv.label.uuid, pv.size);
    for (area, m) in pv.label.metadata_areas.iter().zip(&pv.mdas) {
        match m {
            Ok(st) => {
                let c = st.header.committed;
                s += &format!(
                    " mda@{}:{}/{}/{:08x}",
                    area.offset, c.offset, c.size, c.checksum
                );
            }
            Err(_) => s += &format!(" mda@{}:unreadable", area.offset),
        }
    }
    s
}

/// What a device holds now (read afresh, for verification): as
/// [`scanned_state`] for a PV, else a checksum of its first bytes.
pub fn device_state(path: &Path) -> String {
    let Ok(dev) = Device::open(path, false) else {
        return "absent".into();
    };
    match scan::scan_device(&dev, &mut ParseCache::default()) {
        Ok(Some(pv)) => scanned_state(&pv),
        Ok(None) => match dev.read_at(0, dev.size.min(SIGNATURE_SCAN_BYTES) as usize) {
            Ok(head) => format!("raw size {} head {:08x}", dev.size, lvm_crc(&head)),
            Err(_) => "unreadable".into(),
        },
        Err(e) => format!("bad label: {e}"),
    }
}

/// Tell LVM2 to rescan instead of trusting its device hints.
fn invalidate_lvm_hints() {
    let dir = Path::new("/run/lvm");
    if dir.is_dir() {
        let _ = std::fs::write(dir.join("newhints"), b"");
    }
}

/// Work started beside a commit ([`Engine::apply_overlapped`]).
pub struct Overlapped<T>(crate::workers::Handle<T>);

impl<T> Overlapped<T> {
    /// Wait for the work (a panic in it goes on in the caller).
    pub fn join(self) -> T {
        self.0.join()
    }
}

/// How many `ZeroRange` steps on one device `steps` starts with.
fn zero_run(steps: &[Step]) -> usize {
    let Some(Step::ZeroRange { device: first, .. }) = steps.first() else {
        return 0;
    };
    steps
        .iter()
        .take_while(|s| matches!(s, Step::ZeroRange { device, .. } if device == first))
        .count()
}

/// Whether a later step commits VG metadata on `device`: the commit flushes
/// every PV after writing the text and before any header names it, so data
/// written earlier (a new LV's wiped first blocks) is durable before the VG
/// that exposes it. One flush then serves all of a lease's wipes and the text.
fn flushed_by_later_commit(later: &[Step], device: &Path) -> bool {
    later.iter().any(|s| match s {
        Step::CommitMetadata { devices, .. } => devices.iter().any(|d| same_file(d, device)),
        _ => false,
    })
}

/// dm-thin keeps an active pool's metadata in memory and changes it only on
/// messages (LVM2 sends `create_thin`, `delete`…): a change devpool wrote
/// to the metadata LV meanwhile would be lost, or would corrupt what the
/// kernel writes back. Refuse `what` then, before anything is written.
fn refuse_if_kernel_holds_thin_pool(meta: &VgMetadata, what: &str) -> Result<()> {
    if let Some(d) = crate::dm::thin_pool_held(meta) {
        let pool = ops::thin::the_thin_pool(meta)
            .map(|p| p.pool)
            .unwrap_or_default();
        return Err(EngineError::Refused(format!(
            "thin pool {vg}/{pool}: {what} refused: device-mapper has the pool active ({} is {}), and dm-thin keeps its metadata in memory; deactivate it first ('vgchange -an {vg}')",
            d.node().display(),
            d.name,
            vg = meta.name,
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_the_kernels() {
        let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/hostname") else {
            return;
        };
        assert_eq!(hostname(), kernel.trim());
    }

    fn commit(devices: &[&Path]) -> Step {
        Step::CommitMetadata {
            vg: "vg".into(),
            seqno: 2,
            devices: devices.iter().map(|d| d.to_path_buf()).collect(),
            bytes: 1,
        }
    }

    fn image_vg(dir: &Path) -> (Engine, PathBuf) {
        let img = dir.join("pv.img");
        let e = Engine::new(DeviceSource::List(vec![img.clone()]), dir.join("state"));
        let create = Operation::VgCreate {
            name: "vg".into(),
            pvs: vec![img.clone()],
            extent_size: Bytes(4 << 20),
            pv_options: PvOptions {
                metadata_size: None,
                metadata_copies: 1,
                image_size: Some(Bytes(64 << 20)),
            },
            autoactivation: true,
        };
        e.apply(&create, true).unwrap();
        (e, img)
    }

    fn two_volumes(a: &str, b: &str) -> Operation {
        let vol = |name: &str| NewVolume {
            name: name.into(),
            size: SizeArg::parse("8M").unwrap(),
            tags: vec![],
        };
        Operation::LvCreateBatch {
            vg: "vg".into(),
            volumes: vec![vol(a), vol(b)],
            wipe: true,
            contiguous: true,
            thin_when_pooled: false,
            remove_first: vec![],
        }
    }

    #[test]
    fn overlapped_work_sees_the_wiped_volumes_and_is_undone_when_the_commit_fails() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (mut e, img) = image_vg(dir.path());
        // Old data where the volumes will go.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0xaa; 60 << 20], 4 << 20).unwrap();

        let (plan, _, work) = e
            .apply_overlapped(
                &two_volumes("a", "b"),
                true,
                |plan: &Plan| {
                    // Runs once the wipes are done: each start reads zero.
                    let meta = plan.new_metadata().unwrap();
                    ["a", "b"].map(|lv| {
                        let (path, off, _) = lv_start_in(plan, meta, lv);
                        let mut b = [1u8; 4096];
                        std::fs::File::open(path)
                            .unwrap()
                            .read_exact_at(&mut b, off)
                            .unwrap();
                        b.iter().all(|&x| x == 0)
                    })
                },
                |_| panic!("a commit that succeeded is not undone"),
            )
            .unwrap();
        assert_eq!(work.join(), [true, true]);
        assert!(plan.new_metadata().unwrap().lv("b").is_some());

        // Cut the next commit after its two wipes: the work ran, and is undone.
        e.gate = WriteGate::crash_after(2);
        let undone = std::cell::Cell::new(None);
        let r = e.apply_overlapped(
            &two_volumes("c", "d"),
            true,
            |_| 42,
            |v| undone.set(Some(v)),
        );
        assert!(
            matches!(r, Err(EngineError::InjectedCrash(2))),
            "{:?}",
            r.err()
        );
        assert_eq!(undone.get(), Some(42));
        e.gate = WriteGate::unlimited();
        let (v, _) = e.read_vg("vg").unwrap();
        assert!(v.meta.lv("b").is_some() && v.meta.lv("c").is_none());
    }

    #[test]
    fn a_batch_removes_and_creates_in_one_commit_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = image_vg(dir.path());
        e.apply(&two_volumes("a", "b"), true).unwrap();
        let seqno = e.read_vg("vg").unwrap().0.meta.seqno;
        let mut op = two_volumes("c", "d");
        if let Operation::LvCreateBatch { remove_first, .. } = &mut op {
            *remove_first = vec!["a".into(), "b".into()];
        }
        assert_eq!(op.describe(), "lv remove vg/a vg/b; lv create vg/c vg/d");
        e.apply(&op, true).unwrap();
        let (v, _) = e.read_vg("vg").unwrap();
        assert_eq!(v.meta.seqno, seqno + 1);
        let names: Vec<&str> = v.meta.lvs.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["c", "d"]);
        // A volume already gone: nothing is removed and nothing created.
        let mut op = two_volumes("e", "f");
        if let Operation::LvCreateBatch { remove_first, .. } = &mut op {
            *remove_first = vec!["c".into(), "a".into()];
        }
        let err = e.apply(&op, true).unwrap_err();
        assert!(
            matches!(err, EngineError::LvNotFound { ref lv, .. } if lv == "a"),
            "{err}"
        );
        let (after, _) = e.read_vg("vg").unwrap();
        assert_eq!(after.meta.seqno, seqno + 1);
        assert!(after.meta.lv("c").is_some() && after.meta.lv("e").is_none());
    }

    fn lv_start_in(plan: &Plan, meta: &VgMetadata, lv: &str) -> (PathBuf, u64, u64) {
        let l = meta.lv(lv).unwrap();
        let devpool_format::metadata::SegmentKind::Striped { stripes, .. } = &l.segments[0].kind
        else {
            panic!("not linear")
        };
        let pv = meta.pv(&stripes[0].pv).unwrap();
        let es = meta.extent_size.bytes().0;
        let path = plan.pv_path(&stripes[0].pv).unwrap().to_path_buf();
        (path, pv.pe_start.0 * 512 + stripes[0].start * es, 4096)
    }

    #[test]
    fn a_wipe_skips_its_own_flush_only_when_a_later_commit_covers_its_device() {
        let dir = std::env::temp_dir().join(format!("devpool-flush-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        assert!(flushed_by_later_commit(&[commit(&[&b, &a])], &a));
        assert!(!flushed_by_later_commit(&[commit(&[&b])], &a));
        assert!(!flushed_by_later_commit(&[], &a));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
