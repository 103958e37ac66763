//! The copier's two stages (`Cow::copy_read`, `Cow::copy_commit`) on a
//! real file: a group may read while the one before it commits, so two
//! groups can read the same chunk. Each chunk must be recorded once, with
//! the origin's old data, and stay held until every group that read it has
//! ended; a store that leaves the set between a read and its commit must not
//! make the commit record into the wrong store (or none); a group whose read
//! fails, or that is given up before its commit, must not hold its chunks
//! for good. Last, the whole path: two queues (two copiers, one answering
//! early) write into shared chunks in waves, and every chunk's old data is
//! kept exactly once while the origin ends up with every write.

use devpool_engine::cowstore::CowStore;
use devpool_format::map::VolumeMap;
use devpool_serve::batch::Batch;
use devpool_serve::device::PvDevice;
use devpool_serve::snapshot::{Cow, DevsIo, Role};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4096;
/// Where the snapshots' stores start in the file, and each one's size (room
/// for every chunk of the 1 MiB origin).
const STORES_AT: u64 = 4 * MIB;
const STORE_LEN: u64 = 2 * MIB;

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
    VolumeMap::linear(0, STORES_AT + i * STORE_LEN, STORE_LEN)
}

fn open_store(devs: &[PvDevice], name: &str, i: u64) -> CowStore {
    CowStore::open(&DevsIo(devs), name, store_map(i), 8).unwrap()
}

/// The origin's COW state with the stores `names` (store `i` at
/// `STORES_AT + i * STORE_LEN`).
fn origin(path: &Path, names: &[&str]) -> (Vec<PvDevice>, Cow) {
    let devs = vec![PvDevice::open(path, true).unwrap()];
    let stores = names
        .iter()
        .enumerate()
        .map(|(i, n)| open_store(&devs, n, i as u64))
        .collect();
    (devs, Cow::new(Role::Origin { stores }, Vec::new()))
}

/// A fresh image (see [`image`]) whose origin has one snapshot, "snap":
/// the directory (keep it), the image, its devices, the origin's COW state.
fn snapshotted_origin() -> (tempfile::TempDir, PathBuf, Vec<PvDevice>, Cow) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let (devs, cow) = origin(&path, &["snap"]);
    (dir, path, devs, cow)
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
            f.read_exact_at(&mut b, STORES_AT + i * STORE_LEN + e.new_chunk * CHUNK)
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
    let (_dir, path, devs, cow) = snapshotted_origin();
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
    let (_dir, path, devs, cow) = snapshotted_origin();
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
    let (_dir, path, devs, cow) = snapshotted_origin();
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

/// xorshift64: a fixed, dependency-free sequence.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One non-blocking round of `q`; every request it reports done succeeded.
fn round_ok(q: &mut devpool_serve::queue::Queue) {
    let mut events = Vec::new();
    q.wait(0, &mut events).unwrap();
    for e in &events {
        if let devpool_serve::queue::Event::Done(c) = e {
            assert_eq!(c.errno, 0, "request {} failed", c.tag);
        }
    }
}

#[test]
fn two_queues_writing_into_shared_chunks_keep_every_old_chunk_once() {
    use devpool_serve::buffer::AlignedBuf;
    use devpool_serve::device::Volume;
    use devpool_serve::queue::{Op, Queue, Request};
    use std::sync::Arc;

    let (_dir, path, devs, cow) = snapshotted_origin();
    let original = std::fs::read(&path).unwrap()[..MIB as usize].to_vec();
    let vol = Arc::new(Volume {
        name: "origin".into(),
        uuid: "origin-uuid".into(),
        map: VolumeMap::linear(0, 0, MIB),
        devs,
        read_only: false,
        cow: Some(cow),
        thin: None,
        kernel: None,
    });
    // One queue answers first writes early (an NBD connection's way), the
    // other does not (vhost-user-blk's); each has its own copier.
    let mut queues = [
        Queue::new(Arc::clone(&vol), 256).unwrap(),
        Queue::new(Arc::clone(&vol), 256).unwrap(),
    ];
    queues[0].answer_writes_early();

    let mut model = original.clone();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut touched = std::collections::BTreeSet::new();
    let mut tag = 0u64;
    for round in 0..40 {
        // A round's writes do not overlap each other, so their order does
        // not matter; many share a chunk, across both queues.
        let mut taken = vec![false; (MIB / 512) as usize];
        let mut bufs: Vec<AlignedBuf> = Vec::new();
        let mut reqs = Vec::new();
        for _ in 0..48 {
            let sectors = 1 + next(&mut rng) % 4;
            let first = next(&mut rng) % (MIB / 512 - sectors);
            let span = first as usize..(first + sectors) as usize;
            if taken[span.clone()].iter().any(|&t| t) {
                continue;
            }
            taken[span].iter_mut().for_each(|t| *t = true);
            let (at, len) = (first * 512, sectors * 512);
            let byte = 0xa0 + (round % 0x50) as u8;
            let mut b = AlignedBuf::new(len as usize);
            b.as_mut_slice().fill(byte);
            model[at as usize..(at + len) as usize].fill(byte);
            touched.extend(at / CHUNK..(at + len).div_ceil(CHUNK));
            bufs.push(b);
            reqs.push((at, len));
        }
        for (i, (b, &(at, len))) in bufs.iter_mut().zip(&reqs).enumerate() {
            let req = Request {
                op: Op::Write { fua: false },
                offset: at,
                len,
                iov: vec![libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: len as usize,
                }],
            };
            tag += 1;
            // SAFETY: `bufs` outlives the round, which waits for every
            // request below.
            unsafe { queues[i % 2].submit(tag, req) }.unwrap();
            if i % 8 == 7 {
                // Start a copy-out with what each queue holds, so the
                // next writes form a second group while it runs.
                for q in queues.iter_mut() {
                    round_ok(q);
                }
            }
        }
        let mut spins = 0;
        while queues.iter().any(|q| q.in_flight() > 0) {
            for q in queues.iter_mut() {
                round_ok(q);
            }
            spins += 1;
            assert!(spins < 10_000_000, "round {round} never finished");
            std::thread::yield_now();
        }
    }
    drop(queues);

    let now = std::fs::read(&path).unwrap();
    assert!(
        now[..MIB as usize] == model[..],
        "the origin holds every write"
    );
    let kept = kept(&path, "snap", 0);
    let chunks: Vec<u64> = kept.iter().map(|(c, _)| *c).collect();
    let mut sorted = chunks.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), chunks.len(), "no chunk recorded twice");
    assert_eq!(
        sorted,
        touched.iter().copied().collect::<Vec<_>>(),
        "every chunk written is kept"
    );
    for (c, data) in &kept {
        let at = (c * CHUNK) as usize;
        assert!(
            data[..] == original[at..at + CHUNK as usize],
            "chunk {c} keeps its data from before the snapshot"
        );
    }
}
