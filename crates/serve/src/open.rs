//! A volume of a pool, opened for serving: its map from the VG metadata and
//! its PVs opened for I/O.

use crate::device::{PvDevice, Volume};
use crate::map::{PvPlace, VolumeMap};
use devpool_pool::pool::Located;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Map(#[from] crate::map::MapError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Open a located volume: only the PVs it uses are opened.
pub fn open_volume(loc: &Located, read_only: bool) -> Result<Volume, OpenError> {
    let meta = &loc.meta;
    let mut devs: Vec<PvDevice> = Vec::new();
    let mut used: Vec<(String, usize)> = Vec::new();
    for seg in &loc.lv.segments {
        if let devpool_format::metadata::SegmentKind::Striped { stripes, .. } = &seg.kind {
            for st in stripes {
                if used.iter().any(|(k, _)| *k == st.pv) {
                    continue;
                }
                if let Some((_, path)) = loc.pvs.iter().find(|(k, _)| *k == st.pv) {
                    devs.push(PvDevice::open(path, !read_only)?);
                    used.push((st.pv.clone(), devs.len() - 1));
                }
            }
        }
    }
    let map = VolumeMap::from_lv(meta, &loc.lv, |key| {
        let dev = used.iter().find(|(k, _)| k == key)?.1;
        let pv = meta.pv(key)?;
        Some(PvPlace {
            dev,
            pe_start_bytes: pv.pe_start.0 * 512,
            pe_count: pv.pe_count,
        })
    })?;
    Ok(Volume {
        name: loc.lv.name.clone(),
        uuid: loc.lv.id.raw_str().to_string(),
        map,
        devs,
        read_only,
    })
}
