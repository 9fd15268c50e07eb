//! What both sessions share: the send window of one document in one direction (a client's
//! upload of its timeline, a subscriber's download of storage), and fair round-robin order.

use std::collections::VecDeque;

use pagesync_journal::Lsn;

use super::RETRANSMIT_MS;

/// One direction of one document's transfer: what was sent, what the peer holds, and the
/// batches in between. Acknowledgements only move it forward; a batch unacknowledged for
/// `RETRANSMIT_MS` rewinds it to what the peer holds.
#[derive(Debug)]
pub(crate) struct SendWindow {
    /// The next LSN to send.
    pub(crate) next: Lsn,
    /// The peer holds everything before this.
    pub(crate) acked: Lsn,
    /// Sent and unacknowledged: (first LSN after the batch, bytes).
    inflight: VecDeque<(Lsn, usize)>,
    last_send_ms: i64,
}

impl SendWindow {
    pub(crate) fn new(start: Lsn) -> SendWindow {
        SendWindow { next: start, acked: start, inflight: VecDeque::new(), last_send_ms: 0 }
    }

    /// Bytes that may be sent now, within `limit` unacknowledged bytes.
    pub(crate) fn room(&self, limit: usize) -> usize {
        limit.saturating_sub(self.inflight.iter().map(|(_, b)| b).sum())
    }

    /// A batch of `bytes` ending before `end` went out.
    pub(crate) fn sent(&mut self, end: Lsn, bytes: usize, now_ms: i64) {
        self.next = end;
        self.inflight.push_back((end, bytes));
        self.last_send_ms = now_ms;
    }

    /// The peer holds everything before `next`.
    pub(crate) fn ack(&mut self, next: Lsn) {
        self.acked = self.acked.max(next);
        self.next = self.next.max(self.acked);
        let acked = self.acked;
        self.inflight.retain(|(end, _)| *end > acked);
    }

    /// When unacknowledged batches are due to be sent again, if there are any.
    pub(crate) fn resend_at(&self) -> Option<i64> {
        (!self.inflight.is_empty()).then_some(self.last_send_ms + RETRANSMIT_MS)
    }

    /// Sends again from what the peer holds, if its batches went unacknowledged too long.
    pub(crate) fn rewind_if_due(&mut self, now_ms: i64) {
        if self.resend_at().is_some_and(|t| now_ms >= t) {
            self.inflight.clear();
            self.next = self.acked;
        }
    }
}

/// `keys` in round-robin order: those after `cursor` (the last one served) first, then the
/// rest from the start. Every sender walks its documents and connections this way, so none is
/// served twice while another waits.
pub(crate) fn round_robin<K: Ord + Copy>(keys: impl IntoIterator<Item = K>, cursor: Option<K>) -> Vec<K> {
    let mut keys: Vec<K> = keys.into_iter().collect();
    if let Some(c) = cursor {
        let at = keys.partition_point(|k| *k <= c);
        keys.rotate_left(at);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_starts_after_the_cursor() {
        assert_eq!(round_robin([1, 2, 3, 4], None), [1, 2, 3, 4]);
        assert_eq!(round_robin([1, 2, 3, 4], Some(2)), [3, 4, 1, 2]);
        assert_eq!(round_robin([1, 3, 5], Some(4)), [5, 1, 3]);
        assert_eq!(round_robin([1, 3, 5], Some(9)), [1, 3, 5]);
    }

    #[test]
    fn acks_move_forward_and_silence_rewinds() {
        let lsn = |n| Lsn::new(n).unwrap();
        let mut w = SendWindow::new(lsn(1));
        w.sent(lsn(5), 400, 10);
        w.sent(lsn(9), 300, 20);
        assert_eq!(w.room(1000), 300);
        w.ack(lsn(5));
        assert_eq!((w.acked, w.next, w.room(1000)), (lsn(5), lsn(9), 700));
        w.ack(lsn(3)); // stale: changes nothing
        assert_eq!(w.acked, lsn(5));
        w.rewind_if_due(20 + RETRANSMIT_MS - 1);
        assert_eq!(w.next, lsn(9));
        w.rewind_if_due(20 + RETRANSMIT_MS);
        assert_eq!((w.next, w.room(1000), w.resend_at()), (lsn(5), 1000, None));
    }
}
