//! A stub at the x86 reset vector that asks the VMM for a reset.
//!
//! There is no BIOS, but Linux still jumps to the BIOS to reboot: on a
//! hardware-reduced ACPI platform, `reboot_init()` (arch/x86/kernel/reboot.c) picks
//! EFI reboot, and without EFI the next method is "BIOS": switch to real mode and
//! jump to F000:FFF0, where a real CPU starts after reset. In our guest that address
//! is zeroed RAM, which real mode executes as `add [bx+si], al` forever, so the guest
//! hangs instead of rebooting. The stub there writes ACPI_RESET_VALUE to the ACPI
//! reset register, which is what resetting means for this machine.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{ACPI_RESET_VALUE, ACPI_SLEEP_PORT, HIMEM_START, RESET_VECTOR};

#[derive(Debug, thiserror::Error)]
#[error("cannot write the reset-vector stub at {RESET_VECTOR:#x}: {0}; guest RAM must cover the first MiB")]
pub struct ResetVectorError(#[source] GuestMemoryError);

/// 16-bit real-mode code: `mov dx, port; mov al, value; out dx, al; 1: hlt; jmp 1b`.
/// The `hlt` loop only runs if the VMM ignores the write; interrupts are off then.
pub fn reset_stub() -> [u8; 9] {
    let [port_lo, port_hi] = ACPI_SLEEP_PORT.to_le_bytes();
    [0xba, port_lo, port_hi, 0xb0, ACPI_RESET_VALUE, 0xee, 0xf4, 0xeb, 0xfd]
}

/// Writes the stub at RESET_VECTOR (inside the reserved legacy area).
pub fn write_reset_vector<M: GuestMemoryBackend>(mem: &M) -> Result<(), ResetVectorError> {
    const _: () = assert!(RESET_VECTOR + 16 == HIMEM_START);
    mem.write_slice(&reset_stub(), GuestAddress(RESET_VECTOR)).map_err(ResetVectorError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn stub_writes_the_reset_value_to_the_acpi_port() {
        // mov dx, 0x600 / mov al, 1 / out dx, al / hlt / jmp back to hlt
        assert_eq!(reset_stub(), [0xba, 0x00, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd]);
        // The short jump's target is the hlt: next instruction (9) + (-3) = 6.
        assert_eq!(9 - 3, reset_stub().iter().position(|&b| b == 0xf4).unwrap());
    }

    #[test]
    fn lands_at_f000_fff0() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_reset_vector(&mem).unwrap();
        let mut b = [0u8; 9];
        mem.read_slice(&mut b, GuestAddress((0xf000 << 4) + 0xfff0)).unwrap();
        assert_eq!(b, reset_stub());
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(write_reset_vector(&small).is_err());
    }
}
