//! Tandem's VMM library: build a [`Vm`] from a [`VmConfig`], run it, steer it through a
//! [`VmHandle`] from any thread, learn why it ended. No global state beyond the signal
//! handler that kicks vCPUs out of KVM_RUN; nothing printed (see [`Notices`]).
//!
//! ```no_run
//! let config = vmm::VmConfig::new("/boot/vmlinuz");
//! let vm = vmm::Vm::new(&config)?;
//! let handle = vm.handle();
//! std::thread::spawn(move || {
//!     std::thread::sleep(std::time::Duration::from_secs(10));
//!     println!("{:?}", handle.counters().vm_exits);
//!     handle.shutdown();
//! });
//! let exit = vm.run()?;
//! println!("{exit}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod builder;
pub mod config;
pub mod config_document;
pub mod control;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod failover;
pub mod handle;
pub mod interrupt;
pub mod memory;
pub mod passthrough;
pub mod runner;
pub mod seccomp;
pub mod sriov;
pub mod terminal;
pub mod vcpu;
pub mod vm;

pub use builder::BuildError;
pub use config::{SerialConfig, VmConfig};
pub use config_document::ConfigDocument;
pub use devices::{Level, Notice, Notices};
pub use exit::GuestExit;
pub use handle::{VmCounters, VmHandle, VmInfo, VmState};
pub use passthrough::{AddRequest, PlugError, Plugged};
pub use runner::{RunError, Vm, VmParts};
