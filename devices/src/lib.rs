//! Devices a Tandem guest sees, and the bus they plug into.
//!
//! Every device is reached through [`bus::BusDevice`]: a read or write at an offset
//! inside the range it was inserted at. Devices never see KVM; interrupts leave them
//! through eventfds that the VMM wires to irqfds.

pub mod bus;
pub mod hotplug;
pub mod legacy;
pub mod notice;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use notice::{DeviceNotices, Level, Notice, Notices};
