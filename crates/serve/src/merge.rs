//! `snapshot merge`: roll an origin back to a snapshot, as `lvconvert
//! --merge` does, then delete the snapshot.
//!
//! Every chunk the snapshot kept (or was written to) is copied from its COW
//! store back over the origin, through the origin's own copy-on-write path:
//! the origin's other snapshots get their copy of each chunk first, so they
//! keep showing what they showed. The copy is idempotent, so a merge cut
//! short (a crash, Ctrl-C) leaves the snapshot in place and is finished by
//! running it again. The origin and its snapshots are held for the whole
//! merge: no server may start on them meanwhile.

use crate::batch::Batch;
use crate::export::{ExportError, Family};
use crate::nbd::server::flush_all;
use crate::open::open_volume;
use crate::snapshot::DevsIo;
use devpool_engine::cowstore::{read_mapped, write_mapped};
use devpool_engine::ops::snapshot::find_snapshot;
use devpool_pool::pool::Pools;
use devpool_pool::servers;
use devpool_pool::snapshots::SnapshotDeleted;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub pool: String,
    pub name: String,
    pub origin: String,
    /// Chunks copied back over the origin, and their size.
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub deleted: SnapshotDeleted,
}

/// Chunks read and written per commit of the other snapshots' copy-outs.
const BATCH: usize = 64;

pub fn merge(
    pools: &Pools,
    pool: &str,
    snap: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<MergeReport, ExportError> {
    let sloc = pools.locate(pool, snap)?;
    let link = find_snapshot(&sloc.meta, snap).ok_or_else(|| {
        ExportError::Refused(format!("'{snap}' in pool '{pool}' is not a snapshot"))
    })?;
    let oloc = pools.locate(pool, &link.origin)?;
    let origin = open_volume(&oloc, false)?;
    let cow = origin.cow.as_ref().ok_or_else(|| {
        ExportError::Refused(format!("'{}' has no snapshots any more", link.origin))
    })?;
    let _family = Family::claim(pools, &link.origin, &cow.family)?;
    let _registrations = cow
        .family
        .iter()
        .map(|u| servers::register(&pools.state_dir, u))
        .collect::<Result<Vec<_>, _>>()?;
    let source = cow
        .take_store(&link.cow)
        .ok_or_else(|| ExportError::Refused(format!("snapshot '{snap}' is not loaded")))?;
    if !source.is_valid() {
        return Err(ExportError::Refused(format!(
            "snapshot '{snap}' is invalid (its COW store filled up); it no longer holds the origin's old data and cannot be merged; 'devpool snapshot delete {snap}' removes it"
        )));
    }
    let io = DevsIo(&origin.devs);
    let cb = source.chunk_bytes();
    let size = origin.size();
    let exceptions = source.exceptions().to_vec();
    let total = exceptions.len() as u64;
    let mut done = 0u64;
    let errno = |e: i32| ExportError::Io(std::io::Error::from_raw_os_error(e));
    progress(0, total);
    let mut ring = Batch::new()?;
    for batch in exceptions.chunks(BATCH) {
        let mut data = Vec::with_capacity(batch.len());
        for e in batch {
            let at = e
                .old_chunk
                .checked_mul(cb)
                .filter(|a| *a < size)
                .ok_or_else(|| {
                    ExportError::Refused(format!(
                        "snapshot '{snap}' keeps chunk {} past the end of '{}' ({size} bytes)",
                        e.old_chunk, link.origin
                    ))
                })?;
            let mut buf = vec![0u8; cb.min(size - at) as usize];
            read_mapped(&io, &source.map, e.new_chunk * cb, &mut buf)?;
            data.push((at, buf));
        }
        // The other snapshots keep what the origin holds now, first.
        let ranges: Vec<(u64, u64)> = data.iter().map(|(at, b)| (*at, b.len() as u64)).collect();
        cow.copy_out(&origin.devs, &origin.map, &ranges, &mut ring)
            .map_err(errno)?;
        for (at, buf) in &data {
            write_mapped(&io, &origin.map, *at, buf)?;
        }
        done += batch.len() as u64;
        progress(done, total);
    }
    flush_all(&origin)?;
    // Still registered: nobody starts serving the origin before it is plain.
    let deleted = pools.snapshot_delete(pool, &link.cow)?;
    Ok(MergeReport {
        pool: pool.to_string(),
        name: link.cow,
        origin: link.origin,
        chunks: total,
        chunk_bytes: cb,
        deleted,
    })
}
