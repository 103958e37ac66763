//! Plans as data: what an operation will write, shown before it runs.

use serde::Serialize;
use std::path::PathBuf;

/// One write a plan performs, in execution order.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Create a sparse image file to serve as a PV.
    CreateImage { path: PathBuf, size: u64 },
    /// Zero a byte range (old signatures at the start of a new PV, or the first
    /// 4 KiB of a new LV).
    ZeroRange {
        device: PathBuf,
        offset: u64,
        len: u64,
        reason: String,
    },
    /// Give a byte range the VG no longer uses back to the device: punch a
    /// hole in an image file (its space returns to the host filesystem), or
    /// `BLKDISCARD` on a block device when LVM2's `devices/issue_discards`
    /// asks for it. Runs before the commit that frees the range, while the
    /// extents still belong to the LVs being removed or shrunk.
    DiscardRange {
        device: PathBuf,
        offset: u64,
        len: u64,
        reason: String,
    },
    /// Write a dm-snapshot COW header and an empty first exception area.
    InitCowStore {
        device: PathBuf,
        offset: u64,
        chunk_sectors: u32,
        reason: String,
    },
    /// Write an empty thin pool's dm-thin metadata (no devices, transaction 0)
    /// on its `_tmeta` LV (runs: device, byte offset, length).
    FormatThinPool {
        pool: String,
        meta: Vec<(PathBuf, u64, u64)>,
        chunk_sectors: u32,
        data_bytes: u64,
    },
    /// Change the thin pool's devices in dm-thin's metadata (one commit),
    /// after bringing it in line with the VG as planned (`known` devices,
    /// `known_trans`).
    UpdateThinPool {
        vg: String,
        pool: String,
        meta: Vec<(PathBuf, u64, u64)>,
        /// The data LV's runs, where data blocks the change frees are
        /// punched out of image files after its commit.
        #[serde(default)]
        data: Vec<(PathBuf, u64, u64)>,
        data_bytes: u64,
        known: Vec<u64>,
        known_trans: u64,
        changes: crate::ops::thin::ThinChanges,
    },
    /// The same change while dm-thin holds the pool (its metadata is the
    /// kernel's): messages to the pool device `device`, as LVM2 sends them
    /// (`delete`, `create_thin`, `create_snap` with an active origin
    /// suspended meanwhile, then `set_transaction_id known_trans → new`);
    /// dm-thin commits after each.
    MessageThinPool {
        vg: String,
        pool: String,
        device: String,
        known_trans: u64,
        changes: crate::ops::thin::ThinChanges,
        /// Origins of new snapshots: (thin device id, dm name); the ones
        /// active when the messages go are suspended around them.
        suspend: Vec<(u64, String)>,
    },
    /// Punch the thin pool's unmapped data blocks out of the image files
    /// under its data LV, under the thin lock (no process can map a block
    /// meanwhile): the thin part of `vg trim`.
    TrimThinPool {
        vg: String,
        pool: String,
        meta: Vec<(PathBuf, u64, u64)>,
        data: Vec<(PathBuf, u64, u64)>,
        data_bytes: u64,
    },
    /// Write an empty metadata area header.
    InitMetadataArea {
        device: PathBuf,
        offset: u64,
        size: u64,
    },
    /// Write the label and PV header (sector 1).
    WriteLabel {
        device: PathBuf,
        pv_uuid: String,
        device_size: u64,
        pe_start: u64,
        metadata_areas: Vec<[u64; 2]>,
        in_vg: bool,
    },
    /// The atomic metadata commit on every metadata area of the listed PVs.
    CommitMetadata {
        vg: String,
        seqno: u64,
        devices: Vec<PathBuf>,
        bytes: u64,
    },
    /// Clear the committed and precommitted slots of every metadata area.
    ClearMetadata { device: PathBuf },
    /// Zero the label sectors.
    WipeLabel { device: PathBuf },
    /// List a new PV in LVM2's devices file (where LVM2 uses one), under
    /// the device ID LVM2 would give it.
    ListInDevicesFile {
        file: PathBuf,
        device: PathBuf,
        pv_uuid: String,
        idtype: String,
        idname: String,
        part: Option<u32>,
    },
    /// A removed PV's entry in LVM2's devices file keeps its device and
    /// loses its PVID (as `pvremove` leaves it).
    UnlistInDevicesFile {
        file: PathBuf,
        device: PathBuf,
        pv_uuid: String,
    },
}

impl Step {
    pub fn describe(&self) -> String {
        match self {
            Step::CreateImage { path, size } => {
                format!("create sparse image {} of {size} bytes", path.display())
            }
            Step::ZeroRange {
                device,
                offset,
                len,
                reason,
            } => {
                format!(
                    "zero {len} bytes of {} at byte {offset} ({reason})",
                    device.display()
                )
            }
            Step::TrimThinPool { pool, .. } => {
                format!("punch the unmapped data blocks of thin pool {pool} out of its image files")
            }
            Step::DiscardRange {
                device,
                offset,
                len,
                reason,
            } => format!(
                "discard {len} bytes of {} at byte {offset} ({reason})",
                device.display()
            ),
            Step::InitMetadataArea {
                device,
                offset,
                size,
            } => {
                format!(
                    "write empty metadata area header on {} at byte {offset} (area of {size} bytes)",
                    device.display()
                )
            }
            Step::WriteLabel {
                device,
                pv_uuid,
                in_vg,
                ..
            } => format!(
                "write PV label on {} (uuid {pv_uuid}, {})",
                device.display(),
                if *in_vg { "in a VG" } else { "not in a VG" }
            ),
            Step::CommitMetadata {
                vg,
                seqno,
                devices,
                bytes,
            } => format!(
                "commit VG {vg} metadata seqno {seqno} ({bytes} bytes) to {}: text, precommit, commit",
                devices
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Step::InitCowStore {
                device,
                offset,
                chunk_sectors,
                reason,
            } => format!(
                "write a snapshot COW header (chunk {} KiB) and an empty exception area at byte {offset} of {}: {reason}",
                chunk_sectors / 2,
                device.display()
            ),
            Step::ClearMetadata { device } => {
                format!("clear the metadata slots on {}", device.display())
            }
            Step::FormatThinPool {
                pool,
                meta,
                chunk_sectors,
                data_bytes,
            } => format!(
                "format thin pool {pool}'s dm-thin metadata on {} ({} data blocks of {} KiB)",
                runs_text(meta),
                data_bytes / (u64::from(*chunk_sectors) * 512),
                chunk_sectors / 2
            ),
            Step::UpdateThinPool {
                pool,
                meta,
                changes,
                ..
            } => format!(
                "commit thin pool {pool}'s dm-thin metadata on {}: {}",
                runs_text(meta),
                changes_text(changes)
            ),
            Step::MessageThinPool {
                pool,
                device,
                changes,
                suspend,
                ..
            } => {
                let mut text = format!(
                    "send thin pool {pool}'s change to dm-thin, which holds it ({device}): {}",
                    changes_text(changes)
                );
                for (_, name) in suspend {
                    text.push_str(&format!(
                        "; {name}, if active, is suspended for its snapshot"
                    ));
                }
                text
            }
            Step::WipeLabel { device } => format!("wipe the PV label on {}", device.display()),
            Step::ListInDevicesFile {
                file,
                device,
                idtype,
                idname,
                ..
            } => format!(
                "list {} in LVM2's devices file {} ({idtype} {idname})",
                device.display(),
                file.display()
            ),
            Step::UnlistInDevicesFile { file, device, .. } => format!(
                "clear the PVID of {} in LVM2's devices file {}",
                device.display(),
                file.display()
            ),
        }
    }
}

/// A change, ready to verify and execute.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub transaction: String,
    pub operation: String,
    pub vg: Option<String>,
    pub seqno_before: Option<u64>,
    pub seqno_after: Option<u64>,
    pub steps: Vec<Step>,
    /// Why this plan needs an explicit YES (destroys data or signatures).
    pub confirm: Vec<String>,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub(crate) fingerprint: Vec<(PathBuf, String)>,
    /// The metadata the plan was built from (rendered only for a diff).
    #[serde(skip)]
    pub(crate) old_meta: Option<std::sync::Arc<devpool_format::metadata::VgMetadata>>,
    #[serde(skip)]
    pub(crate) new_text: Option<Vec<u8>>,
    /// The metadata this plan commits, and the device of each of its PVs.
    #[serde(skip)]
    pub(crate) new_meta: Option<std::sync::Arc<devpool_format::metadata::VgMetadata>>,
    #[serde(skip)]
    pub(crate) pv_paths: std::collections::BTreeMap<String, PathBuf>,
    #[serde(skip)]
    pub(crate) locks: Locks,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Locks {
    pub global: bool,
    pub vgs: Vec<String>,
}

impl Locks {
    /// One VG's lock.
    pub fn vg(name: &str) -> Locks {
        Locks {
            global: false,
            vgs: vec![name.to_string()],
        }
    }
}

impl Plan {
    /// The VG as this plan found it (for changes to an existing VG).
    pub fn old_metadata(&self) -> Option<&devpool_format::metadata::VgMetadata> {
        self.old_meta.as_deref()
    }

    /// The VG as this plan leaves it (for VG changes).
    pub fn new_metadata(&self) -> Option<&devpool_format::metadata::VgMetadata> {
        self.new_meta.as_deref()
    }

    /// [`Self::new_metadata`], shared.
    pub fn new_metadata_shared(
        &self,
    ) -> Option<std::sync::Arc<devpool_format::metadata::VgMetadata>> {
        self.new_meta.clone()
    }

    /// The device that carries PV `key` (`pv0`) of the new metadata.
    pub fn pv_path(&self, key: &str) -> Option<&std::path::Path> {
        self.pv_paths.get(key).map(|p| p.as_path())
    }

    /// Unified diff of the VG metadata text, old to new.
    pub fn metadata_diff(&self) -> String {
        let new = self
            .new_text
            .as_deref()
            .map(|t| String::from_utf8_lossy(t.strip_suffix(&[0]).unwrap_or(t)).into_owned());
        let new = new.unwrap_or_default();
        let old = match &self.old_meta {
            Some(m) => String::from_utf8_lossy(&m.to_disk_text())
                .trim_end_matches('\0')
                .to_string(),
            None => String::new(),
        };
        similar::TextDiff::from_lines(&old, &new)
            .unified_diff()
            .context_radius(3)
            .header("metadata (on disk)", "metadata (planned)")
            .to_string()
    }

    pub fn render(&self) -> String {
        let mut s = format!("Plan {} — {}\n", self.transaction, self.operation);
        if let (Some(vg), Some(b), Some(a)) = (&self.vg, self.seqno_before, self.seqno_after) {
            s += &format!("  VG {vg}: seqno {b} -> {a}\n");
        }
        for (i, st) in self.steps.iter().enumerate() {
            s += &format!("  {}. {}\n", i + 1, st.describe());
        }
        for n in &self.notes {
            s += &format!("  note: {n}\n");
        }
        for c in &self.confirm {
            s += &format!("  DESTRUCTIVE: {c}\n");
        }
        let diff = self.metadata_diff();
        if !diff.is_empty() {
            s += "\n";
            s += &diff;
        }
        s
    }
}

/// Random bytes from the OS; without OS randomness, time and pid (unique
/// enough on one host for ids, never used for secrets).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pid = std::process::id() as u128;
        for (i, x) in b.iter_mut().enumerate() {
            *x = ((t ^ (pid << 64)) >> (i % 16 * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    b
}

/// A random transaction id.
pub fn new_transaction_id() -> String {
    random_bytes::<8>()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn changes_text(changes: &crate::ops::thin::ThinChanges) -> String {
    let mut what = Vec::new();
    if !changes.create.is_empty() {
        what.push(format!("create thin devices {:?}", changes.create));
    }
    for (id, origin) in &changes.snapshot {
        what.push(format!("snapshot thin device {origin} as {id}"));
    }
    if !changes.delete.is_empty() {
        what.push(format!("delete thin devices {:?}", changes.delete));
    }
    what.push(format!("transaction {}", changes.trans_id));
    what.join(", ")
}

fn runs_text(runs: &[(PathBuf, u64, u64)]) -> String {
    runs.iter()
        .map(|(d, off, len)| format!("{}@{off}+{len}", d.display()))
        .collect::<Vec<_>>()
        .join(", ")
}
