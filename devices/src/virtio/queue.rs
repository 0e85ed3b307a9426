//! Serving a split virtqueue: virtio-queue's documented notification loop,
//! with the checks a hostile driver needs, and used-buffer notifications
//! that follow the driver's suppression (EVENT_IDX or the avail flags).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How a call of [`drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything the driver published was served; notifications are on.
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
/// the `Queue` documentation): notifications off, pop and serve every chain, then
/// notifications on, and once more round if the driver published meanwhile
/// (it saw NO_NOTIFY and did not kick). Serving goes on until the ring is
/// really empty: a pass that found nothing and a re-check that finds more is
/// the race the re-check is there for, not an error. Only an avail index
/// more than a queue ahead is (detected, reported, never looped on).
///
/// `serve` handles one chain and returns the used length, or `None` when
/// the chain must never complete (serving stops, [`Drained::Stopped`]). After each used
/// entry `signal` is called if the driver wants to hear of it. At most
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
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
    mut signal: impl FnMut(),
    mut bad_head: impl FnMut(BadHead),
    mut before_enable: impl FnMut(&Queue),
) -> Drained {
    let mut served = 0;
    for _ in 0..budget.max(1) {
        if queue.disable_notification(mem).is_err() {
            return Drained::RingInaccessible;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            if served == budget {
                // Not served: step back so that the next call takes it.
                queue.go_to_previous_position();
                return Drained::Yielded;
            }
            served += 1;
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                return Drained::Stopped;
            };
            if queue.add_used(mem, head, len).is_err() {
                bad_head(BadHead(head));
            } else if needs_interrupt(queue, mem) {
                signal();
            }
        }
        before_enable(queue);
        match queue.enable_notification(mem) {
            Ok(false) => return Drained::Empty,
            Ok(true) => {
                if avail_out_of_range(queue, mem) {
                    return Drained::BadAvailIndex;
                }
                // Published after the last pop: another pass.
            }
            Err(_) => return Drained::RingInaccessible,
        }
    }
    Drained::Yielded
}

/// The driver's avail index is more than a queue's worth ahead of the
/// device's: no driver can have published that many (virtio 1.2, 2.7.6).
fn avail_out_of_range(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => (idx - Wrapping(queue.next_avail())).0 > queue.size(),
        Err(_) => true,
    }
}

/// Whether the driver wants an interrupt for the used entries just added
/// (virtio 1.2, 2.7.7.2): with EVENT_IDX as `used_event` says; without, unless
/// the driver set VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags
/// (virtio-queue 0.18 does not look at them).
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used index store must be visible before the flags are read.
    fence(Ordering::SeqCst);
    let flags: u16 = mem
        .read_obj(GuestAddress(queue.avail_ring()))
        .map(u16::from_le)
        .unwrap_or(0);
    u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;

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
