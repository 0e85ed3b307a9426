//! Serving a split virtqueue: virtio-queue's documented notification loop,
//! with the checks a hostile driver needs, and used-buffer notifications
//! that follow the driver's suppression (EVENT_IDX or the avail flags).
//!
//! virtio-queue's `Queue` holds the configuration, the indices and the
//! notification switch; the per-request ring accesses (avail entries,
//! descriptors, used entries, the suppression fields) go through
//! [`Rings`], which finds the rings in guest memory once per call.

use std::num::Wrapping;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::ring::{Chain, Rings};

/// How a call of [`drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything the driver published was served; notifications are on.
    /// Also a queue that is not set up (not ready, or its avail ring at
    /// guest address 0, which virtio-queue takes for a reset queue).
    Empty,
    /// The budget ran out with requests left: call again later.
    Yielded,
    /// The avail index is more than a queue's worth ahead of the device: the
    /// ring is corrupt and nothing more can be taken from it until a reset.
    BadAvailIndex,
    /// Guest memory under the rings cannot be accessed.
    RingInaccessible,
    /// `serve` said that nothing completes any more (the disk lost power):
    /// the chain it was given stays unused, and so does everything after it.
    Stopped,
}

/// Something that went wrong with one chain, for the device's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadHead(pub u16);

/// Serves `queue` the way virtio-queue documents it (the example loop in
/// the `Queue` documentation): notifications off, take and serve every
/// chain, then notifications on, and once more round if the driver
/// published meanwhile (it saw NO_NOTIFY and did not kick). Serving goes on
/// until the ring is really empty: a pass that found nothing and a re-check
/// that finds more is the race the re-check is there for, not an error.
/// Only an avail index more than a queue ahead is (detected, reported,
/// never looped on).
///
/// `serve` handles one chain and returns the used length, or `None` when
/// the chain must never complete (serving stops, [`Drained::Stopped`]). After each used
/// entry `signal` is called if the driver wants to hear of it. A head
/// outside the descriptor table is served as the empty chain it is and
/// given to `bad_head` instead of the used ring. At most
/// `budget` chains are served per call and the loop goes round at most
/// `budget` times, so a guest cannot keep the caller here for ever.
///
/// `before_enable` runs each time a pass has taken everything it saw, just
/// before notifications go back on: the window in which a driver publishes
/// without kicking. Devices pass `|_| {}`; tests replay the race there.
pub fn drain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    budget: usize,
    mut serve: impl FnMut(Chain<'_, '_>) -> Option<u32>,
    mut signal: impl FnMut(),
    mut bad_head: impl FnMut(BadHead),
    mut before_enable: impl FnMut(&Queue),
) -> Drained {
    // What virtio-queue takes for a queue that was reset and not set up
    // again: nothing is served from it.
    if !queue.ready() || queue.avail_ring() == 0 {
        return Drained::Empty;
    }
    let rings = Rings::new(queue, mem);
    let mut next_avail = Wrapping(queue.next_avail());
    let mut next_used = Wrapping(queue.next_used());
    let mut served = 0;
    let drained = 'passes: {
        for _ in 0..budget.max(1) {
            if queue.disable_notification(mem).is_err() {
                break 'passes Drained::RingInaccessible;
            }
            loop {
                let Some(avail_idx) = rings.avail_idx() else {
                    break 'passes Drained::RingInaccessible;
                };
                // No driver can have published more than a queue's worth
                // (virtio 1.2, 2.7.6). Read once per run of chains, not per
                // chain: a request whose data lands on the index is noticed
                // at the next read, after the chains published before it.
                if (avail_idx - next_avail).0 > rings.size() {
                    break 'passes Drained::BadAvailIndex;
                }
                if avail_idx == next_avail {
                    break;
                }
                while next_avail != avail_idx {
                    if served == budget {
                        break 'passes Drained::Yielded;
                    }
                    let Some(head) = rings.avail_entry(next_avail) else {
                        break 'passes Drained::RingInaccessible;
                    };
                    next_avail += 1;
                    served += 1;
                    let Some(len) = serve(rings.chain(head)) else {
                        break 'passes Drained::Stopped;
                    };
                    if head >= rings.size() {
                        bad_head(BadHead(head));
                        continue;
                    }
                    if !rings.add_used(next_used, head, len) {
                        break 'passes Drained::RingInaccessible;
                    }
                    if rings.needs_interrupt(next_used) {
                        signal();
                    }
                    next_used += 1;
                }
            }
            queue.set_next_avail(next_avail.0);
            queue.set_next_used(next_used.0);
            before_enable(queue);
            match queue.enable_notification(mem) {
                Ok(false) => break 'passes Drained::Empty,
                // Published after the last look: another pass.
                Ok(true) => {}
                Err(_) => break 'passes Drained::RingInaccessible,
            }
        }
        Drained::Yielded
    };
    queue.set_next_avail(next_avail.0);
    queue.set_next_used(next_used.0);
    if drained == Drained::BadAvailIndex {
        // Notifications back on, as at the end of every pass: the driver's
        // next kick is heard (and finds the ring corrupt again).
        let _ = queue.enable_notification(mem);
    }
    drained
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::device::tests::{publish, write_request};
    use crate::virtio::block::request::tests::{guest_memory, HEADER};

    fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx")
    }

    /// virtio 1.2, 2.7.10 (available buffer notification suppression):
    /// while the device has VRING_USED_F_NO_NOTIFY set, a driver without
    /// VIRTIO_F_EVENT_IDX publishes and does not notify, so the device must
    /// serve whatever it finds when it turns notifications back on. The race
    /// replayed step by step: a stale kick starts a pass that finds nothing,
    /// the driver publishes B in the window before notifications go back on,
    /// and B must be served in that same call (no kick will ever come).
    #[test]
    fn a_request_published_while_notifications_are_off_is_served() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().expect("queue");
        assert!(!queue.event_idx_enabled());
        let mut served = 0;
        publish(&mock, 0, &write_request(&mem, HEADER));
        let drained = drain(
            &mut queue,
            &mem,
            256,
            |_| {
                served += 1;
                Some(1)
            },
            || {},
            |_| {},
            |_| {},
        );
        assert_eq!((drained, served), (Drained::Empty, 1));

        // The stale kick.
        let mut published = false;
        let drained = drain(
            &mut queue,
            &mem,
            256,
            |_| {
                served += 1;
                Some(1)
            },
            || {},
            |_| {},
            |_| {
                if !std::mem::replace(&mut published, true) {
                    let flags: u16 = mem.read_obj(mock.used_addr()).expect("used flags");
                    assert_eq!(flags, 1, "NO_NOTIFY: the driver will not kick");
                    publish(&mock, 3, &write_request(&mem, HEADER));
                }
            },
        );
        assert_eq!(drained, Drained::Empty);
        assert_eq!(served, 2, "B was served without a kick");
        assert_eq!(used_idx(&mem, &mock), 2);
        let flags: u16 = mem.read_obj(mock.used_addr()).expect("used flags");
        assert_eq!(flags, 0, "notifications are back on");
    }

    /// An avail index more than a queue ahead (virtio 1.2, 2.7.6: the driver
    /// cannot have that many buffers outstanding) is reported, not looped on
    /// and not mistaken for the race above.
    #[test]
    fn an_avail_index_out_of_range_is_detected() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().expect("queue");
        mock.avail().idx().store(17u16.to_le());
        let drained = drain(&mut queue, &mem, 256, |_| Some(1), || {}, |_| {}, |_| {});
        assert_eq!(drained, Drained::BadAvailIndex);
        let flags: u16 = mem.read_obj(mock.used_addr()).expect("used flags");
        assert_eq!(
            flags, 0,
            "notifications are back on: the next kick is heard"
        );
        // Exactly a queue's worth ahead is legal and served.
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().expect("queue");
        for i in 0..16 {
            mock.avail().ring().ref_at(i).expect("ring").store(0);
        }
        mock.avail().idx().store(16u16.to_le());
        let mut served = 0;
        let drained = drain(
            &mut queue,
            &mem,
            256,
            |_| {
                served += 1;
                Some(0)
            },
            || {},
            |_| {},
            |_| {},
        );
        assert_eq!((drained, served), (Drained::Empty, 16));
    }
}
