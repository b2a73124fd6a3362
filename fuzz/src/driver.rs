//! Guest RAM and the driver half of split virtqueues, written by hand from the fuzz
//! input (the rings a hostile driver could leave in RAM), plus the checks a driver can
//! make of what the device put in its used rings.

use devices::virtio::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::Input;

/// The rings have a region of their own, far from the buffers: a buffer can reach them
/// only through a raw 64-bit address, and the checks below see it when one does.
const RING_BASE: u64 = 0x10_0000_0000;
const RING_AREA: u64 = 0x1_0000;
/// Buffers: two adjacent regions (a buffer crossing them is two host pieces), a third
/// one adjacent too, a hole, one more.
const REGIONS: [(u64, usize); 5] =
    [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x2_0000, 0x1_0000), (0x4_0000, 0x8000), (RING_BASE, RING_AREA as usize)];
pub const MEM_END: u64 = 0x4_8000;
/// Addresses where something ends: buffers placed around them cross or leave RAM.
const EDGES: [u64; 6] = [0x1_0000, 0x2_0000, 0x3_0000, 0x4_0000, MEM_END, 0];
/// Each queue's rings take this much of the ring area (enough for 256 entries).
const RING_STRIDE: u64 = 0x2000;
pub const MAX_QUEUES: u16 = (RING_AREA / RING_STRIDE) as u16;
/// The driver-owned part of a queue's rings: descriptor table and available ring.
const DRIVER_AREA: usize = 0x1400;

pub fn guest_memory() -> GuestMemory {
    let ranges = REGIONS.map(|(addr, len)| (GuestAddress(addr), len));
    GuestMemory::from_ranges(&ranges).expect("guest memory")
}

/// A guest-physical address for a buffer: mostly in the buffer regions, sometimes at a
/// region's edge, sometimes anything at all.
pub fn buffer_addr(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0..=4 => u64::from(input.u16()) * 4,
        5 | 6 => EDGES[input.below(EDGES.len() as u64) as usize].wrapping_add(u64::from(input.u8())).wrapping_sub(0x80),
        _ => input.u64(),
    }
}

/// A buffer length: mostly small, sometimes a frame's worth, sometimes anything.
pub fn buffer_len(input: &mut Input) -> u32 {
    match input.u8() % 8 {
        0..=4 => u32::from(input.u8()),
        5 | 6 => u32::from(input.u16()),
        _ => input.u32(),
    }
}

/// Writes up to 64 input bytes anywhere among the buffers (indirect tables, headers).
pub fn poke(mem: &GuestMemory, input: &mut Input) {
    let addr = input.below(MEM_END);
    let len = usize::from(input.u8() % 64) + 1;
    let bytes = input.bytes(len);
    let _ = mem.write_slice(bytes, GuestAddress(addr));
}

/// The driver's side of one split virtqueue.
pub struct DriverQueue {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The available index the driver last wrote.
    avail_idx: u16,
    /// Chains the driver made available in total (wrapping deltas of its writes).
    made_available: u64,
    used_seen: u16,
    used_total: u64,
    /// What the driver wrote to its part of the rings. The device never writes there:
    /// when it differs, a buffer overlapped the rings and the device's writes to it may
    /// have forged used entries too, so the used-ring checks stop for this queue.
    shadow: Vec<u8>,
    clobbered: bool,
}

impl DriverQueue {
    /// Queue `n`'s rings, cleared, as a driver sets them up after a reset.
    pub fn new(mem: &GuestMemory, n: u16, size: u16) -> Self {
        let base = RING_BASE + u64::from(n % MAX_QUEUES) * RING_STRIDE;
        let _ = mem.write_slice(&[0; RING_STRIDE as usize], GuestAddress(base));
        Self {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x1400,
            avail_idx: 0,
            made_available: 0,
            used_seen: 0,
            used_total: 0,
            shadow: vec![0; DRIVER_AREA],
            clobbered: false,
        }
    }

    /// The device's queue for these rings, as the virtio-pci transport builds it.
    pub fn queue(&self, max: u16, event_idx: bool, mem: &GuestMemory) -> Option<Queue> {
        let mut queue = Queue::new(max).ok()?;
        queue.try_set_size(self.size).ok()?;
        queue.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        queue.try_set_avail_ring_address(GuestAddress(self.avail)).ok()?;
        queue.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue.is_valid(mem).then_some(queue)
    }

    /// Writes descriptor `index` (any index: the table may be smaller) from the input.
    pub fn write_desc(&mut self, mem: &GuestMemory, input: &mut Input) {
        let index = u64::from(input.u8());
        let addr = buffer_addr(input);
        let len = buffer_len(input);
        // NEXT, WRITE, INDIRECT, and now and then a bit no driver sets.
        let flags = u16::from(input.u8()) & 0x7 | if input.u8() == 0xff { 0x80 } else { 0 };
        let next = u16::from(input.u8());
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.driver_write(mem, 16 * (index % 256), &raw);
    }

    /// A write to the driver's part of the rings, `offset` bytes in.
    fn driver_write(&mut self, mem: &GuestMemory, offset: u64, bytes: &[u8]) {
        let at = offset as usize;
        self.shadow[at..at + bytes.len()].copy_from_slice(bytes);
        let _ = mem.write_slice(bytes, GuestAddress(self.desc + offset));
    }

    /// Offers chain `head` in the next available slot.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail - self.desc + 4 + 2 * u64::from(self.avail_idx % self.size.max(1));
        self.driver_write(mem, slot, &head.to_le_bytes());
        self.set_avail_idx(mem, self.avail_idx.wrapping_add(1));
    }

    /// Writes the available index, lying or not.
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.made_available += u64::from(idx.wrapping_sub(self.avail_idx));
        self.avail_idx = idx;
        self.driver_write(mem, self.avail - self.desc + 2, &idx.to_le_bytes());
    }

    /// The available ring's flags and `used_event` (EVENT_IDX), as the driver likes.
    pub fn set_notification_fields(&mut self, mem: &GuestMemory, flags: u16, used_event: u16) {
        let avail = self.avail - self.desc;
        self.driver_write(mem, avail, &flags.to_le_bytes());
        self.driver_write(mem, avail + 4 + 2 * u64::from(self.size), &used_event.to_le_bytes());
    }

    /// The used-ring entries (id, len) the device added since the last call, checked:
    /// never more chains used than made available, never an id outside the table.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let mut now = vec![0u8; DRIVER_AREA];
        mem.read_slice(&mut now, GuestAddress(self.desc)).expect("rings in RAM");
        self.clobbered |= now != self.shadow;
        if self.clobbered {
            return Vec::new();
        }
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used ring in RAM");
        let new = idx.wrapping_sub(self.used_seen);
        self.used_total += u64::from(new);
        assert!(
            self.used_total <= self.made_available,
            "the device used {} chains of a queue where the driver made {} available",
            self.used_total,
            self.made_available
        );
        let size = self.size.max(1);
        let first = idx.wrapping_sub(new.min(size));
        let entries = (0..new.min(size))
            .map(|i| {
                let slot = first.wrapping_add(i) % size;
                let at = GuestAddress(self.used).unchecked_add(4 + 8 * u64::from(slot));
                let id: u32 = mem.read_obj(at).expect("used ring in RAM");
                let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("used ring in RAM");
                assert!(id < u32::from(size), "used entry with id {id} in a queue of {size}");
                (id, len)
            })
            .collect();
        self.used_seen = idx;
        entries
    }
}

impl DriverQueue {
    /// Builds a chain of 1 to 8 descriptors from table index `head` on, linked with
    /// NEXT, each buffer filled with up to 32 input bytes, and offers it: the shape of a
    /// real request, for the fuzzer to bend.
    pub fn write_chain(&mut self, mem: &GuestMemory, input: &mut Input) {
        let head = u16::from(input.u8());
        let count = input.u8() % 8 + 1;
        for i in 0..count {
            let index = head.wrapping_add(u16::from(i));
            let addr = buffer_addr(input);
            let len = buffer_len(input);
            let write = u16::from(input.bool()) * 2;
            let last = i + 1 == count;
            let flags = if last { write } else { write | 1 };
            let next = index.wrapping_add(1) % self.size.max(1);
            let fill = input.bytes(len.min(32) as usize);
            let _ = mem.write_slice(fill, GuestAddress(addr));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.driver_write(mem, 16 * u64::from(index % 256), &raw);
        }
        self.publish(mem, head);
    }

    /// One driver action on this queue's rings from the input; false if the action is
    /// not a ring one (the caller handles it).
    pub fn act(&mut self, mem: &GuestMemory, op: u8, input: &mut Input) -> bool {
        match op {
            0 => self.write_desc(mem, input),
            1 => self.write_chain(mem, input),
            2 => {
                let head = u16::from(input.u8());
                self.publish(mem, head)
            }
            3 => {
                let idx = input.u16();
                self.set_avail_idx(mem, idx)
            }
            4 => {
                let (flags, used_event) = (input.u16(), input.u16());
                self.set_notification_fields(mem, flags, used_event)
            }
            _ => return false,
        }
        true
    }
}
