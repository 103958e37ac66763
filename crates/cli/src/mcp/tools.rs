//! The tools: their arguments (the JSON schemas agents see come from these
//! types and their doc comments) and what each call does.

use super::{Call, Reply};
use crate::args::{AccelArg, AttachArg, VmArgs};
use crate::pool_cmds::{human_size, pools, setup_text};
use anyhow::{Result, anyhow, bail};
use devpool_format::units::{Bytes, SizeArg};
use devpool_pool::PoolError;
use rmcp::model::Tool;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The longest string argument taken (paths, names, commands).
const MAX_STRING: usize = 64 * 1024;

#[derive(Deserialize, JsonSchema)]
struct Setup {
    /// The dedicated disk, partition or image file to turn into a pool. Safety
    /// checks refuse mounted, in-use, fstab-listed, RAID, LUKS and foreign LVM
    /// devices. An image file that does not exist is created sparse.
    device_path: String,
    /// The pool's name (its VG is `devpool-<name>`). Default: `default`.
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
    /// Size of a new image file, e.g. 64G.
    image_size: Option<String>,
    /// Also create a thin pool in it (leases become thin volumes).
    #[serde(default)]
    thin: bool,
    /// Without it, nothing changes: the reply is what setup would do and what
    /// the safety checks found. With true, setup runs.
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize, JsonSchema)]
struct PoolOnly {
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
struct Nothing {}

#[derive(Deserialize, JsonSchema)]
struct Resize {
    /// The volume's LV name, as device_pool_status lists it; or the thin
    /// pool's LV (`thinpool`) to grow its data space.
    lv_name: String,
    /// New size: 30G, +10G (grow by) or -5G (shrink by). Shrinking needs confirm.
    new_size: String,
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
    /// Needed to shrink (data past the new end is lost); without it a shrink
    /// only returns its plan.
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum SnapshotAction {
    Create,
    Delete,
    Merge,
    List,
}

#[derive(Deserialize, JsonSchema)]
struct Snapshot {
    /// create, delete, merge (roll the volume back to the snapshot, then
    /// delete it; needs confirm) or list.
    action: SnapshotAction,
    /// The volume (create) — its LV name.
    lv_name: Option<String>,
    /// The snapshot's name (create, delete, merge).
    snapshot_name: Option<String>,
    /// Copy-on-write store size for a snapshot of a plain volume, e.g. 2G
    /// (default: a fifth of the volume). Thin snapshots take none.
    size: Option<String>,
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
    /// Needed for merge; without it, merge returns its plan.
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize, JsonSchema)]
struct Cleanup {
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
    /// Also remove kept leases whose owner is dead.
    #[serde(default)]
    kept: bool,
}

#[derive(Deserialize, JsonSchema)]
struct Teardown {
    /// The pool to remove (its VG and PV labels).
    pool_name: String,
    /// Discard (or zero) the whole device afterwards; progress is reported.
    #[serde(default)]
    wipe_data: bool,
    /// Remove it even while live leases exist.
    #[serde(default)]
    force: bool,
    /// Without it nothing changes: the reply is the plan.
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize, JsonSchema)]
struct Acquire {
    /// Volumes as ROLE:SIZE,… e.g. "test:10G,scratch:10G" (roles test,
    /// scratch, pool1.., logwrites also name fstests variables).
    volumes: Option<String>,
    /// Instead of volumes: a profile, e.g. "fstests" (test, pool1..pool5, logwrites).
    profile: Option<String>,
    /// Size of each profile volume, e.g. 10G.
    size: Option<String>,
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
    /// Keep the lease when this server ends (never reaped; cleanup with kept removes it).
    #[serde(default)]
    keep: bool,
}

#[derive(Deserialize, JsonSchema)]
struct Release {
    /// The lease's session id (from device_pool_lease_acquire or device_pool_status).
    session: String,
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
}

/// How to boot the guest; the VM tools take these arguments besides their
/// own (parsed separately, so that a bad one is named in the error).
#[derive(Deserialize, JsonSchema)]
struct Guest {
    /// The kernel to boot: a bzImage, or a built kernel tree (its
    /// arch/x86/boot/bzImage is booted).
    kernel_path: Option<String>,
    /// Or a Debian linux-image-*.deb (its vmlinuz and modules).
    kernel_deb: Option<String>,
    /// The kernel's module tree (lib/modules/<version>, or a root holding one
    /// as `make modules_install INSTALL_MOD_PATH=DIR` leaves it). Default:
    /// /lib/modules/<version> when it exists.
    modules_path: Option<String>,
    /// Kill the VM after this many seconds, boot included. Default: 300 for
    /// vm_run, 600 for vm_module_test, 3600 for fstests_vm_boot_and_run.
    timeout: Option<u64>,
    /// Guest memory, e.g. 2G (default).
    memory: Option<String>,
    /// Guest vCPUs (default 2).
    cpus: Option<u32>,
    /// Keep the leased volumes afterwards (listed as kept; cleanup with kept removes them).
    #[serde(default)]
    keep_volumes: bool,
    /// The pool (default: $DEVPOOL_POOL, $KERNELDEV_DEVICE_POOL, else `default`).
    pool_name: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
struct VmRun {
    /// The shell command to run in the guest (busybox sh -c).
    command: String,
    /// Volumes to lease and attach as /dev/vda, /dev/vdb…: ROLE:SIZE,…
    /// Each role is also exported as DEVPOOL_<ROLE> (and TEST_DEV, SCRATCH_DEV…).
    volumes: Option<String>,
    /// Modules to load at boot, e.g. ["xfs"].
    #[serde(default)]
    load_modules: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
struct VmModuleTest {
    /// The module under test: a .ko built for this kernel.
    module_path: String,
    /// Unload/load cycles after the first load (default 10).
    cycles: Option<u32>,
    /// Module parameters for insmod: NAME=VALUE pairs separated by spaces.
    params: Option<String>,
    /// The volume the I/O load runs on while the module is loaded, as
    /// ROLE:SIZE (default test:256M; "" for none).
    volumes: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
struct FstestsRun {
    /// The fstests (xfstests-dev) tree, built (`make` in it). It is shared into
    /// the guest; results come back under results_dir.
    fstests_path: String,
    /// Arguments for fstests' check: test names (["generic/001"]) or a group
    /// (["-g", "quick"], the default).
    tests: Option<Vec<String>>,
    /// File system under test: ext4 (default), xfs or btrfs.
    fstype: Option<String>,
    /// Lease the devices from the device pool (default true). With false,
    /// sparse image files made for this run (and deleted after it) are used.
    use_device_pool: Option<bool>,
    /// Devices as ROLE:SIZE,… (default test:4G,scratch:4G): test is TEST_DEV;
    /// scratch is SCRATCH_DEV, or pool1..N make SCRATCH_DEV_POOL; logwrites.
    volumes: Option<String>,
    /// A saved structured result of an earlier run (a JSON file): the reply
    /// then lists what changed and regressions decide the status.
    baseline_path: Option<String>,
}

fn tool<T: JsonSchema>(name: &'static str, description: &'static str) -> Tool {
    let schema = schemars::schema_for!(T);
    let mut obj = match serde_json::to_value(&schema) {
        Ok(Value::Object(o)) => o,
        _ => serde_json::Map::new(),
    };
    obj.remove("$schema");
    obj.remove("title");
    obj.entry("type").or_insert_with(|| json!("object"));
    obj.entry("properties").or_insert_with(|| json!({}));
    Tool::new(name, description, Arc::new(obj))
}

/// A VM tool: its own arguments and [`Guest`]'s.
fn vm_tool<T: JsonSchema>(name: &'static str, description: &'static str) -> Tool {
    let own = tool::<T>(name, description);
    let guest = tool::<Guest>(name, description);
    let mut schema = (*own.input_schema).clone();
    if let (Some(Value::Object(props)), Some(Value::Object(more))) = (
        schema.get_mut("properties"),
        guest.input_schema.get("properties"),
    ) {
        for (k, v) in more {
            props.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Tool::new(name, description, Arc::new(schema))
}

pub fn list() -> Vec<Tool> {
    vec![
        tool::<Setup>(
            "device_pool_setup",
            "Turn a dedicated disk, partition or image file into a device pool (one PV, VG devpool-<pool_name>). Runs the safety checks; without confirm: true it changes nothing and returns what it found and would do.",
        ),
        tool::<PoolOnly>(
            "device_pool_status",
            "A pool's devices, size, free space, health, leases (owner alive or not), volumes, snapshots and thin pool usage.",
        ),
        tool::<PoolOnly>(
            "device_pool_trim",
            "Give a pool's free space back: discard every free extent (holes in an image file, so its filesystem gets the space back; BLKDISCARD on a disk). Releases already do this for their own volumes; trim catches up on space left written by volumes removed outside devpool.",
        ),
        tool::<Nothing>(
            "device_pool_list",
            "Every pool on this host with size, free space, lease and volume counts.",
        ),
        tool::<Resize>(
            "device_pool_resize",
            "Resize a leased volume (grow at once; shrinking needs confirm: true and returns its plan otherwise).",
        ),
        tool::<Snapshot>(
            "device_pool_snapshot",
            "Snapshots of pool volumes: create (copy-on-write, or instant thin snapshot in a thin pool), delete, merge (roll the volume back; needs confirm: true), list. Snapshots belong to their volume's lease.",
        ),
        tool::<Cleanup>(
            "device_pool_cleanup",
            "Remove leases whose owner is dead (PID gone or reused, or the host rebooted), with their volumes and snapshots.",
        ),
        tool::<Teardown>(
            "device_pool_teardown",
            "Remove a pool: reap orphan leases, refuse while live leases exist unless force, remove VG and PV labels, optionally wipe the device (progress reported). Without confirm: true returns the plan.",
        ),
        tool::<Acquire>(
            "device_pool_lease_acquire",
            "Lease uniquely named volumes for a test run, in one atomic commit; returns the session id and each role's block device. The lease belongs to this server: released when the client disconnects, reaped by cleanup if the server dies. keep: true keeps it.",
        ),
        tool::<Release>(
            "device_pool_lease_release",
            "Release a lease: remove its volumes and snapshots in one commit.",
        ),
        vm_tool::<VmRun>(
            "vm_run",
            "Boot a kernel in QEMU (KVM when it works, else TCG) with leased volumes attached as /dev/vd*, run a command, and report its exit status and output; the volumes are released afterwards. Progress follows the guest console; cancelling kills the VM and releases its volumes.",
        ),
        vm_tool::<VmModuleTest>(
            "vm_module_test",
            "Test a kernel module in a QEMU guest: modinfo (vermagic), insmod with params, checks that it is loaded, I/O on a leased volume while loaded, unload/load cycles, rmmod; the kernel log is searched for BUG, WARNING, Oops, lockdep and KASAN reports. Returns each step's result and the reports found; passed is false if any step failed or the log has a report.",
        ),
        vm_tool::<FstestsRun>(
            "fstests_vm_boot_and_run",
            "Boot a kernel in QEMU and run fstests' check on devices leased from the pool (TEST_DEV plus SCRATCH_DEV or SCRATCH_DEV_POOL in a generated local.config), then release them. Returns per-test results (failures with the diff against the golden output), a summary, and with baseline_path the changes and regressions since that run. Progress follows the guest console; cancelling kills the VM and releases its volumes.",
        ),
    ]
}

/// Parse a tool's arguments; a type or missing-field error names the tool.
fn args<T: for<'de> Deserialize<'de>>(tool: &str, a: serde_json::Map<String, Value>) -> Result<T> {
    for (k, v) in &a {
        if let Value::String(s) = v
            && s.len() > MAX_STRING
        {
            bail!(
                "{tool}: argument '{k}' is {} bytes long; at most {MAX_STRING} are taken",
                s.len()
            );
        }
    }
    serde_path_to_error::deserialize(Value::Object(a)).map_err(|e| {
        let at = e.path().to_string();
        let e = e.into_inner();
        if at == "." {
            anyhow!("{tool}: bad arguments: {e}")
        } else {
            anyhow!("{tool}: argument '{at}': {e}")
        }
    })
}

fn pool_of(c: &Call, name: Option<String>) -> String {
    name.filter(|s| !s.is_empty())
        .unwrap_or_else(|| crate::pool_cmds::pool_name(&c.g))
}

/// A reply; structured content is always an object (MCP's rule), so a
/// list is wrapped as `{"items": […]}`.
fn reply(summary: impl Into<String>, value: impl serde::Serialize) -> Result<Reply> {
    let value = match serde_json::to_value(value)? {
        v @ Value::Object(_) => v,
        v => json!({ "items": v }),
    };
    Ok(Reply {
        summary: summary.into(),
        value,
    })
}

/// The plan a destructive call returns without `confirm`.
fn plan(tool: &str, what: &str, reasons: &[String]) -> Result<Reply> {
    let mut summary = format!("{what} (nothing changed; call {tool} again with confirm: true):");
    for r in reasons {
        summary.push_str(&format!("\n  - {r}"));
    }
    reply(
        summary,
        json!({"confirmed": false, "changed": false, "plan": what, "reasons": reasons}),
    )
}

pub fn call(name: &str, a: serde_json::Map<String, Value>, c: &Call) -> Result<Reply> {
    match name {
        "device_pool_setup" => setup(args(name, a)?, c),
        "device_pool_status" => {
            let a: PoolOnly = args(name, a)?;
            let pool = pool_of(c, a.pool_name);
            let st = pools(&c.g)?.status(&pool)?;
            let s = &st.summary;
            let health = if st.health.is_empty() {
                "ok".to_string()
            } else {
                st.health.join("; ")
            };
            reply(
                format!(
                    "pool {}: {} free of {}, {} lease(s), health: {health}",
                    s.pool,
                    human_size(s.free_bytes),
                    human_size(s.size_bytes),
                    st.leases.len()
                ),
                &st,
            )
        }
        "device_pool_trim" => {
            let a: PoolOnly = args(name, a)?;
            let pool = pool_of(c, a.pool_name);
            let r = pools(&c.g)?.trim(&pool)?;
            reply(
                format!(
                    "pool {}: discarded {} of free space ({} range(s))",
                    r.pool,
                    devpool_format::units::format_bytes(devpool_format::units::Bytes(
                        r.discarded_bytes
                    )),
                    r.ranges
                ),
                &r,
            )
        }
        "device_pool_list" => {
            let _: Nothing = args(name, a)?;
            let list = pools(&c.g)?.list()?;
            let names: Vec<String> = list
                .iter()
                .map(|s| {
                    format!(
                        "{} ({} free of {})",
                        s.pool,
                        human_size(s.free_bytes),
                        human_size(s.size_bytes)
                    )
                })
                .collect();
            reply(
                if names.is_empty() {
                    "no pools".to_string()
                } else {
                    format!("pools: {}", names.join(", "))
                },
                json!({ "pools": list }),
            )
        }
        "device_pool_resize" => {
            let a: Resize = args(name, a)?;
            let pool = pool_of(c, a.pool_name);
            let size = SizeArg::parse(&a.new_size).map_err(|e| anyhow!("new_size: {e}"))?;
            let p = pools(&c.g)?;
            if p.thin_pool_lv(&pool)?.as_deref() == Some(a.lv_name.as_str()) {
                let t = p.thin_extend(&pool, size)?;
                return reply(
                    format!(
                        "thin pool {}: data {} -> {}",
                        t.pool_lv,
                        human_size(t.data_bytes_before),
                        human_size(t.data_bytes)
                    ),
                    &t,
                );
            }
            match p.resize(&pool, &a.lv_name, size, a.confirm) {
                Err(PoolError::NeedsConfirmation { what, reasons }) => plan(name, &what, &reasons),
                r => {
                    let bytes = r?;
                    reply(
                        format!("{}: now {} ({bytes} bytes)", a.lv_name, human_size(bytes)),
                        json!({"pool": pool, "lv_name": a.lv_name, "size_bytes": bytes}),
                    )
                }
            }
        }
        "device_pool_snapshot" => snapshot(args(name, a)?, c),
        "device_pool_cleanup" => {
            let a: Cleanup = args(name, a)?;
            let pool = pool_of(c, a.pool_name);
            let r = pools(&c.g)?.cleanup(&pool, a.kept)?;
            let removed: Vec<&str> = r.removed.iter().map(|l| l.session.as_str()).collect();
            reply(
                if removed.is_empty() {
                    format!("nothing to clean up in pool '{pool}'")
                } else {
                    format!(
                        "removed {} orphan lease(s): {}",
                        removed.len(),
                        removed.join(", ")
                    )
                },
                &r,
            )
        }
        "device_pool_teardown" => teardown(args(name, a)?, c),
        "device_pool_lease_acquire" => acquire(args(name, a)?, c),
        "device_pool_lease_release" => {
            let a: Release = args(name, a)?;
            let pool = pool_of(c, a.pool_name);
            let lvs = c.with_leases(|l| l.release(&pool, &a.session))?;
            c.owned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(p, s)| !(p == &pool && s == &a.session));
            reply(
                format!("released {} ({} volumes)", a.session, lvs.len()),
                json!({"pool": pool, "session": a.session, "removed": lvs}),
            )
        }
        "vm_run" => vm_run(args(name, a.clone())?, args(name, a)?, c),
        "vm_module_test" => vm_module_test(args(name, a.clone())?, args(name, a)?, c),
        "fstests_vm_boot_and_run" => fstests(args(name, a.clone())?, args(name, a)?, c),
        _ => bail!(
            "unknown tool '{name}'; the tools are: {}",
            list()
                .iter()
                .map(|t| t.name.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn setup(a: Setup, c: &Call) -> Result<Reply> {
    let p = pools(&c.g)?;
    let pool = a
        .pool_name
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let size = a
        .image_size
        .as_deref()
        .map(|s| crate::parse_bytes("image_size", s))
        .transpose()?;
    let device = PathBuf::from(&a.device_path);
    let out = match p.setup(&device, &pool, size, a.confirm) {
        Err(PoolError::NeedsConfirmation { what, reasons }) => {
            return plan("device_pool_setup", &what, &reasons);
        }
        r => r?,
    };
    let thin = if a.thin && p.thin_pool_lv(&pool)?.is_none() {
        Some(p.thin_enable(&pool, None, None, devpool_pool::thin::DEFAULT_THIN_CHUNK)?)
    } else {
        None
    };
    let mut v = serde_json::to_value(&out)?;
    v["thin"] = serde_json::to_value(&thin)?;
    v["confirmed"] = json!(true);
    reply(setup_text(&out), v)
}

fn snapshot(a: Snapshot, c: &Call) -> Result<Reply> {
    let pool = pool_of(c, a.pool_name);
    let p = pools(&c.g)?;
    let need = |v: &Option<String>, what: &str| -> Result<String> {
        v.clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("device_pool_snapshot: this action needs {what}"))
    };
    match a.action {
        SnapshotAction::List => {
            let list = p.snapshots(&pool)?;
            let thin = p.thin_snapshots(&pool)?;
            let lines: Vec<String> = list
                .iter()
                .map(crate::snapshot_cmds::describe)
                .chain(thin.iter().map(crate::snapshot_cmds::describe_thin))
                .collect();
            reply(
                if lines.is_empty() {
                    format!("no snapshots in pool '{pool}'")
                } else {
                    lines.join("\n")
                },
                json!({ "snapshots": list, "thin_snapshots": thin }),
            )
        }
        SnapshotAction::Create => {
            let vol = need(&a.lv_name, "lv_name")?;
            let snap = need(&a.snapshot_name, "snapshot_name")?;
            if p.is_thin_volume(&pool, &vol)? {
                if a.size.is_some() {
                    bail!("size: a thin snapshot shares the thin pool's space; it takes no size");
                }
                let t = p.thin_snapshot_create(&pool, &vol, &snap)?;
                return reply(
                    format!("thin snapshot {} of {} (blocks shared)", t.name, t.origin),
                    &t,
                );
            }
            let size = a
                .size
                .map(|s| SizeArg::parse(&s).map_err(|e| anyhow!("size: {e}")))
                .transpose()?;
            let s = p.snapshot_create(&pool, &vol, &snap, size, Bytes(4096))?;
            reply(
                format!(
                    "snapshot {} of {}: store {}, chunk {}K",
                    s.name,
                    s.origin,
                    human_size(s.size_bytes),
                    s.chunk_bytes / 1024
                ),
                &s,
            )
        }
        SnapshotAction::Delete => {
            let snap = need(&a.snapshot_name, "snapshot_name")?;
            if p.is_thin_volume(&pool, &snap)? {
                let d = p.thin_snapshot_delete(&pool, &snap)?;
                return reply(
                    format!("deleted thin snapshot {} of {}", d.name, d.origin),
                    &d,
                );
            }
            let d = p.snapshot_delete(&pool, &snap)?;
            reply(format!("deleted snapshot {} of {}", d.name, d.origin), &d)
        }
        SnapshotAction::Merge => {
            let snap = need(&a.snapshot_name, "snapshot_name")?;
            if p.is_thin_volume(&pool, &snap)? {
                let r = match p.thin_snapshot_merge(&pool, &snap, a.confirm) {
                    Err(PoolError::NeedsConfirmation { what, reasons }) => {
                        return plan("device_pool_snapshot", &what, &reasons);
                    }
                    r => r?,
                };
                return reply(
                    format!(
                        "merged thin snapshot {} into {} (device {} -> {})",
                        r.name, r.origin, r.old_device_id, r.device_id
                    ),
                    &r,
                );
            }
            let s = p
                .snapshots(&pool)?
                .into_iter()
                .find(|s| s.name == snap || s.snapshot_lv == snap)
                .ok_or_else(|| anyhow!("no snapshot '{snap}' in pool '{pool}'"))?;
            if !a.confirm {
                let (what, reasons) = s.merge_plan();
                return plan("device_pool_snapshot", &what, &reasons);
            }
            let progress = |done: u64, total: u64| {
                c.progress.report(
                    Some(done as f64),
                    Some(total as f64),
                    &format!("merged {done}/{total} chunks"),
                );
            };
            let r = devpool_serve::merge::merge(&p, &pool, &snap, &progress)?;
            reply(
                format!(
                    "merged {} chunk(s) of {} into {}; snapshot deleted",
                    r.chunks, r.name, r.origin
                ),
                &r,
            )
        }
    }
}

fn teardown(a: Teardown, c: &Call) -> Result<Reply> {
    let p = pools(&c.g)?;
    if !a.confirm {
        let st = p.status(&a.pool_name)?;
        let mut reasons: Vec<String> = st
            .summary
            .devices
            .iter()
            .map(|d| {
                format!(
                    "VG {} and the PV label on {} are removed",
                    st.summary.vg,
                    d.display()
                )
            })
            .collect();
        for l in &st.leases {
            reasons.push(format!(
                "lease {} ({} volumes) {}",
                l.lease.session,
                l.devices.len(),
                if a.force {
                    "is removed (force)"
                } else {
                    "is removed if its owner is dead; a live one refuses the teardown"
                }
            ));
        }
        if a.wipe_data {
            reasons.push("the device is discarded (or zeroed) in full".into());
        }
        return plan(
            "device_pool_teardown",
            &format!("tear down pool '{}'", a.pool_name),
            &reasons,
        );
    }
    let progress = |done: u64, total: u64| {
        c.progress
            .report(Some(done as f64), Some(total as f64), "wiping the device");
    };
    let r = p.teardown(&a.pool_name, a.force, a.wipe_data, true, &progress)?;
    reply(format!("pool '{}' torn down", a.pool_name), &r)
}

fn acquire(a: Acquire, c: &Call) -> Result<Reply> {
    let pool = pool_of(c, a.pool_name);
    let specs = match (&a.volumes, &a.profile) {
        (Some(v), _) => devpool_pool::spec::parse_volumes(v)?,
        (None, Some(pr)) => devpool_pool::spec::profile(pr, a.size.as_deref())?,
        (None, None) => bail!("device_pool_lease_acquire: give volumes (ROLE:SIZE,…) or profile"),
    };
    // Through `devpool daemon` when it runs, as the CLI does.
    let want = crate::args::Want {
        volumes: a.volumes.clone(),
        profile: a.profile.clone(),
        size: a.size.clone(),
    };
    let l = c.with_leases(|l| l.acquire(&pool, &want, &specs, &c.owner, a.keep))?;
    if !a.keep {
        c.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pool.clone(), l.session.clone()));
    }
    let devs: Vec<String> = l
        .devices
        .iter()
        .map(|d| format!("{}={}", d.role, d.device_name()))
        .collect();
    reply(
        format!("lease {} in pool '{pool}': {}", l.session, devs.join(" ")),
        &l,
    )
}

/// The kernel image named by kernel_path: the file, or a kernel tree's
/// arch/x86/boot/bzImage.
fn kernel_image(tool: &str, path: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    if !p.is_dir() {
        return Ok(p);
    }
    let image = p.join("arch/x86/boot/bzImage");
    if !image.is_file() {
        bail!(
            "{tool}: kernel_path {path} is a directory without arch/x86/boot/bzImage (build the kernel first, or give the image)"
        );
    }
    Ok(image)
}

/// The CLI's settings for a VM tool call: its pool, and its VM arguments.
fn vm_settings(
    tool: &str,
    a: Guest,
    c: &Call,
    default_timeout: u64,
    load_modules: Vec<String>,
) -> Result<(crate::args::Global, VmArgs)> {
    if a.kernel_path.is_none() == a.kernel_deb.is_none() {
        bail!("{tool}: give kernel_path or kernel_deb (one of them)");
    }
    let mut g = c.g.clone();
    g.pool = Some(pool_of(c, a.pool_name));
    g.json = true;
    let vm = VmArgs {
        kernel: a.kernel_path.map(|k| kernel_image(tool, &k)).transpose()?,
        kernel_deb: a.kernel_deb.map(PathBuf::from),
        modules: a.modules_path.map(PathBuf::from),
        load_module: load_modules,
        add: Vec::new(),
        mem: a.memory.unwrap_or_else(|| "2G".into()),
        cpus: a.cpus.unwrap_or(2),
        boot_retries: 2,
        timeout: a.timeout.unwrap_or(default_timeout),
        keep: a.keep_volumes,
        accel: AccelArg::Auto,
        attach: AttachArg::Auto,
        append: String::new(),
        quiet: true,
    };
    Ok((g, vm))
}

/// Extras that make a VM call cancellable and stream its console as progress.
fn console_progress(c: &Call) -> crate::vm_cmds::Extras {
    let progress = c.progress.clone();
    c.progress.report(None, None, "preparing the VM");
    crate::vm_cmds::Extras {
        cancel: Some(c.cancel.clone()),
        on_line: Some(Box::new(move |line: &str| {
            if !line.trim().is_empty() {
                progress.report(None, None, line);
            }
        })),
        ..Default::default()
    }
}

/// A VM tool's reply: its report with the status and whether it was
/// cancelled, and a summary that ends with the run's line.
fn vm_reply(
    text: String,
    run: &crate::vm_cmds::RunReport,
    report: impl serde::Serialize,
    status: i32,
    c: &Call,
) -> Result<Reply> {
    let mut v = serde_json::to_value(report)?;
    v["status"] = json!(status);
    v["cancelled"] = json!(c.cancel.load(Ordering::SeqCst));
    let mut summary = text;
    if !run.qemu_error.is_empty() {
        summary.push_str(&format!("QEMU said: {}\n", run.qemu_error));
    }
    summary.push_str(&run.summary());
    reply(summary, v)
}

fn vm_module_test(a: VmModuleTest, guest: Guest, c: &Call) -> Result<Reply> {
    const TOOL: &str = "vm_module_test";
    let (g, vm) = vm_settings(TOOL, guest, c, 600, Vec::new())?;
    let volumes = a.volumes.unwrap_or_else(|| "test:256M".into());
    let specs = if volumes.trim().is_empty() {
        Vec::new()
    } else {
        devpool_pool::spec::parse_volumes(&volumes)?
    };
    let r = crate::vm_suites::module_test_run(
        &g,
        &vm,
        std::path::Path::new(&a.module_path),
        a.cycles.unwrap_or(10),
        a.params.as_deref().unwrap_or(""),
        &specs,
        console_progress(c),
    )
    .map_err(|e| anyhow!("{TOOL}: {e:#}"))?;
    vm_reply(r.text(), &r.run, &r, r.status(), c)
}

fn fstests(a: FstestsRun, guest: Guest, c: &Call) -> Result<Reply> {
    use crate::vm_suites::{DeviceSource, FstestsJob, fstests_run, load_baseline};
    const TOOL: &str = "fstests_vm_boot_and_run";
    let tests = a.tests.unwrap_or_else(|| vec!["-g".into(), "quick".into()]);
    if let Some(t) = tests
        .iter()
        .find(|t| t.is_empty() || t.contains(['\n', '\0']))
    {
        bail!("{TOOL}: argument 'tests': {t:?} is not a test name or check option");
    }
    let volumes = a.volumes.unwrap_or_else(|| "test:4G,scratch:4G".into());
    let job = FstestsJob {
        tree: PathBuf::from(&a.fstests_path),
        fstype: a.fstype.unwrap_or_else(|| "ext4".into()),
        specs: devpool_pool::spec::parse_volumes(&volumes)?,
        devices: if a.use_device_pool.unwrap_or(true) {
            DeviceSource::Pool
        } else {
            DeviceSource::ImageFiles
        },
        baseline: a
            .baseline_path
            .map(|b| load_baseline(std::path::Path::new(&b)))
            .transpose()?,
        results: None,
        check_args: tests,
    };
    let (g, vm) = vm_settings(TOOL, guest, c, 3600, Vec::new())?;
    let r = fstests_run(&g, &vm, job, console_progress(c), false)
        .map_err(|e| anyhow!("{TOOL}: {e:#}"))?;
    vm_reply(r.text(), &r.run, &r, r.status(), c)
}

fn vm_run(a: VmRun, guest: Guest, c: &Call) -> Result<Reply> {
    if a.command.trim().is_empty() {
        bail!("vm_run: command is empty");
    }
    let (g, vm) = vm_settings("vm_run", guest, c, 300, a.load_modules)?;
    let specs = match &a.volumes {
        Some(v) if !v.trim().is_empty() => devpool_pool::spec::parse_volumes(v)?,
        _ => Vec::new(),
    };
    let extras = console_progress(c);
    let command = vec!["sh".to_string(), "-c".to_string(), a.command];
    let (report, outcome) = crate::vm_cmds::boot(&g, &vm, &specs, extras, &command, false)?;
    let output = outcome.command_output().to_string();
    let mut text = String::new();
    if !output.is_empty() {
        let tail: Vec<&str> = output.lines().rev().take(40).collect();
        text.push_str("--- output (last lines) ---\n");
        text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        text.push('\n');
    }
    let mut v = serde_json::to_value(&report)?;
    v["output"] = json!(output);
    vm_reply(text, &report, v, report.status(), c)
}
