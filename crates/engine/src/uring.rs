//! Several writes to one device in one io_uring submission, so the device
//! sees them together rather than one round trip after another.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Write `data[..len]` at each `(offset, len)` of `ranges`; returns when all
/// are done, with the first error. Without io_uring (an old kernel, or a
/// sandbox that forbids it), the writes run one after another. `data` is
/// `'static` so that no error path can free it under a write in flight.
pub fn write_all(file: &File, data: &'static [u8], ranges: &[(u64, u64)]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if ranges.iter().any(|&(_, l)| l as usize > data.len()) {
        return Err(io::Error::other("write longer than its buffer"));
    }
    let Ok(mut ring) = io_uring::IoUring::new(ranges.len().next_power_of_two() as u32) else {
        return ranges
            .iter()
            .try_for_each(|&(o, l)| file.write_all_at(&data[..l as usize], o));
    };
    let fd = io_uring::types::Fd(file.as_raw_fd());
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let sqe = io_uring::opcode::Write::new(fd, data.as_ptr(), len as u32)
            .offset(off)
            .build()
            .user_data(i as u64);
        // SAFETY: `data` is 'static, so it outlives every write.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut left = ranges.len();
    let mut first_err = None;
    while left > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            left -= 1;
            let i = cqe.user_data() as usize;
            let want = ranges.get(i).map_or(0, |r| r.1 as i64);
            let got = cqe.result() as i64;
            if first_err.is_none() && got != want {
                first_err = Some(if got < 0 {
                    io::Error::from_raw_os_error(-got as i32)
                } else {
                    io::Error::other(format!("short write: {got} of {want} bytes"))
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}
