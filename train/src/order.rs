//! The training row order: a pure function of (seed, epoch, position).
//!
//! Each epoch permutes the row groups of all shards (a shard-level shuffle that also mixes row
//! groups across shards) with a generator seeded from (seed, epoch), streams their row indices
//! through a shuffle buffer of `capacity` rows driven by the same generator, and ends when every
//! row has come out once. Only row *indices* are shuffled here, so the order can be replayed to
//! any position without touching the data: resuming at (epoch, index) regenerates the epoch and
//! skips `index` entries.

use crate::rng::{rng, tag};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where the stream is: the next entry to come out is number `index` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub index: u64,
}

/// A row: `row` of unit (row group) `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowRef {
    pub unit: u32,
    pub row: u32,
}

/// One epoch's order.
pub struct EpochOrder {
    unit_rows: Vec<u32>,
    order: Vec<u32>,
    next_unit: usize,
    buffer: Vec<RowRef>,
    capacity: usize,
    rng: ChaCha8Rng,
    index: u64,
}

impl EpochOrder {
    pub fn new(unit_rows: &[u32], seed: u64, epoch: u64, capacity: usize) -> EpochOrder {
        let mut rng = rng(seed, tag::ORDER, &[epoch]);
        let mut order: Vec<u32> = (0..unit_rows.len() as u32).collect();
        order.shuffle(&mut rng);
        EpochOrder {
            unit_rows: unit_rows.to_vec(),
            order,
            next_unit: 0,
            buffer: Vec::with_capacity(capacity + 64),
            capacity: capacity.max(1),
            rng,
            index: 0,
        }
    }

    /// Entries produced so far.
    pub fn index(&self) -> u64 {
        self.index
    }
}

impl Iterator for EpochOrder {
    type Item = RowRef;
    fn next(&mut self) -> Option<RowRef> {
        while self.buffer.len() < self.capacity && self.next_unit < self.order.len() {
            let u = self.order[self.next_unit];
            self.next_unit += 1;
            self.buffer.extend((0..self.unit_rows[u as usize]).map(|row| RowRef { unit: u, row }));
        }
        if self.buffer.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.buffer.len());
        self.index += 1;
        Some(self.buffer.swap_remove(j))
    }
}

/// The endless stream over epochs.
pub struct RowStream {
    unit_rows: Vec<u32>,
    seed: u64,
    capacity: usize,
    epoch: u64,
    current: EpochOrder,
}

impl RowStream {
    /// A stream whose next entry is the one at `start`.
    pub fn new(unit_rows: &[u32], seed: u64, capacity: usize, start: Position) -> RowStream {
        assert!(unit_rows.iter().any(|&n| n > 0), "a stream needs at least one row");
        let mut current = EpochOrder::new(unit_rows, seed, start.epoch, capacity);
        for _ in 0..start.index {
            if current.next().is_none() {
                break;
            }
        }
        let mut s = RowStream { unit_rows: unit_rows.to_vec(), seed, capacity, epoch: start.epoch, current };
        if s.current.index() < start.index {
            // The position was the end of its epoch (or beyond, with fewer rows than before).
            s.start_epoch(start.epoch + 1);
        }
        s
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.current = EpochOrder::new(&self.unit_rows, self.seed, epoch, self.capacity);
    }

    /// The position of the next entry.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, index: self.current.index() }
    }

    /// The next entry and its position.
    pub fn next_row(&mut self) -> (Position, RowRef) {
        loop {
            let pos = self.position();
            if let Some(r) = self.current.next() {
                return (pos, r);
            }
            self.start_epoch(self.epoch + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn an_epoch_is_a_permutation_of_all_rows() {
        let rows = [64, 64, 10, 0, 3];
        for cap in [1, 7, 64, 100, 1000] {
            let e: Vec<RowRef> = EpochOrder::new(&rows, 3, 0, cap).collect();
            assert_eq!(e.len(), 141);
            let set: HashSet<RowRef> = e.iter().copied().collect();
            assert_eq!(set.len(), 141, "cap {cap}");
            assert!(e.iter().all(|r| r.row < rows[r.unit as usize]));
        }
    }

    #[test]
    fn order_depends_on_seed_and_epoch_only() {
        let rows = [64, 64, 64, 20];
        let a: Vec<RowRef> = EpochOrder::new(&rows, 1, 0, 128).collect();
        let b: Vec<RowRef> = EpochOrder::new(&rows, 1, 0, 128).collect();
        let c: Vec<RowRef> = EpochOrder::new(&rows, 1, 1, 128).collect();
        let d: Vec<RowRef> = EpochOrder::new(&rows, 2, 0, 128).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        // The buffer mixes row groups: the first 64 rows do not all come from one unit.
        assert!(a[..64].iter().map(|r| r.unit).collect::<HashSet<_>>().len() > 1);
    }

    #[test]
    fn a_stream_restarted_anywhere_continues_identically() {
        let rows = [5, 7, 3];
        let mut full = RowStream::new(&rows, 9, 4, Position::default());
        let all: Vec<(Position, RowRef)> = (0..50).map(|_| full.next_row()).collect();
        // Crosses epoch boundaries (15 rows per epoch).
        assert_eq!(all[15].0, Position { epoch: 1, index: 0 });
        assert_eq!(all[14].0, Position { epoch: 0, index: 14 });
        for k in [0, 1, 14, 15, 16, 33] {
            let mut s = RowStream::new(&rows, 9, 4, all[k].0);
            let rest: Vec<(Position, RowRef)> = (k..50).map(|_| s.next_row()).collect();
            assert_eq!(rest, all[k..], "restart at {k}");
        }
        // The position just past the end of an epoch is the start of the next one.
        let mut s = RowStream::new(&rows, 9, 4, Position { epoch: 0, index: 15 });
        assert_eq!(s.next_row(), all[15]);
        // Epochs differ from each other.
        let e0: Vec<RowRef> = all[..15].iter().map(|x| x.1).collect();
        let e1: Vec<RowRef> = all[15..30].iter().map(|x| x.1).collect();
        assert_ne!(e0, e1);
    }
}
