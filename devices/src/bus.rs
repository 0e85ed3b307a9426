//! An address bus: non-overlapping ranges, each served by one device.
//!
//! The VMM keeps one bus for I/O ports and one for MMIO; a vCPU exit is
//! dispatched to the device whose range holds the address, with the offset
//! into that range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Ranges of addresses and the devices behind them.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(&base, (len, _))| base..base + len))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |end: u64| {
            self.ranges
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                self.ranges.insert(base, (len, device));
                Ok(())
            }
            _ => Err(BusError::Overlap { base, len }),
        }
    }

    /// Runs `access` on the device serving `len` bytes at `addr`, with the
    /// offset into its range; false when no device serves the whole access.
    fn dispatch(
        &self,
        addr: u64,
        len: usize,
        access: impl FnOnce(&mut dyn BusDevice, u64),
    ) -> bool {
        let Some((base, (range_len, device))) = self.ranges.range(..=addr).next_back() else {
            return false;
        };
        let offset = addr - base;
        if offset + len as u64 > *range_len {
            return false;
        }
        access(
            &mut *device.lock().unwrap_or_else(PoisonError::into_inner),
            offset,
        );
        true
    }

    /// Dispatches a read; false when no device serves the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let len = data.len();
        self.dispatch(addr, len, |device, offset| device.read(offset, data))
    }

    /// Dispatches a write; false when no device serves the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.dispatch(addr, data.len(), |device, offset| {
            device.write(offset, data)
        })
    }
}

/// A device of byte-wide registers (the UART, the i8042): single-byte
/// accesses reach it, anything wider reads as all ones and writes nowhere.
pub trait ByteRegisters: Send {
    /// Reads register `offset`.
    fn read_register(&mut self, offset: u8) -> u8;
    /// Writes register `offset`.
    fn write_register(&mut self, offset: u8, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.read_register(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            self.write_register(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().expect("lock").last_write, Some((7, vec![9])));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.read(0x3f7, &mut data));
        // An access that runs past the end of the range is not served.
        assert!(!bus.read(0x3ff, &mut [0u8; 2]));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, dev.clone()).expect("insert");
        assert!(bus.insert(0x10f, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x9, dev.clone()).is_err());
        assert!(bus.insert(0x200, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.insert(0x110, 1, dev).is_ok());
    }
}
