//! The copier's two stages (`Cow::copy_read`, `Cow::copy_commit`) on a
//! real file: a group may read while the one before it commits, so two
//! groups can read the same chunk. Each chunk must be recorded once, with
//! the origin's old data, and stay held until every group that read it has
//! ended; a store that leaves the set between a read and its commit must not
//! make the commit record into the wrong store (or none); a group whose read
//! fails, or that is given up before its commit, must not hold its chunks
//! for good.

use devpool_engine::cowstore::CowStore;
use devpool_format::map::VolumeMap;
use devpool_serve::batch::Batch;
use devpool_serve::device::PvDevice;
use devpool_serve::snapshot::{Cow, DevsIo, Role};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4096;
/// Where each snapshot's store starts in the file (1 MiB each).
const STORES_AT: u64 = 4 * MIB;

/// A file whose first MiB is the origin, chunk `i` filled with byte `i % 200 + 1`.
fn image(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("pv.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(8 * MIB).unwrap();
    for i in 0..MIB / CHUNK {
        f.write_all_at(&vec![(i % 200) as u8 + 1; CHUNK as usize], i * CHUNK)
            .unwrap();
    }
    path
}

fn store_map(i: u64) -> VolumeMap {
    VolumeMap::linear(0, STORES_AT + i * MIB, MIB)
}

fn open_store(devs: &[PvDevice], name: &str, i: u64) -> CowStore {
    CowStore::open(&DevsIo(devs), name, store_map(i), 8).unwrap()
}

/// The origin's COW state with the stores `names` (store `i` at its MiB).
fn origin(path: &Path, names: &[&str]) -> (Vec<PvDevice>, Cow) {
    let devs = vec![PvDevice::open(path, true).unwrap()];
    let stores = names
        .iter()
        .enumerate()
        .map(|(i, n)| open_store(&devs, n, i as u64))
        .collect();
    (devs, Cow::new(Role::Origin { stores }, Vec::new()))
}

/// Store `i` as it is on disk now: (origin chunk, the data it keeps), in
/// record order.
fn kept(path: &Path, name: &str, i: u64) -> Vec<(u64, Vec<u8>)> {
    let devs = vec![PvDevice::open(path, false).unwrap()];
    let store = open_store(&devs, name, i);
    let f = std::fs::File::open(path).unwrap();
    store
        .exceptions()
        .iter()
        .map(|e| {
            let mut b = vec![0u8; CHUNK as usize];
            f.read_exact_at(&mut b, STORES_AT + i * MIB + e.new_chunk * CHUNK)
                .unwrap();
            (e.old_chunk, b)
        })
        .collect()
}

fn held(cow: &Cow, chunk: u64) -> bool {
    cow.needs_copy_out(MIB, chunk * CHUNK, CHUNK)
}

#[test]
fn two_groups_that_read_the_same_chunk_record_it_once_and_hold_it_until_both_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let (devs, cow) = origin(&path, &["snap"]);
    let map = VolumeMap::linear(0, 0, MIB);
    let (mut ra, mut rb, mut c) = (
        Batch::new().unwrap(),
        Batch::new().unwrap(),
        Batch::new().unwrap(),
    );

    // Group a: chunk 0. Group b, read before a commits: chunks 0 and 1.
    let a = cow.copy_read(&devs, &map, &[(0, CHUNK)], &mut ra).unwrap();
    let b = cow
        .copy_read(&devs, &map, &[(0, 2 * CHUNK)], &mut rb)
        .unwrap();
    let (a, b) = (a.expect("chunk 0 to copy"), b.expect("chunks 0, 1 to copy"));
    assert!(held(&cow, 0) && held(&cow, 1) && held(&cow, 2));

    cow.copy_commit(&devs, a, &mut c).unwrap();
    assert!(held(&cow, 0), "group b still has chunk 0");
    // Group a's write lands on the origin, as the queue sends it now.
    devs[0]
        .buffered()
        .write_all_at(&[0xee; CHUNK as usize], 0)
        .unwrap();

    cow.copy_commit(&devs, b, &mut c).unwrap();
    assert!(
        !held(&cow, 0) && !held(&cow, 1),
        "both kept, none in flight"
    );
    assert!(held(&cow, 2), "never copied");

    let on_disk = kept(&path, "snap", 0);
    let chunks: Vec<u64> = on_disk.iter().map(|(c, _)| *c).collect();
    assert_eq!(chunks, vec![0, 1], "each chunk recorded once");
    assert!(on_disk[0].1.iter().all(|&x| x == 1), "chunk 0's old data");
    assert!(on_disk[1].1.iter().all(|&x| x == 2), "chunk 1's old data");
}

#[test]
fn a_store_that_leaves_between_read_and_commit_does_not_shift_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let map = VolumeMap::linear(0, 0, MIB);
    let mut batch = Batch::new().unwrap();
    {
        // "first" keeps chunk 3 already, so only "second" (the second
        // store) wants it below.
        let (devs, cow) = origin(&path, &["first"]);
        cow.copy_out(&devs, &map, &[(3 * CHUNK, CHUNK)], &mut batch)
            .unwrap();
    }
    let (devs, cow) = origin(&path, &["first", "second"]);
    let group = cow
        .copy_read(&devs, &map, &[(3 * CHUNK, CHUNK)], &mut batch)
        .unwrap()
        .expect("chunk 3 to copy for the second store");
    assert!(cow.take_store("first").is_some());
    cow.copy_commit(&devs, group, &mut batch).unwrap();

    assert_eq!(
        kept(&path, "first", 0).len(),
        1,
        "the store that left is untouched"
    );
    let second = kept(&path, "second", 1);
    assert_eq!(
        second.len(),
        1,
        "the other store, now first, records its chunk"
    );
    assert_eq!(second[0].0, 3);
    assert!(second[0].1.iter().all(|&x| x == 4));
    assert!(!held(&cow, 3));
}

#[test]
fn a_failed_read_leaves_no_chunk_held_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let (devs, cow) = origin(&path, &["snap"]);
    let mut batch = Batch::new().unwrap();
    // An origin map that reaches past the end of the file: its last chunk
    // cannot be read.
    let short = VolumeMap::linear(0, 8 * MIB - CHUNK / 2, MIB);
    let err = cow.copy_read(&devs, &short, &[(0, CHUNK)], &mut batch);
    assert!(err.is_err(), "a short read fails the group");
    assert!(held(&cow, 0), "chunk 0 is still not kept");
    let map = VolumeMap::linear(0, 0, MIB);
    // Nothing of the failed group lingers: a new copy-out takes chunk 0.
    cow.copy_out(&devs, &map, &[(0, CHUNK)], &mut batch)
        .unwrap();
    assert!(!held(&cow, 0));
    assert_eq!(kept(&path, "snap", 0).len(), 1);
}

#[test]
fn an_abandoned_group_records_nothing_and_holds_nothing_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let (devs, cow) = origin(&path, &["snap"]);
    let map = VolumeMap::linear(0, 0, MIB);
    let mut batch = Batch::new().unwrap();
    let group = cow
        .copy_read(&devs, &map, &[(5 * CHUNK, CHUNK)], &mut batch)
        .unwrap()
        .expect("chunk 5 to copy");
    cow.copy_abandon(&group);
    drop(group);
    assert!(kept(&path, "snap", 0).is_empty());
    cow.copy_out(&devs, &map, &[(5 * CHUNK, CHUNK)], &mut batch)
        .unwrap();
    assert!(!held(&cow, 5), "the abandoned group's hold is gone");
    assert_eq!(kept(&path, "snap", 0).len(), 1);
}
