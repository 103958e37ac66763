//! First writes to a snapshotted origin answered before their copy-out
//! (`deferred`): driven through two real queues on one volume, on a real
//! file. The answered write must not have landed yet; a read and a flush on
//! the other queue wait for it, a read elsewhere does not; afterwards the
//! origin has the new data, the snapshot's store the old; and a deferred
//! write that fails makes the next flush fail.

use devpool_engine::cowstore::CowStore;
use devpool_format::map::VolumeMap;
use devpool_serve::buffer::AlignedBuf;
use devpool_serve::device::{PvDevice, Volume};
use devpool_serve::queue::{Event, Op, Queue, Request};
use devpool_serve::snapshot::{Cow, DevsIo, Role};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const STORE_AT: u64 = 4 * MIB;

/// An origin (the file's first MiB, all 0x11) with one snapshot whose
/// zeroed store is the MiB at 4 MiB; the devices opened `writable`.
fn origin(dir: &tempfile::TempDir, writable: bool) -> (std::path::PathBuf, Arc<Volume>) {
    let path = dir.path().join("pv.img");
    if !path.exists() {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(&vec![0x11; MIB as usize], 0).unwrap();
    }
    let devs = vec![PvDevice::open(&path, writable).unwrap()];
    let store = CowStore::open(
        &DevsIo(&devs),
        "snap",
        VolumeMap::linear(0, STORE_AT, MIB),
        8,
    )
    .unwrap();
    let vol = Volume {
        name: "origin".into(),
        uuid: "origin-uuid".into(),
        map: VolumeMap::linear(0, 0, MIB),
        devs,
        read_only: false,
        cow: Some(Cow::new(
            Role::Origin {
                stores: vec![store],
            },
            Vec::new(),
        )),
        thin: None,
        kernel: None,
    };
    (path, Arc::new(vol))
}

fn request(op: Op, offset: u64, buf: Option<&mut AlignedBuf>) -> Request {
    let (len, iov) = match buf {
        Some(b) => (
            b.len() as u64,
            vec![libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }],
        ),
        None => (0, Vec::new()),
    };
    Request {
        op,
        offset,
        len,
        iov,
    }
}

/// A queue, and the completions it reported that the test has not taken
/// yet (one wait may report several requests; none may be lost).
struct Driven {
    q: Queue,
    done: HashMap<u64, i32>,
}

impl Driven {
    fn new(q: Queue) -> Driven {
        Driven {
            q,
            done: HashMap::new(),
        }
    }

    fn round(&mut self, min: usize) {
        let mut ev = Vec::new();
        self.q.wait(min, &mut ev).unwrap();
        for e in ev {
            if let Event::Done(c) = e {
                self.done.insert(c.tag, c.errno);
            }
        }
    }

    /// After one non-blocking round: the errno of every request done and
    /// not taken yet, by tag.
    fn poll(&mut self) -> HashMap<u64, i32> {
        self.round(0);
        std::mem::take(&mut self.done)
    }

    /// Drive the queue until `tag` is done; its errno.
    fn until_done(&mut self, tag: u64) -> i32 {
        for _ in 0..10_000 {
            if let Some(errno) = self.done.remove(&tag) {
                return errno;
            }
            self.round(1);
        }
        panic!("request {tag} never completed");
    }
}

impl std::ops::Deref for Driven {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.q
    }
}

impl std::ops::DerefMut for Driven {
    fn deref_mut(&mut self) -> &mut Queue {
        &mut self.q
    }
}

fn filled(byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(4096);
    b.as_mut_slice().fill(byte);
    b
}

#[test]
fn an_answered_write_holds_overlapping_requests_on_every_queue_until_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    let (path, vol) = origin(&dir, true);
    let deferred = &vol.cow.as_ref().unwrap().deferred;
    let mut a = Driven::new(Queue::new(Arc::clone(&vol), 64).unwrap());
    a.answer_writes_early();
    let mut b = Driven::new(Queue::new(Arc::clone(&vol), 64).unwrap());

    let mut data = filled(0x22);
    // SAFETY: every buffer here outlives the queues' use of it (each
    // request is waited for below).
    unsafe { a.submit(1, request(Op::Write { fua: false }, 8192, Some(&mut data))) }.unwrap();
    // The client's buffer is not needed once the write is answered.
    data.as_mut_slice().fill(0xee);
    assert_eq!(a.poll().get(&1), Some(&0), "answered at once");
    assert_eq!(
        deferred.pending(),
        1,
        "answered before it reached the origin"
    );

    let (mut same, mut other) = (filled(0), filled(0));
    // SAFETY: as above.
    unsafe {
        b.submit(7, request(Op::Read, 8192, Some(&mut same)))
            .unwrap();
        b.submit(8, request(Op::Flush, 0, None)).unwrap();
        b.submit(9, request(Op::Read, 16384, Some(&mut other)))
            .unwrap();
    }
    assert_eq!(b.until_done(9), 0, "a read elsewhere goes ahead");
    assert!(other.as_mut_slice().iter().all(|&x| x == 0x11));
    let early = b.poll();
    assert!(
        !early.contains_key(&7) && !early.contains_key(&8),
        "the overlapping read and the flush waited: {early:?}"
    );
    assert_eq!(b.in_flight(), 2);

    // Queue a runs the copy-out and the write; b is woken.
    while a.in_flight() > 0 {
        a.poll();
    }
    assert_eq!(deferred.pending(), 0);
    assert_eq!(b.until_done(7), 0);
    assert!(
        same.as_mut_slice().iter().all(|&x| x == 0x22),
        "the read sees the answered write"
    );
    assert_eq!(b.until_done(8), 0);

    // On disk: the new data on the origin, the old in the store's first
    // data chunk (chunk 2: after the header and the first exception area).
    let f = std::fs::File::open(&path).unwrap();
    let mut at = vec![0u8; 4096];
    f.read_exact_at(&mut at, 8192).unwrap();
    assert!(at.iter().all(|&x| x == 0x22));
    f.read_exact_at(&mut at, STORE_AT + 2 * 4096).unwrap();
    assert!(
        at.iter().all(|&x| x == 0x11),
        "the snapshot kept the old chunk"
    );
}

#[test]
fn a_deferred_write_that_fails_fails_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    origin(&dir, true);
    // The same volume, its device opened read-only behind the queue's back:
    // the copy-out and the origin write both fail after the answer.
    let (_, vol) = origin(&dir, false);
    let mut q = Driven::new(Queue::new(Arc::clone(&vol), 64).unwrap());
    q.answer_writes_early();
    let mut data = filled(0x33);
    // SAFETY: data outlives the request.
    unsafe { q.submit(1, request(Op::Write { fua: false }, 0, Some(&mut data))) }.unwrap();
    assert_eq!(q.poll().get(&1), Some(&0), "answered at once");
    // SAFETY: a flush points at no memory.
    unsafe { q.submit(2, request(Op::Flush, 0, None)) }.unwrap();
    assert_ne!(q.until_done(2), 0, "the lost write is reported");
    // SAFETY: as above.
    unsafe { q.submit(3, request(Op::Flush, 0, None)) }.unwrap();
    assert_eq!(q.until_done(3), 0, "reported once");
}
