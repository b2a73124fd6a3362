//! The virtio-blk device model: what it offers, its configuration space, activation and
//! reset.

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;

use super::disk::Disk;
use super::execute::{Executor, Negotiated, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::worker::BlockWorker;
use super::{BlockConfig, BlockCounters, BlockError, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::notice::{DeviceNotices, Notices};
use crate::virtio::{ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, Worker};

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// A virtio-blk disk with one request queue.
pub struct Block {
    disk: Arc<Disk>,
    name: String,
    log: DeviceNotices,
    id: [u8; ID_BYTES],
    avail_features: u64,
    acked_features: u64,
    /// `struct virtio_blk_config`, little-endian, laid out by the bindings' offsets.
    config_space: [u8; CONFIG_LEN],
    counters: Arc<BlockCounters>,
}

impl Block {
    /// Opens the disk image and works out what the device offers.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let id = serial(&config.id)?;
        let disk = Disk::open(&config)?;

        let mut features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if config.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        // Only where the file system can punch holes (probed by Disk::open; never on a
        // read-only disk or a block device).
        if disk.can_punch() {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let config_space = config_space(&disk);
        Ok(Self {
            disk: Arc::new(disk),
            name: config.path.display().to_string(),
            log: DeviceNotices::new(format!("virtio-blk {}", config.path.display()), Notices::discard()),
            id,
            avail_features: features,
            acked_features: 0,
            config_space,
            counters: Arc::default(),
        })
    }

    /// The disk's running totals; they survive resets.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    pub fn readonly(&self) -> bool {
        self.disk.readonly()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the disk's warnings go (dropped until this is called).
    pub fn set_notices(&mut self, notices: Notices) {
        self.log = DeviceNotices::new(self.log.name(), notices);
    }

    #[cfg(test)]
    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Builds the worker for `queues`; `activate` boxes it.
    pub(crate) fn build_worker(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<BlockWorker, ActivateError> {
        if !self.acked(VIRTIO_F_VERSION_1) {
            return Err(ActivateError::Features {
                features: self.acked_features,
                reason: "VIRTIO_F_VERSION_1 is required: this device has no legacy interface".into(),
            });
        }
        let got = queues.len();
        let [ActivatedQueue { index, mut queue, notify }] =
            <[ActivatedQueue; 1]>::try_from(queues).map_err(|_| ActivateError::QueueCount { expected: 1, got })?;
        // The transport may or may not have told the queue these: EVENT_IDX changes where
        // it reads and writes notification thresholds, and virtio-queue refuses to hand
        // out chains from a queue not marked ready (the contract says it is enabled).
        queue.set_event_idx(self.acked(VIRTIO_RING_F_EVENT_IDX));
        queue.set_ready(true);
        let exec = Executor {
            disk: self.disk.clone(),
            counters: self.counters.clone(),
            id: self.id,
            negotiated: Negotiated {
                flush: self.acked(VIRTIO_BLK_F_FLUSH),
                discard: self.acked(VIRTIO_BLK_F_DISCARD),
                write_zeroes: self.acked(VIRTIO_BLK_F_WRITE_ZEROES),
            },
            log: self.log.clone(),
            bounce: None,
        };
        Ok(BlockWorker::new(mem, queue, index, notify, interrupt, exec))
    }
}

/// The GET_ID serial: printable ASCII, NUL-padded to 20 bytes (no NUL when 20 long).
fn serial(id: &str) -> Result<[u8; ID_BYTES], BlockError> {
    if id.len() > ID_BYTES {
        return Err(BlockError::IdTooLong { id: id.to_owned(), len: id.len() });
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(BlockError::IdNotAscii { id: id.to_owned() });
    }
    let mut out = [0u8; ID_BYTES];
    out[..id.len()].copy_from_slice(id.as_bytes());
    Ok(out)
}

fn config_space(disk: &Disk) -> [u8; CONFIG_LEN] {
    let mut space = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| space[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(offset_of!(virtio_blk_config, capacity), &(disk.size() / SECTOR_SIZE).to_le_bytes());
    // Header and status take two descriptors of a queue-sized chain (Linux caps its
    // scatter-gather lists by this even with indirect descriptors).
    put(offset_of!(virtio_blk_config, seg_max), &(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
    put(offset_of!(virtio_blk_config, blk_size), &disk.block_size().to_le_bytes());
    if disk.can_punch() {
        // Discard granularity: the file system block, below which punching only zeroes.
        let granularity = disk.io_block().max(u64::from(disk.block_size())) / SECTOR_SIZE;
        let granularity = u32::try_from(granularity).unwrap_or(1);
        put(offset_of!(virtio_blk_config, max_discard_sectors), &MAX_DISCARD_SECTORS.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_discard_seg), &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(offset_of!(virtio_blk_config, discard_sector_alignment), &granularity.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_write_zeroes_sectors), &MAX_DISCARD_SECTORS.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_write_zeroes_seg), &MAX_DISCARD_SEGMENTS.to_le_bytes());
        // WRITE_ZEROES with unmap punches holes.
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    }
    space
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        // The transport masks already; masking again keeps `acked` honest regardless.
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only: `writeback` is only writable with
        // VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Worker, ActivateError> {
        Ok(Box::new(self.build_worker(mem, interrupt, queues)?))
    }

    fn reset(&mut self) {
        // The worker (queue state, bounce buffer) is gone already; the disk stays open and
        // the counters keep counting.
        self.acked_features = 0;
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.name)
            .field("capacity", &self.capacity())
            .field("readonly", &self.readonly())
            .field("features", &format_args!("{:#x}", self.avail_features))
            .finish_non_exhaustive()
    }
}
