//! The process's allocator: mimalloc for everything small, the system allocator for blocks of
//! [`LARGE_BYTES_MIN`] or more.
//!
//! It owns only the routing. Why two: the event path allocates a handful of small buffers per
//! event, and at 70k events/s glibc's `malloc`/`free` were about 13 % of the server's CPU,
//! where mimalloc is much cheaper. But mimalloc's `realloc` of a large block allocates anew
//! and copies, while glibc serves blocks this large with `mmap` and grows them with `mremap`,
//! which moves no bytes: the first insert into a million-row HNSW graph loaded from a file
//! grows a 600 MB arena, and a copy of it made a crash restart's replay a second slower.
//!
//! It must never hand a block to the allocator that did not make it. The routing is by the
//! layout's size, which Rust passes unchanged to `dealloc` and `realloc` (the contract of
//! `GlobalAlloc`), so the size alone says which allocator owns a block.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large go to the system allocator. glibc always maps blocks of 32 MiB
/// or more (its largest dynamic mmap threshold on 64-bit), so these are always remappable.
pub const LARGE_BYTES_MIN: usize = 32 << 20;

pub struct Routed;

static SMALL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn is_large(size: usize) -> bool {
    size >= LARGE_BYTES_MIN
}

unsafe impl GlobalAlloc for Routed {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size()) {
            System.alloc(layout)
        } else {
            SMALL.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            SMALL.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(layout.size()) {
            System.dealloc(ptr, layout)
        } else {
            SMALL.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (is_large(layout.size()), is_large(new_size)) {
            (true, true) => System.realloc(ptr, layout, new_size),
            (false, false) => SMALL.realloc(ptr, layout, new_size),
            // Crossing the line: the block moves to the other allocator.
            _ => {
                let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
                    return std::ptr::null_mut();
                };
                let new_ptr = self.alloc(new_layout);
                if !new_ptr.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new_ptr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks grow and shrink across the line with their bytes intact, in both allocators.
    #[test]
    fn realloc_across_the_line_keeps_the_bytes() {
        let a = Routed;
        let sizes = [
            64,
            LARGE_BYTES_MIN - 8,
            LARGE_BYTES_MIN,
            LARGE_BYTES_MIN * 2 + 8,
            4096,
            LARGE_BYTES_MIN + 1,
            16,
        ];
        unsafe {
            let mut layout = Layout::from_size_align(sizes[0], 16).unwrap();
            let mut p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..layout.size() {
                *p.add(i) = (i % 251) as u8;
            }
            for &size in &sizes[1..] {
                let kept = layout.size().min(size);
                p = a.realloc(p, layout, size);
                assert!(!p.is_null());
                assert_eq!(p as usize % 16, 0, "alignment kept");
                for i in (0..kept).step_by(4099).chain([kept - 1]) {
                    assert_eq!(
                        *p.add(i),
                        (i % 251) as u8,
                        "byte {i} after growing to {size}"
                    );
                }
                layout = Layout::from_size_align(size, 16).unwrap();
                for i in kept..size {
                    *p.add(i) = (i % 251) as u8;
                }
            }
            a.dealloc(p, layout);
            let z = Layout::from_size_align(LARGE_BYTES_MIN, 8).unwrap();
            let q = a.alloc_zeroed(z);
            assert!(!q.is_null());
            assert!((0..LARGE_BYTES_MIN).step_by(4096).all(|i| *q.add(i) == 0));
            a.dealloc(q, z);
        }
    }
}
