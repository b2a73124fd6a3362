//! A whole VM lifecycle through the library (`Vm::new` → handle → `run`) and through the
//! control socket, on the host's KVM. The "kernel" is a hand-made ELF whose 64-bit code
//! prints 'K' on COM1 and then reads an unhandled port forever, so the tests see the guest
//! start, stop while paused, and run again. Needs /dev/kvm and root; fails without them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::{GuestExit, PlugError, RunError, SerialConfig, Vm, VmConfig, VmState};

/// mov dx,0x3f8; mov al,'K'; out dx,al; loop: mov dx,0x1234; in al,dx; jmp loop
const CODE: [u8; 14] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4b, 0xee, 0x66, 0xba, 0x34, 0x12, 0xec, 0xeb, 0xf9];
const LOAD: u64 = 0x10_0000;

/// An ELF64 executable with one PT_LOAD segment holding `code` at 1 MiB, its entry.
fn elf(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&half.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [120u64, LOAD, LOAD, code.len() as u64, code.len() as u64, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        f.extend_from_slice(&word.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Scratch) -> VmConfig {
    let kernel = dir.path("kernel.elf");
    std::fs::write(&kernel, elf(&CODE)).unwrap();
    let mut config = VmConfig::new(kernel);
    config.memory = 64 << 20;
    config.serial = SerialConfig::File(dir.path("serial.log"));
    config
}

fn new_vm(config: &VmConfig) -> Vm {
    Vm::new(config).unwrap_or_else(|e| {
        panic!("this test runs a guest on KVM and needs /dev/kvm and root (run it as root on a KVM host): {e}")
    })
}

fn serial(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_library_starts_a_vm_paused_resumes_it_steers_it_and_shuts_it_down() {
    let dir = Scratch::new("library-api");
    let config = config(&dir);
    let vm = new_vm(&config);
    let handle = vm.handle();
    assert_eq!(handle.state(), VmState::Created);
    handle.pause().expect("a VM can be paused before it starts");
    let info = handle.info();
    assert_eq!((info.cpus, info.memory_mib), (1, 64));
    assert!(info.devices.is_empty() && info.failover.is_empty());

    let runner = std::thread::spawn(move || vm.run());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(handle.state(), VmState::Paused);
    assert_eq!(serial(&dir.path("serial.log")), "", "a VM started paused ran guest code");

    handle.resume().expect("resume");
    assert_eq!(handle.state(), VmState::Running);
    eventually("the guest printed K", || serial(&dir.path("serial.log")) == "K");
    eventually("the guest loops on its port", || handle.counters().vm_exits.pio_unhandled > 10);
    assert!(matches!(handle.resume(), Err(RunError::NotPaused)));

    handle.pause().expect("pause");
    let at_pause = handle.counters().vm_exits.pio_unhandled;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(handle.counters().vm_exits.pio_unhandled, at_pause, "a paused guest ran");
    handle.resume().expect("resume");

    // Device requests (run on the VM's host-device thread) are typed errors that leave
    // the VM running.
    assert!(matches!(handle.remove_device("nic9"), Err(PlugError::NotFound(_))));
    let bad = vmm::AddRequest::Parked("vf9".into());
    assert!(matches!(handle.add_device(bad), Err(PlugError::NotFound(_))));
    assert_eq!(handle.state(), VmState::Running);

    handle.shutdown();
    let exit = runner.join().expect("the VM thread").expect("the VM ran");
    assert_eq!(exit, GuestExit::Shutdown);
    assert_eq!(handle.state(), VmState::Ended);
    assert!(matches!(handle.pause(), Err(RunError::Ended)));
    assert!(handle.info().devices.is_empty(), "a handle kept after the end answers, with nothing left");
    assert!(matches!(handle.remove_device("nic9"), Err(PlugError::Conflict(m)) if m.contains("ended")));
}

#[test]
fn the_socket_drives_the_same_lifecycle_and_goes_away_with_the_vm() {
    let dir = Scratch::new("socket-api");
    let config = config(&dir);
    let sock = dir.path("api.sock");
    let mut vm = new_vm(&config);
    vm.serve_api(&sock).expect("serve the control socket");
    let ctl = |words: &[&str]| {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        vmm::api::run_ctl(&sock, &words)
    };
    let runner = std::thread::spawn(move || vm.run());
    eventually("the guest printed K", || serial(&dir.path("serial.log")) == "K");

    let info = ctl(&["info"]).expect("info");
    assert!(info.contains(r#""state": "running""#) || info.contains(r#""state":"running""#), "{info}");
    ctl(&["pause"]).expect("pause");
    assert!(ctl(&["pause"]).unwrap_err().to_string().contains("already paused"));
    let counters = ctl(&["counters"]).expect("counters");
    assert!(counters.contains("pio_unhandled"), "{counters}");
    ctl(&["resume"]).expect("resume");
    let unknown = ctl(&["device-remove", "nic9"]).unwrap_err().to_string();
    assert!(unknown.contains("nic9"), "{unknown}");

    ctl(&["shutdown"]).expect("shutdown");
    let exit = runner.join().expect("the VM thread").expect("the VM ran");
    assert_eq!(exit, GuestExit::Shutdown);
    assert!(!sock.exists(), "the socket file outlived the VM");
}
