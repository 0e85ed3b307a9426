//! The guest memory of a split virtqueue (virtio 1.2, 2.7), looked up once
//! per `drain` call instead of once per access.
//!
//! virtio-queue's `Queue` keeps the queue's configuration and its indices;
//! every ring access it makes goes through vm-memory's generic
//! `GuestMemory` accessors, each a region lookup, a bounds check and a
//! byte-wise copy: ~120 instructions to read one 16-byte descriptor, ~2300
//! for a whole 4 KiB request on a disk that moves no data (callgrind, the
//! `block_throughput` benchmark's "device alone" line; ~1100 with
//! [`Rings`], and 267-434 -> 218-240 ns per request in alternated runs).
//! [`Rings`] finds each
//! ring's bytes once (one `VolatileSlice` per ring, as Firecracker's queue
//! keeps host pointers to its rings) and reads entries, descriptors and
//! indirect tables from it with a bounds check and one volatile access. A
//! ring that does not lie inside one guest memory region (legal, if
//! unusual) is accessed address by address, as virtio-queue does, with the
//! same results.
//!
//! [`Chain`] walks a descriptor chain with exactly virtio-queue's rules
//! (`DescriptorChain`'s iterator: at most a queue's worth of descriptors, an
//! index outside the table ends the chain, one level of indirect table whose
//! length is a multiple of 16, no more than `u32::MAX` bytes in all); a
//! property test holds the two walks to the same descriptors.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, VolatileMemory, VolatileSlice};

/// Bytes of a descriptor.
const DESC_SIZE: u64 = 16;
/// Bytes before the avail ring's and the used ring's entries (flags, idx).
const RING_HEADER: u64 = 4;
/// Bytes of an avail ring entry.
const AVAIL_ELEM: u64 = 2;
/// Bytes of a used ring entry (id, len).
const USED_ELEM: u64 = 8;

/// A ring's bytes in guest memory: a slice when they lie in one region,
/// else their guest address.
#[derive(Clone, Copy)]
enum RingMemory<'m> {
    Slice(VolatileSlice<'m>),
    Guest(GuestAddress),
}

impl<'m> RingMemory<'m> {
    /// The `len` bytes at `addr`.
    fn new(mem: &'m GuestMemoryMmap, addr: GuestAddress, len: u64) -> Self {
        usize::try_from(len)
            .ok()
            .and_then(|len| vm_memory::GuestMemoryBackend::get_slice(mem, addr, len).ok())
            .map_or(RingMemory::Guest(addr), RingMemory::Slice)
    }

    fn load_u16(&self, mem: &GuestMemoryMmap, offset: u64, order: Ordering) -> Option<u16> {
        let val: u16 = match self {
            RingMemory::Slice(slice) => slice.load(usize::try_from(offset).ok()?, order).ok()?,
            RingMemory::Guest(addr) => mem.load(addr.checked_add(offset)?, order).ok()?,
        };
        Some(u16::from_le(val))
    }

    fn store_u16(&self, mem: &GuestMemoryMmap, offset: u64, val: u16, order: Ordering) -> bool {
        let val = val.to_le();
        match self {
            RingMemory::Slice(slice) => {
                usize::try_from(offset).is_ok_and(|offset| slice.store(val, offset, order).is_ok())
            }
            RingMemory::Guest(addr) => addr
                .checked_add(offset)
                .is_some_and(|at| mem.store(val, at, order).is_ok()),
        }
    }

    /// The `index`th descriptor of a table.
    fn descriptor(&self, mem: &GuestMemoryMmap, index: u16) -> Option<Descriptor> {
        let offset = u64::from(index) * DESC_SIZE;
        match self {
            RingMemory::Slice(slice) => slice
                .get_ref::<Descriptor>(usize::try_from(offset).ok()?)
                .ok()
                .map(|desc| desc.load()),
            RingMemory::Guest(addr) => mem.read_obj(addr.checked_add(offset)?).ok(),
        }
    }

    /// Writes a used entry (id, len: two little-endian u32) in one access.
    fn store_used_elem(&self, mem: &GuestMemoryMmap, offset: u64, id: u16, len: u32) -> bool {
        let elem = (u64::from(id) | u64::from(len) << 32).to_le();
        match self {
            RingMemory::Slice(slice) => usize::try_from(offset).is_ok_and(|offset| {
                slice
                    .get_ref::<u64>(offset)
                    .map(|elem_ref| elem_ref.store(elem))
                    .is_ok()
            }),
            RingMemory::Guest(addr) => addr
                .checked_add(offset)
                .is_some_and(|at| mem.write_obj(elem, at).is_ok()),
        }
    }
}

/// The three rings of one split virtqueue, found in guest memory.
pub struct Rings<'m> {
    mem: &'m GuestMemoryMmap,
    desc: RingMemory<'m>,
    avail: RingMemory<'m>,
    used: RingMemory<'m>,
    size: u16,
    event_idx: bool,
}

impl<'m> Rings<'m> {
    /// Finds the rings `queue` is configured with (the driver cannot move
    /// them while the queue is live).
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Self {
        let size = u64::from(queue.size());
        Rings {
            mem,
            desc: RingMemory::new(mem, GuestAddress(queue.desc_table()), DESC_SIZE * size),
            // The entries and used_event.
            avail: RingMemory::new(
                mem,
                GuestAddress(queue.avail_ring()),
                RING_HEADER + AVAIL_ELEM * size + 2,
            ),
            // The entries and avail_event.
            used: RingMemory::new(
                mem,
                GuestAddress(queue.used_ring()),
                RING_HEADER + USED_ELEM * size + 2,
            ),
            size: queue.size(),
            event_idx: queue.event_idx_enabled(),
        }
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver's avail index (acquire: the entries it published before
    /// it are visible after it), or `None` if the ring is not in memory.
    pub fn avail_idx(&self) -> Option<Wrapping<u16>> {
        self.avail
            .load_u16(self.mem, 2, Ordering::Acquire)
            .map(Wrapping)
    }

    /// The head of the chain in avail ring entry `position` (modulo the
    /// queue size), or `None` if the ring is not in memory.
    pub fn avail_entry(&self, position: Wrapping<u16>) -> Option<u16> {
        let entry = u64::from(position.0.checked_rem(self.size)?);
        self.avail.load_u16(
            self.mem,
            RING_HEADER + AVAIL_ELEM * entry,
            Ordering::Acquire,
        )
    }

    /// The chain whose head descriptor is `head`.
    pub fn chain(&self, head: u16) -> Chain<'_, 'm> {
        Chain {
            rings: self,
            table: self.desc,
            table_size: self.size,
            next: head,
            ttl: self.size,
            indirect: false,
            bytes: 0,
        }
    }

    /// Puts `(head, len)` in used ring entry `position` (modulo the queue
    /// size) and publishes it: the used index becomes `position + 1`
    /// (release: the entry and every byte the device wrote for the chain
    /// are visible before it). False if the ring is not in memory.
    pub fn add_used(&self, position: Wrapping<u16>, head: u16, len: u32) -> bool {
        let Some(entry) = position.0.checked_rem(self.size) else {
            return false;
        };
        self.used.store_used_elem(
            self.mem,
            RING_HEADER + USED_ELEM * u64::from(entry),
            head,
            len,
        ) && self
            .used
            .store_u16(self.mem, 2, (position + Wrapping(1)).0, Ordering::Release)
    }

    /// Whether the driver wants an interrupt for the used entry just put at
    /// `position` (virtio 1.2, 2.7.7.2), the device having asked this after
    /// each entry it added: with EVENT_IDX, when `used_event` is
    /// `position` (what virtio-queue's `needs_notification` computes for
    /// one entry added since its last call); without, unless the driver set
    /// VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags. A ring that
    /// cannot be read gets the interrupt.
    pub fn needs_interrupt(&self, position: Wrapping<u16>) -> bool {
        // The used index store must be visible before the driver's field
        // is read (the driver does the converse).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let used_event = RING_HEADER + AVAIL_ELEM * u64::from(self.size);
            return self
                .avail
                .load_u16(self.mem, used_event, Ordering::Relaxed)
                .is_none_or(|used_event| used_event == position.0);
        }
        self.avail
            .load_u16(self.mem, 0, Ordering::Relaxed)
            .is_none_or(|flags| u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

/// A descriptor chain being walked: yields its descriptors in order, an
/// indirect table's in place of the descriptor that points to it.
pub struct Chain<'r, 'm> {
    rings: &'r Rings<'m>,
    /// The table being walked: the queue's, or an indirect one.
    table: RingMemory<'m>,
    table_size: u16,
    next: u16,
    /// Descriptors the walk may still take from this table.
    ttl: u16,
    indirect: bool,
    /// Bytes of the descriptors yielded so far.
    bytes: u32,
}

impl Chain<'_, '_> {
    /// Continues in the indirect table `desc` points to; false (the walk
    /// ends) for a table inside a table, or one whose length is not a
    /// number of descriptors or is more than 65535 of them.
    fn enter_indirect(&mut self, desc: &Descriptor) -> bool {
        if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
            return false;
        }
        let Ok(entries) = u16::try_from(u64::from(desc.len()) / DESC_SIZE) else {
            return false;
        };
        self.table = RingMemory::new(self.rings.mem, desc.addr(), u64::from(desc.len()));
        self.table_size = entries;
        self.next = 0;
        self.ttl = entries;
        self.indirect = true;
        true
    }
}

impl Iterator for Chain<'_, '_> {
    type Item = Descriptor;

    // Inlined into the one loop that walks chains (the request path's).
    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_size {
                return None;
            }
            let desc = self.table.descriptor(self.rings.mem, self.next)?;
            if desc.refers_to_indirect_table() {
                if !self.enter_indirect(&desc) {
                    return None;
                }
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;

    use super::*;

    const MEM: u64 = 0x10_0000;

    fn memory(regions: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(at, len)| (GuestAddress(at), len))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
    }

    fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// What virtio-queue's own walk yields for `head`.
    fn reference_walk(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) -> Vec<Descriptor> {
        let mut iter = queue.iter(mem).expect("iter");
        let chain = iter.next().expect("a chain");
        assert_eq!(chain.head_index(), head);
        chain.collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]
        /// The walk yields exactly what virtio-queue's DescriptorChain
        /// yields, for tables of random descriptors (loops, indices out of
        /// the table, indirect flags on anything, indirect tables of any
        /// length, nested, in and out of memory, straddling two adjacent
        /// regions), whether the tables are read through a slice or by
        /// address.
        #[test]
        fn walks_as_virtio_queue_does(
            table in proptest::collection::vec(
                (0u64..12, 0u32..80, 0u16..8, 0u16..20), 16),
            indirect in proptest::collection::vec(
                (0u64..12, 0u32..80, 0u16..8, 0u16..20), 8),
            head in 0u16..18,
            adjacent in any::<bool>(),
        ) {
            // Two regions: adjacent (a table may straddle them) or with a gap.
            let second = if adjacent { MEM / 2 } else { MEM / 2 + 0x1000 };
            let mem = memory(&[(0, (MEM / 2) as usize), (second, (MEM / 2) as usize)]);
            let mock = MockSplitQueue::new(&mem, 16);
            // Indirect tables at these places: inside the first region, across
            // the boundary (or in the gap), outside memory.
            let places = [0x4_0000u64, MEM / 2 - 0x40, u64::MAX - 0x40, 1 << 40];
            for (i, &(addr, len, flags, next)) in indirect.iter().enumerate() {
                let d = Descriptor::new(0x1000 * addr, len, flags, next);
                for place in &places[..2] {
                    let _ = mem.write_obj(RawDescriptor::from(d), GuestAddress(place + 16 * i as u64));
                }
            }
            for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
                // addr 8..12 names an indirect table place, at varying lengths.
                // Lengths near u32::MAX for some data descriptors: two of
                // them overflow the chain's byte count, which ends it.
                let (addr, len) = match addr {
                    8..=11 => (places[addr as usize - 8], len * 2),
                    _ if len >= 50 => (0x1000 * addr, u32::MAX - len),
                    _ => (0x1000 * addr, len),
                };
                let d = Descriptor::new(addr, len, flags, next);
                mock.desc_table().store(i as u16, RawDescriptor::from(d)).expect("store");
            }
            mock.avail().ring().ref_at(0).expect("ring").store(head.to_le());
            mock.avail().idx().store(1u16.to_le());
            let mut queue: Queue = mock.create_queue().expect("queue");
            let rings = Rings::new(&queue, &mem);
            prop_assert!(matches!(rings.desc, RingMemory::Slice(_)));
            let ours: Vec<_> = rings.chain(head).map(|d| fields(&d)).collect();
            let by_address = Rings { desc: RingMemory::Guest(GuestAddress(queue.desc_table())), ..Rings::new(&queue, &mem) };
            let by_address: Vec<_> = by_address.chain(head).map(|d| fields(&d)).collect();
            let reference: Vec<_> = reference_walk(&mut queue, &mem, head).iter().map(fields).collect();
            prop_assert_eq!(&ours, &reference);
            prop_assert_eq!(&by_address, &reference);
        }
    }

    /// Avail entries and used entries land where virtio-queue puts them,
    /// through a slice and by address, wrapping at the queue size.
    #[test]
    fn avail_and_used_entries_are_where_the_spec_puts_them() {
        let mem = memory(&[(0, MEM as usize)]);
        let mock = MockSplitQueue::new(&mem, 16);
        let queue: Queue = mock.create_queue().expect("queue");
        for slice in [true, false] {
            let mut rings = Rings::new(&queue, &mem);
            if !slice {
                rings.avail = RingMemory::Guest(GuestAddress(queue.avail_ring()));
                rings.used = RingMemory::Guest(GuestAddress(queue.used_ring()));
            }
            for i in 0..16u16 {
                mock.avail()
                    .ring()
                    .ref_at(usize::from(i))
                    .expect("ring")
                    .store((100 + i).to_le());
            }
            mock.avail().idx().store(40u16.to_le());
            assert_eq!(rings.avail_idx(), Some(Wrapping(40)));
            assert_eq!(rings.avail_entry(Wrapping(3)), Some(103));
            assert_eq!(rings.avail_entry(Wrapping(16 * 7 + 5)), Some(105));
            assert!(rings.add_used(Wrapping(65535), 9, 0x1234_5678));
            let elem = mock.used().ring().ref_at(15).expect("used").load();
            assert_eq!((elem.id(), elem.len()), (9, 0x1234_5678));
            assert_eq!(mock.used().idx().load(), 0, "65535 + 1 wraps to 0");
        }
    }

    /// With EVENT_IDX the interrupt goes out for the entry the driver named
    /// in used_event and no other; without, as the avail flags say.
    #[test]
    fn interrupts_as_the_driver_asks() {
        let mem = memory(&[(0, MEM as usize)]);
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().expect("queue");
        let used_event = GuestAddress(queue.avail_ring() + 4 + 2 * 16);
        queue.set_event_idx(true);
        let rings = Rings::new(&queue, &mem);
        mem.write_obj(7u16.to_le(), used_event).expect("used_event");
        let wanted: Vec<u16> = (0..20)
            .filter(|&p| rings.needs_interrupt(Wrapping(p)))
            .collect();
        assert_eq!(wanted, [7]);
        queue.set_event_idx(false);
        let rings = Rings::new(&queue, &mem);
        assert!(rings.needs_interrupt(Wrapping(3)));
        mem.write_obj(1u16.to_le(), GuestAddress(queue.avail_ring()))
            .expect("flags");
        assert!(!rings.needs_interrupt(Wrapping(3)));
    }

    /// Rings outside guest memory are reported, not read as zeroes.
    #[test]
    fn rings_outside_memory_read_as_nothing() {
        let mem = memory(&[(0, MEM as usize)]);
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().expect("queue");
        queue.set_desc_table_address(Some(0xFFFF_0000), Some(0xFF));
        queue.set_avail_ring_address(Some(0xFFFF_0000), Some(0xFF));
        queue.set_used_ring_address(Some(0xFFFF_0000), Some(0xFF));
        let rings = Rings::new(&queue, &mem);
        assert_eq!(rings.avail_idx(), None);
        assert_eq!(rings.avail_entry(Wrapping(0)), None);
        assert!(!rings.add_used(Wrapping(0), 0, 0));
        assert!(rings.needs_interrupt(Wrapping(0)));
        assert_eq!(rings.chain(0).count(), 0);
    }
}
