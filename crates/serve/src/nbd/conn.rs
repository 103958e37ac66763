//! One NBD connection in the transmission phase: one thread, one ring. The
//! socket receive, the volume I/O and the stop signal all complete on the
//! same io_uring, so the thread sleeps in one `io_uring_enter` and each wake
//! handles everything that is ready; replies finished in one round go out in
//! one `sendmsg`.

use super::proto::{self, REQUEST_LEN, RequestHeader};
use super::spec::{Guess, WriteRun};
use crate::buffer::{AlignedBuf, BufPool};
use crate::device::Volume;
use crate::queue::{Event, Op, Queue, Request};
use io_uring::{opcode, types};
use slab::Slab;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

const RECV: u64 = 1;
const STOP: u64 = 2;
const RBUF: usize = 256 << 10;
/// Enough queue entries for deep client queues without waiting on the ring;
/// it also bounds the writes a connection answers ahead of their copy-out
/// (see `deferred`): 4096 of them (16 MiB of 4 KiB writes, the volume's
/// budget) keep the copier's two stages fed with groups of several hundred
/// chunks (1024 made the origin's first writes ~15% slower here).
const RING_DEPTH: u32 = 4096;
/// iovecs per sendmsg (IOV_MAX is 1024).
const SEND_BATCH: usize = 512;

struct Pending {
    handle: u64,
    buf: Option<AlignedBuf>,
    /// Reads send their buffer with the reply.
    read: bool,
}

struct PayloadIn {
    hdr: RequestHeader,
    buf: AlignedBuf,
    filled: usize,
}

struct Reply {
    head: [u8; 16],
    data: Option<AlignedBuf>,
}

pub struct Connection {
    fd: RawFd,
    q: Queue,
    bufs: BufPool,
    pending: Slab<Pending>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    payload: Option<PayloadIn>,
    /// The receive in flight guessed a run of writes (see `spec`).
    guess: Option<Guess>,
    run: WriteRun,
    recv_pending: bool,
    read_shut: bool,
    closing: bool,
    replies: Vec<Reply>,
}

/// Serve requests on a negotiated socket until the client disconnects or
/// `stop_fd` (an eventfd) becomes readable. In-flight requests are finished
/// and answered before returning.
pub fn serve(fd: RawFd, vol: Arc<Volume>, stop_fd: RawFd) -> io::Result<()> {
    let mut q = Queue::new_for_this_thread(vol, RING_DEPTH)?;
    // This loop drives the ring for as long as anything is in flight.
    q.answer_writes_early();
    q.spin_for_requests();
    let mut c = Connection {
        fd,
        q,
        bufs: BufPool::default(),
        pending: Slab::new(),
        rbuf: vec![0; RBUF],
        rstart: 0,
        rend: 0,
        payload: None,
        guess: None,
        run: WriteRun::default(),
        recv_pending: false,
        read_shut: false,
        closing: false,
        replies: Vec::new(),
    };
    let poll = opcode::PollAdd::new(types::Fd(stop_fd), libc::POLLIN as u32).build();
    // SAFETY: a poll on an eventfd points at no memory.
    unsafe { c.q.push_foreign(poll, STOP) };
    c.run()
}

impl Connection {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Vec::new();
        loop {
            self.parse_requests();
            self.ensure_recv();
            // New requests go to the disk before the replies are copied out
            // to the client: the disk works while the client reads them.
            if !self.replies.is_empty() {
                self.q.hand_over();
            }
            self.send_replies();
            if self.closing {
                if self.recv_pending && !self.read_shut {
                    // Wake our own receive so its buffer is free before we go.
                    // SAFETY: shutdown on our socket descriptor.
                    unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
                    self.read_shut = true;
                }
                if !self.recv_pending && self.pending.is_empty() && self.q.in_flight() == 0 {
                    return Ok(());
                }
            }
            events.clear();
            self.q.wait(1, &mut events)?;
            for ev in events.drain(..) {
                match ev {
                    Event::Done(c) => {
                        let Some(p) = self.pending.try_remove(c.tag as usize) else {
                            continue;
                        };
                        self.finish(p, c.errno);
                    }
                    Event::Foreign { data: RECV, result } => self.received(result),
                    Event::Foreign { data: STOP, .. } => self.closing = true,
                    Event::Foreign { .. } => {}
                }
            }
        }
    }

    fn finish(&mut self, p: Pending, errno: i32) {
        let head = proto::simple_reply(proto::nbd_errno(errno), p.handle);
        let data = match p.buf {
            Some(b) if p.read && errno == 0 => Some(b),
            Some(b) => {
                self.bufs.put(b);
                None
            }
            None => None,
        };
        self.replies.push(Reply { head, data });
    }

    fn reply_now(&mut self, handle: u64, errno: i32) {
        self.replies.push(Reply {
            head: proto::simple_reply(proto::nbd_errno(errno), handle),
            data: None,
        });
    }

    fn received(&mut self, result: i32) {
        self.recv_pending = false;
        let guess = self.guess.take();
        if result <= 0 {
            if let Some(g) = guess {
                g.give_back(&mut self.bufs);
            }
            // EOF, or an error other than an interrupted receive.
            if result == 0 || (-result != libc::EINTR && -result != libc::EAGAIN) {
                self.closing = true;
            }
            return;
        }
        let n = result as usize;
        if let Some(g) = guess {
            self.received_guess(g, n);
        } else if let Some(p) = &mut self.payload {
            p.filled += n;
            if p.filled == p.buf.len()
                && let Some(p) = self.payload.take()
            {
                self.start(p.hdr, Op::Write { fua: fua(&p.hdr) }, Some(p.buf), false);
            }
        } else {
            self.rend += n;
        }
    }

    /// Start the writes a guessed receive held whole; keep the rest (a
    /// payload still to come, stream bytes) as an ordinary receive would.
    fn received_guess(&mut self, g: Guess, n: usize) {
        // The guess was made with the stream buffer empty (rend 0), for no
        // more than the buffer holds.
        let Some(split) = g.split(n, &mut self.bufs, &mut self.rbuf[self.rend..]) else {
            self.closing = true;
            return;
        };
        self.rend += split.stream;
        for part in split.parts {
            self.run.note(Some(part.buf.len()));
            if part.whole() {
                let h = part.head;
                self.start(h, Op::Write { fua: fua(&h) }, Some(part.buf), false);
            } else {
                self.payload = Some(PayloadIn {
                    hdr: part.head,
                    buf: part.buf,
                    filled: part.filled,
                });
            }
        }
    }

    fn ensure_recv(&mut self) {
        if self.recv_pending || self.closing {
            return;
        }
        let (ptr, len) = if let Some(p) = &mut self.payload {
            let left = p.buf.len() - p.filled;
            // SAFETY: filled < len, inside the buffer.
            (unsafe { p.buf.as_mut_ptr().add(p.filled) }, left)
        } else {
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
                if let Some(mut g) = Guess::new(&self.run, RBUF, &mut self.bufs) {
                    let e = opcode::RecvMsg::new(types::Fd(self.fd), g.msg()).build();
                    // SAFETY: the guess's msghdr, iovecs and slots stay at
                    // their heap addresses in `self.guess` until the receive
                    // completes (run() waits for it before returning).
                    unsafe { self.q.push_foreign(e, RECV) };
                    self.guess = Some(g);
                    self.recv_pending = true;
                    return;
                }
            }
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            // SAFETY: rend <= RBUF.
            (
                unsafe { self.rbuf.as_mut_ptr().add(self.rend) },
                RBUF - self.rend,
            )
        };
        let e = opcode::Recv::new(types::Fd(self.fd), ptr, len as u32).build();
        // SAFETY: the target (payload buffer or rbuf tail) is neither freed nor
        // moved while recv_pending is set; run() waits for it before returning.
        unsafe { self.q.push_foreign(e, RECV) };
        self.recv_pending = true;
    }

    fn parse_requests(&mut self) {
        while !self.closing && self.payload.is_none() && self.rend - self.rstart >= REQUEST_LEN {
            let mut head = [0u8; REQUEST_LEN];
            head.copy_from_slice(&self.rbuf[self.rstart..self.rstart + REQUEST_LEN]);
            let Some(h) = RequestHeader::parse(&head) else {
                // Not NBD any more: nothing later can be trusted.
                self.closing = true;
                return;
            };
            self.rstart += REQUEST_LEN;
            self.run
                .note((h.typ == proto::CMD_WRITE).then_some(h.len as usize));
            match h.typ {
                proto::CMD_WRITE => {
                    if h.len > proto::MAX_PAYLOAD {
                        // Its payload cannot be skipped safely: disconnect.
                        self.closing = true;
                        return;
                    }
                    let len = h.len as usize;
                    let mut buf = self.bufs.get(len);
                    let take = len.min(self.rend - self.rstart);
                    buf.as_mut_slice()[..take]
                        .copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
                    self.rstart += take;
                    if take == len {
                        self.start(h, Op::Write { fua: fua(&h) }, Some(buf), false);
                    } else {
                        self.payload = Some(PayloadIn {
                            hdr: h,
                            buf,
                            filled: take,
                        });
                    }
                }
                proto::CMD_READ => {
                    if h.len > proto::MAX_PAYLOAD {
                        self.reply_now(h.handle, libc::EINVAL);
                        continue;
                    }
                    let buf = self.bufs.get(h.len as usize);
                    self.start(h, Op::Read, Some(buf), true);
                }
                proto::CMD_DISC => self.closing = true,
                proto::CMD_FLUSH => self.start(h, Op::Flush, None, false),
                proto::CMD_TRIM => self.start(h, Op::Discard, None, false),
                proto::CMD_WRITE_ZEROES => {
                    let may_trim = h.flags & proto::CMD_FLAG_NO_HOLE == 0;
                    self.start(
                        h,
                        Op::WriteZeroes {
                            may_trim,
                            fua: fua(&h),
                        },
                        None,
                        false,
                    )
                }
                _ => self.reply_now(h.handle, libc::EINVAL),
            }
        }
    }

    fn start(&mut self, h: RequestHeader, op: Op, mut buf: Option<AlignedBuf>, read: bool) {
        if h.len == 0 && op != Op::Flush {
            if let Some(b) = buf {
                self.bufs.put(b);
            }
            self.reply_now(h.handle, 0);
            return;
        }
        let iov = match &mut buf {
            Some(b) => vec![libc::iovec {
                iov_base: b.as_mut_ptr() as *mut _,
                iov_len: b.len(),
            }],
            None => Vec::new(),
        };
        let key = self.pending.insert(Pending {
            handle: h.handle,
            buf,
            read,
        });
        let req = Request {
            op,
            offset: h.offset,
            len: h.len as u64,
            iov,
        };
        // SAFETY: the buffer lives in `pending[key]` (heap memory that does not
        // move) until this request's completion removes it.
        if let Err(errno) = unsafe { self.q.submit(key as u64, req) } {
            let p = self.pending.remove(key);
            self.finish(p, errno);
        }
    }

    /// Send every finished reply; a client that went away ends the connection.
    fn send_replies(&mut self) {
        if self.replies.is_empty() {
            return;
        }
        let replies = std::mem::take(&mut self.replies);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(replies.len() * 2);
        for r in &replies {
            iov.push(libc::iovec {
                iov_base: r.head.as_ptr() as *mut _,
                iov_len: 16,
            });
            if let Some(d) = &r.data {
                iov.push(libc::iovec {
                    iov_base: d.as_ptr() as *mut _,
                    iov_len: d.len(),
                });
            }
        }
        if send_all(self.fd, &mut iov).is_err() {
            self.closing = true;
        }
        for r in replies {
            if let Some(d) = r.data {
                self.bufs.put(d);
            }
        }
    }
}

fn fua(h: &RequestHeader) -> bool {
    h.flags & proto::CMD_FLAG_FUA != 0
}

/// sendmsg until every byte is out (MSG_NOSIGNAL: a closed peer is an error,
/// not a SIGPIPE).
fn send_all(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let end = (start + SEND_BATCH).min(iov.len());
        // SAFETY: msghdr over our iovec slice.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov[start..end].as_mut_ptr();
            msg.msg_iovlen = end - start;
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        while n > 0 && start < end {
            let v = &mut iov[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing inside the same iovec.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut _;
                v.iov_len -= n;
                n = 0;
            }
        }
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(())
}
