//! Everything a Linux guest needs in memory and in its vCPUs before the first
//! instruction: the memory map, the kernel/initramfs/command line, `boot_params`,
//! the CPU's initial state and CPUID, and the MP and ACPI tables.
//!
//! This crate does no KVM ioctls: it takes plain data, writes guest memory and
//! returns kvm-bindings structures, so all of it is unit-testable without /dev/kvm.
//! Only x86_64 guests are supported.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod params;
pub mod regs;
pub mod reset_vector;
