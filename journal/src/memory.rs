//! An in-memory journal: the reference backend, used by tests, the simulator and the browser
//! fallback when OPFS is missing. "Durable" here means "until the process ends".

use std::collections::VecDeque;

use crate::{Journal, JournalError, JournalId, Lsn, LsnRange, Result};

#[derive(Debug, Clone)]
pub struct MemoryJournal {
    id: JournalId,
    /// The LSN of `entries[0]` (or the next LSN when `entries` is empty).
    first: Lsn,
    entries: VecDeque<Vec<u8>>,
}

impl MemoryJournal {
    pub fn new(id: JournalId) -> MemoryJournal {
        MemoryJournal { id, first: Lsn::FIRST, entries: VecDeque::new() }
    }

    /// The bytes held, for memory accounting.
    pub fn payload_bytes(&self) -> usize {
        self.entries.iter().map(Vec::len).sum()
    }
}

impl Journal for MemoryJournal {
    fn id(&self) -> JournalId {
        self.id
    }

    fn range(&self) -> LsnRange {
        LsnRange::from_count(self.first, self.entries.len() as u64)
    }

    fn append_batch(&mut self, payloads: &[&[u8]]) -> Result<LsnRange> {
        for p in payloads {
            crate::check_entry_len(self.id, p)?;
        }
        let next = self.range().next();
        self.entries.extend(payloads.iter().map(|p| p.to_vec()));
        Ok(LsnRange::from_count(next, payloads.len() as u64))
    }

    fn read(&self, lsn: Lsn) -> Result<Vec<u8>> {
        let range = self.range();
        if !range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range });
        }
        Ok(self.entries[(lsn.get() - self.first.get()) as usize].clone())
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> Result<()> {
        let range = self.range();
        if !range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range });
        }
        let payload = &self.entries[(lsn.get() - self.first.get()) as usize];
        let part = offset.checked_add(buf.len()).and_then(|end| payload.get(offset..end));
        buf.copy_from_slice(part.ok_or_else(|| crate::part_out_of_bounds(self.id, lsn, payload.len()))?);
        Ok(())
    }

    fn read_range(&self, range: LsnRange) -> Result<Vec<Vec<u8>>> {
        crate::check_in_range(self.id, self.range(), range)?;
        range.iter().map(|lsn| self.read(lsn)).collect()
    }

    fn can_remove_last(&self) -> bool {
        true
    }

    fn remove_last(&mut self) -> Result<()> {
        self.entries.pop_back();
        Ok(())
    }

    fn remove_prefix(&mut self, up_to: Lsn) -> Result<()> {
        let trimmed = self.range().remove_through(up_to);
        let drop = ((trimmed.first().get() - self.first.get()) as usize).min(self.entries.len());
        self.entries.drain(..drop);
        self.first = trimmed.first();
        Ok(())
    }
}
