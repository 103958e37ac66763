//! Receiving a run of same-sized writes straight into aligned buffers.
//!
//! A write's payload follows its 28-byte header in the stream, so payloads
//! received into one big buffer sit at 28-byte steps, and direct I/O needs
//! aligned memory: each payload would be copied once more (measured: about
//! a tenth of the connection thread's time under 4 KiB random writes, and
//! some 10% of their rate on this 2-vCPU machine). While a client sends a
//! run of writes of one length, the next bytes are most likely more of them:
//! one `recvmsg` then scatters the stream over header slots and aligned
//! payload buffers, header, payload, header, payload. Whatever turns out
//! otherwise (another request, a shorter read) is handed back as plain
//! stream bytes, in order, for the ordinary parser: a wrong guess costs the
//! copy the guess would have saved, never a byte.

use super::proto::{CMD_WRITE, REQUEST_LEN, RequestHeader};
use crate::buffer::{AlignedBuf, BufPool};

/// Writes of one length in a row before the next receive guesses more.
const RUN: u32 = 4;
/// The largest payload guessed (larger ones are received straight into
/// their buffer anyway: the stream buffer cannot hold many of them).
const MAX_LEN: usize = 64 << 10;
/// Requests one guess receives at most (a client's queue depth, typically).
const MAX_SLOTS: usize = 32;

/// The lengths of the writes just parsed, to guess the next requests by.
#[derive(Default)]
pub struct WriteRun {
    len: usize,
    count: u32,
}

impl WriteRun {
    /// Count one parsed request: a write of `len` bytes, or `None` for
    /// anything else.
    pub fn note(&mut self, write_len: Option<usize>) {
        match write_len {
            Some(len) if len == self.len => self.count = self.count.saturating_add(1),
            Some(len) => *self = WriteRun { len, count: 1 },
            None => self.count = 0,
        }
    }

    /// The payload length to guess, if the run is long enough and the
    /// length suits (block-sized, small enough).
    fn guess(&self) -> Option<usize> {
        (self.count >= RUN && self.len > 0 && self.len.is_multiple_of(512) && self.len <= MAX_LEN)
            .then_some(self.len)
    }
}

/// One guessed receive: its slots and the `msghdr` the kernel fills them
/// through. Everything stays at a fixed heap address until the receive
/// completes (the caller keeps the value alive until then).
pub struct Guess {
    len: usize,
    heads: Box<[[u8; REQUEST_LEN]]>,
    bufs: Vec<AlignedBuf>,
    iov: Box<[libc::iovec]>,
    msg: Box<libc::msghdr>,
}

/// A write of the guessed length that a guessed receive held, with the
/// first `filled` bytes of its payload in `buf`: all of them, or (for the
/// last one) fewer, the rest still to be received into `buf`.
pub struct Part {
    pub head: RequestHeader,
    pub buf: AlignedBuf,
    pub filled: usize,
}

impl Part {
    /// Whether its whole payload is in.
    pub fn whole(&self) -> bool {
        self.filled == self.buf.len()
    }
}

/// What [`Guess::split`] found.
pub struct Split {
    pub parts: Vec<Part>,
    /// How many bytes after the parts are not a guessed write (up to the
    /// end of what was received), copied to the start of the caller's
    /// stream buffer for the ordinary parser.
    pub stream: usize,
}

impl Guess {
    /// A receive of up to `room` bytes guessed from `run`, or `None` when
    /// there is nothing to guess.
    pub fn new(run: &WriteRun, room: usize, pool: &mut BufPool) -> Option<Guess> {
        let len = run.guess()?;
        let slots = (room / (REQUEST_LEN + len)).min(MAX_SLOTS);
        if slots < 2 {
            return None;
        }
        let mut heads = vec![[0u8; REQUEST_LEN]; slots].into_boxed_slice();
        let mut bufs: Vec<AlignedBuf> = (0..slots).map(|_| pool.get(len)).collect();
        let iov: Box<[libc::iovec]> = heads
            .iter_mut()
            .zip(bufs.iter_mut())
            .flat_map(|(h, b)| {
                [
                    libc::iovec {
                        iov_base: h.as_mut_ptr().cast(),
                        iov_len: REQUEST_LEN,
                    },
                    libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: len,
                    },
                ]
            })
            .collect();
        let mut g = Guess {
            len,
            heads,
            bufs,
            iov,
            // SAFETY: an all-zero msghdr is a valid empty one.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        };
        g.msg.msg_iov = g.iov.as_mut_ptr();
        g.msg.msg_iovlen = g.iov.len() as _;
        Some(g)
    }

    /// The `msghdr` to receive into.
    pub fn msg(&mut self) -> *mut libc::msghdr {
        &mut *self.msg
    }

    /// Nothing was received: the buffers go back to `pool`.
    pub fn give_back(self, pool: &mut BufPool) {
        for b in self.bufs {
            pool.put(b);
        }
    }

    /// Split the `n` bytes received into what they are: the guessed writes,
    /// then what is not one, copied to the start of `stream` (the empty
    /// stream buffer, at least as large as the guess's `room`). Unused
    /// buffers go back to `pool`. `None`: `stream` is too small for it.
    pub fn split(self, n: usize, pool: &mut BufPool, stream: &mut [u8]) -> Option<Split> {
        let Guess {
            len, heads, bufs, ..
        } = self;
        let mut parts = Vec::new();
        // Bytes copied to `stream`, once a slot was not a guessed write.
        let mut streamed: Option<usize> = None;
        let mut fits = true;
        let mut left = n;
        for (head, mut buf) in heads.iter().zip(bufs) {
            let head_bytes = left.min(REQUEST_LEN);
            left -= head_bytes;
            let payload_bytes = left.min(len);
            left -= payload_bytes;
            if head_bytes == 0 {
                pool.put(buf);
                continue;
            }
            if streamed.is_none() {
                let parsed = (head_bytes == REQUEST_LEN)
                    .then(|| RequestHeader::parse(head))
                    .flatten()
                    .filter(|h| h.typ == CMD_WRITE && h.len as usize == len);
                if let Some(head) = parsed {
                    parts.push(Part {
                        head,
                        buf,
                        filled: payload_bytes,
                    });
                    continue;
                }
                streamed = Some(0);
            }
            if let Some(at) = &mut streamed {
                for bytes in [&head[..head_bytes], &buf.as_mut_slice()[..payload_bytes]] {
                    match stream.get_mut(*at..*at + bytes.len()) {
                        Some(to) => to.copy_from_slice(bytes),
                        None => fits = false,
                    }
                    *at += bytes.len();
                }
            }
            pool.put(buf);
        }
        fits.then_some(Split {
            parts,
            stream: streamed.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::CMD_READ;
    use super::*;

    /// A request header's bytes.
    fn header(h: &RequestHeader) -> Vec<u8> {
        h.encode().to_vec()
    }

    fn request(typ: u16, handle: u64, len: u32) -> Vec<u8> {
        header(&RequestHeader {
            flags: 0,
            typ,
            handle,
            offset: handle * 4096,
            len,
        })
    }

    fn write(handle: u64, len: usize) -> Vec<u8> {
        let mut r = request(CMD_WRITE, handle, len as u32);
        r.extend((0..len).map(|i| (i as u64 * 31 + handle) as u8));
        r
    }

    /// Scatter `stream` through a guess as the kernel would, and split it:
    /// the parts, and the bytes handed back as stream.
    fn receive(run: &WriteRun, stream: &[u8], pool: &mut BufPool) -> (Vec<Part>, Vec<u8>) {
        let g = Guess::new(run, 256 << 10, pool).expect("a guess");
        let mut at = 0;
        for v in g.iov.iter() {
            let n = v.iov_len.min(stream.len() - at);
            // SAFETY: the iovec points into the guess's own slots.
            unsafe { std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), v.iov_base.cast(), n) };
            at += n;
        }
        assert_eq!(at, stream.len(), "the test stream fits the guess");
        let mut back = vec![0u8; 256 << 10];
        let split = g.split(stream.len(), pool, &mut back).expect("fits");
        back.truncate(split.stream);
        (split.parts, back)
    }

    fn run_of(len: usize) -> WriteRun {
        let mut run = WriteRun::default();
        for _ in 0..RUN {
            run.note(Some(len));
        }
        run
    }

    #[test]
    fn only_a_run_of_block_sized_writes_is_guessed() {
        let mut pool = BufPool::default();
        let mut run = WriteRun::default();
        for _ in 0..RUN - 1 {
            run.note(Some(4096));
        }
        assert!(Guess::new(&run, 256 << 10, &mut pool).is_none());
        run.note(Some(4096));
        assert!(Guess::new(&run, 256 << 10, &mut pool).is_some());
        run.note(None);
        assert!(Guess::new(&run, 256 << 10, &mut pool).is_none());
        assert!(Guess::new(&run_of(1000), 256 << 10, &mut pool).is_none());
        assert!(Guess::new(&run_of(1 << 20), 256 << 10, &mut pool).is_none());
        // Room for a single request is no guess.
        assert!(Guess::new(&run_of(4096), 5000, &mut pool).is_none());
    }

    #[test]
    fn guessed_writes_land_in_aligned_buffers_and_the_rest_stays_stream() {
        let mut pool = BufPool::default();
        let run = run_of(4096);
        // Two writes, a read, then a write of the guessed length that must
        // stay stream (everything after a miss is), and half a header.
        let mut stream = [write(1, 4096), write(2, 4096), request(CMD_READ, 3, 4096)].concat();
        let after_miss = [write(4, 4096), request(CMD_WRITE, 5, 4096)[..10].to_vec()].concat();
        stream.extend_from_slice(&after_miss);
        let (parts, rest) = receive(&run, &stream, &mut pool);
        assert_eq!(parts.len(), 2);
        for (i, p) in parts.iter().enumerate() {
            assert!(p.whole(), "part {i} is not a whole write");
            let (h, buf) = (&p.head, &p.buf);
            assert_eq!(h.handle, i as u64 + 1);
            assert_eq!(buf.as_ptr() as usize % 4096, 0, "aligned");
            let want = write(i as u64 + 1, 4096);
            // SAFETY: reading the buffer's own bytes.
            let got = unsafe { std::slice::from_raw_parts(buf.as_ptr(), 4096) };
            assert_eq!(got, &want[REQUEST_LEN..]);
        }
        // The read and what follows are stream bytes.
        let want = [request(CMD_READ, 3, 4096), after_miss].concat();
        assert_eq!(rest, want);
    }

    #[test]
    fn a_payload_cut_short_is_received_on_into_its_buffer() {
        let mut pool = BufPool::default();
        let run = run_of(8192);
        let stream = [write(1, 8192), write(2, 8192)[..REQUEST_LEN + 100].to_vec()].concat();
        let (parts, rest) = receive(&run, &stream, &mut pool);
        assert_eq!(parts.len(), 2);
        assert!(rest.is_empty());
        assert!(parts[0].whole() && parts[0].head.handle == 1);
        assert!(!parts[1].whole(), "the cut write is not partial");
        let cut = &parts[1];
        assert_eq!((cut.head.handle, cut.filled, cut.buf.len()), (2, 100, 8192));
        // A cut header is stream: the parser waits for the rest of it.
        let stream = [write(1, 8192), write(2, 8192)[..REQUEST_LEN - 1].to_vec()].concat();
        let (parts, rest) = receive(&run, &stream, &mut pool);
        assert_eq!(parts.len(), 1);
        assert_eq!(rest, write(2, 8192)[..REQUEST_LEN - 1]);
    }

    #[test]
    fn garbage_where_a_header_was_guessed_reaches_the_parser_unchanged() {
        let mut pool = BufPool::default();
        let run = run_of(4096);
        let stream: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let (parts, rest) = receive(&run, &stream, &mut pool);
        assert!(parts.is_empty());
        assert_eq!(rest, stream);
    }

    /// The bytes a part stands for, as the connection takes them: the
    /// header, then the whole buffer of a whole write, or the payload bytes
    /// received so far of a cut one.
    fn bytes_of(part: &Part) -> Vec<u8> {
        let mut r = header(&part.head);
        let n = if part.whole() {
            part.buf.len()
        } else {
            part.filled
        };
        // SAFETY: reading the buffer's own first n bytes.
        r.extend_from_slice(unsafe { std::slice::from_raw_parts(part.buf.as_ptr(), n) });
        r
    }

    /// One piece of a client's stream: a write of the guessed length, a
    /// write of another length, a read, a flush, or bytes that are not NBD.
    fn piece() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (any::<u64>(), any::<bool>()).prop_map(|(h, fua)| {
                let mut w = write(h % 1000, 4096);
                w[5] = u8::from(fua);
                w
            }),
            1 => (any::<u64>(), 1usize..9000).prop_map(|(h, len)| write(h % 1000, len)),
            1 => any::<u64>().prop_map(|h| request(CMD_READ, h % 1000, 4096)),
            1 => any::<u64>().prop_map(|h| request(3, h % 1000, 0)),
            1 => proptest::collection::vec(any::<u8>(), 1..64),
        ]
    }

    proptest::proptest! {
        /// Whatever arrives and wherever the receive ends, the guessed
        /// writes and the bytes handed back are exactly what was received,
        /// in order: no byte lost, doubled or moved.
        #[test]
        fn every_received_byte_comes_back_once_and_in_order(
            pieces in proptest::collection::vec(piece(), 1..40),
            end_of in 0usize..40,
            near in proptest::prop_oneof![-2i64..=2, -40i64..=40],
        ) {
            let stream = pieces.concat();
            let room = 256 << 10;
            let mut pool = BufPool::default();
            let g = Guess::new(&run_of(4096), room, &mut pool).expect("a guess");
            let capacity: usize = g.iov.iter().map(|v| v.iov_len).sum();
            g.give_back(&mut pool);
            // The receive ends near the end of some piece (where the cases
            // that matter are: a header or payload cut by a few bytes).
            let end: usize = pieces.iter().take(end_of % pieces.len() + 1).map(Vec::len).sum();
            let n = (end as i64 + near).clamp(1, stream.len().min(capacity) as i64) as usize;
            let (parts, rest) = receive(&run_of(4096), &stream[..n], &mut pool);
            let mut got: Vec<u8> = parts.iter().flat_map(bytes_of).collect();
            // Only the last part may be cut short, and only at the end.
            for p in parts.iter().rev().skip(1) {
                proptest::prop_assert!(p.whole(), "a partial write before the end");
            }
            if parts.last().is_some_and(|p| !p.whole()) {
                proptest::prop_assert!(rest.is_empty(), "stream bytes after a partial write");
            }
            got.extend_from_slice(&rest);
            proptest::prop_assert_eq!(got, stream[..n].to_vec());
        }
    }

    #[test]
    fn stream_bytes_that_do_not_fit_the_callers_buffer_are_refused() {
        let mut pool = BufPool::default();
        let g = Guess::new(&run_of(4096), 256 << 10, &mut pool).expect("a guess");
        let garbage = [0xabu8; 100];
        // SAFETY: the first iovec is the first header slot (28 bytes) and
        // the second its 4 KiB payload buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(garbage.as_ptr(), g.iov[0].iov_base.cast(), 28);
            std::ptr::copy_nonoverlapping(garbage.as_ptr(), g.iov[1].iov_base.cast(), 72);
        }
        assert!(g.split(100, &mut pool, &mut [0u8; 50]).is_none());
    }
}
