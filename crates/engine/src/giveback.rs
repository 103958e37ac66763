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
use devpool_format::metadata::VgMetadata;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

/// Bytes punched per hold of the VG lock (about 25 ms of ext4's work here).
/// 7 volumes with 256 MiB written each, released while another process
/// acquired in a loop: that acquire waited 57-125 ms at most, against
/// 308-389 ms when the commit punched it all under one hold.
pub const ROUND_BYTES: u64 = 128 << 20;

/// A byte range of an image file, with the file opened.
struct ImageRange {
    dev: Rc<Device>,
    begin: u64,
    end: u64,
}

/// The byte ranges `lvs` occupy in image files (each path opened once,
/// for writing if `write`; `path_of` gives a PV's path). Block devices are skipped; a PV whose
/// path is unknown or cannot be opened gives `None`.
fn image_ranges(
    meta: &VgMetadata,
    path_of: &dyn Fn(&str) -> Option<PathBuf>,
    lvs: &[String],
    write: bool,
) -> Vec<Option<ImageRange>> {
    let es = meta.extent_size.bytes().0;
    let mut devs: HashMap<PathBuf, Option<Rc<Device>>> = HashMap::new();
    let mut out = Vec::new();
    for (key, start, len, lv) in meta.used_areas() {
        if !lvs.iter().any(|l| l == lv) {
            continue;
        }
        let (Some(pv), Some(path)) = (meta.pv(key), path_of(key)) else {
            out.push(None);
            continue;
        };
        let dev = devs
            .entry(path)
            .or_insert_with_key(|p| Device::open(p, write).ok().map(Rc::new));
        match dev {
            None => out.push(None),
            Some(d) if d.is_block => {}
            Some(d) => {
                let begin = pv.pe_start.0 * 512 + start * es;
                out.push(Some(ImageRange {
                    dev: Rc::clone(d),
                    begin,
                    end: begin + len * es,
                }));
            }
        }
    }
    out
}

/// Whether any of `lvs` has written data in an image file, as far as
/// `meta` (possibly stale: this only decides whether [`Engine::give_back`]
/// is worth its lock) and `path_of` (a PV's device) tell. A PV whose
/// device is unknown counts as holding data.
pub fn lvs_hold_data(
    meta: &VgMetadata,
    path_of: &dyn Fn(&str) -> Option<PathBuf>,
    lvs: &[String],
) -> bool {
    image_ranges(meta, path_of, lvs, false)
        .into_iter()
        .any(|r| r.is_none_or(|r| r.dev.next_data(r.begin, r.end).is_some()))
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
            let _held = self.take_locks(&Locks::vg(vg), true)?;
            let scan = self.scan();
            let Ok(loaded) = scan.vg(vg) else {
                return Ok(total);
            };
            let path_of = |key: &str| loaded.device_of(key).map(|d| d.path.clone());
            let mut budget = round.max(1);
            for r in image_ranges(&loaded.meta, &path_of, lvs, true)
                .into_iter()
                .flatten()
            {
                let mut at = r.begin;
                while budget > 0
                    && let Some(from) = r.dev.next_data(at, r.end)
                {
                    let n = (r.end - from).min(budget);
                    r.dev.discard(&self.gate, from, n)?;
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
