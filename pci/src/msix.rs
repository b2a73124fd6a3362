//! MSI-X: the capability in config space, the vector table and the pending bit array
//! (PBA) the device exposes in a BAR, per-vector and function masking.
//!
//! The capability's control word lives in config space (the device owns it through
//! `PciConfiguration` with bits 14 and 15 writable) and is handed to
//! [`Msix::set_control`] after each config write that touches it; the table and PBA
//! live here. Every routing change goes to [`MsiVectors`] as described in `interrupt`.

use std::sync::Arc;

use crate::interrupt::{MsiMessage, MsiVectors, VectorRoute};

pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// The table size field is 11 bits wide.
pub const MAX_MSIX_VECTORS: u16 = 2048;
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Offset of the message control word from the start of the capability.
pub const MSIX_CONTROL_OFFSET: usize = 2;
/// Bytes of the capability, header included.
pub const MSIX_CAPABILITY_LEN: usize = 12;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_ADDR_LO: u64 = 0;
const ENTRY_ADDR_HI: u64 = 4;
const ENTRY_DATA: u64 = 8;
const ENTRY_VECTOR_CONTROL: u64 = 12;
const VECTOR_CONTROL_MASK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("an MSI-X table has 1 to {MAX_MSIX_VECTORS} vectors, not {0}")]
    TableSize(u16),
    #[error("MSI-X {what} offset {offset:#x} is not 8-byte aligned (its low 3 bits hold the BAR index)")]
    Alignment { what: &'static str, offset: u32 },
    #[error("MSI-X {what} BAR index {bar} is not 0 to 5")]
    BarIndex { what: &'static str, bar: u8 },
    #[error("MSI-X vector {vector} is beyond the table of {table_size}")]
    Vector { vector: u16, table_size: u16 },
    #[error("cannot deliver MSI-X vector {vector}: {source}")]
    Deliver {
        vector: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Where the table and the PBA live: BAR index and offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// Bytes the table of `vectors` entries occupies.
pub fn table_len(vectors: u16) -> u64 {
    u64::from(vectors) * MSIX_TABLE_ENTRY_SIZE
}

/// Bytes the PBA for `vectors` entries occupies (whole QWORDs).
pub fn pba_len(vectors: u16) -> u64 {
    u64::from(vectors).div_ceil(64) * 8
}

/// The capability body (after ID and next pointer) and its writable mask, for
/// `PciConfiguration::add_capability(MSIX_CAPABILITY_ID, ..)`.
pub fn capability_body(table_size: u16, layout: &MsixLayout) -> Result<([u8; 10], [u8; 10]), MsixError> {
    if table_size == 0 || table_size > MAX_MSIX_VECTORS {
        return Err(MsixError::TableSize(table_size));
    }
    let location = |what, bar: u8, offset: u32| {
        if bar > 5 {
            Err(MsixError::BarIndex { what, bar })
        } else if offset & 0x7 != 0 {
            Err(MsixError::Alignment { what, offset })
        } else {
            Ok(offset | u32::from(bar))
        }
    };
    let table = location("table", layout.table_bar, layout.table_offset)?;
    let pba = location("PBA", layout.pba_bar, layout.pba_offset)?;
    let mut body = [0; 10];
    body[0..2].copy_from_slice(&(table_size - 1).to_le_bytes());
    body[2..6].copy_from_slice(&table.to_le_bytes());
    body[6..10].copy_from_slice(&pba.to_le_bytes());
    let mut writable = [0; 10];
    writable[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
    Ok((body, writable))
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    vector_control: u32,
}

impl Default for Entry {
    /// Entries come out of reset masked (PCI 3.0, 6.8.2.9).
    fn default() -> Self {
        Self { addr_lo: 0, addr_hi: 0, data: 0, vector_control: VECTOR_CONTROL_MASK }
    }
}

impl Entry {
    fn masked(&self) -> bool {
        self.vector_control & VECTOR_CONTROL_MASK != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage { addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo), data: self.data }
    }

    fn field(&self, field: u64) -> u32 {
        match field {
            ENTRY_ADDR_LO => self.addr_lo,
            ENTRY_ADDR_HI => self.addr_hi,
            ENTRY_DATA => self.data,
            ENTRY_VECTOR_CONTROL => self.vector_control,
            // `table_access` only yields the four DWORD-aligned field offsets.
            _ => 0,
        }
    }

    fn set_field(&mut self, field: u64, value: u32) {
        match field {
            // Bits 1:0 of the address are reserved zero (DWORD-aligned writes).
            ENTRY_ADDR_LO => self.addr_lo = value & !0x3,
            ENTRY_ADDR_HI => self.addr_hi = value,
            ENTRY_DATA => self.data = value,
            // Only the mask bit is defined; the rest is reserved zero.
            ENTRY_VECTOR_CONTROL => self.vector_control = value & VECTOR_CONTROL_MASK,
            _ => {}
        }
    }
}

/// The MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    routes: Vec<VectorRoute>,
    enabled: bool,
    function_masked: bool,
    vectors: Arc<dyn MsiVectors>,
}

impl Msix {
    /// A table of `table_size` vectors, delivered through `vectors` (which must have
    /// at least as many).
    pub fn new(table_size: u16, vectors: Arc<dyn MsiVectors>) -> Result<Self, MsixError> {
        if table_size == 0 || table_size > MAX_MSIX_VECTORS {
            return Err(MsixError::TableSize(table_size));
        }
        let n = usize::from(table_size);
        Ok(Self {
            entries: vec![Entry::default(); n],
            pending: vec![0; n.div_ceil(64)],
            routes: vec![VectorRoute::Disabled; n],
            enabled: false,
            function_masked: false,
            vectors,
        })
    }

    pub fn table_size(&self) -> u16 {
        // `new` bounds the length by MAX_MSIX_VECTORS.
        self.entries.len() as u16
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_function_masked(&self) -> bool {
        self.function_masked
    }

    /// The guest wrote the capability's message control word; `control` is its value
    /// after the config space masks.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for vector in 0..self.table_size() {
            self.sync_vector(vector);
        }
    }

    /// Back to the power-on state: disabled, every entry masked and cleared, nothing
    /// pending. For a function-level reset (the config space is reset alongside).
    pub fn reset(&mut self) {
        self.entries.fill(Entry::default());
        self.pending.fill(0);
        self.set_control(0);
    }

    /// A read at `offset` inside the table. DWORD and aligned QWORD accesses are
    /// served; anything else (the spec leaves it undefined) reads all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let Some((index, field)) = self.table_access(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let Some(entry) = self.entries.get(index) else {
            data.fill(0xff);
            return;
        };
        let mut value = u64::from(entry.field(field));
        if data.len() == 8 {
            value |= u64::from(entry.field(field + 4)) << 32;
        }
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// A write at `offset` inside the table; undefined accesses are ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.table_access(offset, data.len()) else {
            return;
        };
        let mut bytes = [0; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        entry.set_field(field, value as u32);
        if data.len() == 8 {
            entry.set_field(field + 4, (value >> 32) as u32);
        }
        // `index` is below the table size, which fits in u16.
        self.sync_vector(index as u16);
    }

    /// The entry and field an access addresses, if it is a DWORD access to a field or
    /// a QWORD access to the address or to data plus control.
    fn table_access(&self, offset: u64, len: usize) -> Option<(usize, u64)> {
        let field = offset % MSIX_TABLE_ENTRY_SIZE;
        let valid = match len {
            4 => field & 0x3 == 0,
            8 => field & 0x7 == 0,
            _ => false,
        };
        let index = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        (valid && index < self.entries.len()).then_some((index, field))
    }

    /// A read at `offset` inside the PBA (DWORD or aligned QWORD; else all-ones).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let aligned = matches!(data.len(), 4 | 8) && offset & (data.len() as u64 - 1) == 0;
        let qword = usize::try_from(offset / 8).ok().and_then(|i| self.pending.get(i));
        match (aligned, qword) {
            (true, Some(&bits)) => {
                let bytes = bits.to_le_bytes();
                let start = (offset % 8) as usize;
                data.copy_from_slice(&bytes[start..start + data.len()]);
            }
            _ => data.fill(0xff),
        }
    }

    /// The PBA is read-only: writes are ignored.
    pub fn write_pba(&mut self, _offset: u64, _data: &[u8]) {}

    pub fn is_pending(&self, vector: u16) -> bool {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        self.pending.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        if let Some(w) = self.pending.get_mut(word) {
            if pending {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    /// The device signals `vector`: delivered if live, recorded in the PBA if masked,
    /// dropped while MSI-X is disabled (there is no INTx to fall back to).
    pub fn trigger(&mut self, vector: u16) -> Result<(), MsixError> {
        let Some(route) = self.routes.get(usize::from(vector)) else {
            return Err(MsixError::Vector { vector, table_size: self.table_size() });
        };
        if !self.enabled {
            return Ok(());
        }
        if !route.is_live() {
            self.set_pending(vector, true);
            return Ok(());
        }
        self.vectors.trigger(vector).map_err(|source| MsixError::Deliver { vector, source })
    }

    /// Brings the VMM's view of `vector` up to date with the registers, and delivers
    /// what was pending if the vector just became live.
    fn sync_vector(&mut self, vector: u16) {
        let i = usize::from(vector);
        let (Some(entry), Some(route)) = (self.entries.get(i), self.routes.get_mut(i)) else {
            return;
        };
        let masked = self.function_masked || entry.masked();
        route.sync(vector, self.enabled, masked, entry.message(), self.vectors.as_ref());
        if route.is_live() && self.is_pending(vector) {
            // On failure the bit stays set: the interrupt is still owed.
            if self.vectors.trigger(vector).is_ok() {
                self.set_pending(vector, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::testing::{Call, Call::*, RecordingVectors};

    fn msix(n: u16) -> (Msix, Arc<RecordingVectors>) {
        let v = Arc::new(RecordingVectors::default());
        (Msix::new(n, v.clone()).unwrap(), v)
    }

    fn program(m: &mut Msix, vector: u64, msg: MsiMessage, masked: bool) {
        let base = vector * MSIX_TABLE_ENTRY_SIZE;
        m.write_table(base, &msg.addr.to_le_bytes());
        m.write_table(base + 8, &msg.data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn msg(n: u32) -> MsiMessage {
        MsiMessage { addr: 0xfee0_0000 + u64::from(n) * 0x1000, data: 0x30 + n }
    }

    fn read32(m: &Msix, offset: u64) -> u32 {
        let mut b = [0; 4];
        m.read_table(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn capability_body_encodes_layout() {
        let layout = MsixLayout { table_bar: 0, table_offset: 0x4000, pba_bar: 2, pba_offset: 0x800 };
        let (body, writable) = capability_body(3, &layout).unwrap();
        assert_eq!(body, [2, 0, 0x00, 0x40, 0, 0, 0x02, 0x08, 0, 0]);
        assert_eq!(writable, [0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(capability_body(0, &layout), Err(MsixError::TableSize(0))));
        assert!(matches!(capability_body(2049, &layout), Err(MsixError::TableSize(2049))));
        let odd = MsixLayout { table_offset: 0x4004, ..layout };
        assert!(matches!(capability_body(3, &odd), Err(MsixError::Alignment { .. })));
        let bad_bar = MsixLayout { pba_bar: 6, ..layout };
        assert!(matches!(capability_body(3, &bad_bar), Err(MsixError::BarIndex { .. })));
        assert_eq!((table_len(3), pba_len(3), pba_len(64), pba_len(65)), (48, 8, 8, 16));
    }

    #[test]
    fn table_reads_back_what_was_written() {
        let (mut m, _) = msix(4);
        // Reset state: masked, zero.
        assert_eq!(read32(&m, 12), 1);
        program(&mut m, 2, MsiMessage { addr: 0x1_fee0_0003, data: 0x41 }, false);
        assert_eq!(read32(&m, 32), 0xfee0_0000);
        assert_eq!(read32(&m, 36), 1);
        assert_eq!(read32(&m, 40), 0x41);
        assert_eq!(read32(&m, 44), 0);
        let mut q = [0; 8];
        m.read_table(32, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_0000);
        m.read_table(40, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x41);
        m.write_table(44, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(read32(&m, 44), 0);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (mut m, v) = msix(2);
        m.set_control(CONTROL_ENABLE);
        for (offset, len) in [(0, 1), (0, 2), (2, 4), (4, 8), (12, 8), (0, 3), (0, 16), (32, 4), (u64::MAX - 3, 4)] {
            m.write_table(offset, &vec![0xff; len]);
            let mut buf = vec![0; len];
            m.read_table(offset, &mut buf);
            assert!(buf.iter().all(|&b| b == 0xff), "read at {offset:#x}+{len}");
        }
        m.read_table(0, &mut []);
        assert_eq!(read32(&m, 0), 0);
        assert_eq!(read32(&m, 12), 1);
        assert_eq!(v.take(), vec![]);
        let mut b = [0; 4];
        m.read_pba(2, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.read_pba(8, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.write_pba(0, &[0xff; 8]);
        m.read_pba(0, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(matches!(m.trigger(2), Err(MsixError::Vector { vector: 2, table_size: 2 })));
        assert!(matches!(Msix::new(0, v.clone()), Err(MsixError::TableSize(0))));
    }

    #[test]
    fn enable_and_disable_report_only_unmasked_vectors() {
        let (mut m, v) = msix(3);
        program(&mut m, 0, msg(0), false);
        program(&mut m, 1, msg(1), true);
        assert_eq!(v.take(), vec![], "nothing is routed while MSI-X is off");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(v.take(), vec![Enable(0, msg(0))]);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(v.take(), vec![]);
        m.set_control(0);
        assert_eq!(v.take(), vec![Disable(0)]);
    }

    #[test]
    fn vector_mask_holds_interrupts_pending_until_unmask() {
        let (mut m, v) = msix(3);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, msg(1), false);
        assert_eq!(v.take(), vec![Enable(1, msg(1))]);
        m.trigger(1).unwrap();
        assert_eq!(v.take(), vec![Trigger(1)]);

        m.write_table(16 + 12, &1u32.to_le_bytes());
        m.trigger(1).unwrap();
        m.trigger(1).unwrap();
        assert!(m.is_pending(1));
        let mut pba = [0; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert_eq!(v.take(), vec![Mask(1)]);

        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(v.take(), vec![Unmask(1), Trigger(1)]);
        assert!(!m.is_pending(1));

        // A never-unmasked vector records its trigger but gets no route.
        m.trigger(2).unwrap();
        assert!(m.is_pending(2));
        assert_eq!(v.take(), vec![]);
        program(&mut m, 2, msg(2), false);
        assert_eq!(v.take(), vec![Enable(2, msg(2)), Trigger(2)]);
    }

    #[test]
    fn message_written_while_masked_applies_on_unmask() {
        let (mut m, v) = msix(1);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, msg(0), false);
        m.write_table(12, &1u32.to_le_bytes());
        m.write_table(0, &msg(5).addr.to_le_bytes());
        m.write_table(8, &msg(5).data.to_le_bytes());
        m.write_table(12, &0u32.to_le_bytes());
        assert_eq!(v.take(), vec![Enable(0, msg(0)), Mask(0), Enable(0, msg(5))]);
    }

    #[test]
    fn function_mask_masks_every_live_vector() {
        let (mut m, v) = msix(3);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, msg(0), false);
        program(&mut m, 2, msg(2), false);
        assert_eq!(v.take(), vec![], "function mask keeps new vectors unrouted");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(v.take(), vec![Enable(0, msg(0)), Enable(2, msg(2))]);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(2).unwrap();
        assert_eq!(v.take(), vec![Mask(0), Mask(2)]);
        assert!(m.is_function_masked() && m.is_pending(2));
        m.set_control(CONTROL_ENABLE);
        assert_eq!(v.take(), vec![Unmask(0), Unmask(2), Trigger(2)]);
    }

    #[test]
    fn triggers_while_disabled_are_dropped_and_reset_clears() {
        let (mut m, v) = msix(2);
        program(&mut m, 0, msg(0), false);
        m.trigger(0).unwrap();
        assert!(!m.is_pending(0));
        m.set_control(CONTROL_ENABLE);
        m.reset();
        assert!(!m.is_enabled());
        assert_eq!(read32(&m, 12), 1);
        assert_eq!(v.take(), vec![Call::Enable(0, msg(0)), Call::Disable(0)]);
    }
}
