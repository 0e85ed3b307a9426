//! What one return from `KVM_RUN` means: a device access to emulate, a kick
//! to look at, or a reason for the VM to stop.
//!
//! Port and MMIO exits go to the buses; an access no device serves reads as
//! all ones and writes nowhere, as on a PC.

use devices::bus::Bus;
use devices::exit::VmExit;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

/// What the run loop does after one `KVM_RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulation {
    /// The exit was handled: enter the guest again.
    Handled,
    /// `KVM_RUN` was interrupted by a kick: see why before entering again.
    Interrupted,
    /// KVM could not run the guest; the vCPU's state tells more.
    InternalError,
    /// The VM stops, for this reason.
    Stop(VmExit),
}

/// Handles the `result` of one `KVM_RUN` of vCPU `id`, whose devices are on
/// `pio` (I/O ports) and `mmio`.
pub fn handle_kvm_exit(
    id: u8,
    pio: &Bus,
    mmio: &Bus,
    result: Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Emulation {
    let stop = |why: String| Emulation::Stop(VmExit::Failed(format!("vCPU {id}: {why}")));
    match result {
        Ok(VcpuExit::IoIn(port, data)) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Emulation::Handled
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            pio.write(u64::from(port), data);
            Emulation::Handled
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
            Emulation::Handled
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            mmio.write(addr, data);
            Emulation::Handled
        }
        Ok(VcpuExit::Intr) => Emulation::Interrupted,
        // Only without an in-kernel local APIC does KVM hand HLT to
        // userspace; this VMM always has one.
        Ok(VcpuExit::Hlt) => stop("HLT exit without an in-kernel local APIC".into()),
        Ok(VcpuExit::Shutdown) => Emulation::Stop(VmExit::Shutdown(format!(
            "vCPU {id}: triple fault (shutdown)"
        ))),
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            KVM_SYSTEM_EVENT_RESET => Emulation::Stop(VmExit::Reset),
            KVM_SYSTEM_EVENT_SHUTDOWN => Emulation::Stop(VmExit::PowerOff),
            KVM_SYSTEM_EVENT_CRASH => stop("the guest reported a crash".into()),
            other => stop(format!("system event {other}")),
        },
        Ok(VcpuExit::InternalError) => Emulation::InternalError,
        Ok(VcpuExit::FailEntry(reason, cpu)) => stop(format!(
            "KVM entry failed, hardware reason {reason:#x} on host CPU {cpu}"
        )),
        Ok(other) => stop(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR => Emulation::Interrupted,
        Err(e) if e.errno() == libc::EAGAIN => Emulation::Handled,
        Err(e) => stop(format!("KVM_RUN: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use devices::bus::BusDevice;

    use super::*;

    /// Remembers writes, answers reads with its offset.
    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn bus_with(base: u64, device: &Arc<Mutex<Recorder>>) -> Bus {
        let mut bus = Bus::new();
        bus.insert(base, 0x10, device.clone()).expect("insert");
        bus
    }

    #[test]
    fn port_and_mmio_accesses_reach_their_device() {
        let port_dev = Arc::new(Mutex::new(Recorder::default()));
        let mmio_dev = Arc::new(Mutex::new(Recorder::default()));
        let pio = bus_with(0x3f8, &port_dev);
        let mmio = bus_with(0xd000_0000, &mmio_dev);
        let handle = |exit| handle_kvm_exit(0, &pio, &mmio, Ok(exit));

        let mut data = [0u8; 1];
        let exit = VcpuExit::IoIn(0x3fd, &mut data);
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, Ok(exit)),
            Emulation::Handled
        );
        assert_eq!(data, [5]);
        assert_eq!(handle(VcpuExit::IoOut(0x3f8, b"x")), Emulation::Handled);
        let mut data = [0u8; 4];
        let exit = VcpuExit::MmioRead(0xd000_0008, &mut data);
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, Ok(exit)),
            Emulation::Handled
        );
        assert_eq!(data, [8; 4]);
        assert_eq!(
            handle(VcpuExit::MmioWrite(0xd000_0004, &[1, 2])),
            Emulation::Handled
        );
        assert_eq!(port_dev.lock().expect("lock").0, vec![(0, b"x".to_vec())]);
        assert_eq!(mmio_dev.lock().expect("lock").0, vec![(4, vec![1, 2])]);
    }

    #[test]
    fn unserved_addresses_read_as_all_ones() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let mut data = [0u8; 2];
        let exit = VcpuExit::IoIn(0x80, &mut data);
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, Ok(exit)),
            Emulation::Handled
        );
        assert_eq!(data, [0xff; 2]);
        let mut data = [0u8; 8];
        let exit = VcpuExit::MmioRead(0x1234, &mut data);
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, Ok(exit)),
            Emulation::Handled
        );
        assert_eq!(data, [0xff; 8]);
        let exit = VcpuExit::IoOut(0x80, &[1]);
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, Ok(exit)),
            Emulation::Handled
        );
    }

    #[test]
    fn kicks_and_retries_go_on() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let errno = |n| Err(kvm_ioctls::Error::new(n));
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, errno(libc::EINTR)),
            Emulation::Interrupted
        );
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, Ok(VcpuExit::Intr)),
            Emulation::Interrupted
        );
        assert_eq!(
            handle_kvm_exit(0, &pio, &mmio, errno(libc::EAGAIN)),
            Emulation::Handled
        );
    }

    #[test]
    fn stops_say_why() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let stop = |result| match handle_kvm_exit(3, &pio, &mmio, result) {
            Emulation::Stop(reason) => reason,
            other => panic!("{other:?} is not a stop"),
        };
        assert_eq!(
            stop(Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]))),
            VmExit::Reset
        );
        assert_eq!(
            stop(Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]))),
            VmExit::PowerOff
        );
        assert_eq!(
            stop(Ok(VcpuExit::Shutdown)),
            VmExit::Shutdown("vCPU 3: triple fault (shutdown)".into())
        );
        let failed = |reason: VmExit| match reason {
            VmExit::Failed(text) => text,
            other => panic!("{other:?} is not a failure"),
        };
        assert!(failed(stop(Ok(VcpuExit::FailEntry(0x21, 1)))).contains("reason 0x21"));
        assert!(failed(stop(Ok(VcpuExit::Hlt))).starts_with("vCPU 3: HLT"));
        assert!(
            failed(stop(Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])))).contains("crash")
        );
        assert!(failed(stop(Ok(VcpuExit::Debug(Default::default())))).contains("unexpected exit"));
        assert_eq!(
            failed(stop(Err(kvm_ioctls::Error::new(libc::EFAULT)))),
            format!("vCPU 3: KVM_RUN: {}", kvm_ioctls::Error::new(libc::EFAULT))
        );
        assert_eq!(
            handle_kvm_exit(3, &pio, &mmio, Ok(VcpuExit::InternalError)),
            Emulation::InternalError
        );
    }
}
