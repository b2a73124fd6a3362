//! Tandem embedded in a program: a VM from a JSON document, its notices kept by the
//! embedder, its counters read while it runs, and an orderly shutdown after a while.
//!
//!     cargo run --example embed -- /boot/vmlinuz initrd.gz 10
//!
//! (as root on a host whose KVM boots Linux; the guest's console is this terminal).

use std::sync::{Arc, Mutex};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, kernel, initramfs, seconds] = &args[..] else {
        return Err("usage: embed KERNEL INITRAMFS SECONDS".into());
    };
    let mut doc = vmm::ConfigDocument::new(kernel);
    doc.initramfs = Some(initramfs.into());
    doc.memory = "256M".into();
    doc.serial = "stdio".into();
    let config = vmm::VmConfig::try_from(doc)?;

    // Whatever the VM has to say, in the embedder's own log.
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let notices = vmm::Notices::new(move |n| sink.lock().unwrap().push(n.to_string()));

    let vm = vmm::Vm::with_notices(&config, notices)?;
    let handle = vm.handle();
    let seconds: u64 = seconds.parse()?;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        let c = handle.counters();
        eprintln!("embed: {} port and {} MMIO exits so far; shutting down", c.vm_exits.pio, c.vm_exits.mmio);
        handle.shutdown();
    });
    let exit = vm.run()?;
    eprintln!("embed: the VM ended: {exit}");
    for line in log.lock().unwrap().iter() {
        eprintln!("embed: the VM said: {line}");
    }
    Ok(())
}
