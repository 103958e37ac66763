//! Property test: random sequences of writes (fast path and provisioning),
//! discards, write-zeroes, thin snapshots and deletes on a thin pool,
//! against an in-memory model of every volume's contents. The volumes'
//! `Thin`s share the pool's uncommitted changes (as in one server
//! process); writes commit on FUA, on flush, and before the engine changes
//! devices, and a flush step lets every `Thin` go, so the next reads come
//! from a fresh load of what was committed. After each step every volume
//! reads back exactly as the model says; at the end the pool's data use is
//! exactly the blocks still mapped, and thin_check (when installed) accepts
//! the metadata.

use devpool_engine::cowstore::{DevIo, read_mapped};
use devpool_engine::ops::thin::ThinChanges;
use devpool_engine::thinstore::ThinStore;
use devpool_format::map::VolumeMap;
use devpool_serve::device::PvDevice;
use devpool_serve::snapshot::DevsIo;
use devpool_serve::thin::Thin;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;
const META: u64 = 4 * MIB;
const DATA: u64 = 4 * MIB; // 64 blocks of 64 KiB: small enough to fill up
const VOL: u64 = MIB; // 16 chunks per volume
const CHUNK_SECTORS: u32 = 128;

#[derive(Debug, Clone)]
enum Step {
    Write {
        dev: usize,
        off: u64,
        len: u64,
        byte: u8,
    },
    Discard {
        dev: usize,
        off: u64,
        len: u64,
    },
    Zero {
        dev: usize,
        off: u64,
        len: u64,
    },
    Snapshot {
        dev: usize,
    },
    Delete {
        dev: usize,
    },
    Flush {
        dev: usize,
    },
    /// Every volume let go without a commit (a crash after the data writes).
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    let range = (0..VOL).prop_flat_map(|off| (Just(off), 1..=(VOL - off).min(200_000)));
    prop_oneof![
        6 => (0..4usize, range.clone(), any::<u8>())
            .prop_map(|(dev, (off, len), byte)| Step::Write { dev, off, len, byte: byte | 1 }),
        2 => (0..4usize, range.clone()).prop_map(|(dev, (off, len))| Step::Discard { dev, off, len }),
        1 => (0..4usize, range).prop_map(|(dev, (off, len))| Step::Zero { dev, off, len }),
        1 => (0..4usize).prop_map(|dev| Step::Snapshot { dev }),
        1 => (0..4usize).prop_map(|dev| Step::Delete { dev }),
        1 => (0..4usize).prop_map(|dev| Step::Flush { dev }),
        1 => Just(Step::Crash),
    ]
}

struct Pool {
    _dir: tempfile::TempDir,
    devs: Vec<PvDevice>,
    meta_map: VolumeMap,
    data_map: VolumeMap,
    vg: String,
    trans: u64,
}

impl Pool {
    fn new(tag: &str) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pv.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(META + DATA).unwrap();
        let devs = vec![PvDevice::open(&path, true).unwrap()];
        let meta_map = VolumeMap::linear(0, 0, META);
        let data_map = VolumeMap::linear(0, META, DATA);
        ThinStore::format(
            &DevsIo(&devs),
            "model/pool",
            meta_map.clone(),
            data_map.clone(),
            CHUNK_SECTORS,
        )
        .unwrap();
        Pool {
            _dir: dir,
            devs,
            meta_map,
            data_map,
            vg: format!("devpool-model-{}-{tag}", std::process::id()),
            trans: 0,
        }
    }

    fn store(&self) -> ThinStore {
        ThinStore::open(
            &DevsIo(&self.devs),
            "model/pool",
            self.meta_map.clone(),
            self.data_map.clone(),
        )
        .unwrap()
    }

    /// An engine-like change of devices, under the thin lock.
    fn change(&mut self, mut c: ThinChanges) {
        let lock_dir = std::path::Path::new(devpool_engine::lock::LVM_LOCK_DIR);
        let _l = devpool_engine::lock::lock_thin(lock_dir, &self.vg).unwrap();
        let mut s = self.store();
        self.trans += 1;
        c.trans_id = self.trans;
        s.apply(&c).unwrap();
        s.commit(&DevsIo(&self.devs)).unwrap();
    }

    fn open(&self, id: u64) -> Thin {
        Thin::new(self.store(), id, VOL, &self.vg)
    }
}

/// Write through the fast path when the plan allows it, else provisioning.
fn write(t: &Thin, devs: &[PvDevice], off: u64, buf: &[u8]) -> Result<(), i32> {
    match t.plan(off, buf.len() as u64, true) {
        Some(plan) => {
            for p in plan.pieces {
                devs[p.dev]
                    .buffered()
                    .write_all_at(&buf[p.at as usize..(p.at + p.len) as usize], p.offset)
                    .unwrap();
            }
            Ok(())
        }
        // Some writes are FUA (committed before they complete).
        None => t.write(devs, off, buf, buf[0] % 8 == 1),
    }
}

fn read_all(t: &Thin, devs: &[PvDevice]) -> Vec<u8> {
    let mut buf = vec![0xffu8; VOL as usize];
    let plan = t.plan(0, VOL, false).expect("reads always plan");
    for p in plan.pieces {
        devs[p.dev]
            .buffered()
            .read_exact_at(&mut buf[p.at as usize..(p.at + p.len) as usize], p.offset)
            .unwrap();
    }
    for (at, n) in plan.zeroes {
        buf[at as usize..(at + n) as usize].fill(0);
    }
    buf
}

fn run(steps: Vec<Step>, tag: &str) -> Result<(), TestCaseError> {
    let mut pool = Pool::new(tag);
    let chunk = u64::from(CHUNK_SECTORS) * 512;
    // Slot → (device id, model contents); four slots, device 1 to start.
    let mut slots: Vec<Option<(u64, Vec<u8>)>> = vec![None; 4];
    let mut next_id = 1u64;
    pool.change(ThinChanges {
        create: vec![next_id],
        ..ThinChanges::default()
    });
    slots[0] = Some((next_id, vec![0; VOL as usize]));
    // Device → per chunk, every byte value ever written there (a crash may
    // show any of them, or zeroes: never another device's data).
    let mut seen: BTreeMap<u64, Vec<BTreeSet<u8>>> = BTreeMap::new();
    seen.insert(next_id, vec![BTreeSet::new(); (VOL / chunk) as usize]);
    next_id += 1;
    let mut open: BTreeMap<u64, Thin> = BTreeMap::new();
    let devs = &pool.devs as *const Vec<PvDevice>;
    // SAFETY: `pool.devs` is never replaced while the test runs.
    let devs: &[PvDevice] = unsafe { &*devs };
    for s in steps {
        match s {
            Step::Write {
                dev,
                off,
                len,
                byte,
            } => {
                let Some((id, model)) = slots[dev].as_mut() else {
                    continue;
                };
                let t = open.entry(*id).or_insert_with(|| pool.open(*id));
                let buf = vec![byte; len as usize];
                match write(t, devs, off, &buf) {
                    Ok(()) => {
                        model[off as usize..(off + len) as usize].fill(byte);
                        if let Some(chunks) = seen.get_mut(id) {
                            for c in off / chunk..=(off + len - 1) / chunk {
                                chunks[c as usize].insert(byte);
                            }
                        }
                    }
                    // A full pool refuses the write whole: the model stays.
                    Err(e) => prop_assert_eq!(e, libc::ENOSPC),
                }
            }
            Step::Discard { dev, off, len } | Step::Zero { dev, off, len } => {
                let zero = matches!(s, Step::Zero { .. });
                let Some((id, model)) = slots[dev].as_mut() else {
                    continue;
                };
                let t = open.entry(*id).or_insert_with(|| pool.open(*id));
                match t.discard(devs, off, len, zero, false) {
                    Ok(()) => {
                        let (start, end) = (off, off + len);
                        if zero {
                            model[start as usize..end as usize].fill(0);
                        } else {
                            // Whole chunks read as zeroes; partial ones keep their data.
                            let first = start.div_ceil(chunk) * chunk;
                            let last = end / chunk * chunk;
                            if first < last {
                                model[first as usize..last as usize].fill(0);
                            }
                        }
                    }
                    Err(e) => prop_assert_eq!(e, libc::ENOSPC),
                }
            }
            Step::Snapshot { dev } => {
                let (Some((origin, model)), Some(free)) =
                    (slots[dev].clone(), slots.iter().position(Option::is_none))
                else {
                    continue;
                };
                // Servers of the pool stop for a change of devices.
                flush_all(&mut open, devs)?;
                pool.change(ThinChanges {
                    snapshot: vec![(next_id, origin)],
                    ..ThinChanges::default()
                });
                slots[free] = Some((next_id, model));
                let inherited = seen.get(&origin).cloned().unwrap_or_default();
                seen.insert(next_id, inherited);
                next_id += 1;
            }
            Step::Delete { dev } => {
                let Some((id, _)) = slots[dev].take() else {
                    continue;
                };
                flush_all(&mut open, devs)?;
                pool.change(ThinChanges {
                    delete: vec![id],
                    ..ThinChanges::default()
                });
            }
            Step::Flush { dev } => {
                // One volume's flush commits the pool's whole transaction:
                // every volume then reads as committed, from a fresh load.
                if let Some(t) = open.values().nth(dev % open.len().max(1)) {
                    prop_assert_eq!(t.flush(devs), Ok(()));
                }
                prop_assert!(open.values().all(|t| !t.dirty()));
                open.clear();
            }
            Step::Crash => {
                open.clear();
                for (id, model) in slots.iter_mut().flatten() {
                    let got = read_all(&pool.open(*id), devs);
                    for (c, part) in got.chunks(chunk as usize).enumerate() {
                        let ok = &seen[id][c];
                        prop_assert!(
                            part.iter().all(|b| *b == 0 || ok.contains(b)),
                            "after a crash, chunk {} of device {} shows data never written to it",
                            c,
                            id
                        );
                    }
                    // What it reads now is what it holds.
                    *model = got;
                }
            }
        }
        for (id, model) in slots.iter().flatten() {
            let t = open.entry(*id).or_insert_with(|| pool.open(*id));
            let got = read_all(t, devs);
            prop_assert!(got == *model, "device {} differs from the model", id);
        }
    }
    flush_all(&mut open, devs)?;
    // Data use is exactly the blocks still mapped (none leaked).
    let store = pool.store();
    let mut mapped = std::collections::BTreeSet::new();
    for d in store.m.devices.values() {
        for bt in d.mappings.values() {
            mapped.insert(bt.block);
        }
    }
    prop_assert_eq!(store.usage().data_used, mapped.len() as u64);
    let mut meta = vec![0u8; META as usize];
    read_mapped(&DevsIo(devs), &pool.meta_map, 0, &mut meta).unwrap();
    if let Ok(out) = std::process::Command::new("thin_check")
        .arg(write_tmp(&pool, &meta))
        .output()
    {
        prop_assert!(
            out.status.success(),
            "thin_check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = DevsIo(devs).sync();
    Ok(())
}

/// A fixed sequence that must match the model.
fn run_ok(steps: Vec<Step>, tag: &str) {
    if let Err(e) = run(steps, tag) {
        panic!("{e}");
    }
}

/// Commit what the open volumes provisioned, and let them go.
fn flush_all(open: &mut BTreeMap<u64, Thin>, devs: &[PvDevice]) -> Result<(), TestCaseError> {
    for t in open.values() {
        prop_assert_eq!(t.flush(devs), Ok(()));
    }
    open.clear();
    Ok(())
}

fn write_tmp(pool: &Pool, meta: &[u8]) -> std::path::PathBuf {
    let p = pool._dir.path().join("tmeta.bin");
    std::fs::write(&p, meta).unwrap();
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn thin_volumes_match_a_model_of_their_contents(steps in proptest::collection::vec(step(), 1..40)) {
        run(steps, "p")?;
    }
}

/// A block freed by an uncommitted discard is not handed out again before
/// the commit: after a crash the discarding volume still maps it (and may
/// read its old data or zeroes), never another write's data.
#[test]
fn a_block_freed_in_a_transaction_is_not_reused_before_its_commit() {
    let chunk = u64::from(CHUNK_SECTORS) * 512;
    let steps = vec![
        Step::Write {
            dev: 0,
            off: 0,
            len: chunk,
            byte: 0x11,
        },
        Step::Flush { dev: 0 },
        Step::Discard {
            dev: 0,
            off: 0,
            len: chunk,
        },
        Step::Write {
            dev: 0,
            off: chunk,
            len: 10,
            byte: 0x77,
        },
        Step::Crash,
    ];
    run_ok(steps, "reuse");
}

/// A block that two volumes share in the committed metadata stays shared
/// for in-place writes until the next commit, even after one volume
/// provisioned a block of its own in memory: otherwise the other volume's
/// write overwrites it in place, and after a crash the first one (mapped to
/// it again) reads the other's data.
#[test]
fn a_block_shared_in_the_committed_copy_is_not_overwritten_in_place_before_a_commit() {
    let chunk = u64::from(CHUNK_SECTORS) * 512;
    let steps = vec![
        Step::Write {
            dev: 0,
            off: 0,
            len: chunk,
            byte: 0x11,
        },
        Step::Flush { dev: 0 },
        // Devices 2 and 3 (slots 1, 2) share the block with device 1...
        Step::Snapshot { dev: 0 },
        Step::Snapshot { dev: 1 },
        // ... then only with each other (committed).
        Step::Write {
            dev: 0,
            off: 0,
            len: chunk,
            byte: 0x22,
        },
        Step::Flush { dev: 0 },
        // Device 2 gets its own block (uncommitted)...
        Step::Zero {
            dev: 1,
            off: 100,
            len: 10,
        },
        // ... so in memory device 3 alone maps the old one.
        Step::Write {
            dev: 2,
            off: 0,
            len: 10,
            byte: 0x62,
        },
        Step::Crash,
    ];
    run_ok(steps, "shared");
}
