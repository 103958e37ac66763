//! Can KVM boot a guest here? `/dev/kvm` existing is not enough: nested or
//! restricted hosts have it and still fail (QEMU aborts setting an MSR, or the
//! vCPU hangs). So the probe boots the run's own kernel under KVM with a tiny
//! initramfs that prints a marker and powers off. The answer is cached per
//! host boot and kernel image, since it cannot change before a reboot.

use crate::initramfs::Initramfs;
use crate::qemu::{Accel, Machine};
use crate::runner::{self, Ending};
use crate::{Result, io_err};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmProbe {
    pub usable: bool,
    /// Why not (or "booted").
    pub reason: String,
    boot_id: String,
    kernel: String,
}

const MARKER: &str = "devpool-kvm-probe-ok";
/// A guest under working KVM reaches init in about a second.
const LIMIT: Duration = Duration::from_secs(20);

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn kernel_key(image: &Path) -> String {
    let m = std::fs::metadata(image).ok();
    format!(
        "{}:{}:{:?}",
        image.display(),
        m.as_ref().map(|m| m.len()).unwrap_or(0),
        m.and_then(|m| m.modified().ok())
    )
}

/// Probe (or read the cached answer from `cache_file`).
pub fn kvm(image: &Path, busybox: &Path, cache_file: &Path, work: &Path) -> Result<KvmProbe> {
    let id = boot_id();
    let key = kernel_key(image);
    if let Some(p) = std::fs::read(cache_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<KvmProbe>(&b).ok())
        .filter(|p| p.boot_id == id && p.kernel == key)
    {
        return Ok(p);
    }
    let (usable, reason) = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) => (false, format!("/dev/kvm: {e}")),
        Ok(_) => boot_probe(image, busybox, work)?,
    };
    let p = KvmProbe {
        usable,
        reason,
        boot_id: id,
        kernel: key,
    };
    if let Some(dir) = cache_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_vec(&p) {
        let _ = std::fs::write(cache_file, json);
    }
    Ok(p)
}

fn boot_probe(image: &Path, busybox: &Path, work: &Path) -> Result<(bool, String)> {
    let mut i = Initramfs::new();
    i.busybox(busybox)?;
    i.bytes(
        "init",
        format!("#!/bin/busybox sh\necho {MARKER}\npoweroff -f\n").as_bytes(),
        0o755,
    )?;
    let initrd = work.join("kvm-probe.cpio");
    std::fs::write(&initrd, i.finish()?).map_err(io_err(format!("write {}", initrd.display())))?;
    let m = Machine {
        kernel: image.to_path_buf(),
        initrd: initrd.clone(),
        append: "console=ttyS0 panic=-1 quiet".into(),
        mem_mib: 256,
        cpus: 1,
        accel: Accel::Kvm,
        disks: Vec::new(),
        shares: Vec::new(),
    };
    let o = runner::run(&m, LIMIT, &|| false, &mut |_| {})?;
    let _ = std::fs::remove_file(&initrd);
    if o.console.contains(MARKER) {
        return Ok((true, "a probe guest booted under KVM".into()));
    }
    let why = match o.ending {
        Ending::TimedOut => format!("a probe guest did not reach init under KVM in {LIMIT:?}"),
        _ => {
            let last = o
                .qemu_stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("QEMU exited without output");
            format!(
                "QEMU could not boot a probe guest under KVM: {}",
                last.trim()
            )
        }
    };
    Ok((false, why))
}
