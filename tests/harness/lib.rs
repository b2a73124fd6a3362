//! The integration-test harness: runs a scenario script inside an L1 Linux booted under
//! QEMU's emulation (the nested bed, see `resources/bed/`), where `tandem` boots L2
//! guests under KVM, and parses what L1's serial console reported.
//!
//! A scenario brackets each `tandem` run with `RUN-BEGIN <name>` and
//! `RUN-END <name> rc=<status>` lines; the L2 guest's console lands between them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `tandem` binary cargo built beside this test executable (same profile). Tests
/// never build it themselves: `cargo test --workspace` builds it before running them.
pub fn tandem_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/tandem
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("tandem"));
    match bin {
        Some(b) if b.exists() => b,
        _ => panic!(
            "the tandem binary is not built next to {}: run `cargo build --workspace --bins` (resources/test.sh does)",
            exe.display()
        ),
    }
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the nested bed needs root (network namespaces, taps); run the tests as root");
}

#[derive(Debug, Clone)]
pub struct BedOptions {
    pub mem_mib: u32,
    pub smp: u32,
    pub iommu: bool,
    pub igb: bool,
    pub timeout_s: u32,
    /// More L1 kernel command line (e.g. intremap=off).
    pub append: String,
    /// More files for L1, as (host path, path inside L1).
    pub files: Vec<(PathBuf, String)>,
}

impl Default for BedOptions {
    fn default() -> Self {
        Self {
            mem_mib: 2048,
            smp: 2,
            iommu: false,
            igb: false,
            timeout_s: 900,
            append: String::new(),
            files: Vec::new(),
        }
    }
}

/// A file of the image cache that `resources/build-images.sh` fills.
pub fn cached(name: &str) -> PathBuf {
    let p = repo_root().join("resources/cache").join(name);
    assert!(p.exists(), "{} is missing: run resources/build-images.sh first", p.display());
    p
}

/// Boots L1 with `scenario` as its /scenario.sh and returns its console log.
pub fn run_bed(name: &str, scenario: &Path, opts: &BedOptions) -> BedLog {
    require_root();
    let root = repo_root();
    let work = std::env::temp_dir().join(format!("tandem-bed-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("create bed work dir");
    let overlay = work.join("overlay.cpio");
    let status = Command::new(root.join("resources/bed/overlay.sh"))
        .arg(&overlay)
        .arg(tandem_binary())
        .arg(format!("{}:/scenario.sh", scenario.display()))
        .args(opts.files.iter().map(|(host, guest)| format!("{}:{guest}", host.display())))
        .status()
        .expect("run resources/bed/overlay.sh");
    assert!(status.success(), "resources/bed/overlay.sh failed ({status}); run resources/build-images.sh first");

    let log = work.join("l1.log");
    let mut cmd = Command::new(root.join("resources/bed/run-l1.sh"));
    cmd.args(["--mem", &opts.mem_mib.to_string(), "--smp", &opts.smp.to_string()]);
    cmd.args(["--timeout", &opts.timeout_s.to_string()]);
    // L1's own watchdog fires first, so a hung scenario still reports what was stuck.
    let watchdog = format!("tandem.scenario_timeout={}", opts.timeout_s.saturating_sub(45).max(30));
    cmd.args(["--append", format!("{watchdog} {}", opts.append).trim_end()]);
    if opts.iommu {
        cmd.arg("--iommu");
    }
    if opts.igb {
        cmd.arg("--igb");
    }
    // One L1 at a time: two would share the host's two cores and each run twice as slow.
    static ONE_L1: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let one = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    cmd.arg(&overlay).arg(&log);
    let read =
        |log: &Path| std::fs::read(log).map(|b| String::from_utf8_lossy(&b).replace('\r', "")).unwrap_or_default();
    let mut status = cmd.status().expect("run resources/bed/run-l1.sh");
    // The emulated bed's own failures (TCG running L1 and its emulated SVM): an L1 that
    // hangs or dies before its init never ran tandem; an L1 whose kernel crashed (status 1:
    // a panic through pvpanic, run-l1.sh making an Oops one or ending an L1 that hung in
    // its Oops or kept a CPU stalled in VMRUN) failed in the kernel, which a process cannot
    // make it do. Either boots once more; a second failure stands.
    let text = read(&log);
    let retry = if !status.success() && !text.contains("L1-INIT-OK") {
        Some(format!("L1 ended ({status}) before its init, before tandem ran"))
    } else if status.code() == Some(1) {
        let crash = |l: &&str| {
            ["Kernel panic - not syncing", "BUG: TASK stack guard page", "rcu_preempt detected stalls"]
                .iter()
                .any(|m| l.contains(m))
        };
        let panic = text.lines().rev().find(crash).unwrap_or("no panic line");
        Some(format!("L1's kernel crashed ({})", panic.trim()))
    } else {
        None
    };
    if let Some(why) = retry {
        let first = work.join("l1-first.log");
        let _ = std::fs::rename(&log, &first);
        // Straight to stderr, past the test's capture: a retry is seen in every run's log.
        let _ =
            writeln!(std::io::stderr(), "[harness] bed {name}: {why}; log {}: booting it once more", first.display());
        status = cmd.status().expect("run resources/bed/run-l1.sh");
    }
    drop(one);
    let bed = BedLog { text: read(&log), path: log };
    // Runs the scenario made again after the bed's fault (run_vm in resources/bed/lib.sh),
    // seen in every run's log like the retries above.
    for l in bed.text.lines().filter(|l| l.starts_with("L1-RUN-STUCK") || l.starts_with("L1-BED-FAULT")) {
        let _ = writeln!(std::io::stderr(), "[harness] bed {name}: {l}");
    }
    assert!(status.success(), "the L1 bed exited with {status}; log {}:\n{}", bed.path.display(), bed.tail(60));
    assert!(bed.text.contains("L1-INIT-OK"), "L1 never reached its init; log:\n{}", bed.tail(60));
    assert!(
        !bed.text.contains("L1-SCENARIO-TIMEOUT"),
        "the scenario hung; log {}:\n{}",
        bed.path.display(),
        bed.tail(200)
    );
    bed
}

/// As [`run_bed`], run again (at most `attempts` runs in all) while `redo` says why a
/// run is to be redone (see [`redo_on_bed_fault`]). Any other failure is the test's to
/// judge.
pub fn run_bed_retrying(
    name: &str,
    scenario: &Path,
    opts: &BedOptions,
    attempts: u32,
    redo: impl Fn(&BedLog) -> Option<String>,
) -> BedLog {
    let mut attempt = 1;
    loop {
        let bed = run_bed(name, scenario, opts);
        let Some(why) = redo(&bed) else { return bed };
        if attempt >= attempts {
            let _ = writeln!(
                std::io::stderr(),
                "[harness] bed {name}, run {attempt} of at most {attempts}: {why} (log {})",
                bed.path.display()
            );
            return bed;
        }
        // The next run writes the same log: this one is kept beside it, for its diagnosis.
        let kept = bed.path.with_file_name(format!("l1-attempt-{attempt}.log"));
        let kept = if std::fs::rename(&bed.path, &kept).is_ok() { kept } else { bed.path.clone() };
        let _ = writeln!(
            std::io::stderr(),
            "[harness] bed {name}, run {attempt} of at most {attempts}: {why} (log {})",
            kept.display()
        );
        attempt += 1;
    }
}

/// The usual `redo` of [`run_bed_retrying`]: a run that is not `done` and whose log shows
/// one of the bed's own faults.
pub fn redo_on_bed_fault(bed: &BedLog, done: bool) -> Option<String> {
    if done {
        return None;
    }
    bed_fault(&bed.text).map(|f| format!("the bed's fault, {f}"))
}

/// The bed's own faults, measured, that neither tandem nor the guest can cause:
/// - an interrupt the L2 guest took with interrupts disabled, which scenarios diagnose
///   with `vm_bed_fault` (resources/bed/lib.sh) and report as `L1-BED-FAULT` lines;
/// - an L1 CPU that stays inside VMRUN through its own timer interrupts (L1's KVM always
///   intercepts them), seen as an RCU stall whose backtrace is in `svm_vcpu_run`.
pub fn bed_fault(text: &str) -> Option<String> {
    if let Some(line) = text.lines().find(|l| l.starts_with("L1-BED-FAULT")) {
        return Some(line.to_string());
    }
    let stall = text.find("rcu: INFO: rcu_preempt detected stalls")?;
    let in_vmrun = text[stall..].lines().take(40).any(|l| l.contains("RIP: 0010:svm_vcpu_run"));
    in_vmrun.then(|| "an L1 CPU stuck inside VMRUN through its own interrupts (RCU stall in svm_vcpu_run)".to_string())
}

pub struct BedLog {
    pub text: String,
    pub path: PathBuf,
}

pub struct Run {
    pub name: String,
    pub lines: Vec<String>,
    /// tandem's exit status, None when the run never ended (L1 timed out or crashed).
    pub rc: Option<i32>,
}

impl BedLog {
    /// The kernel's records of calls a VMM thread made outside its seccomp filter.
    pub fn seccomp_violations(&self) -> Vec<&str> {
        self.text.lines().filter(|l| l.starts_with("L1-SECCOMP")).collect()
    }

    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The console lines of the run named `name`.
    pub fn run(&self, name: &str) -> Run {
        let begin = format!("RUN-BEGIN {name}");
        let end = format!("RUN-END {name} ");
        let mut lines = Vec::new();
        let mut inside = false;
        let mut rc = None;
        for line in self.text.lines() {
            if line.trim_end() == begin {
                inside = true;
            } else if inside && line.starts_with(&end) {
                rc = kv(line, "rc").and_then(|v| v.parse().ok());
                break;
            } else if inside {
                lines.push(line);
            }
        }
        assert!(inside, "run {name} never started; log {}:\n{}", self.path.display(), self.tail(40));
        Run { name: name.to_string(), lines: untangle(&lines), rc }
    }
}

impl Run {
    /// The first line containing `marker`, or a failure that shows the run's console.
    pub fn line(&self, marker: &str) -> &str {
        match self.lines.iter().find(|l| l.contains(marker)) {
            Some(l) => l,
            None => panic!("run {}: no {marker:?} line; its console:\n{}", self.name, self.console()),
        }
    }

    pub fn console(&self) -> String {
        let n = self.lines.len();
        self.lines[n.saturating_sub(80)..].join("\n")
    }
}

/// A run's lines with tandem's own messages taken out of the guest lines they landed in:
/// the guest's serial console and tandem's stderr share the output, and a message can come
/// between two bytes of a guest line (`run_console` in resources/bed/lib.sh does the same).
fn untangle(lines: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(lines.len());
    let mut carry = String::new();
    for line in lines {
        let line = std::mem::take(&mut carry) + line;
        match line.find("tandem: ") {
            Some(at) if at > 0 => {
                out.push(line[at..].to_string());
                carry = line[..at].to_string();
            }
            _ => out.push(line),
        }
    }
    if !carry.is_empty() {
        out.push(carry);
    }
    out
}

/// The value of `key=value` in a whitespace-separated line.
pub fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runs_and_pairs() {
        let bed = BedLog {
            text: "L1-INIT-OK\nRUN-BEGIN a\nhello\nTANDEM-L2-INIT cpus=2 mem_kb=100\nRUN-END a rc=0\nRUN-BEGIN b\nx\n"
                .into(),
            path: PathBuf::from("/x"),
        };
        let a = bed.run("a");
        assert_eq!(a.rc, Some(0));
        assert_eq!(kv(a.line("TANDEM-L2-INIT"), "cpus"), Some("2"));
        assert_eq!(kv(a.line("TANDEM-L2-INIT"), "mem"), None);
        let b = bed.run("b");
        assert_eq!(b.rc, None);
        assert_eq!(b.lines, vec!["x"]);
    }

    #[test]
    fn tells_the_beds_faults_from_other_failures() {
        assert_eq!(
            bed_fault("x\nL1-BED-FAULT interrupt with interrupts disabled: a\n").as_deref(),
            Some("L1-BED-FAULT interrupt with interrupts disabled: a")
        );
        let stall = "[1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n[1] NMI backtrace for cpu 0\n[1] RIP: 0010:svm_vcpu_run+0x234/0x720 [kvm_amd]\n";
        assert!(bed_fault(stall).is_some_and(|f| f.contains("VMRUN")));
        assert_eq!(bed_fault("[1] rcu: INFO: rcu_preempt detected stalls\n[1] RIP: 0010:schedule+0x1\n"), None);
        assert_eq!(bed_fault("L1-HP-NOT-SEEN n=3\n"), None);
    }

    #[test]
    fn takes_tandem_messages_out_of_guest_lines() {
        let lines = ["L2-ED", "L2-EDtandem: edu: removed (x)", "U-GONE n=5", "tandem: y", "end"];
        assert_eq!(untangle(&lines[1..]), ["tandem: edu: removed (x)", "L2-EDU-GONE n=5", "tandem: y", "end"]);
        assert_eq!(untangle(&["Atandem: m"]), ["tandem: m", "A"]);
    }
}
