//! What the virtio-blk device advertises: feature bits, the config space
//! and the limits requests are checked against.

use std::mem::offset_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::request::{Limits, SECTOR};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES_BIT: u32 = 30;
/// The logical block size the guest sees (and the overlay's block).
pub const BLOCK_SIZE: u32 = 4096;
pub const QUEUE_SIZE: usize = 256;
const SEG_MAX: u32 = 126;
const SIZE_MAX: u32 = 1 << 20;
const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR as u32;
const MAX_DISCARD_SEG: u32 = 32;
/// Bytes of `struct virtio_blk_config` up to and including the
/// write-zeroes fields (the secure-erase and zoned fields after them are
/// not offered).
pub const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
/// Offset of the `writeback` byte (CONFIG_WCE).
pub const WRITEBACK_OFFSET: u32 = offset_of!(virtio_blk_config, wce) as u32;

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub capacity_bytes: u64,
    pub read_only: bool,
    pub queues: u16,
    /// Returned by GET_ID: at most 20 bytes.
    pub serial: String,
    /// The longest a queue's worker watches its ring after it drains
    /// (adaptive, see [`super::poll`]); zero turns polling off.
    pub poll: std::time::Duration,
}

/// The default bound on polling: a depth-1 driver on this kind of host
/// sends its next request within it.
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_micros(50);

impl DeviceConfig {
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_bytes / SECTOR
    }

    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            PROTOCOL_FEATURES_BIT,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ]
        .to_vec();
        if self.read_only {
            bits.push(VIRTIO_BLK_F_RO);
        } else {
            bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
        }
        bits.into_iter().fold(0, |acc, b| acc | (1u64 << b))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity_sectors(),
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            block_size: BLOCK_SIZE,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        }
    }

    /// `struct virtio_blk_config`, little-endian, with `writeback` as
    /// given; each field where the bindings put it.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let l = self.limits();
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        macro_rules! field {
            ($name:ident, $value:expr) => {
                put(offset_of!(virtio_blk_config, $name), &$value.to_le_bytes())
            };
        }
        field!(capacity, self.capacity_sectors());
        field!(size_max, l.size_max);
        field!(seg_max, l.seg_max);
        // geometry: not offered.
        field!(blk_size, BLOCK_SIZE);
        // Topology: physical block = logical block, no alignment offset,
        // minimum and optimal I/O one block.
        field!(physical_block_exp, 0u8);
        field!(alignment_offset, 0u8);
        field!(min_io_size, 1u16);
        field!(opt_io_size, 1u32);
        field!(wce, u8::from(writeback));
        field!(num_queues, self.queues);
        field!(max_discard_sectors, l.max_discard_sectors);
        field!(max_discard_seg, l.max_discard_seg);
        field!(discard_sector_alignment, BLOCK_SIZE / SECTOR as u32);
        field!(max_write_zeroes_sectors, l.max_write_zeroes_sectors);
        field!(max_write_zeroes_seg, l.max_write_zeroes_seg);
        field!(write_zeroes_may_unmap, 1u8);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_fields_sit_where_virtio_puts_them() {
        let d = DeviceConfig {
            capacity_bytes: 1 << 30,
            read_only: false,
            queues: 4,
            serial: "x".into(),
            poll: DEFAULT_POLL,
        };
        let c = d.config_space(true);
        // The offsets of the virtio specification, 5.2.4.
        assert_eq!(CONFIG_LEN, 60);
        assert_eq!(WRITEBACK_OFFSET, 32);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 1 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = DeviceConfig {
            read_only: true,
            ..d
        };
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }
}
