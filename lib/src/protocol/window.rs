//! What both sessions share: the send window of one document in one direction (a client's
//! upload of its timeline, a subscriber's download of storage), and fair round-robin order.

use std::collections::VecDeque;

use pagesync_journal::Lsn;

use super::RETRANSMIT_MS;

/// One direction of one document's transfer: what was sent, what the peer holds, and the
/// batches in between. Acknowledgements only move it forward; a batch unacknowledged for
/// `RETRANSMIT_MS` rewinds it to what the peer holds, and each rewind with no progress since
/// doubles that wait (up to `MAX_RETRANSMIT_BACKOFF` doublings): a peer that never
/// acknowledges costs a resend every few seconds, not five a second per document.
#[derive(Debug)]
pub(crate) struct SendWindow {
    /// The next LSN to send.
    pub(crate) next: Lsn,
    /// The peer holds everything before this.
    pub(crate) acked: Lsn,
    /// Sent and unacknowledged: (first LSN after the batch, bytes).
    inflight: VecDeque<(Lsn, usize)>,
    last_send_ms: i64,
    /// Rewinds since the peer last acknowledged something.
    rewinds: u32,
}

/// A window rewound this many times in a row waits `RETRANSMIT_MS << 5` (6.4 s) between resends.
pub(crate) const MAX_RETRANSMIT_BACKOFF: u32 = 5;

impl SendWindow {
    pub(crate) fn new(start: Lsn) -> SendWindow {
        SendWindow { next: start, acked: start, inflight: VecDeque::new(), last_send_ms: 0, rewinds: 0 }
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
        if next > self.acked {
            self.rewinds = 0;
        }
        self.acked = self.acked.max(next);
        self.next = self.next.max(self.acked);
        let acked = self.acked;
        self.inflight.retain(|(end, _)| *end > acked);
    }

    /// The peer holds only what is before `next` after all (it dropped what it had taken and
    /// not yet used): that is sent again when a batch would be, after `RETRANSMIT_MS` and with
    /// the same backoff, so a peer that keeps dropping costs a resend every few seconds.
    pub(crate) fn taken_back(&mut self, next: Lsn, now_ms: i64) {
        if next >= self.acked {
            return self.ack(next);
        }
        self.acked = next;
        self.inflight.push_back((self.next.max(next.next()), 0));
        self.last_send_ms = now_ms;
    }

    /// When unacknowledged batches are due to be sent again, if there are any.
    pub(crate) fn resend_at(&self) -> Option<i64> {
        let wait = RETRANSMIT_MS << self.rewinds.min(MAX_RETRANSMIT_BACKOFF);
        (!self.inflight.is_empty()).then_some(self.last_send_ms + wait)
    }

    /// Sends again from what the peer holds, if its batches went unacknowledged too long.
    pub(crate) fn rewind_if_due(&mut self, now_ms: i64) {
        if self.resend_at().is_some_and(|t| now_ms >= t) {
            self.inflight.clear();
            self.next = self.acked;
            self.rewinds += 1;
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
    fn what_the_peer_took_back_is_sent_again_after_the_wait() {
        let lsn = |n| Lsn::new(n).unwrap();
        let mut w = SendWindow::new(lsn(1));
        w.sent(lsn(9), 300, 10);
        w.ack(lsn(9));
        assert_eq!(w.resend_at(), None, "all acknowledged");
        w.taken_back(lsn(4), 20);
        assert_eq!(w.acked, lsn(4));
        w.rewind_if_due(20 + RETRANSMIT_MS - 1);
        assert_eq!(w.next, lsn(9), "not at once");
        w.rewind_if_due(20 + RETRANSMIT_MS);
        assert_eq!(w.next, lsn(4), "sent again from what the peer holds");
        // Taken back again with nothing new: the wait doubles.
        w.sent(lsn(9), 300, 300);
        w.taken_back(lsn(4), 300);
        assert_eq!(w.resend_at(), Some(300 + 2 * RETRANSMIT_MS));
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

    #[test]
    fn a_peer_that_never_acknowledges_gets_ever_rarer_resends() {
        let lsn = |n| Lsn::new(n).unwrap();
        let mut w = SendWindow::new(lsn(1));
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            w.sent(lsn(2), 100, now);
            let at = w.resend_at().expect("in flight");
            waits.push(at - now);
            w.rewind_if_due(at);
            now = at;
        }
        let r = RETRANSMIT_MS;
        assert_eq!(waits, [r, 2 * r, 4 * r, 8 * r, 16 * r, 32 * r, 32 * r, 32 * r]);
        // Progress resets the wait.
        w.sent(lsn(2), 100, now);
        w.ack(lsn(2));
        w.sent(lsn(3), 100, now);
        assert_eq!(w.resend_at(), Some(now + r));
    }
}
