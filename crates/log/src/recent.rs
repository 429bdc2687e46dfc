//! The newest records, kept in memory after the writer has written them, so readers near the
//! tail (the event bus's tailer, a live subscriber catching up a little, a long-poll) are
//! served without touching the segment files.
//!
//! It owns only copies of what the writer already wrote: it is a cache, never a source of
//! truth. It must never hold a gap (its seqs are contiguous), never grow past its limits (the
//! oldest records leave first), and never serve a record above the durable seq — the reader
//! passes the durable seq it read before looking, and records are pushed before the writer
//! publishes them durable, so everything between the ring's first seq and the durable seq is
//! here. Why: reading a page back from the file cost a 256 KiB buffer, a `pread`, and a
//! checksum of every frame from the nearest index entry, per page — most of the bus's CPU at
//! high event rates.

use crate::Seq;
use std::collections::VecDeque;

/// Payload bytes the ring holds at most by default.
pub const RECENT_BYTES_LIMIT_DEFAULT: usize = 8 * 1024 * 1024;
/// Records the ring holds at most.
pub const RECENT_RECORDS_LIMIT: usize = 65_536;

pub(crate) struct Recent {
    /// `(seq, payload)`, contiguous seqs in order.
    records: VecDeque<(Seq, Vec<u8>)>,
    bytes: usize,
    bytes_limit: usize,
}

impl Recent {
    pub(crate) fn new(bytes_limit: usize) -> Self {
        Recent {
            records: VecDeque::new(),
            bytes: 0,
            bytes_limit,
        }
    }

    /// Adds the record the writer just wrote at `seq`, which must follow the newest one held.
    pub(crate) fn push(&mut self, seq: Seq, payload: Vec<u8>) {
        if self.bytes_limit == 0 {
            return;
        }
        if let Some((last, _)) = self.records.back() {
            assert_eq!(seq, last + 1, "the ring's seqs are contiguous");
        }
        self.bytes += payload.len();
        self.records.push_back((seq, payload));
        while self.records.len() > RECENT_RECORDS_LIMIT
            || (self.bytes > self.bytes_limit && self.records.len() > 1)
        {
            if let Some((_, old)) = self.records.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    /// Records from `from` through `durable_seq`: at most `max_records`, about `max_bytes`
    /// (at least one), copied out. `None` when `from` is older than the ring (read the files).
    pub(crate) fn read(
        &self,
        from: Seq,
        durable_seq: Seq,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Vec<(Seq, Vec<u8>)>> {
        let (first, _) = self.records.front()?;
        if from < *first {
            return None;
        }
        let skip = usize::try_from(from - first).ok()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (seq, payload) in self.records.iter().skip(skip) {
            if *seq > durable_seq || out.len() >= max_records {
                break;
            }
            if !out.is_empty() && bytes + payload.len() > max_bytes {
                break;
            }
            bytes += payload.len();
            out.push((*seq, payload.clone()));
        }
        // A ring that starts at or before `from` but ends before it holds nothing newer: the
        // caller only asks for seqs at or below the durable seq, which the ring always has.
        debug_assert!(out.first().map_or(true, |(s, _)| *s == from));
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_only_what_it_holds_up_to_the_durable_seq() {
        let mut r = Recent::new(1024);
        assert_eq!(r.read(1, 10, 10, 1000), None);
        for seq in 1..=5 {
            r.push(seq, vec![seq as u8; 10]);
        }
        let got = r.read(2, 4, 10, 1000).unwrap();
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(got[0].1, vec![2u8; 10]);
        // Record and byte limits (at least one record).
        assert_eq!(r.read(1, 5, 2, 1000).unwrap().len(), 2);
        assert_eq!(r.read(1, 5, 10, 5).unwrap().len(), 1);
        assert_eq!(r.read(1, 5, 10, 25).unwrap().len(), 2);
    }

    #[test]
    fn drops_the_oldest_past_its_byte_limit() {
        let mut r = Recent::new(100);
        for seq in 1..=20 {
            r.push(seq, vec![0; 10]);
        }
        assert!(r.bytes <= 100);
        assert_eq!(r.records.front().map(|(s, _)| *s), Some(11));
        assert_eq!(
            r.read(5, 20, 100, 10_000),
            None,
            "older than the ring: the files"
        );
        assert_eq!(r.read(11, 20, 100, 10_000).unwrap().len(), 10);
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn refuses_a_gap() {
        let mut r = Recent::new(100);
        r.push(1, vec![1]);
        r.push(3, vec![3]);
    }
}
