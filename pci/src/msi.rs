//! MSI: the 64-bit, per-vector-maskable MSI capability.
//!
//! The capability's registers live in config space (the device adds the capability
//! with [`capability_body`] and owns it through `PciConfiguration`); after each config
//! write that touches it the device hands the capability's bytes to [`Msi::update`],
//! which reports routing changes to [`MsiVectors`] as described in `interrupt`. The
//! pending bits are the one register the device changes on its own: they are kept
//! here and laid over config reads with [`Msi::pending_bits`].

use std::sync::Arc;

use crate::interrupt::{MsiMessage, MsiVectors, VectorRoute};

pub const MSI_CAPABILITY_ID: u8 = 0x05;
/// Bytes of the capability, header included.
pub const MSI_CAPABILITY_LEN: usize = 24;
/// Offsets of the registers from the start of the capability.
pub const MSI_CONTROL_OFFSET: usize = 2;
/// The layout `Msi::update` takes (64-bit address, per-vector masking); VFIO
/// passthrough translates a device's shorter layouts into it.
pub const MSI_ADDRESS_LO_OFFSET: usize = 4;
pub const MSI_ADDRESS_HI_OFFSET: usize = 8;
pub const MSI_DATA_OFFSET: usize = 12;
pub const MSI_MASK_OFFSET: usize = 16;
pub const MSI_PENDING_OFFSET: usize = 20;
/// MSI allows 1, 2, 4, 8, 16 or 32 vectors.
pub const MAX_MSI_VECTORS: u16 = 32;

const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_CAPABLE_SHIFT: u16 = 1;
const CONTROL_ENABLED_SHIFT: u16 = 4;
const CONTROL_COUNT_MASK: u16 = 0x7;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASKING: u16 = 1 << 8;

#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    #[error("an MSI capability has 1, 2, 4, 8, 16 or 32 vectors, not {0}")]
    VectorCount(u16),
    #[error("MSI vector {vector} is beyond the {capable} the capability offers")]
    Vector { vector: u16, capable: u16 },
    #[error("cannot deliver MSI vector {vector}: {source}")]
    Deliver {
        vector: u16,
        #[source]
        source: std::io::Error,
    },
}

/// The capability body (after ID and next pointer) and its writable mask, for
/// `PciConfiguration::add_capability(MSI_CAPABILITY_ID, ..)`.
pub fn capability_body(vectors: u16) -> Result<([u8; 22], [u8; 22]), MsiError> {
    let log2 = log2_vectors(vectors)?;
    let control = CONTROL_64BIT | CONTROL_PER_VECTOR_MASKING | log2 << CONTROL_CAPABLE_SHIFT;
    let writable_control = CONTROL_ENABLE | CONTROL_COUNT_MASK << CONTROL_ENABLED_SHIFT;
    let mask_bits = if vectors == 32 { u32::MAX } else { (1u32 << vectors) - 1 };
    let mut body = [0; 22];
    let mut writable = [0; 22];
    // The body starts 2 bytes into the capability.
    let at = |offset: usize| offset - 2;
    body[at(MSI_CONTROL_OFFSET)..][..2].copy_from_slice(&control.to_le_bytes());
    writable[at(MSI_CONTROL_OFFSET)..][..2].copy_from_slice(&writable_control.to_le_bytes());
    // Bits 1:0 of the address are reserved (DWORD aligned); bits 31:16 of the data
    // are the extended message data, which this capability does not offer.
    writable[at(MSI_ADDRESS_LO_OFFSET)..][..4].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
    writable[at(MSI_ADDRESS_HI_OFFSET)..][..4].copy_from_slice(&u32::MAX.to_le_bytes());
    writable[at(MSI_DATA_OFFSET)..][..2].copy_from_slice(&0xffffu16.to_le_bytes());
    writable[at(MSI_MASK_OFFSET)..][..4].copy_from_slice(&mask_bits.to_le_bytes());
    Ok((body, writable))
}

fn log2_vectors(vectors: u16) -> Result<u16, MsiError> {
    if vectors.is_power_of_two() && vectors <= MAX_MSI_VECTORS {
        Ok(vectors.trailing_zeros() as u16)
    } else {
        Err(MsiError::VectorCount(vectors))
    }
}

fn u16_at(cap: &[u8], offset: usize) -> u16 {
    cap.get(offset..offset + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(cap: &[u8], offset: usize) -> u32 {
    cap.get(offset..offset + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The MSI state of one function.
pub struct Msi {
    capable: u16,
    routes: Vec<VectorRoute>,
    pending: u32,
    enabled: u16,
    base: MsiMessage,
    mask: u32,
    vectors: Arc<dyn MsiVectors>,
}

impl Msi {
    /// A capability offering `vectors` vectors, delivered through `vectors_out`.
    pub fn new(vectors: u16, vectors_out: Arc<dyn MsiVectors>) -> Result<Self, MsiError> {
        log2_vectors(vectors)?;
        Ok(Self {
            capable: vectors,
            routes: vec![VectorRoute::Disabled; usize::from(vectors)],
            pending: 0,
            enabled: 0,
            base: MsiMessage::default(),
            mask: 0,
            vectors: vectors_out,
        })
    }

    /// How many vectors the guest enabled (0 while MSI is off).
    pub fn enabled_vectors(&self) -> u16 {
        self.enabled
    }

    /// The guest wrote the capability; `cap` is the whole capability as config space
    /// now holds it (`MSI_CAPABILITY_LEN` bytes from its ID). A short slice reads as
    /// zeroes, which turns MSI off.
    pub fn update(&mut self, cap: &[u8]) {
        let control = u16_at(cap, MSI_CONTROL_OFFSET);
        self.enabled = if control & CONTROL_ENABLE == 0 {
            0
        } else {
            // Software must not enable more than offered; if it does, honour the offer.
            let log2 = (control >> CONTROL_ENABLED_SHIFT) & CONTROL_COUNT_MASK;
            (1u16 << log2.min(5)).min(self.capable)
        };
        let addr = u64::from(u32_at(cap, MSI_ADDRESS_HI_OFFSET)) << 32 | u64::from(u32_at(cap, MSI_ADDRESS_LO_OFFSET));
        self.base = MsiMessage { addr, data: u32::from(u16_at(cap, MSI_DATA_OFFSET)) };
        self.mask = u32_at(cap, MSI_MASK_OFFSET);
        for vector in 0..self.capable {
            self.sync_vector(vector);
        }
    }

    /// The message vector `vector` sends: with n vectors enabled, the device puts the
    /// vector number in the low log2(n) bits of the data.
    fn message(&self, vector: u16) -> MsiMessage {
        let low_bits = u32::from(self.enabled.max(1) - 1);
        MsiMessage { addr: self.base.addr, data: (self.base.data & !low_bits) | (u32::from(vector) & low_bits) }
    }

    fn masked(&self, vector: u16) -> bool {
        self.mask & (1 << vector) != 0
    }

    /// The pending bits register, to lay over config reads of
    /// `cap + MSI_PENDING_OFFSET`.
    pub fn pending_bits(&self) -> u32 {
        self.pending
    }

    /// The device signals `vector`: delivered if live, recorded as pending if masked,
    /// dropped if the guest did not enable it.
    pub fn trigger(&mut self, vector: u16) -> Result<(), MsiError> {
        let Some(route) = self.routes.get(usize::from(vector)) else {
            return Err(MsiError::Vector { vector, capable: self.capable });
        };
        if vector >= self.enabled {
            return Ok(());
        }
        if !route.is_live() {
            self.pending |= 1 << vector;
            return Ok(());
        }
        self.vectors.trigger(vector).map_err(|source| MsiError::Deliver { vector, source })
    }

    /// Off, nothing pending (a function-level reset; config space is reset alongside).
    pub fn reset(&mut self) {
        self.pending = 0;
        self.update(&[]);
    }

    fn sync_vector(&mut self, vector: u16) {
        let enabled = vector < self.enabled;
        let masked = self.masked(vector);
        let msg = self.message(vector);
        let Some(route) = self.routes.get_mut(usize::from(vector)) else { return };
        route.sync(vector, enabled, masked, msg, self.vectors.as_ref());
        if route.is_live() && self.pending & (1 << vector) != 0 && self.vectors.trigger(vector).is_ok() {
            self.pending &= !(1 << vector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{overlay, PciConfiguration, PciHeader};
    use crate::interrupt::testing::{Call::*, RecordingVectors};

    /// A config space with the capability, and the MSI state behind it.
    struct Function {
        config: PciConfiguration,
        cap: usize,
        msi: Msi,
        v: Arc<RecordingVectors>,
    }

    impl Function {
        fn new(vectors: u16) -> Self {
            let header = PciHeader {
                vendor_id: 1,
                device_id: 2,
                revision_id: 0,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                interrupt_pin: 0,
            };
            let mut config = PciConfiguration::new(&header);
            let (body, writable) = capability_body(vectors).unwrap();
            let cap = config.add_capability(MSI_CAPABILITY_ID, &body, &writable).unwrap();
            let v = Arc::new(RecordingVectors::default());
            Self { config, cap, msi: Msi::new(vectors, v.clone()).unwrap(), v }
        }

        fn write(&mut self, reg: usize, data: &[u8]) {
            self.config.write((self.cap + reg) as u64, data);
            let mut bytes = [0; MSI_CAPABILITY_LEN];
            self.config.read(self.cap as u64, &mut bytes[..8]);
            self.config.read(self.cap as u64 + 8, &mut bytes[8..16]);
            self.config.read(self.cap as u64 + 16, &mut bytes[16..]);
            self.msi.update(&bytes);
        }

        fn read_u32(&self, reg: usize) -> u32 {
            let mut b = [0; 4];
            self.config.read((self.cap + reg) as u64, &mut b);
            let pending = self.msi.pending_bits().to_le_bytes();
            overlay((self.cap + reg) as u64, &mut b, (self.cap + MSI_PENDING_OFFSET) as u64, &pending);
            u32::from_le_bytes(b)
        }

        fn program(&mut self, addr: u64, data: u16) {
            self.write(MSI_ADDRESS_LO_OFFSET, &(addr as u32).to_le_bytes());
            self.write(MSI_ADDRESS_HI_OFFSET, &((addr >> 32) as u32).to_le_bytes());
            self.write(MSI_DATA_OFFSET, &data.to_le_bytes());
        }
    }

    fn msg(addr: u64, data: u32) -> MsiMessage {
        MsiMessage { addr, data }
    }

    #[test]
    fn capability_layout() {
        let f = Function::new(4);
        assert_eq!(f.config.read_u8(f.cap), MSI_CAPABILITY_ID);
        assert_eq!(f.config.read_u16(f.cap + 2), 0x0184);
        assert!(matches!(capability_body(3), Err(MsiError::VectorCount(3))));
        assert!(matches!(capability_body(64), Err(MsiError::VectorCount(64))));
        assert!(capability_body(32).is_ok());
    }

    #[test]
    fn enabling_routes_each_enabled_vector() {
        let mut f = Function::new(4);
        f.program(0x1_fee0_0003, 0x4041);
        assert_eq!(f.v.take(), vec![]);
        // Enable with 4 vectors (MME = 2): data low 2 bits carry the vector number.
        f.write(MSI_CONTROL_OFFSET, &(CONTROL_ENABLE | 2 << CONTROL_ENABLED_SHIFT).to_le_bytes());
        assert_eq!(f.msi.enabled_vectors(), 4);
        let a = 0x1_fee0_0000;
        assert_eq!(
            f.v.take(),
            vec![
                Enable(0, msg(a, 0x4040)),
                Enable(1, msg(a, 0x4041)),
                Enable(2, msg(a, 0x4042)),
                Enable(3, msg(a, 0x4043))
            ]
        );
        // Read-only bits of control survive the write.
        assert_eq!(f.config.read_u16(f.cap + 2) & 0x18e, 0x184);
        f.write(MSI_CONTROL_OFFSET, &[0]);
        assert_eq!(f.v.take(), vec![Disable(0), Disable(1), Disable(2), Disable(3)]);
    }

    #[test]
    fn too_many_messages_are_clamped() {
        let mut f = Function::new(2);
        f.program(0xfee0_0000, 0x30);
        f.write(MSI_CONTROL_OFFSET, &(CONTROL_ENABLE | 7 << CONTROL_ENABLED_SHIFT).to_le_bytes());
        assert_eq!(f.msi.enabled_vectors(), 2);
        assert_eq!(f.v.take().len(), 2);
        assert!(matches!(f.msi.trigger(2), Err(MsiError::Vector { vector: 2, capable: 2 })));
    }

    #[test]
    fn masked_vector_pends_until_unmasked() {
        let mut f = Function::new(2);
        f.program(0xfee0_0000, 0x30);
        f.write(MSI_MASK_OFFSET, &0b10u32.to_le_bytes());
        f.write(MSI_CONTROL_OFFSET, &(CONTROL_ENABLE | 1 << CONTROL_ENABLED_SHIFT).to_le_bytes());
        assert_eq!(f.v.take(), vec![Enable(0, msg(0xfee0_0000, 0x30))]);
        f.msi.trigger(1).unwrap();
        f.msi.trigger(0).unwrap();
        assert_eq!(f.read_u32(MSI_PENDING_OFFSET), 0b10);
        assert_eq!(f.v.take(), vec![Trigger(0)]);
        // Guest writes to the pending bits do nothing; mask bits beyond the count neither.
        f.write(MSI_PENDING_OFFSET, &0u32.to_le_bytes());
        f.write(MSI_MASK_OFFSET, &0xffff_fffdu32.to_le_bytes());
        assert_eq!(f.read_u32(MSI_MASK_OFFSET), 0b01);
        assert_eq!(f.read_u32(MSI_PENDING_OFFSET), 0);
        assert_eq!(f.v.take(), vec![Mask(0), Enable(1, msg(0xfee0_0000, 0x31)), Trigger(1)]);
    }

    #[test]
    fn trigger_while_off_is_dropped_and_short_update_disables() {
        let mut f = Function::new(1);
        f.msi.trigger(0).unwrap();
        assert_eq!(f.msi.pending_bits(), 0);
        f.program(0xfee0_0000, 0x30);
        f.write(MSI_CONTROL_OFFSET, &CONTROL_ENABLE.to_le_bytes());
        f.msi.update(&[0x05, 0, 1]);
        f.msi.reset();
        assert_eq!(f.v.take(), vec![Enable(0, msg(0xfee0_0000, 0x30)), Disable(0)]);
    }
}
