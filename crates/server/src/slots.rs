//! Counted slots: a bound on how many long-lived things (WebSocket sessions, NDJSON uploads)
//! run at once. Their handlers return before the work ends, so the request concurrency limit
//! does not cover them; a slot is held by the work itself and freed when it is dropped.
//! Past the bound the caller answers 503 at once — never a queue.

use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Slots {
    open: AtomicUsize,
    limit: usize,
}

impl Slots {
    pub const fn new(limit: usize) -> Self {
        Slots {
            open: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes a slot, or `None` when all `limit` are in use.
    pub fn try_acquire(&'static self) -> Option<Slot> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.limit {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One slot in use, given back on drop.
pub struct Slot(&'static Slots);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_given_back() {
        static S: Slots = Slots::new(2);
        let a = S.try_acquire().unwrap();
        let _b = S.try_acquire().unwrap();
        assert!(S.try_acquire().is_none());
        drop(a);
        assert!(S.try_acquire().is_some());
        assert_eq!(S.open(), 1);
    }
}
