//! `tandem` as a process the host's tools act on: stopped and continued (^Z and `fg`, a
//! debugger, a cgroup freezer, a benchmark reading its memory), it goes on running its
//! guest and answering its socket. Runs on the host's KVM with a hand-made guest, since
//! that KVM cannot boot Linux (see README).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An ELF64 executable with `code` as its one PT_LOAD segment at 1 MiB, entered there
/// (64-bit mode, as tandem enters an ELF kernel).
fn elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const HEADERS: u64 = 64 + 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this one
    f.extend_from_slice(&0u64.to_le_bytes()); // no sections
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // r-x
    let len = code.len() as u64;
    for v in [HEADERS, LOAD, LOAD, len, len, 4096] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

fn need_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs /dev/kvm (run as root on a KVM host): {e}");
    }
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({sig}): {}", std::io::Error::last_os_error());
}

fn ctl(sock: &Path, what: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["ctl", "--api-socket", sock.to_str().unwrap(), what])
        .output()
        .expect("run tandem ctl")
}

/// Its stderr, once it has ended (it is killed first if it has not).
fn stderr_of(mut child: Child) -> String {
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait for tandem");
    format!("{} — stderr: {}", out.status, String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_stopped_and_continued_tandem_runs_on() {
    need_kvm();
    let dir = scratch();
    let (kernel, serial, sock) = (dir.join("idle.elf"), dir.join("serial"), dir.join("api.sock"));
    // mov dx,0x3f8; mov al,'K'; out dx,al; hlt; jmp back to the hlt
    std::fs::write(&kernel, elf(&[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4b, 0xee, 0xf4, 0xeb, 0xfd])).unwrap();
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M"])
        .args(["--serial", &format!("file={}", serial.display()), "--api-socket", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tandem");
    let start = Instant::now();
    while std::fs::read(&serial).map_or(true, |s| !s.contains(&b'K')) {
        assert!(start.elapsed() < Duration::from_secs(20), "the guest never printed: {}", stderr_of(child));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Several rounds, each letting every thread get back to its sleep or poll first: the
    // stop interrupts those, and the continue resumes them.
    let mut child = child;
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        signal(&child, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(100));
        signal(&child, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = child.try_wait().expect("poll tandem") {
            panic!("round {round}: tandem ended ({status}) after SIGCONT: {}", stderr_of(child));
        }
    }
    let info = ctl(&sock, "info");
    assert!(info.status.success(), "ctl info: {}", String::from_utf8_lossy(&info.stderr));
    assert!(String::from_utf8_lossy(&info.stdout).contains("running"), "{}", String::from_utf8_lossy(&info.stdout));
    assert!(ctl(&sock, "shutdown").status.success());
    let out = child.wait_with_output().expect("wait for tandem");
    assert!(out.status.success(), "{} — stderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
