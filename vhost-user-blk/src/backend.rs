//! The vhost-user side of the disk: what `vhost-user-backend` asks a device
//! (features, configuration space, memory, events) answered from the devices
//! crate's virtio-blk, whose request path serves the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devices::exit::ExitSignal;
use devices::virtio::block::config::{features, BlockConfig};
use devices::virtio::block::request::{serve, Disk, Scratch, ID_LEN};
use devices::virtio::block::DiskBackend;
use devices::virtio::queue::{drain, Drained};
use devices::virtio::ConfigSpace;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Largest queue a frontend may set up: QEMU's vhost-user-blk asks for
/// 1024 entries unless told otherwise (`queue-size=`).
const MAX_QUEUE_SIZE: usize = 1024;
/// The only request queue.
const REQUEST_QUEUE: u16 = 0;
/// Event number of [`BlkBackend::resume_event`]: above the queues and the
/// library's own exit event (1).
pub const RESUME_EVENT: u16 = 2;

/// Why a vhost-user event could not be served.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An event the backend did not register.
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    /// A request arrived before the frontend sent its memory table.
    #[error("the frontend sent no memory table")]
    NoMemory,
    /// The interrupt (call) eventfd could not be written.
    #[error("cannot signal the used queue: {0}")]
    Signal(std::io::Error),
    /// The resume event could not be re-armed.
    #[error("cannot re-arm the resume event: {0}")]
    Resume(std::io::Error),
}

/// What ended the queue work for good (a power cut, `power-cut-after-writes`).
pub type OnStop = Box<dyn Fn() + Send + Sync>;

impl From<BackendError> for std::io::Error {
    fn from(err: BackendError) -> Self {
        std::io::Error::other(err)
    }
}

/// A vhost-user-blk device over one disk.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    disk: Arc<dyn DiskBackend>,
    read_only: bool,
    id: [u8; ID_LEN],
    config: BlockConfig,
    /// Signalled when the disk loses power (`power-cut-after-writes`).
    exit: Arc<ExitSignal>,
    /// Told when the disk will complete nothing more.
    on_stop: OnStop,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Written when a pass stopped at its budget: the worker comes back.
    resume: EventFd,
    /// The guest broke the ring and was told so once (per connection).
    reported_bad_ring: AtomicBool,
}

impl BlkBackend {
    /// A backend serving `disk`, answering GET_ID with `id`; `on_stop` is
    /// called when the disk completes nothing more: a power cut, which the
    /// disk's layers report to `exit`.
    pub fn new(
        disk: Arc<dyn DiskBackend>,
        read_only: bool,
        id: [u8; ID_LEN],
        exit: Arc<ExitSignal>,
        on_stop: OnStop,
    ) -> std::io::Result<Self> {
        let config = BlockConfig::new(disk.size(), disk.discard_alignment());
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                disk,
                read_only,
                id,
                config,
                exit,
                on_stop,
                mem: Mutex::new(None),
                resume: EventFd::new(EFD_NONBLOCK)?,
                reported_bad_ring: AtomicBool::new(false),
            }),
        })
    }

    /// The event the daemon must watch as [`RESUME_EVENT`].
    pub fn resume_event(&self) -> &EventFd {
        &self.inner.resume
    }

    /// Makes everything written durable (at disconnect and on signals).
    pub fn flush(&self) -> Result<(), devices::virtio::block::backend::BackendError> {
        self.inner.disk.flush()
    }

    /// The frontend went away: its memory table is dropped (the next
    /// frontend's requests are never served from the previous guest's
    /// memory, and that memory is unmapped), and a pending resume is
    /// forgotten.
    pub fn disconnected(&self) {
        *self
            .inner
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        // The counter only says "come back"; an empty one is fine.
        let _ = self.inner.resume.read();
        self.inner.reported_bad_ring.store(false, Ordering::Relaxed);
    }

    fn serve_queue(&self, vring: &VringRwLock) -> Result<(), BackendError> {
        // The library checks this for kicks, not for the resume event: a
        // ring stopped by GET_VRING_BASE, disabled, or never set up is left
        // as the frontend last saw it.
        {
            let state = vring.get_ref();
            if !state.is_enabled() || !state.get_queue().ready() {
                return Ok(());
            }
        }
        let mem = self
            .inner
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(BackendError::NoMemory)?;
        let mem = mem.memory();
        let disk = Disk {
            backend: self.inner.disk.as_ref(),
            read_only: self.inner.read_only,
            write_through: self.inner.config.write_through(),
            id: &self.inner.id,
        };
        let mut state = vring.get_mut();
        // The interrupt goes out after every request the driver wants to
        // hear of, while the queue stays borrowed: a clone of the call fd.
        let call = match state.get_call() {
            Some(call) => Some(call.try_clone().map_err(BackendError::Signal)?),
            None => None,
        };
        let mut signal_error = None;
        let mut scratch = Scratch::default();
        let drained = drain(
            state.get_queue_mut(),
            &mem,
            MAX_QUEUE_SIZE,
            |chain| {
                let outcome = serve(chain, &mem, &disk, &mut scratch)?;
                if let Some(err) = outcome.host_error {
                    eprintln!("vhost-user-blk: {err}");
                }
                Some(outcome.used_len)
            },
            || {
                if let Some(Err(e)) = call.as_ref().map(|c| c.notify()) {
                    signal_error.get_or_insert(e);
                }
            },
            |_| self.report_bad_ring("the driver offered a descriptor outside the queue"),
            |_| {},
        );
        drop(state);
        if let Some(e) = signal_error {
            return Err(BackendError::Signal(e));
        }
        match drained {
            Drained::Empty => {}
            Drained::Yielded => self.inner.resume.write(1).map_err(BackendError::Resume)?,
            Drained::BadAvailIndex => {
                self.report_bad_ring("the driver's avail index is out of range")
            }
            Drained::RingInaccessible => {
                self.report_bad_ring("the driver's rings are not in its memory")
            }
            Drained::Stopped => (self.inner.on_stop)(),
        }
        // The write that cut the power completed; nothing may follow it in
        // the ring, so the cut is not left for a next request to find.
        if drained != Drained::Stopped && self.inner.exit.is_set() {
            (self.inner.on_stop)();
        }
        Ok(())
    }

    fn report_bad_ring(&self, what: &str) {
        if !self.inner.reported_bad_ring.swap(true, Ordering::Relaxed) {
            eprintln!("vhost-user-blk: {what}; ignoring such requests");
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        features(self.inner.read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&self, acked: u64) {
        // The cache mode follows FLUSH and CONFIG_WCE, as in vmm's device.
        self.inner.config.negotiate(acked);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets EVENT_IDX on the queue itself, which is all the
        // request path looks at.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size as usize];
        self.inner.config.read(u64::from(offset), &mut data);
        data
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is writable; anything else is ignored, as the
        // virtio-mmio transport does.
        self.inner.config.write(u64::from(offset), buf);
        Ok(())
    }

    fn reset_device(&self) {
        self.inner.config.reset();
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        *self
            .inner
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(mem);
        self.inner.reported_bad_ring.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the library's worker never ends and a disconnect
        // cannot be waited for.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                eprintln!("vhost-user-blk: no exit event for the worker: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        match device_event {
            REQUEST_QUEUE => {}
            RESUME_EVENT => {
                // The counter only says "come back"; its value does not matter.
                let _ = self.inner.resume.read();
            }
            other => return Err(BackendError::UnknownEvent(other).into()),
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        Ok(self.serve_queue(vring)?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use devices::virtio::block::backend::BackendError as DiskError;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// A disk of bytes `i % 251` that counts its flushes.
    struct Pattern {
        size: u64,
        flushes: AtomicUsize,
    }

    impl DiskBackend for Pattern {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), DiskError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), DiskError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), DiskError> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<(), DiskError> {
            Ok(())
        }
        fn discard_alignment(&self) -> u64 {
            512
        }
    }

    fn backend(read_only: bool) -> (BlkBackend, Arc<Pattern>, Arc<AtomicBool>) {
        let disk = Arc::new(Pattern {
            size: 1 << 20,
            flushes: AtomicUsize::new(0),
        });
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let on_stop: OnStop = Box::new(move || flag.store(true, Ordering::SeqCst));
        let exit = Arc::new(ExitSignal::new().expect("exit signal"));
        let backend = BlkBackend::new(
            disk.clone(),
            read_only,
            *b"acow-0123456789abcde",
            exit,
            on_stop,
        )
        .expect("backend");
        (backend, disk, stopped)
    }

    /// What a vhost-user frontend would have set up: the memory table and a
    /// ready vring whose rings are those of `mock`.
    fn vring(
        backend: &BlkBackend,
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    ) -> VringRwLock {
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).expect("memory");
        let vring = VringRwLock::new(atomic, 1024).expect("vring");
        vring.set_queue_size(16);
        vring
            .set_queue_info(
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
            .expect("queue info");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// Publishes one request in `mock`'s ring: a header of `request_type`
    /// for `sector`, `len` bytes of data (device-writable for a read) and
    /// a status byte set to 0xff.
    fn publish_request(
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        request_type: u32,
        sector: u64,
        len: u32,
    ) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER))
            .expect("header");
        mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
        let data_flags = if request_type == VIRTIO_BLK_T_IN {
            F_NEXT | F_WRITE
        } else {
            F_NEXT
        };
        let descs = [
            RawDescriptor::from(Descriptor::new(HEADER, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(DATA, len, data_flags, 2)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, F_WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).expect("chain");
    }

    /// The features and configuration space are vmm's device's (one
    /// virtio-blk, two transports), plus vhost-user's protocol features.
    #[test]
    fn features_and_config_are_the_in_process_devices() {
        let (rw, _, _) = backend(false);
        let (ro, _, _) = backend(true);
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(rw.features(), features(false) | protocol);
        assert_eq!(ro.features(), features(true) | protocol);
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert!(rw
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        let capacity = rw.get_config(0, 8);
        assert_eq!(
            u64::from_le_bytes(capacity.try_into().expect("8 bytes")),
            2048
        );
        // `writeback` (offset 32) is writable only once CONFIG_WCE is acked.
        assert_eq!(rw.get_config(32, 1), [1]);
        rw.acked_features(features(false) & !(1 << VIRTIO_BLK_F_FLUSH));
        assert_eq!(rw.get_config(32, 1), [0], "writethrough without FLUSH");
    }

    /// A read published in the ring is served by devices' request path: the
    /// data and status land in guest memory and the chain is used.
    #[test]
    fn a_kick_serves_the_queue_through_the_devices_request_path() {
        let (backend, _, stopped) = backend(false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        publish_request(&mem, &mock, VIRTIO_BLK_T_IN, 3, 1024);
        let vring = vring(&backend, &mem, &mock);
        backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("served");
        let mut data = vec![0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA)).expect("data");
        let expected: Vec<u8> = (3 * 512..3 * 512 + 1024).map(|i| (i % 251) as u8).collect();
        assert_eq!(data, expected);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"), 0);
        let used_idx: u16 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx");
        assert_eq!(used_idx, 1);
        let used_len: u32 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 8))
            .expect("used len");
        assert_eq!(used_len, 1025, "data and status");
        assert!(!stopped.load(Ordering::SeqCst));
    }

    /// A stopped ring (GET_VRING_BASE sets it not ready) or a disabled one
    /// is left alone, even when the backend's own resume event fires: the
    /// frontend took the ring's base and must find it as it was, and the
    /// guest memory under a ring that was never set up is not the device's.
    #[test]
    fn a_resume_on_a_stopped_or_disabled_ring_serves_nothing() {
        let (backend, _, _) = backend(false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        publish_request(&mem, &mock, VIRTIO_BLK_T_IN, 0, 512);
        let used_idx = |mem: &GuestMemoryMmap| -> u16 {
            mem.read_obj(GuestAddress(mock.used_addr().0 + 2))
                .expect("used idx")
        };
        let vring = vring(&backend, &mem, &mock);
        vring.set_queue_ready(false);
        backend
            .handle_event(RESUME_EVENT, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("nothing to do");
        assert_eq!(used_idx(&mem), 0, "a stopped ring was served");
        vring.set_queue_ready(true);
        vring.set_enabled(false);
        backend
            .handle_event(RESUME_EVENT, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("nothing to do");
        assert_eq!(used_idx(&mem), 0, "a disabled ring was served");
        vring.set_enabled(true);
        backend
            .handle_event(RESUME_EVENT, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("served");
        assert_eq!(used_idx(&mem), 1);
    }

    /// A ring never set up (addresses 0) is not touched: the used flags
    /// there would be guest memory at address 0.
    #[test]
    fn a_resume_before_the_ring_is_set_up_leaves_guest_memory_alone() {
        let (backend, _, _) = backend(false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mem");
        mem.write_obj(0xa5a5_a5a5u32, GuestAddress(0))
            .expect("marker");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).expect("memory");
        let vring = VringRwLock::new(atomic, 1024).expect("vring");
        vring.set_enabled(true);
        backend
            .handle_event(RESUME_EVENT, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("nothing to do");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0)).expect("marker"),
            0xa5a5_a5a5
        );
    }

    /// After a disconnect the previous frontend's memory is gone: a ring of
    /// the next frontend kicked before its memory table serves nothing from
    /// the old guest's memory.
    #[test]
    fn a_disconnect_forgets_the_frontends_memory() {
        let (backend, _, _) = backend(false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        publish_request(&mem, &mock, VIRTIO_BLK_T_IN, 0, 512);
        let old = vring(&backend, &mem, &mock);
        backend.inner.resume.write(1).expect("pending resume");
        backend.disconnected();
        assert!(
            backend.inner.resume.read().is_err(),
            "the resume is forgotten"
        );
        // The next frontend's ring, at the same addresses, before SET_MEM_TABLE.
        let next =
            VringRwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 1024).expect("vring");
        next.set_queue_size(16);
        next.set_queue_info(
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        )
        .expect("queue info");
        next.set_queue_ready(true);
        next.set_enabled(true);
        assert!(backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, std::slice::from_ref(&next), 0)
            .is_err());
        let used_idx: u16 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx");
        assert_eq!(used_idx, 0, "served from the previous guest's memory");
        drop(old);
    }

    /// The write that cuts the power completes; with nothing after it in
    /// the ring the backend still stops then (exit 3), not at the next
    /// request, which may never come (the guest powers off, and the
    /// disconnect would exit 0).
    #[test]
    fn the_write_that_cuts_the_power_stops_the_backend() {
        use devices::virtio::block::lab::{PowerCut, PowerCutPlan};
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

        let pattern: Box<dyn DiskBackend> = Box::new(Pattern {
            size: 1 << 20,
            flushes: AtomicUsize::new(0),
        });
        let plan = PowerCutPlan {
            after_writes: 1,
            seed: None,
        };
        let exit = Arc::new(ExitSignal::new().expect("exit signal"));
        let signal = exit.clone();
        let on_cut = Box::new(move |writes| {
            signal.signal(devices::exit::VmExit::PowerCut {
                disk: "disk".into(),
                writes,
            })
        });
        let disk: Arc<dyn DiskBackend> = Arc::new(PowerCut::new(pattern, plan, on_cut));
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let on_stop: OnStop = Box::new(move || flag.store(true, Ordering::SeqCst));
        let backend =
            BlkBackend::new(disk, false, *b"acow-0123456789abcde", exit, on_stop).expect("backend");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        publish_request(&mem, &mock, VIRTIO_BLK_T_OUT, 0, 512);
        let vring = vring(&backend, &mem, &mock);
        backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("served");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"), 0);
        assert!(
            stopped.load(Ordering::SeqCst),
            "the power cut went unnoticed"
        );
    }

    /// Before the frontend sent its memory table there is nothing to serve:
    /// an error for the library, not a panic.
    #[test]
    fn a_kick_before_the_memory_table_is_an_error() {
        let (backend, _, _) = backend(false);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vring = VringRwLock::new(mem, 1024).expect("vring");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        assert!(backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, std::slice::from_ref(&vring), 0)
            .is_err());
        assert!(backend
            .handle_event(7, EventSet::IN, std::slice::from_ref(&vring), 0)
            .is_err());
    }
}
