//! Virtio devices, independent of their transport (virtio-pci lives in the `pci` crate).

pub mod block;
mod device;
pub mod net;

pub use device::{
    read_config_space, ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    Worker,
};
