//! The virtio-blk configuration space (virtio 1.2, 5.2.4): virtio-bindings'
//! `virtio_blk_config` layout, read-only but for `writeback`.

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vm_memory::ByteValued;

use super::request::{limits, SECTOR_SIZE};
use crate::virtio::{
    read_config_bytes, ConfigSpace, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// The feature bits a virtio-blk disk offers, whatever its transport.
pub fn features(read_only: bool) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        // The driver may switch between writeback and writethrough
        // (QEMU offers it too; a device that offers it MUST offer FLUSH).
        VIRTIO_BLK_F_CONFIG_WCE,
    ];
    if read_only {
        bits.push(VIRTIO_BLK_F_RO);
    } else {
        bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
    }
    bits.iter().fold(0, |acc, bit| acc | (1u64 << bit))
}

/// `virtio_blk_config` as bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct Layout(virtio_blk_config);

// SAFETY: virtio_blk_config is a packed struct of integers and arrays of
// integers: no padding, and every bit pattern is a valid value.
unsafe impl ByteValued for Layout {}

/// Offset of `writeback` (called `wce` in the Linux header).
const WRITEBACK: usize = offset_of!(virtio_blk_config, wce);

/// A virtio-blk device's configuration space.
pub struct BlockConfig {
    /// Everything but `writeback`, fixed at creation.
    fixed: Layout,
    /// The cache mode: 1 writeback, 0 writethrough.
    writeback: AtomicU8,
    /// VIRTIO_BLK_F_CONFIG_WCE was negotiated: the driver may set `writeback`.
    writable: AtomicBool,
}

impl BlockConfig {
    /// The configuration of a disk of `capacity` bytes whose discards act
    /// on `discard_alignment`-byte units.
    pub fn new(capacity: u64, discard_alignment: u64) -> Self {
        let alignment = (discard_alignment / SECTOR_SIZE).clamp(1, u64::from(u32::MAX));
        let config = virtio_blk_config {
            capacity: (capacity / SECTOR_SIZE).to_le(),
            seg_max: limits::SEG_MAX.to_le(),
            blk_size: (SECTOR_SIZE as u32).to_le(),
            num_queues: 1u16.to_le(),
            max_discard_sectors: limits::MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: limits::MAX_DISCARD_SEG.to_le(),
            discard_sector_alignment: (alignment as u32).to_le(),
            max_write_zeroes_sectors: limits::MAX_WRITE_ZEROES_SECTORS.to_le(),
            max_write_zeroes_seg: limits::MAX_WRITE_ZEROES_SEG.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        BlockConfig {
            fixed: Layout(config),
            writeback: AtomicU8::new(1),
            writable: AtomicBool::new(false),
        }
    }

    /// Sets the cache mode from the features the driver accepted (virtio
    /// 1.2, 5.2.5): writeback with FLUSH, writethrough without ("If
    /// VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not,
    /// the device MUST initialize writeback to 0"), switchable by the driver
    /// only with CONFIG_WCE.
    pub fn negotiate(&self, acked: u64) {
        let flush = acked & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.writeback.store(u8::from(flush), Ordering::SeqCst);
        self.writable.store(
            acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0,
            Ordering::SeqCst,
        );
    }

    /// Back to the state after creation (device reset).
    pub fn reset(&self) {
        self.writeback.store(1, Ordering::SeqCst);
        self.writable.store(false, Ordering::SeqCst);
    }

    /// Completed writes must be stable before they complete (writethrough).
    pub fn write_through(&self) -> bool {
        self.writeback.load(Ordering::SeqCst) == 0
    }
}

impl ConfigSpace for BlockConfig {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = self.fixed;
        bytes.0.wce = self.writeback.load(Ordering::SeqCst);
        read_config_bytes(bytes.as_slice(), offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        // Only `writeback` is writable, one byte, 0 or 1, and only with
        // CONFIG_WCE negotiated; anything else is ignored.
        if offset != WRITEBACK as u64 || !self.writable.load(Ordering::SeqCst) {
            return false;
        }
        let [value @ (0 | 1)] = data else {
            return false;
        };
        self.writeback.swap(*value, Ordering::SeqCst) != *value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u32(config: &BlockConfig, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        config.read(offset as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// Structure (issue 12) and virtio 1.2, 5.2.4 (device configuration
    /// layout): the fields sit where `struct virtio_blk_config` puts them,
    /// checked against the spec's byte offsets; padding reads 0 (5.2.5:
    /// "The device MUST initialize padding bytes unused0 and unused1 to 0").
    #[test]
    fn the_layout_is_the_specs() {
        let config = BlockConfig::new(1 << 30, 64 << 10);
        let mut capacity = [0u8; 8];
        config.read(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), (1 << 30) / 512);
        assert_eq!(read_u32(&config, 12), limits::SEG_MAX);
        assert_eq!(read_u32(&config, 20), 512, "blk_size");
        let mut byte = [0xffu8; 1];
        config.read(32, &mut byte);
        assert_eq!(byte, [1], "writeback");
        config.read(33, &mut byte);
        assert_eq!(byte, [0], "unused0");
        assert_eq!(read_u32(&config, 36), limits::MAX_DISCARD_SECTORS);
        assert_eq!(read_u32(&config, 40), 1, "max_discard_seg");
        assert_eq!(read_u32(&config, 44), 128, "discard_sector_alignment");
        assert_eq!(read_u32(&config, 48), limits::MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(read_u32(&config, 52), 1, "max_write_zeroes_seg");
        config.read(56, &mut byte);
        assert_eq!(byte, [1], "write_zeroes_may_unmap");
        let mut unused1 = [0xffu8; 3];
        config.read(57, &mut unused1);
        assert_eq!(unused1, [0; 3]);
        assert_eq!(std::mem::size_of::<Layout>(), 96);
        // Past the end reads zeros.
        assert_eq!(read_u32(&config, 200), 0);
    }

    /// virtio 1.2, 5.2.5 (device initialization): `writeback` follows the
    /// negotiated features, and the driver may switch it only with
    /// VIRTIO_BLK_F_CONFIG_WCE (5.2.6.1: "If the VIRTIO_BLK_F_CONFIG_WCE
    /// feature is negotiated, the driver MAY switch to writethrough or
    /// writeback mode by writing respectively 0 and 1").
    #[test]
    fn writeback_follows_the_features_and_the_driver() {
        let config = BlockConfig::new(1 << 20, 512);
        config.negotiate(1 << VIRTIO_BLK_F_CONFIG_WCE);
        assert!(config.write_through(), "WCE without FLUSH starts at 0");
        config.negotiate((1 << VIRTIO_BLK_F_CONFIG_WCE) | (1 << VIRTIO_BLK_F_FLUSH));
        assert!(!config.write_through());
        assert!(config.write(WRITEBACK as u64, &[0]), "changed");
        assert!(config.write_through());
        assert!(!config.write(WRITEBACK as u64, &[0]), "unchanged");
        assert!(!config.write(WRITEBACK as u64, &[2]), "not a mode");
        assert!(!config.write(0, &[0]), "capacity is read-only");
        config.negotiate(1 << VIRTIO_BLK_F_FLUSH);
        assert!(
            !config.write(WRITEBACK as u64, &[0]),
            "no WCE, not writable"
        );
        assert!(!config.write_through());
        config.negotiate(0);
        assert!(config.write_through(), "no FLUSH: writethrough");
    }
}
