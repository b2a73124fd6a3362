//! Bad input to the `tandem` binary: each case must end with a non-zero status and a
//! message that names the problem, never a panic. Runs on the host (needs /dev/kvm
//! for the cases that get as far as creating the VM).

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output().expect("run tandem")
}

fn assert_refused(args: &[&str], expect: &[&str]) {
    let out = tandem(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "{args:?}: expected {e:?} in stderr: {stderr}");
    }
}

fn scratch(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn need_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs /dev/kvm (run as root on a KVM host): {e}");
    }
}

#[test]
fn missing_kernel() {
    assert_refused(&["--kernel", "/nonexistent/vmlinuz"], &["cannot open kernel", "/nonexistent/vmlinuz"]);
}

#[test]
fn missing_initramfs() {
    let k = scratch("k-for-initrd", b"x");
    assert_refused(
        &["--kernel", k.to_str().unwrap(), "--initramfs", "/nonexistent/initrd"],
        &["cannot open initramfs", "/nonexistent/initrd"],
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    need_kvm();
    let k = scratch("not-a-kernel", &[0x55u8; 8192]);
    assert_refused(&["--kernel", k.to_str().unwrap(), "--serial", "off"], &["not-a-kernel", "not a Linux kernel"]);
}

#[test]
fn zero_memory() {
    let k = scratch("k-mem0", b"x");
    assert_refused(&["--kernel", k.to_str().unwrap(), "--memory", "0"], &["memory size 0"]);
}

#[test]
fn memory_that_is_not_a_size() {
    let k = scratch("k-memq", b"x");
    assert_refused(&["--kernel", k.to_str().unwrap(), "--memory", "lots"], &["not a size", "512M"]);
}

#[test]
fn more_memory_than_the_host_has() {
    need_kvm();
    let k = scratch("k-memhuge", b"x");
    assert_refused(&["--kernel", k.to_str().unwrap(), "--memory", "64T"], &["more than this host has"]);
}

#[test]
fn zero_cpus() {
    let k = scratch("k-cpu0", b"x");
    assert_refused(&["--kernel", k.to_str().unwrap(), "--cpus", "0"], &["0 vCPUs"]);
}

#[test]
fn more_cpus_than_allowed() {
    let k = scratch("k-cpuhuge", b"x");
    assert_refused(&["--kernel", k.to_str().unwrap(), "--cpus", "5000"], &["5000 vCPUs is more than"]);
}

#[test]
fn initramfs_that_does_not_fit() {
    need_kvm();
    // The real Debian kernel needs ~80 MiB once decompressed; 96 MiB of initramfs
    // (sparse, so cheap) cannot fit beside it in 128 MiB.
    let kernel = kernel_image();
    let big = scratch("big-initrd", b"");
    std::fs::File::options().write(true).open(&big).unwrap().set_len(96 << 20).unwrap();
    assert_refused(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            big.to_str().unwrap(),
            "--memory",
            "128M",
            "--serial",
            "off",
        ],
        &["does not fit", "--memory"],
    );
}

#[test]
fn unknown_flag() {
    assert_refused(&["--kernel", "/x", "--frobnicate"], &["--frobnicate"]);
}

#[test]
fn bad_serial() {
    assert_refused(&["--kernel", "/x", "--serial", "tty"], &["stdio, off or file=PATH"]);
}

#[test]
fn two_devices_with_one_id() {
    assert_refused(
        &["--kernel", "/x", "--net", "tap=t0,id=nic", "--disk", "path=/tmp/d.img,id=nic"],
        &["two devices have the id \"nic\""],
    );
}

#[test]
fn malformed_device_flags() {
    assert_refused(&["--kernel", "/x", "--net", "mac=02:00:00:00:00:01"], &["--net", "tap=NAME is required"]);
    assert_refused(&["--kernel", "/x", "--disk", "path=/d,readonly=maybe"], &["readonly=\"maybe\" must be on or off"]);
}

#[test]
fn tap_name_too_long() {
    need_kvm();
    let kernel = kernel_image();
    assert_refused(
        &["--kernel", kernel.to_str().unwrap(), "--serial", "off", "--net", "tap=this-name-is-far-too-long"],
        &["this-name-is-far-too-long", "15"],
    );
}

#[test]
fn tap_without_permission() {
    need_kvm();
    let kernel = kernel_image();
    // Root without CAP_NET_ADMIN: what a user who is not allowed to create taps runs into.
    const CAP_NET_ADMIN: libc::c_ulong = 12;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
    cmd.args(["--kernel", kernel.to_str().unwrap(), "--serial", "off", "--net", "tap=tndm-noperm0"]);
    // SAFETY: prctl is async-signal-safe and touches only the child's capability bounding set.
    unsafe {
        cmd.pre_exec(|| match libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    let out = cmd.output().expect("run tandem without CAP_NET_ADMIN (needs root to drop it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tandem created a tap without CAP_NET_ADMIN; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for e in ["creating tap tndm-noperm0", "CAP_NET_ADMIN"] {
        assert!(stderr.contains(e), "expected {e:?} in stderr: {stderr}");
    }
    assert!(!std::path::Path::new("/sys/class/net/tndm-noperm0").exists(), "the tap was left behind");
}

#[test]
fn malformed_passthrough_flags() {
    assert_refused(&["--kernel", "/x", "--vf", "index=0"], &["--vf", "pf=IFNAME", "is required", "e.g."]);
    assert_refused(&["--kernel", "/x", "--vf", "pf=eth0,index=x"], &["index=\"x\"", "e.g."]);
    assert_refused(&["--kernel", "/x", "--vf", "pf=eth0,index=0,mac=01:00:00:00:00:01"], &["multicast"]);
    assert_refused(&["--kernel", "/x", "--device", "path=/tmp/not-a-device"], &["--device", "sysfs"]);
    assert_refused(
        &["--kernel", "/x", "--vf", "pf=eth0,index=0,id=a", "--disk", "path=/d,id=a"],
        &["two devices have the id \"a\""],
    );
}

#[test]
fn passthrough_on_a_host_that_cannot() {
    need_kvm();
    let kernel = kernel_image();
    let has_iommu = std::fs::read_dir("/sys/class/iommu").is_ok_and(|mut d| d.next().is_some());
    // On a host without an IOMMU that is what the user hears first; with one, the made-up
    // PF (or the missing interrupt remapping) is.
    let expect: &[&str] = if has_iommu { &["tndm-nopf0"] } else { &["no IOMMU", "intel_iommu=on"] };
    assert_refused(&["--kernel", kernel.to_str().unwrap(), "--serial", "off", "--vf", "pf=tndm-nopf0,index=0"], expect);
}

#[test]
fn hugepages_the_host_has_not_reserved() {
    need_kvm();
    let kernel = kernel_image();
    // 20 GiB of huge pages: fits the host's RAM check, never its hugepage pool.
    assert_refused(
        &["--kernel", kernel.to_str().unwrap(), "--serial", "off", "--memory", "size=20G,hugepages=on"],
        &["10240", "huge pages", "nr_hugepages"],
    );
}

#[test]
fn missing_disk_image() {
    need_kvm();
    let kernel = kernel_image();
    assert_refused(
        &["--kernel", kernel.to_str().unwrap(), "--serial", "off", "--disk", "path=/nonexistent/disk.img"],
        &["/nonexistent/disk.img"],
    );
}

/// The Debian kernel fetched by `resources/fetch-guest.sh`.
fn kernel_image() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/cache/vmlinuz");
    assert!(p.exists(), "{} is missing: run resources/build-images.sh first", p.display());
    p
}
