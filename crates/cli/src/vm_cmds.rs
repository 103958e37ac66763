//! `devpool vm …`: lease volumes, attach them to a QEMU guest the fastest
//! way each allows, boot, run, report, release.

use crate::args::{AccelArg, AttachArg, Global, VmArgs, Want};
use crate::pool_cmds::{pool_name, pools};
use anyhow::{Context, Result, anyhow, bail};
use devpool_pool::owner::Owner;
use devpool_pool::pool::{Acquired, Pools};
use devpool_pool::spec::{self, VolumeSpec};
use devpool_serve::export::{self, ExportSpec};
use devpool_serve::lifetime::Stopper;
use devpool_serve::nbd::server::Endpoint;
use devpool_vm::guest::{AddFile, GuestSpec, Share, disk_name};
use devpool_vm::kernel::Kernel;
use devpool_vm::probe;
use devpool_vm::qemu::{Accel, Disk, MAX_DISKS, Machine};
use devpool_vm::runner::{self, Ending, Outcome};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static CANCEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCEL.store(true, Ordering::SeqCst);
}

fn cancel_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// How one disk reaches the guest.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub guest_device: String,
    /// The lease role, or `disk` for a whole host file/device.
    pub role: String,
    pub lv: Option<String>,
    /// raw, vhost-user-blk or nbd.
    pub attach: &'static str,
    /// Where the bytes are, or why this path was taken.
    pub detail: String,
    /// The volume's one range on its PV, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extent: Option<Extent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Extent {
    pub path: PathBuf,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Kernel, lease, attachments, initramfs.
    pub prepare_ms: u64,
    /// QEMU start to the command starting in the guest.
    pub boot_ms: Option<u64>,
    pub command_ms: Option<u64>,
    /// Command end to report: guest power-off, servers stopped, lease released.
    pub report_ms: u64,
    pub total_ms: u64,
}

/// A boot QEMU did not survive, before the guest's command started.
#[derive(Debug, Clone, Serialize)]
pub struct QemuCrash {
    pub signal: String,
    /// QEMU start to its death.
    pub after_ms: u64,
    pub qemu_error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub accel: &'static str,
    pub accel_reason: String,
    pub pool: Option<String>,
    pub session: Option<String>,
    pub kept: bool,
    pub disks: Vec<Attachment>,
    pub ending: Ending,
    pub exit_code: Option<i32>,
    pub timings: Timings,
    pub released: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_error: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub qemu_error: String,
    /// The signal that ended QEMU, when one did (a crash, or the kill of a
    /// timed-out or cancelled run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_signal: Option<String>,
    /// Boots that QEMU crashed in before the command started, each followed
    /// by a fresh boot (see --boot-retries).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub qemu_crashes: Vec<QemuCrash>,
    /// Whether `qemu_signal` means QEMU crashed (rather than was killed).
    #[serde(skip)]
    pub qemu_crashed: bool,
}

impl RunReport {
    /// devpool's exit status for this run.
    pub fn status(&self) -> i32 {
        match self.ending {
            Ending::Exited => self.exit_code.unwrap_or(125),
            Ending::TimedOut => 124,
            Ending::Cancelled => 130,
            Ending::Died => 125,
        }
    }

    pub fn summary(&self) -> String {
        let secs = |ms: Option<u64>| {
            ms.map(|m| format!("{:.1} s", m as f64 / 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        let what = match self.ending {
            Ending::Exited => format!("the command exited with status {}", self.status()),
            Ending::TimedOut => format!(
                "TIMED OUT after {}: the VM was killed",
                secs(Some(self.timings.total_ms))
            ),
            Ending::Cancelled => "cancelled: the VM was killed".into(),
            Ending::Died => match (&self.qemu_signal, self.qemu_crashed) {
                (Some(sig), true) => format!(
                    "QEMU crashed ({sig}) without the guest reporting an exit status: a QEMU bug, not the guest's doing"
                ),
                (Some(sig), false) => format!(
                    "QEMU was killed ({sig}) before the guest reported an exit status"
                ),
                (None, _) => "the guest stopped without reporting an exit status (kernel panic, or init failed)"
                    .into(),
            },
        };
        let lease = match (&self.session, self.kept, self.released) {
            (None, _, _) => String::new(),
            (Some(s), true, _) => format!("; kept lease {s}"),
            (Some(s), false, true) => format!("; released lease {s}"),
            (Some(s), false, false) => format!(
                "; releasing lease {s} failed ({}): 'devpool cleanup' reaps it",
                self.release_error.as_deref().unwrap_or("?")
            ),
        };
        let retried = match self.qemu_crashes.len() {
            0 => String::new(),
            n => format!(
                "; booted {} times: QEMU crashed before the command started ({})",
                n + 1,
                self.qemu_crashes
                    .iter()
                    .map(|c| c.signal.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "{what} (boot {}, command {}, {}){lease}{retried}",
            secs(self.timings.boot_ms),
            secs(self.timings.command_ms),
            self.accel.to_uppercase(),
        )
    }
}

/// Called with each line of the guest console.
pub type LineHook = Box<dyn FnMut(&str) + Send>;

/// What a VM command adds to the generic run.
#[derive(Default)]
pub struct Extras {
    /// Set to stop the VM (its volumes are released as usual); without it,
    /// SIGINT/SIGTERM/SIGHUP do.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Sees every console line (progress for a caller that does not stream).
    pub on_line: Option<LineHook>,
    pub files: Vec<AddFile>,
    /// Guest files written from memory: (guest path, contents, mode).
    pub contents: Vec<(String, Vec<u8>, u32)>,
    pub modules: Vec<String>,
    pub shares: Vec<Share>,
    pub env: Vec<(String, String)>,
    pub disks: Vec<PathBuf>,
    pub workdir: Option<String>,
}

pub fn find_busybox() -> Result<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("busybox is not installed (apt-get install busybox-static)"))
}

pub fn kernel(g: &Global, vm: &VmArgs) -> Result<Kernel> {
    match (&vm.kernel, &vm.kernel_deb) {
        (_, Some(deb)) => {
            if vm.modules.is_some() {
                bail!("--modules: a --kernel-deb brings its own modules");
            }
            let cache = g.state_dir.join("kernels");
            std::fs::create_dir_all(&cache)
                .with_context(|| format!("creating {}", cache.display()))?;
            if !Kernel::deb_is_unpacked(deb, &cache) {
                eprintln!(
                    "devpool: unpacking {} into {} (once; then depmod)",
                    deb.display(),
                    cache.display()
                );
            }
            Ok(Kernel::from_deb(deb, &cache)?)
        }
        (Some(image), None) => Ok(Kernel::from_parts(image, vm.modules.as_deref())?),
        (None, None) => bail!("give --kernel BZIMAGE or --kernel-deb DEB"),
    }
}

fn accel(g: &Global, vm: &VmArgs, k: &Kernel, busybox: &Path) -> Result<(Accel, String)> {
    Ok(match vm.accel {
        AccelArg::Kvm => (Accel::Kvm, "--accel kvm".into()),
        AccelArg::Tcg => (Accel::Tcg, "--accel tcg".into()),
        AccelArg::Auto => {
            let dir = g.state_dir.join("vm");
            std::fs::create_dir_all(&dir)?;
            let p = probe::kvm(&k.image, busybox, &dir.join("kvm-probe.json"), &dir)?;
            if p.usable {
                (Accel::Kvm, p.reason)
            } else {
                (Accel::Tcg, p.reason)
            }
        }
    })
}

fn mem_mib(s: &str) -> Result<u64> {
    let b = crate::parse_bytes("--mem", s)?.0;
    let mib = b / (1 << 20);
    if mib < 128 {
        bail!("--mem {s}: a guest needs at least 128M");
    }
    Ok(mib)
}

fn volume_specs(v: &Want) -> Result<Vec<VolumeSpec>> {
    Ok(match (&v.volumes, &v.profile) {
        (Some(s), _) => spec::parse_volumes(s)?,
        (None, Some(p)) => spec::profile(p, v.size.as_deref())?,
        (None, None) => Vec::new(),
    })
}

/// A lease and the servers of one VM run; dropping it stops the servers
/// and releases the lease (unless kept), whatever happened before.
struct Leased {
    pools: Pools,
    pool: String,
    lease: Option<Acquired>,
    keep: bool,
    servers: Vec<export::Running>,
    stopper: Arc<Stopper>,
    dir: PathBuf,
    done: Option<std::result::Result<(), String>>,
}

impl Leased {
    fn finish(&mut self) -> std::result::Result<(), String> {
        if let Some(d) = &self.done {
            return d.clone();
        }
        self.stopper.stop("the VM ended");
        for r in self.servers.drain(..) {
            if let Err(e) = r.wait() {
                eprintln!("devpool: a volume server failed: {e}");
            }
        }
        let r = match &self.lease {
            Some(a) if !self.keep => self
                .pools
                .release(&self.pool, &a.session)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        self.done = Some(r.clone());
        r
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!(
                "devpool: releasing the VM's volumes failed: {e}; 'devpool cleanup' reaps them"
            );
        }
    }
}

fn attach(l: &mut Leased, mode: AttachArg, queues: u32) -> Result<(Vec<Disk>, Vec<Attachment>)> {
    let mut disks = Vec::new();
    let mut out = Vec::new();
    let Some(a) = l.lease.clone() else {
        return Ok((disks, out));
    };
    for (i, d) in a.devices.iter().enumerate() {
        let loc = l.pools.locate(&l.pool, &d.lv)?;
        let contiguous = devpool_pool::pool::contiguous_extent(&loc.meta, &d.lv, |k| {
            loc.pvs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, p)| p.clone())
        });
        let guest_device = disk_name(i);
        let extent = contiguous.as_ref().ok().map(|(path, offset, size)| Extent {
            path: path.clone(),
            offset: *offset,
            size: *size,
        });
        let (how, detail) = match (mode, contiguous) {
            (AttachArg::Auto | AttachArg::Raw, Ok((path, offset, size))) => {
                disks.push(Disk::Raw {
                    path: path.clone(),
                    offset,
                    size,
                });
                (
                    "raw",
                    format!("{} at offset {offset}, {size} bytes", path.display()),
                )
            }
            (AttachArg::Raw, Err(e)) => bail!("--attach raw: {e}"),
            (AttachArg::Auto, Err(e)) => ("vhost-user-blk", format!("not one range: {e}")),
            (AttachArg::VhostUserBlk, _) => ("vhost-user-blk", "--attach vhost-user-blk".into()),
            (AttachArg::Nbd, _) => ("nbd", "--attach nbd".into()),
        };
        if how != "raw" {
            let sock = l.dir.join(format!("{}.sock", d.role));
            let spec = if how == "nbd" {
                ExportSpec {
                    nbd: Some(Endpoint::Unix(sock.clone())),
                    queues: 1,
                    ..ExportSpec::default()
                }
            } else {
                ExportSpec {
                    vhost_user_blk: Some(sock.clone()),
                    queues: queues.clamp(1, devpool_serve::vhost::MAX_QUEUES as u32) as usize,
                    ..ExportSpec::default()
                }
            };
            let r = export::start(&l.pools, &l.pool, &d.lv, &spec, l.stopper.clone())
                .map_err(|e| anyhow!("serving {} for the guest: {e}", d.lv))?;
            l.servers.push(r);
            disks.push(if how == "nbd" {
                Disk::Nbd { socket: sock }
            } else {
                Disk::VhostUserBlk {
                    socket: sock,
                    queues: spec.queues as u32,
                }
            });
        }
        out.push(Attachment {
            guest_device,
            role: d.role.clone(),
            lv: Some(d.lv.clone()),
            attach: how,
            detail,
            extent,
        });
    }
    Ok((disks, out))
}

/// Boot `command` in a guest with `specs` leased and attached; returns the
/// report and the console record. The lease is released before returning.
pub fn boot(
    g: &Global,
    vm: &VmArgs,
    specs: &[VolumeSpec],
    extras: Extras,
    command: &[String],
    stream: bool,
) -> Result<(RunReport, Outcome)> {
    let t0 = Instant::now();
    let cancel = extras.cancel.clone();
    if cancel.is_none() {
        cancel_on_signals();
    }
    let mut hook = extras.on_line;
    let mem = mem_mib(&vm.mem)?;
    if vm.cpus == 0 || vm.cpus > 64 {
        bail!("--cpus {}: between 1 and 64", vm.cpus);
    }
    let mut files = extras.files;
    for a in &vm.add {
        files.push(AddFile::parse(a)?);
    }
    for f in &files {
        if std::fs::symlink_metadata(&f.src).is_err() {
            bail!("--add {}: no such file or directory", f.src.display());
        }
    }
    for d in &extras.disks {
        if !d.exists() {
            bail!("--disk {}: no such file or device", d.display());
        }
    }
    let nvol = specs.len() + extras.disks.len();
    if nvol > MAX_DISKS {
        bail!("{nvol} disks: a guest takes at most {MAX_DISKS}");
    }
    let k = kernel(g, vm)?;
    let busybox = find_busybox()?;
    let (accel, accel_reason) = accel(g, vm, &k, &busybox)?;

    let p = pools(g)?;
    let pool = pool_name(g);
    let owner = Owner::of_this_process().map_err(anyhow::Error::msg)?;
    let lease = if specs.is_empty() {
        None
    } else {
        Some(p.acquire_unattached(&pool, specs, &owner, vm.keep)?)
    };
    let run_id = lease
        .as_ref()
        .map(|a| a.session.clone())
        .unwrap_or_else(|| format!("vm-{}", std::process::id()));
    let dir = p.state_dir.join("run").join(&run_id);
    let mut leased = Leased {
        pools: p,
        pool: pool.clone(),
        lease,
        keep: vm.keep,
        servers: Vec::new(),
        stopper: Stopper::new()?,
        dir: dir.clone(),
        done: None,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(a) = &leased.lease {
        eprintln!("devpool: lease {} in pool '{pool}'", a.session);
    }
    let (mut disks, mut attachments) = attach(&mut leased, vm.attach, vm.cpus)?;
    for d in &extras.disks {
        let size = disk_size(d)?;
        let i = disks.len();
        disks.push(Disk::Raw {
            path: d.clone(),
            offset: 0,
            size,
        });
        attachments.push(Attachment {
            guest_device: disk_name(i),
            role: "disk".into(),
            lv: None,
            attach: "raw",
            detail: format!("{} ({size} bytes)", d.display()),
            extent: None,
        });
    }
    for a in &attachments {
        eprintln!(
            "devpool: {} = {}{} via {} ({})",
            a.guest_device,
            a.role,
            a.lv.as_deref().map(|l| format!(" {l}")).unwrap_or_default(),
            a.attach,
            a.detail
        );
    }

    let roles: Vec<(String, String)> = attachments
        .iter()
        .filter(|a| a.lv.is_some())
        .map(|a| (a.role.clone(), a.guest_device.clone()))
        .collect();
    let mut env = spec::environment(&roles);
    for (i, a) in attachments.iter().filter(|a| a.lv.is_none()).enumerate() {
        env.push((format!("DEVPOOL_DISK{i}"), a.guest_device.clone()));
    }
    if let Some(a) = &leased.lease {
        env.push(("DEVPOOL_SESSION".into(), a.session.clone()));
        env.push(("DEVPOOL_POOL".into(), pool.clone()));
    }
    env.extend(extras.env);

    let mut modules = vm.load_module.clone();
    modules.extend(extras.modules);
    let mut optional = vec![
        "virtio_blk".to_string(),
        "dm_mod".into(),
        "crc32c_generic".into(),
        "ext4".into(),
    ];
    if !extras.shares.is_empty() {
        optional.extend(["9pnet_virtio".to_string(), "9p".into()]);
    }
    let guest = GuestSpec {
        kernel: k.clone(),
        busybox,
        modules,
        optional_modules: optional,
        files,
        env,
        disks: disks.len(),
        shares: extras.shares.clone(),
        command: command.to_vec(),
        workdir: extras.workdir.unwrap_or_else(|| "/".into()),
    };
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, guest.initramfs_with(&extras.contents)?)
        .with_context(|| format!("writing {}", initrd.display()))?;
    let machine = Machine {
        kernel: k.image.clone(),
        initrd,
        append: format!("console=ttyS0 panic=-1 quiet loglevel=4 {}", vm.append)
            .trim()
            .to_string(),
        mem_mib: mem,
        cpus: vm.cpus,
        accel,
        disks,
        shares: extras.shares,
    };
    let prepare = t0.elapsed();
    eprintln!(
        "devpool: booting {} ({}) under {} ({accel_reason}) with {} MiB, {} vCPU(s); timeout {} s",
        k.image.display(),
        k.version,
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        mem,
        vm.cpus,
        vm.timeout
    );
    let to_stdout = stream && !vm.quiet && !g.json;
    let to_stderr = stream && !vm.quiet && g.json;
    // Blank lines are held back: the guest prints one before each marker.
    let mut blank = 0usize;
    let mut finished = false;
    let mut on_line = |line: &str| {
        if let Some(h) = hook.as_mut() {
            h(line);
        }
        let marker = line.contains(devpool_vm::guest::READY_MARKER);
        let exit = runner::parse_exit(line).is_some();
        finished |= exit;
        if marker || exit || finished {
            blank = 0;
            return;
        }
        if line.is_empty() {
            blank += 1;
            return;
        }
        let text = format!("{}{line}", "\n".repeat(std::mem::take(&mut blank)));
        if to_stdout {
            println!("{text}");
            let _ = std::io::stdout().flush();
        } else if to_stderr {
            eprintln!("{text}");
        }
    };
    let ms = |d: Duration| d.as_millis() as u64;
    let mut crashes = Vec::new();
    let outcome = runner::run_retrying(
        &machine,
        Duration::from_secs(vm.timeout),
        vm.boot_retries,
        &|| {
            CANCEL.load(Ordering::SeqCst)
                || cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst))
        },
        &mut on_line,
        &mut |o, before| {
            let crash = QemuCrash {
                signal: o.signal.map(runner::signal_name).unwrap_or_default(),
                after_ms: ms(o.total),
                qemu_error: o.qemu_stderr.trim().to_string(),
            };
            if !crash.qemu_error.is_empty() {
                eprintln!("devpool: QEMU said: {}", crash.qemu_error);
            }
            eprintln!(
                "devpool: QEMU crashed ({}) {:.1} s into the boot, before the command started: a QEMU bug, not the guest's; booting again ({} of {} retries)",
                crash.signal,
                o.total.as_secs_f64(),
                before + 1,
                vm.boot_retries
            );
            crashes.push(crash);
        },
    )?;
    let released = leased.finish();
    let crashed_ms: u64 = crashes.iter().map(|c| c.after_ms).sum();
    let report = RunReport {
        kernel: k.image.clone(),
        kernel_version: k.version.clone(),
        accel: if accel == Accel::Kvm { "kvm" } else { "tcg" },
        accel_reason,
        pool: leased.lease.as_ref().map(|_| pool.clone()),
        session: leased.lease.as_ref().map(|a| a.session.clone()),
        kept: vm.keep,
        disks: attachments,
        ending: outcome.ending,
        exit_code: outcome.exit,
        timings: Timings {
            prepare_ms: ms(prepare),
            boot_ms: outcome.boot.map(ms),
            command_ms: outcome.command.map(ms),
            report_ms: ms(t0.elapsed())
                .saturating_sub(ms(prepare))
                .saturating_sub(crashed_ms)
                .saturating_sub(outcome.boot.map(ms).unwrap_or(0))
                .saturating_sub(outcome.command.map(ms).unwrap_or(0)),
            total_ms: ms(t0.elapsed()),
        },
        released: leased.lease.is_some() && !vm.keep && released.is_ok(),
        release_error: released.err(),
        qemu_error: if outcome.ending == Ending::Exited {
            String::new()
        } else {
            outcome.qemu_stderr.trim().to_string()
        },
        qemu_signal: outcome.signal.map(runner::signal_name),
        qemu_crashes: crashes,
        qemu_crashed: outcome.qemu_crashed(),
    };
    Ok((report, outcome))
}

fn disk_size(p: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(p).with_context(|| format!("--disk {}", p.display()))?;
    Ok(f.seek(SeekFrom::End(0))?)
}

pub fn parse_env(list: &[String]) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v))
                if !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !k.as_bytes()[0].is_ascii_digit() =>
            {
                Ok((k.to_string(), v.to_string()))
            }
            _ => bail!("--env '{e}': expected NAME=VALUE with NAME made of letters, digits and _"),
        })
        .collect()
}

pub fn print_report(g: &Global, r: &RunReport) -> Result<()> {
    if g.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    }
    print_report_summary(r);
    Ok(())
}

/// `devpool vm run`.
pub fn run(
    g: &Global,
    vm: &VmArgs,
    volumes: &Want,
    disks: &[PathBuf],
    env: &[String],
    command: &[String],
) -> Result<i32> {
    let specs = volume_specs(volumes)?;
    let extras = Extras {
        env: parse_env(env)?,
        disks: disks.to_vec(),
        ..Extras::default()
    };
    let (report, _) = boot(g, vm, &specs, extras, command, true)?;
    print_report(g, &report)?;
    Ok(report.status())
}

pub fn print_report_summary(r: &RunReport) {
    if !r.qemu_error.is_empty() {
        eprintln!("devpool: QEMU said: {}", r.qemu_error);
    }
    eprintln!("devpool: {}", r.summary());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn died(signal: Option<&str>, crashed: bool) -> RunReport {
        RunReport {
            kernel: PathBuf::from("/boot/vmlinuz"),
            kernel_version: "6.12".into(),
            accel: "tcg",
            accel_reason: String::new(),
            pool: None,
            session: None,
            kept: false,
            disks: Vec::new(),
            ending: Ending::Died,
            exit_code: None,
            timings: Timings {
                prepare_ms: 1,
                boot_ms: None,
                command_ms: None,
                report_ms: 1,
                total_ms: 2,
            },
            released: false,
            release_error: None,
            qemu_error: String::new(),
            qemu_signal: signal.map(String::from),
            qemu_crashes: Vec::new(),
            qemu_crashed: crashed,
        }
    }

    #[test]
    fn a_died_run_says_whether_qemu_crashed_was_killed_or_the_guest_stopped() {
        let s = died(Some("SIGABRT"), true).summary();
        assert!(s.starts_with("QEMU crashed (SIGABRT)"), "{s}");
        let s = died(Some("SIGTERM"), false).summary();
        assert!(s.starts_with("QEMU was killed (SIGTERM)"), "{s}");
        let s = died(None, false).summary();
        assert!(s.starts_with("the guest stopped"), "{s}");
        let mut r = died(None, false);
        r.ending = Ending::Exited;
        r.exit_code = Some(3);
        r.qemu_crashes = vec![QemuCrash {
            signal: "SIGABRT".into(),
            after_ms: 3000,
            qemu_error: String::new(),
        }];
        let s = r.summary();
        assert!(
            s.contains("status 3") && s.contains("booted 2 times"),
            "{s}"
        );
    }
}
