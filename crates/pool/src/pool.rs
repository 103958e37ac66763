//! Pools: a VG named `devpool-<NAME>` on one dedicated device or image file.
//! The name, not the device path, identifies a pool; `state_dir/pools/NAME.json`
//! only remembers where the pool was last seen, so that a lease does not scan
//! every block device (it is verified on use and refreshed by a system scan).

use crate::dmdev::DmDevice;
use crate::lease::{self, Lease};
use crate::loopdev;
use crate::owner::{Liveness, Owner};
use crate::safety;
use crate::servers;
use crate::spec::VolumeSpec;
use crate::{PoolError, Result};
use devpool_engine::engine::{DeviceSource, Engine, Operation, PvOptions, same_file};
use devpool_engine::plan::Plan;
use devpool_engine::vg::LoadedVg;
use devpool_engine::{EngineError, NewVolume};
use devpool_format::metadata::{SegmentKind, VgMetadata};
use devpool_format::units::{Bytes, SizeArg};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const VG_PREFIX: &str = "devpool-";
/// Pools use LVM2's default extent size.
const EXTENT_SIZE: Bytes = Bytes(4 << 20);
/// `pool status` warns below this share of free space.
/// A snapshot this full is reported in health.
const SNAPSHOT_FULL_PERCENT: u64 = 80;
const LOW_FREE_PERCENT: u64 = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PoolRecord {
    name: String,
    pub(crate) vg: String,
    devices: Vec<PathBuf>,
    /// devpool made the image file (the embedded default): teardown deletes it.
    created_image: bool,
}

/// What one acquire asks for.
pub(crate) struct LeaseRequest<'a> {
    pub specs: &'a [VolumeSpec],
    pub owner: &'a Owner,
    pub keep: bool,
    pub devices: DeviceOptions,
}

/// How a lease's volumes become host devices.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Attach a host loop device to each volume.
    pub loops: bool,
    /// Give the loop devices to this user and group (who ran devpool
    /// through sudo).
    pub chown: Option<(u32, u32)>,
}

/// A lease about to be committed.
pub(crate) struct NewLease {
    pub session: String,
    /// (role, LV name) per volume.
    pub names: Vec<(String, String)>,
    pub volumes: Vec<NewVolume>,
}

/// The commit that creates leased volumes (after removing `released`).
pub(crate) fn lease_op(vg: &str, volumes: Vec<NewVolume>, released: Vec<String>) -> Operation {
    Operation::LvCreateBatch {
        vg: vg.to_string(),
        volumes,
        wipe: true,
        // Every leased volume gets one loop device over one range.
        contiguous: true,
        // Thin volumes when the pool has a thin pool (served, no loop).
        thin_when_pooled: true,
        remove_first: released,
    }
}

/// A lease's devices, made while its commit is written.
pub(crate) struct Exposed {
    devices: Result<Vec<LeasedDevice>>,
    /// Everything attached, also when a later attach failed.
    attached: Vec<loopdev::Attached>,
    /// For thin volumes on a host with device-mapper: the VG after the
    /// commit and its PVs, to activate them once the commit is done.
    thin: Option<Box<ThinToActivate>>,
}

/// A committed VG and its PVs (key, path).
type ThinToActivate = (VgMetadata, Vec<(String, PathBuf)>);

impl Exposed {
    /// The devices of the lease named `names` in `plan`: a loop device per
    /// volume, none for thin volumes (they get dm-thin devices after the
    /// commit where the host has device-mapper, else they are served) or
    /// without `opts.loops`.
    /// The loop devices attach on up to `threads` threads.
    pub(crate) fn make(
        plan: &Plan,
        names: &[(String, String)],
        opts: DeviceOptions,
        threads: usize,
    ) -> Exposed {
        let mut attached = Vec::new();
        let mut thin = None;
        let devices = match plan.new_metadata() {
            Some(meta) => {
                let thin_lease = names.first().is_some_and(|(_, lv)| {
                    devpool_engine::ops::thin::thin_volume(meta, lv).is_some()
                });
                if thin_lease && opts.loops && crate::dmdev::available() {
                    let pvs = meta
                        .pvs
                        .iter()
                        .filter_map(|p| {
                            plan.pv_path(&p.key)
                                .map(|d| (p.key.clone(), d.to_path_buf()))
                        })
                        .collect();
                    thin = Some(Box::new((meta.clone(), pvs)));
                }
                expose(plan, meta, names, opts, threads, &mut attached)
            }
            None => Err(PoolError::Invalid(
                "acquire: the plan has no metadata".into(),
            )),
        };
        Exposed {
            devices,
            attached,
            thin,
        }
    }

    /// Detach what was attached (the commit failed).
    pub(crate) fn undo(self) {
        for a in &self.attached {
            loopdev::give_back(a);
        }
    }
}

fn expose(
    plan: &Plan,
    meta: &VgMetadata,
    names: &[(String, String)],
    opts: DeviceOptions,
    threads: usize,
    attached: &mut Vec<loopdev::Attached>,
) -> Result<Vec<LeasedDevice>> {
    let thin = names
        .first()
        .is_some_and(|(_, lv)| devpool_engine::ops::thin::thin_volume(meta, lv).is_some());
    let es = meta.extent_size.bytes().0;
    let mut devices: Vec<LeasedDevice> = Vec::with_capacity(names.len());
    // (index in devices, window) of each loop device to make.
    let mut windows: Vec<(usize, loopdev::Window)> = Vec::new();
    for (role, lv) in names {
        let mut d = LeasedDevice {
            role: role.clone(),
            lv: lv.clone(),
            device: None,
            size_bytes: meta.lv(lv).map_or(0, |l| l.extent_count() * es),
        };
        if !thin {
            let (backing, offset, size) =
                contiguous_extent(meta, lv, |k| plan.pv_path(k).map(Path::to_path_buf))?;
            d.size_bytes = size;
            if opts.loops {
                let lv_uuid = meta.lv(lv).map(|l| l.id.raw_str()).unwrap_or_default();
                windows.push((
                    devices.len(),
                    loopdev::Window {
                        backing,
                        offset,
                        size,
                        lv_uuid: lv_uuid.to_string(),
                    },
                ));
            }
        }
        devices.push(d);
    }
    let (at, windows): (Vec<usize>, Vec<loopdev::Window>) = windows.into_iter().unzip();
    let mut failed = None;
    for (i, r) in at.into_iter().zip(loopdev::attach_all(&windows, threads)) {
        match r {
            Ok(a) => {
                if let Some((uid, gid)) = opts.chown {
                    loopdev::chown_to(&a.device, uid, gid);
                }
                devices[i].device = Some(a.device.clone());
                attached.push(a);
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(devices)
}

/// Settings and entry points for pools.
#[derive(Debug, Clone)]
pub struct Pools {
    pub state_dir: PathBuf,
    /// The fstab the safety checks read (a setting so tests can use a scratch one).
    pub fstab: PathBuf,
    /// Size of the embedded default pool's sparse image.
    pub default_size: Bytes,
    /// First part of leased LV names.
    pub prefix: String,
    /// Stop at the first change's plan ([`EngineError::DryRun`]), touching
    /// nothing before it either (loop devices, servers).
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeasedDevice {
    pub role: String,
    pub lv: String,
    /// The host block device: a loop device, or for a thin volume a dm-thin
    /// device on a host with device-mapper (absent for leases taken
    /// without one, e.g. for a VM, and for thin volumes elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    pub size_bytes: u64,
}

impl LeasedDevice {
    /// The loop device's path, or `-` when the lease has none.
    pub fn device_name(&self) -> String {
        self.device
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "-".into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Acquired {
    pub pool: String,
    pub session: String,
    pub owner: Owner,
    pub kept: bool,
    pub devices: Vec<LeasedDevice>,
    /// Orphans reaped because the pool was too full.
    pub reaped: Vec<String>,
    /// What the caller should know (why the volumes have no loop devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The loop devices attached, as the kernel knows them (so that a
    /// resident process can detach them without a scan).
    #[serde(skip)]
    pub attached: Vec<loopdev::Attached>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupOutcome {
    pub pool: String,
    pub vg: String,
    pub device: PathBuf,
    pub size_bytes: u64,
    pub already: bool,
    /// What the user should know (the engine's plan notes), e.g. that
    /// LVM2's devices file must list the device.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolSummary {
    pub pool: String,
    pub vg: String,
    pub devices: Vec<PathBuf>,
    pub size_bytes: u64,
    pub free_bytes: u64,
    pub leases: usize,
    pub volumes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    #[serde(flatten)]
    pub lease: Lease,
    pub devices: Vec<LeasedDevice>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    #[serde(flatten)]
    pub summary: PoolSummary,
    pub leases: Vec<LeaseStatus>,
    /// LVs in the pool that no lease owns (made by hand, or by LVM2).
    pub other_volumes: Vec<String>,
    /// Copy-on-write snapshots, with how full their stores are.
    pub snapshots: Vec<crate::snapshots::SnapshotStatus>,
    /// The thin pool, when the pool has one.
    pub thin: Option<crate::thin::ThinStatus>,
    /// Thin snapshots (listed with their origin and its lease).
    pub thin_snapshots: Vec<ThinSnapshotStatus>,
    /// The pool's image files: written bytes, their filesystem's free space.
    pub images: Vec<crate::hostspace::ImageSpace>,
    /// What device-mapper has active of the pool, and what holds each.
    pub dm_devices: Vec<crate::activate::ActiveDevice>,
    pub health: Vec<String>,
}

/// What `pool trim` gave back.
#[derive(Debug, Clone, Serialize)]
pub struct TrimReport {
    pub pool: String,
    /// Free space discarded (all of it, whether it held data or not).
    pub discarded_bytes: u64,
    pub ranges: usize,
    /// The pool's image files afterwards.
    pub images: Vec<crate::hostspace::ImageSpace>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThinSnapshotStatus {
    pub name: String,
    pub origin: String,
    pub lease: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CleanupReport {
    pub pool: String,
    pub removed: Vec<Lease>,
    pub kept: Vec<(String, String)>,
    pub detached: Vec<PathBuf>,
}

fn lease_names(specs: &[VolumeSpec], prefix: &str, session: &str) -> Vec<(String, String)> {
    specs
        .iter()
        .map(|s| (s.role.clone(), format!("{prefix}-{session}-{}", s.role)))
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_u32() -> u32 {
    u32::from_le_bytes(devpool_engine::plan::random_bytes::<4>())
}

/// Where a volume lives, if one loop device can cover it.
pub fn contiguous_extent(
    meta: &VgMetadata,
    lv: &str,
    pv_path: impl Fn(&str) -> Option<PathBuf>,
) -> Result<(PathBuf, u64, u64)> {
    let l = meta
        .lv(lv)
        .ok_or_else(|| PoolError::Invalid(format!("volume {lv} not found in {}", meta.name)))?;
    let es = meta.extent_size.bytes().0;
    let one = match l.segments.as_slice() {
        [seg] => match &seg.kind {
            SegmentKind::Striped { stripes, .. } if stripes.len() == 1 => Some(&stripes[0]),
            _ => None,
        },
        _ => None,
    };
    if let Some(s) = devpool_engine::ops::snapshot::snapshot_links(meta)
        .iter()
        .find(|s| s.origin == lv || s.cow == lv || s.snapshot_lv == lv)
    {
        return Err(PoolError::Refused(format!(
            "volume {}/{lv} is {} snapshot '{}': a plain loop device would bypass copy-on-write; devpool serves it (devpool serve {lv} --block-device)",
            meta.name,
            if s.origin == lv { "the origin of" } else { "" },
            s.cow
        )));
    }
    let Some(st) = one else {
        return Err(PoolError::Refused(format!(
            "volume {}/{lv} has {} segment(s) or stripes; one loop device covers only one contiguous range (serving such volumes needs devpool's data plane)",
            meta.name,
            l.segments.len()
        )));
    };
    let pv = meta
        .pv(&st.pv)
        .ok_or_else(|| PoolError::Invalid(format!("{lv}: unknown PV {}", st.pv)))?;
    let path = pv_path(&st.pv).ok_or_else(|| {
        PoolError::Refused(format!("{lv}: the device of PV {} is missing", st.pv))
    })?;
    let offset = pv.pe_start.0 * 512 + st.start * es;
    Ok((path, offset, l.extent_count() * es))
}

impl Pools {
    pub fn vg_name(name: &str) -> Result<String> {
        let vg = format!("{VG_PREFIX}{name}");
        devpool_format::names::validate_vg_name(&vg)
            .map_err(|e| PoolError::Invalid(format!("pool name '{name}': {e}")))?;
        Ok(vg)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("pools").join(format!("{name}.json"))
    }

    fn record(&self, name: &str) -> Option<PoolRecord> {
        let text = std::fs::read_to_string(self.record_path(name)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save_record(&self, rec: &PoolRecord) -> Result<()> {
        let path = self.record_path(&rec.name);
        let dir = self.state_dir.join("pools");
        std::fs::create_dir_all(&dir).map_err(|e| PoolError::io(&dir, "create", e))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let text = serde_json::to_string_pretty(rec).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(|e| PoolError::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| PoolError::io(&path, "rename", e))
    }

    fn system_engine(&self) -> Engine {
        let mut e = Engine::new(DeviceSource::System, self.state_dir.clone());
        e.dry_run = self.dry_run;
        e
    }

    fn list_engine(&self, devices: Vec<PathBuf>) -> Engine {
        let mut e = Engine::new(DeviceSource::List(devices), self.state_dir.clone());
        e.dry_run = self.dry_run;
        e
    }

    /// Run `f` on an engine that sees pool `name`'s devices: the remembered
    /// ones first, with no scan of their own; when they no longer carry the
    /// whole VG, what a system scan finds (remembered for next time). The
    /// default pool is created on first use.
    pub(crate) fn with_pool<T>(
        &self,
        name: &str,
        f: impl Fn(&Engine, &PoolRecord) -> Result<T>,
    ) -> Result<T> {
        if let Some(rec) = self.record(name) {
            match f(&self.list_engine(rec.devices.clone()), &rec) {
                Err(PoolError::Engine(
                    EngineError::VgNotFound(_) | EngineError::MissingPvs { .. },
                )) => {}
                r => return r,
            }
        }
        let (e, rec) = self.discover(name)?;
        f(&e, &rec)
    }

    fn discover(&self, name: &str) -> Result<(Engine, PoolRecord)> {
        let vg = Self::vg_name(name)?;
        let scan = self.system_engine().scan();
        if let Ok(v) = scan.vg(&vg) {
            let rec = PoolRecord {
                name: name.to_string(),
                vg: vg.clone(),
                devices: v.devices.iter().flatten().map(|d| d.path.clone()).collect(),
                created_image: self.record(name).is_some_and(|r| r.created_image),
            };
            self.save_record(&rec)?;
            return Ok((self.list_engine(rec.devices.clone()), rec));
        }
        if name == "default" {
            self.create_default()?;
            if let Some(rec) = self.record(name) {
                return Ok((self.list_engine(rec.devices.clone()), rec));
            }
        }
        Err(PoolError::NoPool(name.to_string()))
    }

    fn create_default(&self) -> Result<()> {
        let img = self.state_dir.join("images").join("default.img");
        let dir = self.state_dir.join("images");
        std::fs::create_dir_all(&dir).map_err(|e| PoolError::io(&dir, "create", e))?;
        let e = self.system_engine();
        e.apply(
            &Operation::VgCreate {
                name: Self::vg_name("default")?,
                pvs: vec![img.clone()],
                extent_size: EXTENT_SIZE,
                pv_options: PvOptions {
                    metadata_size: None,
                    metadata_copies: 1,
                    image_size: Some(self.default_size),
                },
                autoactivation: false,
            },
            true,
        )?;
        self.save_record(&PoolRecord {
            name: "default".into(),
            vg: Self::vg_name("default")?,
            devices: vec![std::fs::canonicalize(&img).unwrap_or(img)],
            created_image: true,
        })
    }

    /// Turn a dedicated device (or an image file, made with `image_size` if
    /// it does not exist) into pool `name`.
    pub fn setup(
        &self,
        device: &Path,
        name: &str,
        image_size: Option<Bytes>,
        confirmed: bool,
    ) -> Result<SetupOutcome> {
        let vg = Self::vg_name(name)?;
        let sys = self.system_engine();
        let scan = sys.scan();
        // A device left unread could hold this pool's VG already.
        let unread: Vec<String> = scan
            .unreadable
            .iter()
            .filter(|u| u.contains(devpool_engine::engine::NOT_READ))
            .map(|u| format!("not searched for an existing pool '{name}': {u}"))
            .collect();
        if let Ok(existing) = scan.vg(&vg) {
            let on_device = existing
                .devices
                .iter()
                .flatten()
                .any(|d| same_file(&d.path, device));
            if !on_device {
                return Err(PoolError::Refused(format!(
                    "pool '{name}' already exists on {} (VG {vg})",
                    existing
                        .devices
                        .iter()
                        .flatten()
                        .map(|d| d.path.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let new_image = !device.exists();
        let mut findings = safety::Findings::default();
        // Held for the whole setup: nobody can mount or claim the device meanwhile.
        let mut _exclusive = None;
        if new_image {
            if image_size.is_none() {
                return Err(PoolError::Invalid(format!(
                    "{}: no such device or image file (pass --image-size to create a sparse image there)",
                    device.display()
                )));
            }
        } else {
            findings = safety::check(device, &self.fstab)?;
            if findings.lvm_pv {
                let own = self.list_engine(vec![device.to_path_buf()]);
                let s = own.scan();
                if let Ok(v) = s.vg(&vg) {
                    if self.dry_run {
                        return Err(PoolError::Refused(format!(
                            "dry run: pool '{name}' is already set up on {}; nothing to do",
                            device.display()
                        )));
                    }
                    let rec = PoolRecord {
                        name: name.to_string(),
                        vg: vg.clone(),
                        devices: v.devices.iter().flatten().map(|d| d.path.clone()).collect(),
                        created_image: false,
                    };
                    self.save_record(&rec)?;
                    return Ok(SetupOutcome {
                        pool: name.to_string(),
                        vg,
                        device: device.to_path_buf(),
                        size_bytes: v.meta.extent_count() * v.meta.extent_size.bytes().0,
                        already: true,
                        notes: Vec::new(),
                    });
                }
                let owner = s
                    .assembly
                    .vgs
                    .first()
                    .map(|v| format!("a PV of VG {}", v.meta.name))
                    .unwrap_or_else(|| "an LVM2 PV that belongs to no VG".into());
                findings
                    .refusals
                    .push(format!("{} is already {owner}", device.display()));
            }
            if !findings.refusals.is_empty() {
                return Err(PoolError::Unsafe {
                    device: device.to_path_buf(),
                    findings: findings.refusals,
                });
            }
            if crate::sysblk::is_file_type_block(device) {
                _exclusive = Some(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_EXCL)
                        .open(device)
                        .map_err(|e| PoolError::io(device, "open exclusively", e))?,
                );
            }
        }
        let size = if new_image {
            image_size.map(|b| b.0).unwrap_or(0)
        } else {
            devpool_engine::device::Device::open(device, false)?.size
        };
        if !confirmed {
            let mut reasons = vec![format!(
                "{} ({} bytes) becomes pool '{name}' (VG {vg}); everything on it is lost",
                device.display(),
                size
            )];
            reasons.extend(findings.confirm.clone());
            return Err(PoolError::NeedsConfirmation {
                what: format!("pool setup {}", device.display()),
                reasons,
            });
        }
        let backup = if new_image {
            None
        } else {
            Some(Backup::take(device, size)?)
        };
        let result = sys.apply(
            &Operation::VgCreate {
                name: vg.clone(),
                pvs: vec![device.to_path_buf()],
                extent_size: EXTENT_SIZE,
                pv_options: PvOptions {
                    metadata_size: None,
                    metadata_copies: 1,
                    image_size,
                },
                autoactivation: false,
            },
            true,
        );
        let notes = match result {
            Ok((plan, _)) => {
                let mut notes = plan.notes;
                let grows = image_size.filter(|_| new_image).map(|b| b.0);
                notes.extend(grows.and_then(|n| crate::hostspace::overcommit_note(device, n)));
                notes.extend(unread);
                notes
            }
            Err(e @ EngineError::DryRun(_)) => return Err(e.into()),
            Err(e) => {
                let restored = match &backup {
                    Some(b) => match b.restore(device) {
                        Ok(()) => "the first and last MiB were restored".to_string(),
                        Err(r) => format!("restoring the first and last MiB failed too: {r}"),
                    },
                    None => {
                        let _ = std::fs::remove_file(device);
                        "the new image file was removed".to_string()
                    }
                };
                return Err(PoolError::Refused(format!(
                    "pool setup on {} failed: {e}; {restored}",
                    device.display()
                )));
            }
        };
        self.save_record(&PoolRecord {
            name: name.to_string(),
            vg: vg.clone(),
            devices: vec![std::fs::canonicalize(device).unwrap_or(device.to_path_buf())],
            created_image: false,
        })?;
        Ok(SetupOutcome {
            pool: name.to_string(),
            vg,
            device: device.to_path_buf(),
            size_bytes: size,
            already: false,
            notes,
        })
    }

    /// Every pool a system scan finds.
    pub fn list(&self) -> Result<Vec<PoolSummary>> {
        let scan = self.system_engine().scan();
        Ok(scan
            .assembly
            .vgs
            .iter()
            .filter_map(|v| {
                let name = v.meta.name.strip_prefix(VG_PREFIX)?;
                Some(summary(name, v, lease::count(&v.meta)))
            })
            .collect())
    }

    pub(crate) fn read_vg(&self, name: &str) -> Result<LoadedVg> {
        self.with_pool(name, |e, rec| Ok(e.read_vg(&rec.vg)?.0))
    }

    pub fn status(&self, name: &str) -> Result<PoolStatus> {
        let v = self.read_vg(name)?;
        let all = lease::leases(&v.meta);
        let s = summary(name, &v, all.len());
        let attached = loopdev::list();
        let mut leases = Vec::new();
        for l in all {
            let devices = l
                .volumes
                .iter()
                .flat_map(|vol| {
                    let uuid = v.meta.lv(&vol.lv).map(|m| m.id.raw_str().to_string());
                    attached
                        .iter()
                        .filter(move |a| Some(&a.lv_uuid) == uuid.as_ref())
                        .map(|a| LeasedDevice {
                            role: vol.role.clone(),
                            lv: vol.lv.clone(),
                            device: Some(a.device.clone()),
                            size_bytes: a.size,
                        })
                })
                .collect();
            leases.push(LeaseStatus { lease: l, devices });
        }
        // Snapshots are listed on their own.
        let snapshot_lvs: std::collections::HashSet<String> =
            devpool_engine::ops::snapshot::snapshot_links(&v.meta)
                .into_iter()
                .flat_map(|l| [l.cow, l.snapshot_lv])
                .collect();
        let thin_snaps = crate::thin::thin_snapshots_of(
            &v.meta,
            &v.meta
                .lvs
                .iter()
                .map(|l| l.name.clone())
                .collect::<Vec<_>>(),
        );
        let other_volumes = v
            .meta
            .lvs
            .iter()
            .filter(|l| {
                lease::session_of(l).is_none()
                    && !snapshot_lvs.contains(&l.name)
                    && !devpool_engine::ops::thin::is_thin_internal(&v.meta, &l.name)
                    && !thin_snaps.contains(&l.name)
            })
            .map(|l| l.name.clone())
            .collect();
        let thin_snapshots = crate::thin::thin_snapshot_statuses(&v.meta, &thin_snaps);
        let thin = crate::thin::status(&v);
        let mut health = Vec::new();
        for m in &v.health.missing_pvs {
            health.push(format!("PV missing: {m}"));
        }
        for d in &v.health.disagreeing {
            health.push(format!("metadata copies disagree: {d}"));
        }
        let snapshots = crate::snapshots::statuses(&v);
        for sn in &snapshots {
            match (&sn.usage, &sn.error) {
                (Some(u), _) if !u.valid => health.push(format!(
                    "snapshot {} is invalid: its COW store filled up ({} chunks); it no longer shows the old data of {}",
                    sn.name, u.capacity_chunks, sn.origin
                )),
                (Some(u), _) if u.capacity_chunks > 0 && u.used_chunks * 100 / u.capacity_chunks >= SNAPSHOT_FULL_PERCENT => {
                    health.push(format!(
                        "snapshot {} is {}% full ({} of {} chunks); it becomes invalid when full",
                        sn.name,
                        u.used_chunks * 100 / u.capacity_chunks,
                        u.used_chunks,
                        u.capacity_chunks
                    ))
                }
                (None, Some(e)) => health.push(format!("snapshot {}: {e}", sn.name)),
                _ => {}
            }
        }
        if let Some(t) = &thin {
            crate::thin::health(t, &mut health);
        }
        // A thin pool takes most of the VG on purpose; its own use counts.
        if thin.is_none()
            && s.size_bytes > 0
            && s.free_bytes * 100 / s.size_bytes < LOW_FREE_PERCENT
        {
            health.push(format!(
                "free space is low: {} of {} bytes free",
                s.free_bytes, s.size_bytes
            ));
        }
        if !v
            .meta
            .flags
            .iter()
            .any(|f| f == devpool_engine::engine::NOAUTOACTIVATE)
        {
            health.push(format!(
                "LVM2 may activate this pool's volumes by itself (at boot, or when udev sees its PVs), and its dm-snapshot and dm-thin would then change them behind devpool: run 'vgchange --setautoactivation n {}'",
                v.meta.name
            ));
        }
        // What device-mapper has active of this pool: a thin lease's and a
        // server's devices are how they work; anything else (LVM2's, `lv
        // activate`, a killed server's) holds snapshot changes back until
        // it goes, and releases remove it.
        let dm_devices = crate::activate::active_devices(&self.state_dir, &v.meta);
        let loose: Vec<String> = dm_devices
            .iter()
            .filter(|d| d.held_by.is_none())
            .map(|d| format!("{} ({})", d.name, d.device.display()))
            .collect();
        if !loose.is_empty() {
            health.push(format!(
                "device-mapper has {} of this pool's devices active that no lease or server of devpool's holds (LVM2's activation, `lv activate`, or a killed server's): {}; copy-on-write snapshots of their volumes cannot change until they go, and devpool serves none of its thin volumes itself while dm-thin holds the thin pool (its changes go to the kernel as messages) ('vgchange -an {}', `devpool lv deactivate`, or releasing the lease removes them)",
                loose.len(),
                loose.join(", "),
                v.meta.name
            ));
        }
        if let Some(file) = devpool_engine::lvmconf::lvm_devices_file() {
            let pvs = v
                .devices
                .iter()
                .flatten()
                .map(|d| (d.path.as_path(), d.label.uuid.raw_str()));
            for d in devpool_engine::devicesfile::unlisted(&file, pvs) {
                health.push(format!(
                    "LVM2 does not see PV {} of this pool: LVM2 here uses only the devices its devices file {} lists (run 'lvmdevices --adddev {}')",
                    d.display(),
                    file.display(),
                    d.display()
                ));
            }
        }
        let images: Vec<_> = s
            .devices
            .iter()
            .filter_map(|d| crate::hostspace::ImageSpace::of(d))
            .collect();
        health.extend(images.iter().filter_map(|i| i.health()));
        Ok(PoolStatus {
            summary: s,
            leases,
            other_volumes,
            snapshots,
            thin,
            thin_snapshots,
            images,
            dm_devices,
            health,
        })
    }

    /// Lease volumes: one commit creates them with the owner in their tags;
    /// then each gets a loop device. Reaps orphans once if the pool is full.
    pub fn acquire(
        &self,
        name: &str,
        specs: &[VolumeSpec],
        owner: &Owner,
        keep: bool,
    ) -> Result<Acquired> {
        // Without the right to attach loop devices: the volumes alone.
        let loops = loopdev::usable();
        let mut a = self.acquire_as(name, specs, owner, keep, loops)?;
        if !loops {
            a.notes.push(loopdev::NOT_USABLE.to_string());
        }
        Ok(a)
    }

    /// Lease volumes without host loop devices (a VM attaches them itself).
    pub fn acquire_unattached(
        &self,
        name: &str,
        specs: &[VolumeSpec],
        owner: &Owner,
        keep: bool,
    ) -> Result<Acquired> {
        self.acquire_as(name, specs, owner, keep, false)
    }

    fn acquire_as(
        &self,
        name: &str,
        specs: &[VolumeSpec],
        owner: &Owner,
        keep: bool,
        loops: bool,
    ) -> Result<Acquired> {
        self.acquire_request(
            name,
            &LeaseRequest {
                specs,
                owner,
                keep,
                devices: DeviceOptions {
                    loops,
                    chown: loopdev::sudo_user(),
                },
            },
        )
    }

    pub(crate) fn acquire_request(&self, name: &str, req: &LeaseRequest) -> Result<Acquired> {
        self.with_pool(name, |e, rec| self.acquire_on(e, rec, name, req))
    }

    /// One commit creates the lease's volumes, with the owner in their
    /// tags; their loop devices attach while it is written (under the
    /// VG's lock, so a cleanup never sees them before their volumes).
    /// Reaps orphans once if the pool is full.
    fn acquire_on(
        &self,
        e: &Engine,
        rec: &PoolRecord,
        name: &str,
        req: &LeaseRequest,
    ) -> Result<Acquired> {
        let lease = self.new_lease(req.specs, req.owner, req.keep);
        let op = lease_op(&rec.vg, lease.volumes.clone(), vec![]);
        let attempt = || {
            let (names, opts) = (lease.names.clone(), req.devices);
            e.apply_overlapped(
                &op,
                true,
                move |plan| Exposed::make(plan, &names, opts, loopdev::ATTACH_THREADS),
                Exposed::undo,
            )
        };
        let mut reaped = Vec::new();
        let (_, _, attaching) = match attempt() {
            Ok(done) => done,
            Err(EngineError::NoSpace { .. } | EngineError::NoContiguousSpace { .. }) => {
                let report = self.cleanup(name, false)?;
                reaped = report.removed.iter().map(|l| l.session.clone()).collect();
                attempt()?
            }
            Err(err) => return Err(err.into()),
        };
        let mut acquired = self.finish_acquire(name, lease, req, attaching.join())?;
        acquired.reaped = reaped;
        Ok(acquired)
    }

    /// On a host with device-mapper, a lease's thin volumes get dm-thin
    /// devices as other volumes get loop devices (they stay until the
    /// release, which removes them); `meta` is the VG the lease's commit
    /// wrote. One that cannot be activated is
    /// left to `devpool serve`, and a note says why.
    fn thin_devices(
        &self,
        meta: &VgMetadata,
        pvs: &[(String, PathBuf)],
        devices: &mut [LeasedDevice],
        opts: DeviceOptions,
        notes: &mut Vec<String>,
    ) {
        for d in devices.iter_mut() {
            if devpool_engine::ops::thin::thin_volume(meta, &d.lv).is_none() {
                continue;
            }
            match crate::activate::activate_lv(&self.state_dir, meta, pvs, &d.lv, false) {
                Ok((node, _stack)) => {
                    if let Some((uid, gid)) = opts.chown {
                        loopdev::chown_to(&node, uid, gid);
                    }
                    d.device = Some(node);
                }
                Err(e) => notes.push(format!(
                    "thin volume {} has no device-mapper device ({e}); devpool serve {} --block-device serves it",
                    d.lv, d.lv
                )),
            }
        }
    }

    /// Session id, LV names and volumes of a lease about to be committed.
    pub(crate) fn new_lease(&self, specs: &[VolumeSpec], owner: &Owner, keep: bool) -> NewLease {
        let session = lease::new_session_id(unix_now(), random_u32());
        let names = lease_names(specs, &self.prefix, &session);
        let volumes = specs
            .iter()
            .zip(&names)
            .map(|(s, (role, lv))| NewVolume {
                name: lv.clone(),
                size: s.size,
                tags: lease::tags(&session, role, owner, keep),
            })
            .collect();
        NewLease {
            session,
            names,
            volumes,
        }
    }

    /// The lease, once committed with its devices. A lease is usable whole
    /// or not at all: if a device could not be attached, it is released.
    pub(crate) fn finish_acquire(
        &self,
        name: &str,
        lease: NewLease,
        req: &LeaseRequest,
        exposed: Exposed,
    ) -> Result<Acquired> {
        match exposed.devices {
            Ok(mut devices) => {
                let mut notes = Vec::new();
                if let Some(thin) = &exposed.thin {
                    let (meta, pvs) = &**thin;
                    self.thin_devices(meta, pvs, &mut devices, req.devices, &mut notes);
                }
                Ok(Acquired {
                    pool: name.to_string(),
                    session: lease.session,
                    owner: req.owner.clone(),
                    kept: req.keep,
                    devices,
                    reaped: Vec::new(),
                    notes,
                    attached: exposed.attached,
                })
            }
            Err(err) => {
                let _ = self.release(name, &lease.session);
                Err(err)
            }
        }
    }

    pub fn release(&self, name: &str, session: &str) -> Result<Vec<String>> {
        self.with_pool(name, |e, rec| self.release_on(e, rec, name, session))
    }

    fn release_on(
        &self,
        e: &Engine,
        rec: &PoolRecord,
        name: &str,
        session: &str,
    ) -> Result<Vec<String>> {
        for _ in 0..3 {
            let (v, _) = e.read_vg(&rec.vg)?;
            let r = release_targets(&v.meta, name, session)?;
            self.let_go(&v.meta, &r)?;
            let path_of = |key: &str| v.device_of(key).map(|d| d.path.clone());
            if devpool_engine::giveback::lvs_hold_data(&v.meta, &path_of, &r.remove) {
                e.give_back(&rec.vg, &r.remove)?;
            }
            if remove_all(e, &rec.vg, r.remove)? {
                return Ok(r.lvs);
            }
        }
        Err(PoolError::Refused(format!(
            "lease '{session}' kept changing while it was released; try again"
        )))
    }

    /// Before a release's commit: detach the loop devices of its volumes
    /// and stop the servers of everything it removes.
    pub(crate) fn let_go(&self, meta: &VgMetadata, r: &ReleaseTargets) -> Result<()> {
        self.let_go_known(meta, r, &[])
    }

    /// [`Self::let_go`], detaching the loop devices in `known` directly;
    /// only volumes whose device is not among them cost a scan of every
    /// attached loop device.
    pub(crate) fn let_go_known(
        &self,
        meta: &VgMetadata,
        r: &ReleaseTargets,
        known: &[loopdev::Attached],
    ) -> Result<()> {
        if self.dry_run {
            return Ok(());
        }
        // Nothing is let go while a mount or a holder still uses a volume.
        let all_known = r.remove.iter().all(|lv| {
            meta.lv(lv)
                .is_some_and(|l| known.iter().any(|a| a.lv_uuid == l.id.raw_str()))
        });
        let listed;
        let attached = if all_known {
            known
        } else {
            listed = loopdev::list();
            &listed[..]
        };
        let servers = || self.server_pids(meta, &r.remove);
        refuse_if_in_use(meta, &r.remove, attached, &servers, "release")?;
        let loops = loops_of(meta, &r.lvs, attached);
        if let Err(users) = detach_unless_used(&loops, &own_dm(meta)) {
            return Err(refusal("release", &users));
        }
        self.stop_servers(meta, &r.remove)?;
        remove_dm_devices(meta, &r.remove)?;
        Ok(())
    }

    pub fn leases(&self, name: &str) -> Result<Vec<Lease>> {
        let v = self.read_vg(name)?;
        Ok(lease::leases(&v.meta))
    }

    /// Remove every lease whose owner is dead (kept ones only with
    /// `include_kept`); report what was removed and what was kept, and why.
    pub fn cleanup(&self, name: &str, include_kept: bool) -> Result<CleanupReport> {
        self.with_pool(name, |e, rec| self.cleanup_on(e, rec, name, include_kept))
    }

    fn cleanup_on(
        &self,
        e: &Engine,
        rec: &PoolRecord,
        name: &str,
        include_kept: bool,
    ) -> Result<CleanupReport> {
        for _ in 0..3 {
            // Read and detach under the VG's shared lock: a concurrent
            // acquire attaches its loop devices only after its commit, so a
            // device seen here whose volume is not in this read has really
            // lost its volume (a stray over extents a new lease may get).
            let lock = e.hold_vg_shared(&rec.vg)?;
            let (v, _) = e.read_vg(&rec.vg)?;
            let mut report = CleanupReport {
                pool: name.to_string(),
                ..Default::default()
            };
            let mut lvs = Vec::new();
            let attached = loopdev::list();
            let ours = own_dm(&v.meta);
            for l in lease::leases(&v.meta) {
                match (&l.liveness, l.kept && !include_kept) {
                    (Liveness::Dead(_), false) => {
                        let mine: Vec<String> = l.volumes.iter().map(|v| v.lv.clone()).collect();
                        let mut family = with_snapshots(&v.meta, mine.clone());
                        family.extend(crate::thin::thin_snapshots_of(&v.meta, &mine));
                        let servers = || self.server_pids(&v.meta, &family);
                        let mut users = in_use(&v.meta, &family, &attached, &servers);
                        // A dry run stops at the plan: the devices stay.
                        if users.is_empty() && !self.dry_run {
                            match detach_unless_used(&loops_of(&v.meta, &mine, &attached), &ours) {
                                Ok(done) => report.detached.extend(done),
                                Err(open) => users = open,
                            }
                        }
                        if !users.is_empty() {
                            report.kept.push((
                                l.session.clone(),
                                format!(
                                    "owner is gone, but its volumes are still in use ({}); unmount them (or stop what has them open) and run cleanup again",
                                    users.join("; ")
                                ),
                            ));
                            continue;
                        }
                        lvs.extend(mine);
                        report.removed.push(l);
                    }
                    (Liveness::Dead(_), true) => report
                        .kept
                        .push((l.session.clone(), "kept (--kept removes it)".into())),
                    (Liveness::Alive, _) => report
                        .kept
                        .push((l.session.clone(), "owner is alive".into())),
                    (Liveness::OtherHost(h), _) => report.kept.push((l.session.clone(), h.clone())),
                }
            }
            let thin_snaps = crate::thin::thin_snapshots_of(&v.meta, &lvs);
            lvs.extend(thin_snaps);
            // A dry run stops at the plan: devices and servers stay.
            if !self.dry_run {
                report.detached.extend(detach_loops(&v, &lvs, true));
                self.stop_servers(&v.meta, &lvs)?;
                report.detached.extend(remove_dm_devices(&v.meta, &lvs)?);
            }
            drop(lock);
            if lvs.is_empty() {
                return Ok(report);
            }
            if remove_all(e, &rec.vg, with_snapshots(&v.meta, lvs))? {
                return Ok(report);
            }
        }
        Err(PoolError::Refused(format!(
            "pool '{name}' kept changing during cleanup; try again"
        )))
    }

    /// Resize a leased volume; its loop device follows.
    pub fn resize(&self, name: &str, lv: &str, size: SizeArg, confirmed: bool) -> Result<u64> {
        self.with_pool(name, |e, rec| self.resize_on(e, rec, lv, size, confirmed))
    }

    fn resize_on(
        &self,
        e: &Engine,
        rec: &PoolRecord,
        lv: &str,
        size: SizeArg,
        confirmed: bool,
    ) -> Result<u64> {
        let shrinking = matches!(size.sign, Some(devpool_format::units::Sign::Minus));
        let op = Operation::LvResize {
            vg: rec.vg.clone(),
            name: lv.to_string(),
            size,
        };
        let plan = e.plan(&op)?;
        let meta = plan
            .new_metadata()
            .ok_or_else(|| PoolError::Invalid("resize: the plan has no metadata".into()))?;
        let before = plan
            .old_metadata()
            .and_then(|m| m.lv(lv))
            .map(|l| l.extent_count())
            .unwrap_or(0);
        let after = meta.lv(lv).map(|l| l.extent_count()).unwrap_or(0);
        if (shrinking || after < before) && !confirmed {
            return Err(PoolError::NeedsConfirmation {
                what: format!("resize {lv}"),
                reasons: vec![format!(
                    "shrinking {lv} from {} to {} bytes loses the data past the new end",
                    before * meta.extent_size.bytes().0,
                    after * meta.extent_size.bytes().0
                )],
            });
        }
        let uuid = meta
            .lv(lv)
            .map(|l| l.id.raw_str().to_string())
            .unwrap_or_default();
        if let Some(d) = crate::dmdev::active_for_lvs(meta, [uuid.as_str()]).first() {
            return Err(PoolError::Refused(format!(
                "resize of {lv} refused: device-mapper has it active as {} ({}), which would go on mapping the old extents; stop the server that serves it first",
                d.name,
                d.node().display()
            )));
        }
        let attached: Vec<_> = loopdev::list()
            .into_iter()
            .filter(|a| a.lv_uuid == uuid)
            .collect();
        let window = contiguous_extent(meta, lv, |k| plan.pv_path(k).map(Path::to_path_buf));
        if let Err(err) = &window
            && !attached.is_empty()
        {
            return Err(PoolError::Refused(format!(
                "resize of {lv} refused: {err} (its loop device could not follow)"
            )));
        }
        e.execute(&plan)?;
        if let Ok((_, offset, bytes)) = window {
            for a in &attached {
                loopdev::set_window(a, offset, bytes)?;
            }
        }
        Ok(after * meta.extent_size.bytes().0)
    }

    /// Punch the written data of `lvs` (being released) out of the pool's
    /// image files in bounded rounds before their commit (see
    /// `devpool_engine::giveback`); `meta` is the view the release used.
    pub(crate) fn give_back(&self, name: &str, meta: &VgMetadata, lvs: &[String]) -> Result<()> {
        // devpool writes each PV's device path into the metadata.
        let path_of = |key: &str| meta.pv(key)?.device.as_ref().map(PathBuf::from);
        if !devpool_engine::giveback::lvs_hold_data(meta, &path_of, lvs) {
            return Ok(());
        }
        self.with_pool(name, |e, rec| {
            e.give_back(&rec.vg, lvs).map(|_| ()).map_err(Into::into)
        })
    }

    /// Discard the free extents of pool `name` (see `Operation::VgTrim`).
    pub fn trim(&self, name: &str) -> Result<TrimReport> {
        self.with_pool(name, |e, rec| {
            let (plan, _) = e.apply(
                &Operation::VgTrim {
                    name: rec.vg.clone(),
                },
                true,
            )?;
            let lens: Vec<u64> = plan
                .steps
                .iter()
                .filter_map(|s| match s {
                    devpool_engine::plan::Step::DiscardRange { len, .. } => Some(*len),
                    _ => None,
                })
                .collect();
            Ok(TrimReport {
                pool: name.to_string(),
                discarded_bytes: lens.iter().sum(),
                ranges: lens.len(),
                images: rec
                    .devices
                    .iter()
                    .filter_map(|d| crate::hostspace::ImageSpace::of(d))
                    .collect(),
            })
        })
    }

    /// Remove pool `name`: reap orphans, refuse while live leases exist
    /// (unless `force`), remove the VG and PV labels, optionally wipe.
    pub fn teardown(
        &self,
        name: &str,
        force: bool,
        wipe: bool,
        confirmed: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<CleanupReport> {
        if self.dry_run {
            return Err(self.teardown_plan(name, force, wipe)?.into());
        }
        let report = self.cleanup(name, false)?;
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            refuse_live_leases(name, &v.meta, force)?;
            if !confirmed {
                let mut reasons = vec![format!(
                    "pool '{name}' (VG {}) on {} is removed with its {} volume(s)",
                    rec.vg,
                    rec.devices
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    v.meta.lvs.len()
                )];
                if wipe {
                    reasons.push("the device's contents are discarded".into());
                }
                return Err(PoolError::NeedsConfirmation {
                    what: format!("pool teardown {name}"),
                    reasons,
                });
            }
            let all: Vec<String> = v.meta.lvs.iter().map(|l| l.name.clone()).collect();
            let servers = || self.server_pids(&v.meta, &all);
            let attached = loopdev::list();
            refuse_if_in_use(&v.meta, &all, &attached, &servers, "teardown")?;
            if let Err(users) =
                detach_unless_used(&loops_of(&v.meta, &all, &attached), &own_dm(&v.meta))
            {
                return Err(refusal("teardown", &users));
            }
            self.stop_servers(&v.meta, &all)?;
            remove_dm_devices(&v.meta, &all)?;
            e.apply(
                &Operation::VgRemove {
                    name: rec.vg.clone(),
                },
                true,
            )?;
            for d in &rec.devices {
                e.apply(&Operation::PvRemove { path: d.clone() }, true)?;
            }
            for d in &rec.devices {
                if rec.created_image {
                    std::fs::remove_file(d).map_err(|err| PoolError::io(d, "remove image", err))?;
                } else if wipe {
                    crate::wipe::wipe(d, progress)?;
                }
            }
            let _ = std::fs::remove_file(self.record_path(name));
            Ok(())
        })?;
        Ok(report)
    }
}

impl Pools {
    /// What `teardown` would do, as the VG removal's plan with the steps
    /// around it (devices detached, servers stopped, PV labels removed, the
    /// image deleted or the device wiped) in its notes; nothing is changed.
    /// Orphan leases are not reaped first: the VG's removal takes them.
    fn teardown_plan(&self, name: &str, force: bool, wipe: bool) -> Result<EngineError> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            refuse_live_leases(name, &v.meta, force)?;
            let mut plan = e.plan(&Operation::VgRemove {
                name: rec.vg.clone(),
            })?;
            let last = plan.steps.len();
            let mut before = Vec::new();
            let uuids: std::collections::HashMap<&str, &str> = v
                .meta
                .lvs
                .iter()
                .map(|l| (l.id.raw_str(), l.name.as_str()))
                .collect();
            for a in loopdev::list() {
                if let Some(lv) = uuids.get(a.lv_uuid.as_str()) {
                    before.push(format!(
                        "before step 1: detach {} ({lv})",
                        a.device.display()
                    ));
                }
            }
            for l in &v.meta.lvs {
                let pids = servers::serving(&self.state_dir, l.id.raw_str());
                if !pids.is_empty() {
                    before.push(format!(
                        "before step 1: stop the server(s) of {} (pid {})",
                        l.name,
                        pids.iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            let mut after = Vec::new();
            for d in &rec.devices {
                after.push(format!(
                    "after step {last}: remove the PV label of {}",
                    d.display()
                ));
                after.push(if rec.created_image {
                    format!(
                        "after step {last}: delete the image file {} (devpool created it)",
                        d.display()
                    )
                } else if wipe {
                    format!("after step {last}: discard (wipe) all of {}", d.display())
                } else {
                    format!(
                        "after step {last}: leave the rest of {} as it is (no --wipe)",
                        d.display()
                    )
                });
            }
            after.push(format!(
                "after step {last}: forget the pool record {}",
                self.record_path(name).display()
            ));
            plan.notes.splice(0..0, before);
            plan.notes.extend(after);
            Ok(EngineError::DryRun(Box::new(plan)))
        })
    }

    /// Stop devpool's servers of `lvs` (NBD, vhost-user-blk, FUSE) and wait
    /// until they have flushed and let go, before their extents are freed.
    /// Stop the servers of `lvs` and of their snapshots.
    pub(crate) fn stop_servers(&self, meta: &VgMetadata, lvs: &[String]) -> Result<()> {
        let uuids = served_uuids(meta, lvs);
        if !uuids.is_empty() {
            servers::stop(&self.state_dir, &uuids, SERVER_STOP_TIMEOUT)?;
        }
        Ok(())
    }

    /// The PIDs of the servers [`Self::stop_servers`] would stop.
    fn server_pids(&self, meta: &VgMetadata, lvs: &[String]) -> Vec<u32> {
        served_uuids(meta, lvs)
            .into_iter()
            .flat_map(|u| servers::serving(&self.state_dir, u))
            .collect()
    }

    /// Where a volume is and who holds it: what a server needs to serve it.
    pub fn locate(&self, name: &str, lv: &str) -> Result<Located> {
        // A PV added to the pool since it was remembered shows up missing:
        // that is a reason to rediscover, not to serve half a volume.
        let v = self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            if !v.is_complete() {
                return Err(EngineError::MissingPvs {
                    vg: rec.vg.clone(),
                    missing: v.health.missing_pvs.join(", "),
                }
                .into());
            }
            Ok(v)
        })?;
        let meta = Arc::clone(&v.meta);
        let l = meta.lv(lv).ok_or_else(|| {
            PoolError::Invalid(format!(
                "no volume '{lv}' in pool '{name}' (see 'devpool pool status {name}')"
            ))
        })?;
        // A snapshot belongs to the lease of its origin.
        let owner_lv = devpool_engine::ops::snapshot::find_snapshot(&meta, lv)
            .map(|s| s.origin)
            .unwrap_or_else(|| lv.to_string());
        // A thin snapshot too, up its chain of origins.
        let owner_session = crate::thin::lease_of_thin(&meta, &owner_lv);
        let lease = lease::leases(&meta).into_iter().find(|x| {
            x.volumes.iter().any(|vol| vol.lv == owner_lv)
                || owner_session.as_deref() == Some(x.session.as_str())
        });
        let pvs = meta
            .pvs
            .iter()
            .filter_map(|p| v.device_of(&p.key).map(|d| (p.key.clone(), d.path.clone())))
            .collect();
        Ok(Located {
            pool: name.to_string(),
            lv: l.clone(),
            lease,
            pvs,
            meta,
        })
    }
}

/// Teardown's refusal (unless `force`) while `meta` has live or kept leases.
fn refuse_live_leases(name: &str, meta: &VgMetadata, force: bool) -> Result<()> {
    let live: Vec<String> = lease::leases(meta)
        .into_iter()
        .filter(|l| !matches!(l.liveness, Liveness::Dead(_)) || l.kept)
        .map(|l| l.session)
        .collect();
    if live.is_empty() || force {
        return Ok(());
    }
    Err(PoolError::Refused(format!(
        "pool '{name}' has {} live or kept lease(s): {} (release them, or pass --force)",
        live.len(),
        live.join(", ")
    )))
}

/// See [`Pools::locate`].
#[derive(Debug, Clone)]
pub struct Located {
    pub pool: String,
    pub meta: Arc<VgMetadata>,
    pub lv: devpool_format::metadata::LvMeta,
    /// The lease the volume belongs to, if any.
    pub lease: Option<Lease>,
    /// Each PV's key in the VG and its device path.
    pub pvs: Vec<(String, PathBuf)>,
}

/// How long release waits for a volume's server to finish and flush.
const SERVER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Detach the loop devices of `lvs`, and with `strays` any devpool loop
/// device over the VG's PVs whose volume no longer exists; one pass over the
/// attached devices.
fn detach_loops(v: &LoadedVg, lvs: &[String], strays: bool) -> Vec<PathBuf> {
    let pv_files: Vec<&Path> = v
        .devices
        .iter()
        .flatten()
        .map(|d| d.path.as_path())
        .collect();
    detach_marked(&v.meta, lvs, strays.then_some(&pv_files[..]))
}

/// Remove the device-mapper devices of `lvs` (after their servers stopped:
/// a server that was killed leaves its device behind), then the loop
/// devices under them; their nodes. Thin volumes' pool devices go too once
/// nothing is stacked on them (while something is, the release's commit
/// sends its deletions to dm-thin). One still open goes at its last close, as a
/// detached loop device does; one the kernel will not remove stops the
/// release before its commit.
fn remove_dm_devices(meta: &VgMetadata, lvs: &[String]) -> Result<Vec<PathBuf>> {
    let uuids = lvs
        .iter()
        .filter_map(|n| meta.lv(n))
        .map(|l| l.id.raw_str());
    let thin_pool = devpool_engine::ops::thin::the_thin_pool(meta);
    // A thin pool's shared devices change under its thin lock (see
    // `activate::activate_lv`).
    let _thin = match &thin_pool {
        Some(_) if !crate::dmdev::list().is_empty() => Some(devpool_engine::lock::lock_thin(
            &devpool_engine::lock::default_dir(),
            &meta.name,
        )?),
        _ => None,
    };
    let shared = match &thin_pool {
        Some(p) => crate::activate::pool_devices(meta, p),
        None => Vec::new(),
    };
    let own: Vec<DmDevice> = crate::dmdev::active_for_lvs(meta, uuids)
        .into_iter()
        .filter(|d| !shared.contains(d))
        .collect();
    let gone = crate::dmdev::remove_stack(&own, &shared)?;
    Ok(gone
        .into_iter()
        .map(|n| PathBuf::from("/dev/mapper").join(n))
        .collect())
}

/// The uuids of `lvs` and of their snapshots: what their servers serve.
fn served_uuids<'m>(meta: &'m VgMetadata, lvs: &[String]) -> Vec<&'m str> {
    let snapshots = devpool_engine::ops::snapshot::snapshots_of(meta, lvs);
    lvs.iter()
        .chain(&snapshots)
        .filter_map(|lv| meta.lv(lv).map(|l| l.id.raw_str()))
        .collect()
}

/// What still uses the loop and device-mapper devices of `lvs` outside
/// devpool: mounts (in any mount namespace), swap, devices built on them
/// other than the pool's own dm devices, programs holding them exclusively,
/// and programs that have one of their dm devices open. Freeing their
/// extents now would hand a live file system's blocks, or a live writer's
/// target, to the next lease. `attached`: the loop devices to look at
/// (devpool's, by their marks). `servers`: the PIDs of devpool's own
/// servers of these volumes, which the caller stops, so their descriptors
/// do not count (asked for only when a scan is needed).
/// Each device costs one exclusive open (the kernel refuses it while the
/// device or a partition of it is mounted or claimed); `/proc` is scanned
/// only to name a claim's holder, or when a dm device is open. A program
/// that merely has a loop device open is found when it is detached
/// ([`detach_unless_used`]).
fn in_use(
    meta: &VgMetadata,
    lvs: &[String],
    attached: &[loopdev::Attached],
    servers: &dyn Fn() -> Vec<u32>,
) -> Vec<String> {
    let uuids: Vec<&str> = lvs
        .iter()
        .filter_map(|n| meta.lv(n))
        .map(|l| l.id.raw_str())
        .collect();
    if uuids.is_empty() {
        return Vec::new();
    }
    let dm = crate::dmdev::active_for_lvs(meta, uuids.iter().copied());
    let devices: Vec<(PathBuf, crate::sysblk::DevNum)> = loops_of(meta, lvs, attached)
        .into_iter()
        .map(|a| a.device)
        .chain(dm.iter().map(|d| d.node()))
        .filter_map(|dev| crate::sysblk::block_devnum(&dev).map(|d| (dev, d)))
        .collect();
    if devices.is_empty() {
        return Vec::new();
    }
    let ours = own_dm(meta);
    let (mut mounts, mut swaps) = (None, None);
    let mut found = Vec::new();
    // Claimed by something that is no mount, swap or device: a program's
    // exclusive open, or a mount in another mount namespace.
    let mut claimed = Vec::new();
    for (dev, d) in &devices {
        if !crate::sysblk::held_exclusively(dev) {
            continue;
        }
        let mounts = mounts.get_or_insert_with(crate::sysblk::mounts);
        let swaps = swaps.get_or_insert_with(crate::sysblk::swaps);
        let users = crate::sysblk::users(*d, &ours, mounts, swaps);
        // Claimed only by the pool's own dm devices, which go with it.
        if users.is_empty() && held_only_by(*d, &ours) {
            continue;
        }
        if users.is_empty() {
            claimed.push((dev, *d));
        }
        found.extend(users);
    }
    // dm devices open other than by devices stacked on them (the kernel's
    // count; sysfs has none).
    let open_dm = dm.iter().filter(|d| {
        let stacked = crate::sysblk::holders((d.major, d.minor)).len() as i32;
        devpool_engine::dm::info(&d.name)
            .ok()
            .flatten()
            .is_some_and(|i| i.open_count > stacked)
    });
    let scan: Vec<crate::sysblk::DevNum> = claimed
        .iter()
        .map(|(_, d)| *d)
        .chain(open_dm.map(|d| (d.major, d.minor)))
        .collect();
    let open = if scan.is_empty() {
        Vec::new()
    } else {
        crate::sysblk::lasting_openers(&scan, &servers())
    };
    for (dev, d) in claimed {
        if !open.iter().any(|o| o.dev == d) {
            found.push(format!(
                "{} is held exclusively (mounted in another mount namespace, or claimed by a program)",
                dev.display()
            ));
        }
    }
    found.extend(open.iter().map(|o| o.to_string()));
    found
}

/// Detach `loops` (devpool's) only while no program has them open, with the
/// kernel's own test ([`loopdev::detach_unless_used`]: nothing can open one
/// between the check and the detach). A device opened for a moment (udev's
/// `blkid` after a change, another tool's probe) is tried again for about
/// a third of a second. One still open after that is left attached, the
/// ones detached before it are attached again, and its users are returned.
/// Devices held only by the pool's own dm devices (`ours`) are let go last,
/// at their last close, as those go.
fn detach_unless_used(
    loops: &[loopdev::Attached],
    ours: &[crate::sysblk::DevNum],
) -> std::result::Result<Vec<PathBuf>, Vec<String>> {
    let (stacked, plain): (Vec<&loopdev::Attached>, Vec<&loopdev::Attached>) =
        loops.iter().partition(|a| {
            crate::sysblk::block_devnum(&a.device).is_some_and(|d| held_only_by(d, ours))
        });
    let mut detached: Vec<&loopdev::Attached> = Vec::new();
    let refuse = |detached: &[&loopdev::Attached], users: Vec<String>| {
        for d in detached {
            let _ = loopdev::attach(&d.backing, d.offset, d.size, &d.lv_uuid);
        }
        Err(users)
    };
    for a in plain {
        match loopdev::detach_unless_used(a) {
            Ok(loopdev::Detach::Done) => detached.push(a),
            Ok(loopdev::Detach::Gone) => {}
            Ok(loopdev::Detach::InUse(users)) => return refuse(&detached, users),
            Err(e) => return refuse(&detached, vec![e.to_string()]),
        }
    }
    let mut done: Vec<PathBuf> = detached.iter().map(|a| a.device.clone()).collect();
    done.extend(
        stacked
            .into_iter()
            .filter(|a| loopdev::give_back(a))
            .map(|a| a.device.clone()),
    );
    Ok(done)
}

/// Refuse to free `lvs` (for `what`) while [`in_use`] finds users.
fn refuse_if_in_use(
    meta: &VgMetadata,
    lvs: &[String],
    attached: &[loopdev::Attached],
    servers: &dyn Fn() -> Vec<u32>,
    what: &str,
) -> Result<()> {
    let users = in_use(meta, lvs, attached, servers);
    if users.is_empty() {
        return Ok(());
    }
    Err(refusal(what, &users))
}

/// `what` (release, teardown) refused for `users` of the volumes.
fn refusal(what: &str, users: &[String]) -> PoolError {
    PoolError::Refused(format!(
        "{what} refused: its volumes are still in use ({}); their extents would go to the next lease while a file system or a program still uses them. Unmount them (or stop what has them open) first",
        users.join("; ")
    ))
}

/// The loop devices of `lvs` among `attached`.
fn loops_of(
    meta: &VgMetadata,
    lvs: &[String],
    attached: &[loopdev::Attached],
) -> Vec<loopdev::Attached> {
    let uuids: Vec<&str> = lvs
        .iter()
        .filter_map(|n| meta.lv(n))
        .map(|l| l.id.raw_str())
        .collect();
    attached
        .iter()
        .filter(|a| uuids.contains(&a.lv_uuid.as_str()))
        .cloned()
        .collect()
}

/// Whether devices are stacked on `d` and all of them are among `ours`.
fn held_only_by(d: crate::sysblk::DevNum, ours: &[crate::sysblk::DevNum]) -> bool {
    let holders = crate::sysblk::holders(d);
    !holders.is_empty() && holders.iter().all(|h| ours.contains(h))
}

/// The device numbers of the VG's own dm devices.
fn own_dm(meta: &VgMetadata) -> Vec<crate::sysblk::DevNum> {
    crate::dmdev::of_vg(meta)
        .iter()
        .map(|d| (d.major, d.minor))
        .collect()
}

fn detach_marked(meta: &VgMetadata, lvs: &[String], strays_on: Option<&[&Path]>) -> Vec<PathBuf> {
    let doomed: Vec<String> = lvs
        .iter()
        .filter_map(|n| meta.lv(n).map(|l| l.id.raw_str().to_string()))
        .collect();
    let live: std::collections::HashSet<&str> = meta.lvs.iter().map(|l| l.id.raw_str()).collect();
    let mut done = Vec::new();
    for a in loopdev::list() {
        let stray = strays_on.is_some_and(|pvs| {
            !live.contains(a.lv_uuid.as_str()) && pvs.iter().any(|p| same_file(p, &a.backing))
        });
        if (stray || doomed.contains(&a.lv_uuid)) && loopdev::give_back(&a) {
            done.push(a.device);
        }
    }
    done
}

fn summary(name: &str, v: &LoadedVg, leases: usize) -> PoolSummary {
    let es = v.meta.extent_size.bytes().0;
    PoolSummary {
        pool: name.to_string(),
        vg: v.meta.name.clone(),
        devices: v.devices.iter().flatten().map(|d| d.path.clone()).collect(),
        size_bytes: v.meta.extent_count() * es,
        free_bytes: devpool_engine::ops::vg_free_extents(&v.meta) * es,
        leases,
        volumes: v.meta.lvs.len(),
    }
}

/// The first and last MiB of a device, saved before setup writes to it.
struct Backup {
    head: Vec<u8>,
    tail: Vec<u8>,
    tail_at: u64,
}

const BACKUP: u64 = 1 << 20;

impl Backup {
    fn take(path: &Path, size: u64) -> Result<Backup> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path).map_err(|e| PoolError::io(path, "open", e))?;
        let n = BACKUP.min(size);
        let mut head = vec![0u8; n as usize];
        f.read_exact_at(&mut head, 0)
            .map_err(|e| PoolError::io(path, "back up the first MiB", e))?;
        let tail_at = size - n;
        let mut tail = vec![0u8; n as usize];
        f.read_exact_at(&mut tail, tail_at)
            .map_err(|e| PoolError::io(path, "back up the last MiB", e))?;
        Ok(Backup {
            head,
            tail,
            tail_at,
        })
    }

    fn restore(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| PoolError::io(path, "open", e))?;
        f.write_all_at(&self.tail, self.tail_at)
            .and_then(|_| f.write_all_at(&self.head, 0))
            .and_then(|_| f.sync_all())
            .map_err(|e| PoolError::io(path, "restore", e))
    }
}

/// What releasing one lease removes.
#[derive(Debug, Clone)]
pub(crate) struct ReleaseTargets {
    /// The lease's own volumes.
    pub lvs: Vec<String>,
    /// Those, their thin snapshots and their copy-on-write snapshots
    /// (snapshots first: an origin with snapshots cannot go).
    pub remove: Vec<String>,
}

pub(crate) fn release_targets(
    meta: &VgMetadata,
    name: &str,
    session: &str,
) -> Result<ReleaseTargets> {
    let lvs: Vec<String> = meta
        .lvs
        .iter()
        .filter(|l| lease::session_of(l) == Some(session))
        .map(|l| l.name.clone())
        .collect();
    if lvs.is_empty() {
        return Err(PoolError::Invalid(format!(
            "no lease '{session}' in pool '{name}' (see 'devpool lease list')"
        )));
    }
    let mut all = lvs.clone();
    all.extend(crate::thin::thin_snapshots_of(meta, &lvs));
    Ok(ReleaseTargets {
        remove: with_snapshots(meta, all),
        lvs,
    })
}

/// `lvs` preceded by their copy-on-write snapshots.
fn with_snapshots(meta: &VgMetadata, lvs: Vec<String>) -> Vec<String> {
    let mut names = devpool_engine::ops::snapshot::snapshots_of(meta, &lvs);
    names.extend(lvs);
    names
}

/// Remove `names` in one commit; false when someone (a cleanup) removed
/// part of them meanwhile, so the caller looks again.
fn remove_all(e: &Engine, vg: &str, names: Vec<String>) -> Result<bool> {
    let op = Operation::LvRemove {
        vg: vg.to_string(),
        names,
    };
    match e.apply(&op, true) {
        Ok(_) => Ok(true),
        Err(EngineError::LvNotFound { .. }) => Ok(false),
        Err(err) => Err(err.into()),
    }
}
