//! Tandem's VMM library: build a VM from a [`VmConfig`], run it, learn why it ended.
//!
//! ```no_run
//! let config = vmm::VmConfig::new("/boot/vmlinuz");
//! let vm = vmm::start(&config)?;
//! let exit = vm.wait()?;
//! println!("{exit}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod builder;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod failover;
pub mod interrupt;
pub mod memory;
pub mod passthrough;
pub mod runner;
pub mod sriov;
pub mod terminal;
pub mod vcpu;
pub mod vm;

pub use builder::{start, BuildError};
pub use config::{SerialConfig, VmConfig};
pub use exit::GuestExit;
pub use runner::{RunError, RunningVm, VmStopper};
