//! The checks a device must pass before it becomes a pool. Each finding says
//! what was found and where. Refusals stop setup; signatures of file systems
//! and partition tables need confirmation.

use crate::sysblk::{self, Above, DevNum, mount_of};
use crate::{PoolError, Result};
use devpool_engine::hostfs::{SERVER_WAIT, metadata_bounded};
use devpool_format::signature;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Findings {
    /// Reasons the device must not be used.
    pub refusals: Vec<String>,
    /// Data found on the device that setup would destroy.
    pub confirm: Vec<String>,
    /// Signatures found (name, byte offset).
    pub signatures: Vec<(String, u64)>,
    /// Whether the device carries an LVM2 label (the caller decides whether it
    /// is this pool's own PV).
    pub lvm_pv: bool,
}

pub fn check(path: &Path, fstab: &Path) -> Result<Findings> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            PoolError::Invalid(format!("{}: no such device or image file", path.display()))
        }
        _ => PoolError::io(path, "stat", e),
    })?;
    let mut f = Findings::default();
    if meta.file_type().is_block_device() {
        check_block(path, sysblk::devnum_of_rdev(meta.rdev()), fstab, &mut f);
    } else if meta.is_file() {
        check_image(path, &meta, fstab, &mut f);
    } else {
        return Err(PoolError::Invalid(format!(
            "{}: not a block device or a regular image file",
            path.display()
        )));
    }
    check_signatures(path, &mut f);
    Ok(f)
}

fn check_block(path: &Path, dev: DevNum, fstab: &Path, f: &mut Findings) {
    let stack = sysblk::stacked_on(dev);
    let by_dev: BTreeMap<DevNum, &Above> = stack.iter().map(|a| (a.dev, a)).collect();
    for a in &stack[1..] {
        if a.how.contains("(loop device over") {
            f.refusals
                .push(format!("{} is in use by {}", path.display(), a.how));
        } else if a.how.contains("(built on") {
            let kind = if sysblk::kname(a.dev).starts_with("md") {
                "an md RAID member"
            } else {
                "in use"
            };
            f.refusals
                .push(format!("{} is {kind}: {}", path.display(), a.how));
        }
    }
    for m in sysblk::mounts() {
        if let Some(a) = by_dev.get(&m.dev) {
            let what = match m.mountpoint.as_str() {
                "/" => "backs the root file system (/)".to_string(),
                "/boot" | "/boot/efi" => format!("backs {}", m.mountpoint),
                mp => format!("is mounted at {mp}"),
            };
            f.refusals.push(format!("{} {what}", a.how));
        }
    }
    for (name, d) in sysblk::swaps() {
        if let Some(a) = by_dev.get(&d) {
            f.refusals
                .push(format!("{} is in use as swap ({})", a.how, name.display()));
        }
    }
    check_fstab(fstab, &stack, None, f);
    // O_EXCL on a block device fails while it is mounted or claimed by
    // device-mapper, md, or any program that opened it exclusively.
    if let Err(e) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        && e.raw_os_error() == Some(libc::EBUSY)
    {
        f.refusals.push(format!(
            "{} is open exclusively by another program (a mount, device-mapper, md, or a tool holding it)",
            path.display()
        ));
    }
    // A program may have it (or a partition of it) open without a claim: a
    // dd, a QEMU using it as a disk. Setup would write under it.
    let parts = sysblk::partitions(dev);
    let devs: Vec<DevNum> = stack
        .iter()
        .map(|a| a.dev)
        .filter(|d| *d == dev || parts.contains(d))
        .collect();
    for o in sysblk::lasting_openers(&devs, &[]) {
        f.refusals.push(o.to_string());
    }
}

/// Whether `path` is on a FUSE or network file system other than the one
/// an image file is on (device number `image_dev`): then it is not the
/// image, and its server need not be asked (it may not answer).
fn on_another_server(mounts: &[sysblk::Mount], path: &Path, image_dev: DevNum) -> bool {
    std::path::absolute(path).is_ok_and(|abs| {
        mount_of(mounts, &abs).is_some_and(|m| m.asks_a_server() && m.dev != image_dev)
    })
}

fn check_image(path: &Path, meta: &std::fs::Metadata, fstab: &Path, f: &mut Findings) {
    let mounts = sysblk::mounts_cached();
    let image_dev = sysblk::devnum_of_rdev(meta.dev());
    for (l, back) in sysblk::loops() {
        if on_another_server(&mounts, &back, image_dev) {
            continue;
        }
        let backs = match metadata_bounded(&back, SERVER_WAIT) {
            Ok(b) => b.is_some_and(|b| (b.dev(), b.ino()) == (meta.dev(), meta.ino())),
            Err(why) => {
                f.refusals.push(format!(
                    "cannot tell whether {} backs loop device /dev/{}: its backing file {why}",
                    path.display(),
                    sysblk::kname(l)
                ));
                continue;
            }
        };
        if backs {
            f.refusals.push(format!(
                "{} backs loop device /dev/{}",
                path.display(),
                sysblk::kname(l)
            ));
        }
    }
    for (name, _) in sysblk::swaps() {
        if devpool_engine::engine::same_file(&name, path) {
            f.refusals
                .push(format!("{} is in use as swap", path.display()));
        }
    }
    check_fstab(fstab, &[], Some((path, meta)), f);
}

/// blkid's view of one device: UUID, LABEL, PARTUUID, PARTLABEL, TYPE.
fn probe_ids(dev: &Path) -> BTreeMap<String, String> {
    let Ok(out) = std::process::Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .output()
    else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let k = match k {
                "PART_ENTRY_UUID" => "PARTUUID",
                "PART_ENTRY_NAME" => "PARTLABEL",
                k => k,
            };
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn check_fstab(
    fstab: &Path,
    stack: &[Above],
    image: Option<(&Path, &std::fs::Metadata)>,
    f: &mut Findings,
) {
    // Lossy: one line that is not UTF-8 must not hide the others.
    let Ok(bytes) = std::fs::read(fstab) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    let mounts = sysblk::mounts_cached();
    let image_dev = image.map(|(_, meta)| sysblk::devnum_of_rdev(meta.dev()));
    let mut ids: Option<Vec<(&Above, BTreeMap<String, String>)>> = None;
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let spec = sysblk::unescape(fields.next().unwrap_or(""));
        let mountpoint = fields.next().unwrap_or("?");
        let at = format!(
            "{} line {} ({spec} on {mountpoint})",
            fstab.display(),
            lineno + 1
        );
        if let Some((key, value)) = spec.split_once('=')
            && matches!(key, "UUID" | "LABEL" | "PARTUUID" | "PARTLABEL")
        {
            let probed = ids.get_or_insert_with(|| {
                stack
                    .iter()
                    .map(|a| {
                        let node = PathBuf::from(format!("/dev/{}", sysblk::kname(a.dev)));
                        (a, probe_ids(&node))
                    })
                    .collect()
            });
            for (a, m) in probed.iter() {
                if m.get(key).is_some_and(|v| v.eq_ignore_ascii_case(value)) {
                    f.refusals.push(format!("{} is listed in {at}", a.how));
                }
            }
            continue;
        }
        if let Some(image_dev) = image_dev
            && on_another_server(&mounts, Path::new(&spec), image_dev)
        {
            continue;
        }
        let m = match metadata_bounded(Path::new(&spec), SERVER_WAIT) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(why) => {
                f.refusals
                    .push(format!("cannot tell what {at} names: {why}"));
                continue;
            }
        };
        if m.file_type().is_block_device() {
            let d = sysblk::devnum_of_rdev(m.rdev());
            if let Some(a) = stack.iter().find(|a| a.dev == d) {
                f.refusals.push(format!("{} is listed in {at}", a.how));
            }
        } else if let Some((img, meta)) = image
            && m.dev() == meta.dev()
            && m.ino() == meta.ino()
        {
            f.refusals
                .push(format!("{} is listed in {at}", img.display()));
        }
    }
}

/// Bytes read for signatures: the largest offset checked is btrfs's at 64 KiB.
const HEAD: usize = 68 * 1024;

fn check_signatures(path: &Path, f: &mut Findings) {
    let mut head = Vec::with_capacity(HEAD);
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.take(HEAD as u64).read_to_end(&mut head);
    }
    for s in signature::detect(&head) {
        f.signatures.push((s.name.to_string(), s.offset));
        match s.name {
            "LVM2 PV" => f.lvm_pv = true,
            "LUKS" => f.refusals.push(format!(
                "{} is a LUKS container (signature at byte {})",
                path.display(),
                s.offset
            )),
            "md RAID member" => f.refusals.push(format!(
                "{} is an md RAID member (superblock at byte {})",
                path.display(),
                s.offset
            )),
            name => f.confirm.push(format!(
                "{} holds a {name} signature at byte {}; setup destroys it",
                path.display(),
                s.offset
            )),
        }
    }
}
