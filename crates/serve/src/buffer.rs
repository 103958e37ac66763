//! Page-aligned I/O buffers (direct I/O needs aligned memory) and a small
//! per-connection pool so a busy connection does not allocate per request.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to 4 KiB).
    pub fn new(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout");
        // SAFETY: layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Reuse the buffer for `len` bytes (must fit the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "buffer length beyond capacity");
        self.len = len;
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

/// Keeps freed buffers by capacity class (powers of two from 4 KiB).
#[derive(Default)]
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
}

/// Buffers kept per class; beyond that they are freed.
const KEEP: usize = 64;

impl BufPool {
    fn class(len: usize) -> (usize, usize) {
        let cap = len.max(ALIGN).next_power_of_two();
        (cap.trailing_zeros() as usize - 12, cap)
    }
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let (c, cap) = Self::class(len);
        if let Some(mut b) = self.classes.get_mut(c).and_then(Vec::pop) {
            b.set_len(len);
            return b;
        }
        let mut b = AlignedBuf::new(cap);
        b.set_len(len);
        b
    }
    pub fn put(&mut self, b: AlignedBuf) {
        let (c, cap) = Self::class(b.capacity());
        if cap != b.capacity() {
            return;
        }
        if self.classes.len() <= c {
            self.classes.resize_with(c + 1, Vec::new);
        }
        if self.classes[c].len() < KEEP {
            self.classes[c].push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_aligned_and_reused() {
        let mut p = BufPool::default();
        let b = p.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        let addr = b.as_ptr();
        p.put(b);
        let b2 = p.get(6000);
        assert_eq!(b2.as_ptr(), addr);
    }
}
