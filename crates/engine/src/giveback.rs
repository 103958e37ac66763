//! Giving a released volume's space back to the filesystem under an image
//! file ahead of the commit that removes it, a bounded piece at a time.
//!
//! The commit's own discard steps (see `Step::DiscardRange`) run under the
//! VG's lock, so punching gigabytes there would hold up every other change
//! of the VG (every concurrent acquire) for as long. A release calls
//! [`Engine::give_back`] first: each round takes the VG lock, checks that
//! the volumes still exist where they were, punches at most a budget of
//! their written data and lets go, so other commits run in between. The
//! volumes still own their extents throughout (nothing else can be given
//! them before they are removed), and the commit's steps then find holes.

use crate::device::Device;
use crate::engine::Engine;
use crate::error::Result;
use crate::plan::Locks;
use std::collections::HashMap;
use std::path::PathBuf;

/// Bytes punched per hold of the VG lock (about 25 ms of ext4's work here).
/// 7 volumes with 256 MiB written each, released while another process
/// acquired in a loop: that acquire waited 57-125 ms at most, against
/// 308-389 ms when the commit punched it all under one hold.
pub const ROUND_BYTES: u64 = 128 << 20;

/// Whether any of `lvs` has written data in an image file, as far as
/// `meta` (possibly stale: this only decides whether [`Engine::give_back`]
/// is worth its lock) and `path_of` (a PV's device) tell. A PV whose
/// device is unknown counts as holding data.
pub fn lvs_hold_data(
    meta: &devpool_format::metadata::VgMetadata,
    path_of: &dyn Fn(&str) -> Option<PathBuf>,
    lvs: &[String],
) -> bool {
    use std::os::fd::AsRawFd;
    let es = meta.extent_size.bytes().0;
    // Each device opened once: `None` for one that is no image file.
    let mut files: HashMap<PathBuf, Option<std::fs::File>> = HashMap::new();
    meta.used_areas().into_iter().any(|(key, start, len, lv)| {
        if !lvs.iter().any(|l| l == lv) {
            return false;
        }
        let (Some(pv), Some(path)) = (meta.pv(key), path_of(key)) else {
            return true;
        };
        if !files.contains_key(&path) {
            let Ok(f) = std::fs::File::open(&path) else {
                return true;
            };
            let image = f.metadata().is_ok_and(|m| m.is_file());
            files.insert(path.clone(), image.then_some(f));
        }
        let Some(Some(f)) = files.get(&path) else {
            return false;
        };
        let begin = pv.pe_start.0 * 512 + start * es;
        // SAFETY: lseek on a descriptor we own.
        let d = unsafe { libc::lseek(f.as_raw_fd(), begin as libc::off_t, libc::SEEK_DATA) };
        d >= 0 && (d as u64) < begin + len * es
    })
}

impl Engine {
    /// Punch the written data of `lvs` (in VG `vg`) out of image files,
    /// [`ROUND_BYTES`] per hold of the VG lock; volumes missing by now are
    /// skipped. Returns the bytes punched. Block devices are left to the
    /// commit (and `devices/issue_discards`).
    pub fn give_back(&self, vg: &str, lvs: &[String]) -> Result<u64> {
        self.give_back_in_rounds(vg, lvs, ROUND_BYTES)
    }

    /// [`Engine::give_back`], `round` bytes per hold of the lock.
    pub fn give_back_in_rounds(&self, vg: &str, lvs: &[String], round: u64) -> Result<u64> {
        let mut total = 0;
        if self.dry_run {
            return Ok(0);
        }
        loop {
            let _held = self.take_locks(
                &Locks {
                    global: false,
                    vgs: vec![vg.to_string()],
                },
                true,
            )?;
            let scan = self.scan();
            let Ok(loaded) = scan.vg(vg) else {
                return Ok(total);
            };
            let meta = &loaded.meta;
            let es = meta.extent_size.bytes().0;
            let mut budget = round.max(1);
            let mut devs: HashMap<PathBuf, Device> = HashMap::new();
            for (key, start, len, lv) in meta.used_areas() {
                if budget == 0 {
                    break;
                }
                if !lvs.iter().any(|l| l == lv) {
                    continue;
                }
                let (Some(pv), Some(dev)) = (meta.pv(key), loaded.device_of(key)) else {
                    continue;
                };
                if !std::fs::metadata(&dev.path).is_ok_and(|m| m.is_file()) {
                    continue;
                }
                if !devs.contains_key(&dev.path) {
                    devs.insert(dev.path.clone(), Device::open(&dev.path, true)?);
                }
                let Some(d) = devs.get(&dev.path) else {
                    continue;
                };
                let begin = pv.pe_start.0 * 512 + start * es;
                let end = begin + len * es;
                let mut at = begin;
                while budget > 0
                    && let Some(from) = d.next_data(at, end)
                {
                    let n = (end - from).min(budget);
                    d.punch_gated(&self.gate, from, n)?;
                    budget -= n;
                    total += n;
                    at = from + n;
                }
            }
            if budget > 0 {
                return Ok(total);
            }
        }
    }
}
