//! Hand-assembled guests run through Tandem's real VM, vCPU loop and buses on the
//! host's KVM. They need /dev/kvm (even a nested one that cannot boot Linux) and
//! fail, never skip, without it. Each guest ends by asking the i8042 for a CPU reset.
//! The assembly is in comments; bytes were produced with GNU as.

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm::device_manager::DeviceManager;
use vmm::exit::ExitLatch;
use vmm::runner::FailoverSetup;
use vmm::sriov::Host;
use vmm::vcpu::Vcpu;
use vmm::vm::KvmVm;
use vmm::{GuestExit, Vm, VmParts};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CODE: GuestAddress = GuestAddress(0x1000);
const RAM: usize = 0x10000;
const ACPI_PM_PORT: u16 = 0x600;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Sink {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// An MMIO device that records writes and answers reads with a fixed pattern.
#[derive(Default)]
struct Probe {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for Probe {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0x42 + offset as u8 + i as u8;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

struct TinyVm {
    vm: KvmVm,
    devices: DeviceManager,
    serial: Sink,
    latch: Arc<ExitLatch>,
}

fn tiny_vm(code: &[u8]) -> TinyVm {
    let kvm = KvmVm::open_kvm().unwrap_or_else(|e| {
        panic!("these tests run guests on KVM and need /dev/kvm (run as root on a host with KVM): {e}")
    });
    let vm = KvmVm::new(kvm, &[(GuestAddress(0), RAM)]).expect("create VM");
    vm.memory().write_slice(code, CODE).expect("write guest code");
    let serial = Sink::default();
    let latch = Arc::new(ExitLatch::new().unwrap());
    let mut devices = DeviceManager::new(latch.power_sink(), Default::default());
    devices.add_legacy_devices(&vm, Box::new(serial.clone()), ACPI_PM_PORT).expect("legacy devices");
    TinyVm { vm, devices, serial, latch }
}

fn vcpu(t: &TinyVm) -> Vcpu {
    let v = Vcpu::new(&t.vm, 0).expect("create vCPU");
    let cpuid = t.vm.kvm().get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    v.configure_cpu(&cpuid, 1).expect("configure vCPU");
    v
}

/// The VM around `t` with one vCPU, started.
fn started(t: TinyVm, v: Vcpu) -> Vm {
    started_with(t, v, Default::default())
}

/// [`started`], its threads filtered by `seccomp`.
fn started_with(t: TinyVm, v: Vcpu, seccomp: vmm::seccomp::SeccompFilters) -> Vm {
    let parts = VmParts {
        vm: t.vm,
        devices: t.devices,
        vcpus: vec![v],
        latch: t.latch,
        leases: Default::default(),
        failover: FailoverSetup::empty().unwrap(),
        stdin_to_serial: false,
        host: Host::system(),
        cpus: 1,
        memory: RAM as u64,
        seccomp,
    };
    let mut vm = Vm::from_parts(parts);
    vm.start().expect("start the vCPU");
    vm
}

/// A guest that never asks for its reset is stopped after 10 s, so a broken wiring
/// fails the test (with `Stopped`) instead of hanging it.
fn with_watchdog(running: Vm) -> Vm {
    let stopper = running.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        stopper.stop(GuestExit::Stopped { signal: 0 });
    });
    running
}

/// Waits (5 s at most) for the guest's 'W': it has set up and waits for what the test sends.
fn wait_until_ready(serial: &Sink) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !serial.bytes().contains(&b'W') {
        assert!(Instant::now() < deadline, "guest never got ready; serial: {:?}", serial.bytes());
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn real_mode_guest_does_port_io_mmio_and_ioeventfd() {
    // mov dx,0x3f8; mov al,'R'; out dx,al; mov al,'M'; out dx,al
    // mov dx,0x1234; in al,dx; mov dx,0x3f8; out dx,al        ; unknown port -> 0xff
    // mov ax,0x2000; mov ds,ax; mov byte [0x10],0x5a          ; MMIO write at 0x20010
    // mov al,[0x20]; out dx,al                                 ; MMIO read at 0x20020
    // mov dx,0x510; out dx,al                                  ; ioeventfd port
    // mov al,0xfe; out 0x64,al; hlt                            ; i8042 reset
    let code = [
        0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0xb0, 0x4d, 0xee, 0xba, 0x34, 0x12, 0xec, 0xba, 0xf8, 0x03, 0xee, 0xb8,
        0x00, 0x20, 0x8e, 0xd8, 0xc6, 0x06, 0x10, 0x00, 0x5a, 0xa0, 0x20, 0x00, 0xee, 0xba, 0x10, 0x05, 0xee, 0xb0,
        0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
    ];
    let t = tiny_vm(&code);
    let probe = Arc::new(Mutex::new(Probe::default()));
    t.devices.buses().mmio.insert(0x20000, 0x1000, probe.clone()).unwrap();
    let ioevent = EventFd::new(EFD_NONBLOCK).unwrap();
    t.vm.register_pio_ioeventfd(&ioevent, 0x510).unwrap();
    let v = vcpu(&t);
    v.set_real_mode_entry(CODE).unwrap();

    let serial = t.serial.clone();
    let running = with_watchdog(started(t, v));
    let watched = running.handle();
    let counters = watched.exit_counters();
    let exit = running.wait().unwrap();

    assert_eq!(exit, GuestExit::Reset, "the guest's i8042 reset ends the VM");
    assert_eq!(serial.bytes(), vec![b'R', b'M', 0xff, 0x42 + 0x20], "serial saw the bytes in order");
    assert_eq!(probe.lock().unwrap().writes, vec![(0x10, vec![0x5a])]);
    assert_eq!(ioevent.read().unwrap(), 1, "the ioeventfd fired once, inside KVM");
    assert_eq!(counters.pio_unhandled.load(Relaxed), 1, "only the unknown port went unhandled");
    assert_eq!(counters.mmio.load(Relaxed), 2, "one MMIO write and one read exited to us");
}

#[test]
fn long_mode_guest_does_wide_io_and_mmio() {
    // mov dx,0x3f8; mov al,'6'; out dx,al; mov al,'4'; out dx,al
    // mov dx,0x1234; in eax,dx; mov dx,0x3f8; out dx,al; shr eax,24; out dx,al
    // mov rbx,0x30000000; mov dword [rbx+0x10],0xdeadbeef; mov rax,[rbx+0x20]
    // out dx,al; shr rax,56; out dx,al
    // mov dword [rbx+0x1000],1                                 ; MMIO ioeventfd
    // mov al,0xfe; out 0x64,al; hlt
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, 0x36, 0xee, 0xb0, 0x34, 0xee, 0x66, 0xba, 0x34, 0x12, 0xed, 0x66, 0xba, 0xf8,
        0x03, 0xee, 0xc1, 0xe8, 0x18, 0xee, 0x48, 0xc7, 0xc3, 0x00, 0x00, 0x00, 0x30, 0xc7, 0x43, 0x10, 0xef, 0xbe,
        0xad, 0xde, 0x48, 0x8b, 0x43, 0x20, 0xee, 0x48, 0xc1, 0xe8, 0x38, 0xee, 0xc7, 0x83, 0x00, 0x10, 0x00, 0x00,
        0x01, 0x00, 0x00, 0x00, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
    ];
    let t = tiny_vm(&code);
    boot::regs::write_gdt_and_page_tables(t.vm.memory()).expect("page tables");
    let probe = Arc::new(Mutex::new(Probe::default()));
    t.devices.buses().mmio.insert(0x3000_0000, 0x100, probe.clone()).unwrap();
    let ioevent = EventFd::new(EFD_NONBLOCK).unwrap();
    t.vm.register_mmio_ioeventfd(&ioevent, 0x3000_1000).unwrap();
    let v = vcpu(&t);
    v.set_long_mode_entry(CODE).unwrap();

    let serial = t.serial.clone();
    let running = with_watchdog(started(t, v));
    let watched = running.handle();
    let counters = watched.exit_counters();
    let exit = running.wait().unwrap();

    assert_eq!(counters.mmio_unhandled.load(Relaxed), 0);
    assert_eq!(exit, GuestExit::Reset);
    // 8-byte MMIO read at offset 0x20 returns 0x62, 0x63, ... 0x69: low byte 0x62, top 0x69.
    assert_eq!(serial.bytes(), vec![b'6', b'4', 0xff, 0xff, 0x62, 0x69]);
    assert_eq!(probe.lock().unwrap().writes, vec![(0x10, 0xdeadbeef_u32.to_le_bytes().to_vec())]);
    assert_eq!(ioevent.read().unwrap(), 1);
}

#[test]
fn irqfd_interrupt_reaches_a_real_mode_handler() {
    // Programs the in-kernel PIC (vectors 0x20.., only IRQ 5 unmasked), points IVT
    // vector 0x25 at a handler, prints 'W' and waits with sti; hlt. The handler prints
    // 'I', sends EOI and asks for a reset.
    let code = [
        0x31, 0xc0, 0x8e, 0xd8, 0xc7, 0x06, 0x94, 0x00, 0x2e, 0x10, 0xc7, 0x06, 0x96, 0x00, 0x00, 0x00, 0xb0, 0x11,
        0xe6, 0x20, 0xb0, 0x20, 0xe6, 0x21, 0xb0, 0x04, 0xe6, 0x21, 0xb0, 0x01, 0xe6, 0x21, 0xb0, 0xdf, 0xe6, 0x21,
        0xba, 0xf8, 0x03, 0xb0, 0x57, 0xee, 0xfb, 0xf4, 0xeb, 0xfd, 0xba, 0xf8, 0x03, 0xb0, 0x49, 0xee, 0xb0, 0x20,
        0xe6, 0x20, 0xb0, 0xfe, 0xe6, 0x64, 0xcf,
    ];
    let t = tiny_vm(&code);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    t.vm.register_irqfd(&irq, 5).unwrap();
    let v = vcpu(&t);
    v.set_real_mode_entry(CODE).unwrap();

    let serial = t.serial.clone();
    let running = with_watchdog(started(t, v));
    wait_until_ready(&serial);
    assert_eq!(serial.bytes(), b"W", "no interrupt before the irqfd fires");
    irq.write(1).unwrap();
    let exit = running.wait().unwrap();

    assert_eq!(exit, GuestExit::Reset, "the handler ran and reset the guest");
    assert_eq!(serial.bytes(), b"WI");
}

#[test]
fn an_nmi_reaches_a_guest_spinning_with_interrupts_off() {
    // Points IVT vector 2 (NMI) at a handler, prints 'W', then cli; jmp $ — no exit and
    // no maskable interrupt gets in; only a kick out of KVM_RUN lets the NMI be queued.
    // The handler prints 'N' and asks for a reset.
    let code = [
        0x31, 0xc0, 0x8e, 0xd8, 0xc7, 0x06, 0x08, 0x00, 0x19, 0x10, 0xc7, 0x06, 0x0a, 0x00, 0x00, 0x00, 0xba, 0xf8,
        0x03, 0xb0, 0x57, 0xee, 0xfa, 0xeb, 0xfe, 0xba, 0xf8, 0x03, 0xb0, 0x4e, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xcf,
    ];
    let t = tiny_vm(&code);
    let v = vcpu(&t);
    v.set_real_mode_entry(CODE).unwrap();
    let serial = t.serial.clone();
    let running = with_watchdog(started(t, v));
    wait_until_ready(&serial);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(serial.bytes(), b"W", "nothing runs the handler before the NMI");
    running.handle().inject_nmi().unwrap();
    assert_eq!(running.wait().unwrap(), GuestExit::Reset, "the NMI handler ran and reset the guest");
    assert_eq!(serial.bytes(), b"WN");
}

#[test]
fn a_guest_that_never_exits_is_stopped_from_the_host() {
    // cli; hlt; jmp $-2 — a vCPU parked in the kernel, only a kick gets it out.
    let t = tiny_vm(&[0xfa, 0xf4, 0xeb, 0xfd]);
    let v = vcpu(&t);
    v.set_real_mode_entry(CODE).unwrap();
    let running = started(t, v);
    std::thread::sleep(Duration::from_millis(50));
    running.handle().stop(GuestExit::Stopped { signal: 15 });
    // `wait` fails with StuckVcpus if the halted vCPU could not be kicked out of KVM_RUN.
    assert_eq!(running.wait().unwrap(), GuestExit::Stopped { signal: 15 });
}

#[test]
fn a_paused_guest_runs_no_instruction_until_resumed() {
    // loop: mov dx,0x1234; in al,dx; jmp loop     ; an unhandled port read per pass
    let code = [0xba, 0x34, 0x12, 0xec, 0xeb, 0xfb];
    let t = tiny_vm(&code);
    let v = vcpu(&t);
    v.set_real_mode_entry(CODE).unwrap();
    let running = with_watchdog(started(t, v));
    let handle = running.handle();
    let watched = running.handle();
    let counters = watched.exit_counters();
    let reads = || counters.pio_unhandled.load(Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    assert!(reads() > 0, "the guest loops");

    handle.pause().expect("pause");
    assert!(handle.is_paused());
    let at_pause = reads();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(reads(), at_pause, "a paused vCPU ran guest code");
    assert!(matches!(handle.pause(), Err(vmm::RunError::AlreadyPaused)));

    handle.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(50));
    assert!(reads() > at_pause, "the vCPU did not run again after resume");
    assert!(matches!(handle.resume(), Err(vmm::RunError::NotPaused)));

    // Stopping a paused VM still ends it (parked vCPUs see the stop).
    handle.pause().expect("pause again");
    handle.stop(GuestExit::Stopped { signal: 15 });
    assert_eq!(running.wait().unwrap(), GuestExit::Stopped { signal: 15 });
}

/// An MMIO device whose write handler makes a system call no vCPU thread makes (a socket),
/// as a compromised device model would.
struct Rogue;
impl BusDevice for Rogue {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        eprintln!("ROGUE-BEFORE-SYSCALL");
        // SAFETY: socket(2) with constant arguments; the fd, if any, is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by socket(2) and is ours.
            unsafe { libc::close(fd) };
        }
        eprintln!("ROGUE-AFTER-SYSCALL fd={fd}");
    }
}

/// Run by `a_vcpu_thread_making_a_forbidden_syscall_kills_tandem` in a child process, with
/// the seccomp mode in TANDEM_TEST_SECCOMP: a guest that writes the rogue device.
#[test]
#[ignore = "a child of the seccomp test, which runs it in its own process"]
fn seccomp_child_guest_writes_the_rogue_device() {
    let mode: vmm::seccomp::SeccompMode = std::env::var("TANDEM_TEST_SECCOMP").unwrap().parse().unwrap();
    // mov ax,0x2000; mov ds,ax; mov byte [0x10],0x5a      ; MMIO write at 0x20010
    // mov al,0xfe; out 0x64,al; hlt                        ; i8042 reset
    let code = [0xb8, 0x00, 0x20, 0x8e, 0xd8, 0xc6, 0x06, 0x10, 0x00, 0x5a, 0xb0, 0xfe, 0xe6, 0x64, 0xf4];
    let t = tiny_vm(&code);
    t.devices.buses().mmio.insert(0x20000, 0x1000, Arc::new(Mutex::new(Rogue))).unwrap();
    let v = vcpu(&t);
    v.set_real_mode_entry(CODE).unwrap();
    let exit = with_watchdog(started_with(t, v, vmm::seccomp::SeccompFilters::new(mode).unwrap())).wait().unwrap();
    assert_eq!(exit, GuestExit::Reset);
    eprintln!("ROGUE-GUEST-ENDED");
}

fn run_seccomp_child(mode: &str) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child_guest_writes_the_rogue_device",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TANDEM_TEST_SECCOMP", mode)
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_vcpu_thread_making_a_forbidden_syscall_kills_tandem() {
    use std::os::unix::process::ExitStatusExt;
    let (status, stderr) = run_seccomp_child("on");
    assert!(stderr.contains("ROGUE-BEFORE-SYSCALL"), "the guest never reached the device: {stderr}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "not killed by SIGSYS ({status}): {stderr}");
    assert!(!stderr.contains("ROGUE-AFTER-SYSCALL"), "the forbidden call returned: {stderr}");

    // With `log` the same call goes through (the kernel logs it) and the guest ends.
    let (status, stderr) = run_seccomp_child("log");
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("ROGUE-AFTER-SYSCALL fd=") && stderr.contains("ROGUE-GUEST-ENDED"), "{stderr}");
}
