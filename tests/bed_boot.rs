//! The Debian kernel boots under `tandem` inside the nested bed: 1 and 2 vCPUs,
//! 256 MiB and 5 GiB (RAM on both sides of the 32-bit hole), and both power-off and
//! reboot end `tandem` with status 0. One L1 boot serves every test here.

use std::sync::OnceLock;

use tandem_tests::{cached, kv, repo_root, run_bed, BedLog, BedOptions};

fn bed() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| {
        // L1 needs room for a 5 GiB L2 plus itself.
        let opts = BedOptions {
            mem_mib: 7168,
            smp: 2,
            files: vec![(cached("vmlinux-l1"), "/l2/vmlinux".into())],
            ..Default::default()
        };
        run_bed("boot", &repo_root().join("tests/scenarios/boot.sh"), &opts)
    })
}

fn assert_booted(name: &str, cpus: u32, mem_mib: u64) {
    let run = bed().run(name);
    let init = run.line("TANDEM-L2-INIT");
    let got_cpus: u32 = kv(init, "cpus").and_then(|v| v.parse().ok()).expect("cpus=");
    assert_eq!(got_cpus, cpus, "vCPUs seen by the guest: {init}");
    // The E820 map the guest saw: all RAM but the 384 KiB legacy hole below 1 MiB
    // (EBDA, MP table and ACPI area) and the pages the kernel itself reserves.
    let ram_kb: u64 = kv(init, "ram_kb").and_then(|v| v.parse().ok()).expect("ram_kb=");
    let asked_kb = mem_mib * 1024;
    assert!(ram_kb <= asked_kb && ram_kb + 1024 >= asked_kb, "guest RAM {ram_kb} KiB vs {asked_kb} KiB asked: {init}");
    assert_eq!(run.rc, Some(0), "tandem exit status for {name}; console:\n{}", run.console());
}

#[test]
fn boots_with_one_vcpu_and_256m() {
    assert_booted("cpu1-256m", 1, 256);
}

#[test]
fn boots_with_two_vcpus() {
    assert_booted("cpu2-256m", 2, 256);
}

#[test]
fn boots_with_5g_across_the_32bit_hole() {
    assert_booted("cpu2-5g", 2, 5 * 1024);
}

/// Linux's default reboot goes through the FADT reset register; `reboot=k` through the
/// i8042. Both must end tandem cleanly.
#[test]
fn guest_reboot_ends_tandem_with_status_0() {
    for name in ["reboot", "reboot-i8042"] {
        let run = bed().run(name);
        run.line("TANDEM-L2-INIT");
        assert_eq!(run.rc, Some(0), "{name} must end tandem cleanly; console:\n{}", run.console());
    }
}

#[test]
fn boots_an_elf_vmlinux() {
    assert_booted("elf", 1, 256);
}

#[test]
fn host_input_reaches_the_guest_shell() {
    let run = bed().run("serial-input");
    // The shell echoes the typed line; only the guest's arithmetic makes the 42.
    run.line("SERIAL-IN-42");
    assert_eq!(run.rc, Some(0), "the shell's exit powers the guest off; console:\n{}", run.console());
}

#[test]
fn serial_file_gets_the_console() {
    let run = bed().run("serial-file");
    assert_eq!(run.line("SERIAL-FILE-MARKERS"), "SERIAL-FILE-MARKERS 1");
    assert!(!run.lines.iter().any(|l| l.contains("TANDEM-L2-INIT")), "console leaked to stdout");
    assert_eq!(run.rc, Some(0));
}

#[test]
fn sigterm_stops_tandem_with_128_plus_15() {
    let run = bed().run("sigterm");
    assert_eq!(run.rc, Some(143), "console:\n{}", run.console());
    assert!(!run.lines.iter().any(|l| l.contains("TANDEM-L2-INIT")), "the guest was stopped mid-boot");
}
