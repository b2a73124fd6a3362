//! `tandem`: the command-line VM launcher. Parsing and exit codes only; the VM itself
//! is the `vmm` library's business.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vmm::seccomp::{SeccompFilters, ThreadKind};
use vmm::{ConfigDocument, GuestExit, VmConfig};

/// Boot a Linux guest under KVM.
///
/// Example: tandem --kernel vmlinuz --initramfs initrd.gz --cpus 2 --memory 1G
///
/// Exits 0 when the guest powers off or reboots; non-zero, with the reason on stderr,
/// when it cannot start or crashes; 128+N when stopped by signal N (SIGTERM, SIGINT).
#[derive(Parser, Debug)]
#[command(name = "tandem", version, about, long_about, max_term_width = 100)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The whole VM from a JSON file whose keys are these flags' names (kernel, initramfs,
    /// cmdline, cpus, memory, serial, and net, disk, vf, device as lists of the strings
    /// those flags take), instead of the flags. Example: --config vm.json
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "serial", "net", "disk", "vf", "device", "seccomp"])]
    config: Option<PathBuf>,

    /// Guest kernel: a bzImage or an ELF vmlinux. Example: --kernel /boot/vmlinuz-6.1.0-amd64
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk (cpio archive, compressed or not). Example: --initramfs initrd.gz
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line. Example: --cmdline "console=ttyS0 quiet"
    #[arg(long, value_name = "STR", default_value = VmConfig::DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1 to 254, and at most what KVM allows). Example: --cpus 2
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,

    /// Guest RAM, with a K, M, G or T suffix; size=SIZE,hugepages=on backs it with
    /// reserved 2 MiB huge pages. Example: --memory 5G, --memory size=2G,hugepages=on
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,

    /// Where COM1 goes: stdio (the terminal, in raw mode), file=PATH (appended), or off.
    /// Example: --serial file=/tmp/guest.log
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    serial: String,

    /// A virtio-net NIC on a host tap, created (and removed at exit) if it does not exist.
    /// Repeatable. Example: --net tap=tap0,mac=02:00:00:00:00:01,id=net0,queues=1
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,id=ID][,queues=N]")]
    net: Vec<String>,

    /// A virtio-blk disk on a raw image. Repeatable.
    /// Example: --disk path=disk.img,readonly=on,id=disk0 (also direct=on for O_DIRECT)
    #[arg(long, value_name = "path=PATH[,readonly=on][,direct=on][,id=ID]")]
    disk: Vec<String>,

    /// An SR-IOV VF of the NIC whose PF is IFNAME, passed through with VFIO. Tandem sets
    /// the VF's MAC/VLAN/flags on the PF, binds it to vfio-pci, and puts everything back
    /// when it exits (`tandem cleanup` after a kill). create=on makes the PF's VFs if it
    /// has none. Repeatable. Example: --vf pf=eth0,index=0,mac=02:00:00:00:00:01,create=on
    #[arg(
        long,
        value_name = "pf=IFNAME,index=N[,mac=MAC][,vlan=ID][,spoofchk=on|off][,trust=on|off][,create=on][,id=ID]"
    )]
    vf: Vec<String>,

    /// A host PCI device passed through whole with VFIO (bound to vfio-pci for the VM's
    /// life). Repeatable. Example: --device path=/sys/bus/pci/devices/0000:01:00.0
    #[arg(long, value_name = "path=/sys/bus/pci/devices/BDF[,id=ID]")]
    device: Vec<String>,

    /// What the VMM's threads may ask of the kernel: on (a seccomp filter per thread kind;
    /// any other system call kills tandem), log (allowed, logged by the kernel: dmesg |
    /// grep type=1326), or off. Example: --seccomp log
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: String,

    /// Serve the control socket (JSON over HTTP/1.1) at PATH while the VM runs; steer it
    /// with `tandem ctl --api-socket PATH ...`. Example: --api-socket /run/tandem/vm0.sock
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Restore the VFs and devices a killed tandem left bound to vfio-pci (original
    /// driver, MAC, VLAN and flags; VFs it created removed).
    Cleanup,
    /// Steer a running VM through its control socket: info, counters, pause, resume,
    /// shutdown, device-remove ID, device-add vf=SPEC|device=SPEC.
    /// Example: tandem ctl --api-socket /run/tandem/vm0.sock pause
    Ctl {
        /// The socket the VM was started with (--api-socket).
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// The command and its arguments.
        #[arg(required = true, num_args = 1.., value_name = "COMMAND")]
        command: Vec<String>,
    },
}

impl Cli {
    /// The flags (or the --config file) as one document, parsed and checked the way the
    /// library and the control socket parse theirs.
    fn into_config(self) -> anyhow::Result<VmConfig> {
        let doc = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config {}; check the path", path.display()))?;
                ConfigDocument::from_json(&text).with_context(|| format!("--config {}", path.display()))?
            }
            None => {
                let Some(kernel) = self.kernel else { anyhow::bail!("--kernel PATH is required") };
                ConfigDocument {
                    kernel,
                    initramfs: self.initramfs,
                    cmdline: self.cmdline,
                    cpus: self.cpus,
                    memory: self.memory,
                    serial: self.serial,
                    net: self.net,
                    disk: self.disk,
                    vf: self.vf,
                    device: self.device,
                    seccomp: self.seccomp,
                }
            }
        };
        Ok(VmConfig::try_from(doc)?)
    }
}

/// `tandem cleanup`: exit 0 when nothing is left to restore.
fn cleanup() -> ExitCode {
    match vmm::sriov::cleanup(&vmm::sriov::Host::system()) {
        Ok(report) => {
            let said = |what: &str, lines: &[String]| lines.iter().for_each(|l| eprintln!("tandem cleanup: {what}{l}"));
            said("restored ", &report.restored);
            said("still in use, left alone: ", &report.in_use);
            said("warning: ", &report.warnings);
            said("FAILED: ", &report.failed);
            if report.restored.is_empty() && report.failed.is_empty() {
                eprintln!("tandem cleanup: nothing to restore");
            }
            if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("tandem cleanup: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Blocks the termination signals in this thread and every thread started after it,
/// so that one thread can take them with `sigwait` and stop the VM in order.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; pthread_sigmask only reads it.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn forward_stop_signals(set: libc::sigset_t, stopper: vmm::VmHandle, seccomp: &SeccompFilters) {
    let spawned = vmm::seccomp::spawn("signals", seccomp, ThreadKind::Signals, move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` and `sig` are valid for the call.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            stopper.stop(GuestExit::Stopped { signal: sig });
        }
    });
    if let Err(e) = spawned {
        eprintln!("tandem: warning: cannot watch for SIGTERM/SIGINT ({e}); they will be ignored");
    }
}

fn run(cli: Cli) -> anyhow::Result<GuestExit> {
    let signals = block_stop_signals();
    let api_socket = cli.api_socket.clone();
    let config = cli.into_config()?;
    let notices = vmm::Notices::new(|n| eprintln!("tandem: {n}"));
    let mut vm = vmm::Vm::with_notices(&config, notices).context("cannot start the VM")?;
    forward_stop_signals(signals, vm.handle(), vm.seccomp());
    if let Some(path) = api_socket {
        // Served until the VM ends; the socket file goes with it.
        vm.serve_api(&path).context("cannot serve the control socket")?;
    }
    vm.start()?;
    // From here this thread only waits for the end and takes the VM down.
    vm.seccomp().install(ThreadKind::Main).context("cannot filter the main thread")?;
    Ok(vm.wait()?)
}

/// `tandem ctl`: one request; the answer on stdout.
fn ctl(socket: &std::path::Path, words: &[String]) -> ExitCode {
    match vmm::api::run_ctl(socket, words) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// The error chain in one line. The library's messages already carry their cause's
/// text where it helps, so a cause whose text is already there is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Cleanup) => return cleanup(),
        Some(Command::Ctl { api_socket, command }) => return ctl(api_socket, command),
        None => {}
    }
    match run(cli) {
        Ok(exit) if exit.is_clean() => ExitCode::SUCCESS,
        Ok(GuestExit::Stopped { signal }) => {
            eprintln!("tandem: stopped by signal {signal}");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Ok(exit) => {
            eprintln!("tandem: {exit}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("tandem: error: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}
