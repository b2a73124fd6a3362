//! The restore journal: one small `key=value` file per leased device (and one per PF whose
//! VFs Tandem created) under the runtime directory, so that whoever finds it — the lease's
//! own release, the next `tandem` start, or `tandem cleanup` after a SIGKILL — can put the
//! host back as it was.
//!
//! A file is written whole under a temporary name and then linked into place, which fails if the
//! name exists: that is the ownership claim. It names its owner by pid and process start time, so
//! that a recycled pid does not pass for a live owner. Before each change to the host the
//! journal's phase is advanced and saved (temp file, fsync, rename), so a restore from any phase
//! undoes everything that may have happened.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::netlink::{VfAttr, VfConfig};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the runtime directory {path}: {source}; it needs to be writable (run as root)")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the journal {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path} is damaged ({reason}): restore the device by hand, then delete the file")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another tandem has held {path} for {} s while setting up or restoring a device: wait for it, or look \
         for a hung tandem process",
        waited.as_secs()
    )]
    Busy { path: PathBuf, waited: Duration },
}

/// A process, by pid and start time (clock ticks after boot, `/proc/PID/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

impl Owner {
    pub fn current() -> Result<Self, JournalError> {
        let pid = std::process::id();
        let start = start_time(pid).ok_or_else(|| JournalError::Read {
            path: format!("/proc/{pid}/stat").into(),
            source: io::Error::new(io::ErrorKind::InvalidData, "no start time in field 22"),
        })?;
        Ok(Self { pid, start })
    }

    /// False once the process has exited, even if its pid has been given to another.
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// How far a device lease got; each phase is saved before the change it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The file exists; nothing is known or changed yet (VFs may be being created: see the PF record).
    Claimed,
    /// The device and its original driver and settings are known; nothing is changed.
    Recorded,
    /// VF settings in `changed` are being or have been set, the last one perhaps not yet.
    Netlink,
    /// Moving the device to vfio-pci: driver_override, unbind and probe, in some state.
    Binding,
    /// On vfio-pci, its group node present.
    Bound,
}

/// How far the creation of a PF's VFs got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PfPhase {
    Claimed,
    /// Turning `sriov_drivers_autoprobe` off.
    Autoprobe,
    /// Writing `sriov_numvfs`.
    NumVfs,
    Created,
}

/// The first phase of both kinds of journal, the only one a torn write can have been in.
const CLAIMED: &str = "claimed";

const PHASES: [(Phase, &str); 5] = [
    (Phase::Claimed, CLAIMED),
    (Phase::Recorded, "recorded"),
    (Phase::Netlink, "netlink"),
    (Phase::Binding, "binding"),
    (Phase::Bound, "bound"),
];
const PF_PHASES: [(PfPhase, &str); 4] = [
    (PfPhase::Claimed, CLAIMED),
    (PfPhase::Autoprobe, "autoprobe"),
    (PfPhase::NumVfs, "numvfs"),
    (PfPhase::Created, "created"),
];

/// Which VF of which PF a `--vf` lease is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfOrigin {
    pub pf: String,
    pub pf_bdf: String,
    pub pf_ifindex: u32,
    pub index: u32,
}

/// A leased device (a `--vf` or a `--device`) and what to put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub owner: Owner,
    pub phase: Phase,
    /// The VM's name for the device, for messages.
    pub id: String,
    pub vf: Option<VfOrigin>,
    /// Known from [`Phase::Recorded`] on, as are the fields below.
    pub bdf: Option<String>,
    pub group: Option<u32>,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    /// The VF's settings before any change; present whenever the PF could report them (and so
    /// always when `changed` is not empty), as a restore puts back whatever differs from them.
    pub original: Option<VfConfig>,
    pub changed: Vec<VfAttr>,
}

/// A PF whose VFs a lease created, to be removed when no journal refers to the PF any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfRecord {
    pub owner: Owner,
    pub phase: PfPhase,
    pub pf: String,
    pub pf_bdf: String,
    /// `sriov_drivers_autoprobe` before it was turned off. (`sriov_numvfs` was 0: VFs are only
    /// ever created on a PF that had none.)
    pub autoprobe: bool,
    pub numvfs: u32,
}

/// One journal file's `key=value` lines, for typed lookups with errors that name the key.
struct Fields(BTreeMap<String, String>);

impl Fields {
    fn parse(text: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| format!("line {} is not key=value", n + 1))?;
            map.insert(k.to_string(), v.to_string());
        }
        Ok(Self(map))
    }

    fn str(&self, key: &str) -> Result<&str, String> {
        self.0.get(key).map(String::as_str).ok_or_else(|| format!("no {key}="))
    }

    fn opt(&self, key: &str) -> Option<String> {
        self.0.get(key).filter(|v| !v.is_empty()).cloned()
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        let v = self.str(key)?;
        v.parse().map_err(|_| format!("{key}={v} is not a number"))
    }

    fn flag(&self, key: &str) -> Result<bool, String> {
        match self.str(key)? {
            "1" => Ok(true),
            "0" => Ok(false),
            v => Err(format!("{key}={v} is not 0 or 1")),
        }
    }

    fn owner(&self) -> Result<Owner, String> {
        Ok(Owner { pid: self.num("owner_pid")?, start: self.num("owner_start")? })
    }

    fn phase<P: Copy>(&self, table: &[(P, &str)]) -> Result<P, String> {
        let v = self.str("phase")?;
        table.iter().find(|(_, name)| *name == v).map(|(p, _)| *p).ok_or_else(|| format!("unknown phase {v:?}"))
    }
}

fn phase_name<P: PartialEq>(table: &[(P, &'static str)], phase: P) -> &'static str {
    table.iter().find(|(p, _)| *p == phase).map_or("?", |(_, n)| n)
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The file must stay one value per line whatever a user put in an id.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], "?")
}

/// Serialized to and from a journal file.
pub trait Record: Sized {
    fn to_text(&self) -> String;
    fn from_text(text: &str) -> Result<Self, String>;
}

impl Record for DeviceRecord {
    fn to_text(&self) -> String {
        let mut out = format!(
            "owner_pid={}\nowner_start={}\nphase={}\nid={}\n",
            self.owner.pid,
            self.owner.start,
            phase_name(&PHASES, self.phase),
            one_line(&self.id)
        );
        if let Some(vf) = &self.vf {
            out +=
                &format!("pf={}\npf_bdf={}\npf_ifindex={}\nvf_index={}\n", vf.pf, vf.pf_bdf, vf.pf_ifindex, vf.index);
        }
        if let Some(bdf) = &self.bdf {
            out += &format!("bdf={bdf}\n");
        }
        if let Some(group) = self.group {
            out += &format!("group={group}\n");
        }
        if self.phase >= Phase::Recorded {
            out += &format!(
                "driver={}\ndriver_override={}\n",
                self.driver.as_deref().unwrap_or(""),
                self.driver_override.as_deref().unwrap_or("")
            );
        }
        if let Some(c) = &self.original {
            out += &format!(
                "mac={}\nvlan={}\nqos={}\nspoofchk={}\ntrust={}\n",
                mac_text(&c.mac),
                c.vlan,
                c.qos,
                u8::from(c.spoofchk),
                u8::from(c.trust)
            );
        }
        let changed: Vec<_> = self.changed.iter().map(|a| a.name()).collect();
        out += &format!("changed={}\n", changed.join(","));
        out
    }

    fn from_text(text: &str) -> Result<Self, String> {
        let f = Fields::parse(text)?;
        let vf = match f.opt("pf") {
            Some(pf) => Some(VfOrigin {
                pf,
                pf_bdf: f.str("pf_bdf")?.to_string(),
                pf_ifindex: f.num("pf_ifindex")?,
                index: f.num("vf_index")?,
            }),
            None => None,
        };
        let original = match f.opt("mac") {
            Some(mac) => Some(VfConfig {
                mac: crate::config::parse_mac(&mac).ok_or_else(|| format!("mac={mac} is not a MAC"))?,
                vlan: f.num("vlan")?,
                qos: f.num("qos")?,
                spoofchk: f.flag("spoofchk")?,
                trust: f.flag("trust")?,
            }),
            None => None,
        };
        let changed = f
            .opt("changed")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| VfAttr::from_name(s).ok_or_else(|| format!("changed= names an unknown setting {s:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        if !changed.is_empty() && original.is_none() {
            return Err("changed= is set but the original VF settings are missing".into());
        }
        Ok(Self {
            owner: f.owner()?,
            phase: f.phase(&PHASES)?,
            id: f.str("id")?.to_string(),
            vf,
            bdf: f.opt("bdf"),
            group: f.opt("group").map(|g| g.parse().map_err(|_| format!("group={g} is not a number"))).transpose()?,
            driver: f.opt("driver"),
            driver_override: f.opt("driver_override"),
            original,
            changed,
        })
    }
}

impl Record for PfRecord {
    fn to_text(&self) -> String {
        format!(
            "owner_pid={}\nowner_start={}\nphase={}\npf={}\npf_bdf={}\nautoprobe={}\nnumvfs={}\n",
            self.owner.pid,
            self.owner.start,
            phase_name(&PF_PHASES, self.phase),
            self.pf,
            self.pf_bdf,
            u8::from(self.autoprobe),
            self.numvfs
        )
    }

    fn from_text(text: &str) -> Result<Self, String> {
        let f = Fields::parse(text)?;
        Ok(Self {
            owner: f.owner()?,
            phase: f.phase(&PF_PHASES)?,
            pf: f.str("pf")?.to_string(),
            pf_bdf: f.str("pf_bdf")?.to_string(),
            autoprobe: f.flag("autoprobe")?,
            numvfs: f.num("numvfs")?,
        })
    }
}

/// A journal file and the record it holds.
#[derive(Debug)]
pub struct Journal<R> {
    path: PathBuf,
    pub record: R,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where a journal's next version is written before it is renamed or linked into place. The
/// runtime lock keeps other tandems out; the pid keeps apart processes that ignore it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `text` to a new file at `tmp` and syncs it.
fn write_temp(tmp: &Path, text: &str) -> io::Result<()> {
    // A file left at this name (a kill between linking a claim and unlinking its temporary name)
    // may be a second link to a live journal: truncating it would empty the journal in place.
    if let Err(e) = std::fs::remove_file(tmp) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Whether unparseable journal text is a claim cut short, which nothing needs restoring for. An
/// older tandem created the file with O_EXCL and wrote it afterwards, so one killed in between
/// left it empty or in part; a torn write is the claim's first, in phase `claimed` (every later
/// version is renamed into place whole), and the host is first changed after a later phase is
/// saved. So: no `phase=` line at all, a whole `phase=claimed`, or a last line cut inside it.
fn is_dead_claim(text: &str) -> bool {
    let phase = text.split_inclusive('\n').filter_map(|l| l.strip_prefix("phase=")).next_back();
    match phase {
        None => true,
        Some(v) => match v.strip_suffix('\n') {
            Some(whole) => whole == CLAIMED,
            None => CLAIMED.starts_with(v),
        },
    }
}

impl<R: Record> Journal<R> {
    /// Creates the file, or returns `None` when it exists already (someone else's claim, or a stale one).
    pub fn claim(path: PathBuf, record: R) -> Result<Option<Self>, JournalError> {
        let write_err = |source| JournalError::Write { path: path.clone(), source };
        // Whole before it has its name: link(2) fails if the name exists, so it is as exclusive
        // as O_EXCL, but the journal can never be seen empty or in part.
        let tmp = temp_path(&path);
        let linked = write_temp(&tmp, &record.to_text()).and_then(|()| std::fs::hard_link(&tmp, &path));
        // Whatever happened, the temporary name is no claim (and `list` skips it if this fails).
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(write_err(e)),
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir).map_err(write_err)?;
        }
        Ok(Some(Self { path, record }))
    }

    /// Reads the journal at `path`. One that is a claim cut short by a kill (see
    /// `is_dead_claim`) is deleted, and `None` returned: nothing on the host waits for it. The
    /// caller holds the [`RuntimeLock`], so no claim is being written meanwhile.
    pub fn load(path: PathBuf) -> Result<Option<Self>, JournalError> {
        let text =
            std::fs::read_to_string(&path).map_err(|source| JournalError::Read { path: path.clone(), source })?;
        match R::from_text(&text) {
            Ok(record) => Ok(Some(Self { path, record })),
            Err(_) if is_dead_claim(&text) => match std::fs::remove_file(&path) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(JournalError::Write { path, source }),
            },
            Err(reason) => Err(JournalError::Corrupt { path, reason }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with the current record, whole or not at all.
    pub fn save(&self) -> Result<(), JournalError> {
        let write_err = |source| JournalError::Write { path: self.path.clone(), source };
        let tmp = temp_path(&self.path);
        write_temp(&tmp, &self.record.to_text()).map_err(write_err)?;
        std::fs::rename(&tmp, &self.path).map_err(write_err)?;
        match self.path.parent() {
            Some(dir) => sync_dir(dir).map_err(write_err),
            None => Ok(()),
        }
    }

    pub fn remove(self) -> Result<(), JournalError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Write { path: self.path, source }),
        }
    }
}

/// The journal files in a runtime directory, by name.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, JournalError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(JournalError::Read { path: dir.to_path_buf(), source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| JournalError::Read { path: dir.to_path_buf(), source })?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".state") && !name.starts_with('.') {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

pub fn vf_journal_name(pf_bdf: &str, index: u32) -> String {
    format!("vf-{pf_bdf}-{index}.state")
}

pub fn device_journal_name(bdf: &str) -> String {
    format!("dev-{bdf}.state")
}

pub fn pf_journal_name(pf_bdf: &str) -> String {
    format!("pf-{pf_bdf}.state")
}

pub fn is_pf_journal(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pf-"))
}

/// Serializes every change to leased devices among Tandem processes: an exclusive `flock` on
/// `DIR/lock`, released when dropped.
pub struct RuntimeLock {
    _file: File,
}

impl RuntimeLock {
    /// Setting up a VF takes well under a second in practice (VF creation is the slow part);
    /// a holder past this is stuck.
    pub const WAIT: Duration = Duration::from_secs(30);

    pub fn take(dir: &Path) -> Result<Self, JournalError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| JournalError::Dir { path: dir.to_path_buf(), source })?;
        let path = dir.join("lock");
        let lock_err = |source| JournalError::Lock { path: path.clone(), source };
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(lock_err)?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a descriptor this function owns for the call's duration.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(lock_err(e));
            }
            if start.elapsed() >= Self::WAIT {
                return Err(JournalError::Busy { path, waited: start.elapsed() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DeviceRecord {
        DeviceRecord {
            owner: Owner { pid: 42, start: 4242 },
            phase: Phase::Netlink,
            id: "vf\n0".into(),
            vf: Some(VfOrigin { pf: "eth0".into(), pf_bdf: "0000:01:00.0".into(), pf_ifindex: 3, index: 1 }),
            bdf: Some("0000:01:10.2".into()),
            group: Some(21),
            driver: Some("igbvf".into()),
            driver_override: None,
            original: Some(VfConfig { mac: [0, 1, 2, 3, 4, 0xff], vlan: 7, qos: 2, spoofchk: true, trust: false }),
            changed: vec![VfAttr::Mac, VfAttr::Trust],
        }
    }

    #[test]
    fn records_round_trip() {
        let mut r = record();
        let text = r.to_text();
        assert!(text.contains("phase=netlink\n") && text.contains("mac=00:01:02:03:04:ff\n"), "{text}");
        r.id = "vf?0".into();
        assert_eq!(DeviceRecord::from_text(&text), Ok(r));

        let bare = DeviceRecord {
            id: "dev0".into(),
            phase: Phase::Claimed,
            vf: None,
            bdf: None,
            group: None,
            driver: None,
            original: None,
            changed: vec![],
            ..record()
        };
        assert_eq!(DeviceRecord::from_text(&bare.to_text()), Ok(bare));

        let pf = PfRecord {
            owner: Owner { pid: 1, start: 2 },
            phase: PfPhase::NumVfs,
            pf: "eth0".into(),
            pf_bdf: "0000:01:00.0".into(),
            autoprobe: true,
            numvfs: 2,
        };
        assert_eq!(PfRecord::from_text(&pf.to_text()), Ok(pf));
    }

    #[test]
    fn damaged_records_are_refused() {
        let good = record().to_text();
        for (from, to) in [
            ("phase=netlink", "phase=flying"),
            ("owner_pid=42", "owner_pid=x"),
            ("changed=mac,trust", "changed=mac,rate"),
            ("spoofchk=1", "spoofchk=yes"),
            ("owner_start=4242\n", ""),
            ("id=vf?0", "garbage"),
        ] {
            let text = good.replace(from, to);
            assert!(DeviceRecord::from_text(&text).is_err(), "{from} -> {to}");
        }
    }

    #[test]
    fn owners_die() {
        let me = Owner::current().unwrap();
        assert!(me.is_alive());
        assert!(!Owner { start: me.start + 1, ..me }.is_alive(), "a recycled pid is not the owner");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!Owner { pid, start: 0 }.is_alive());
    }
}
