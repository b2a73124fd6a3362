//! Taking a device from the host: [`VfLease`] for a VF named by its PF, [`DeviceLease`] for any
//! PCI device. Each step is journaled before it is made; on any failure the steps made so far
//! are undone before the error is returned.

use std::path::{Path, PathBuf};

use super::netlink::{NetlinkError, VfAttr, VfConfig};
use super::restore::{describe, restore_journal, restore_pf_journal};
use super::state::{self, DeviceRecord, Journal, JournalError, Owner, PfPhase, PfRecord, Phase, RuntimeLock, VfOrigin};
use super::sysfs::SysfsError;
use super::{DeviceSpec, Host, SriovError, VfSpec};

const VFIO_PCI: &str = "vfio-pci";

/// A device's journal and the host to put it back on, restored at the latest on drop.
#[derive(Debug)]
struct Lease {
    host: Host,
    journal: Option<Journal<DeviceRecord>>,
}

impl Lease {
    fn release(&mut self) -> Result<Vec<String>, SriovError> {
        let Some(journal) = self.journal.take() else {
            return Ok(Vec::new());
        };
        let _lock = RuntimeLock::take(&self.host.runtime_dir)?;
        restore_journal(&self.host, journal)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Nobody is left to return an error to: say it, as the exit path would.
        match self.release() {
            Ok(warnings) => warnings.iter().for_each(|w| self.host.notices.warn(w)),
            Err(e) => self.host.notices.warn(e),
        }
    }
}

/// What a finished set-up tells the VMM.
#[derive(Debug)]
struct Taken {
    bdf: String,
    group: u32,
    warnings: Vec<String>,
}

/// Error context for one device: the message names it.
struct Ctx<'a> {
    host: &'a Host,
    dev: String,
}

impl<'a> Ctx<'a> {
    /// For VF `spec.index` of `spec.pf`, named as `describe` names its journal.
    fn vf(host: &'a Host, spec: &VfSpec) -> Self {
        Ctx { host, dev: format!("{} (VF {} of {})", spec.id, spec.index, spec.pf) }
    }

    fn sysfs(&self) -> impl Fn(SysfsError) -> SriovError + '_ {
        |source| SriovError::Sysfs { dev: self.dev.clone(), source }
    }

    fn netlink<'p>(&'p self, pf: &'p str) -> impl Fn(NetlinkError) -> SriovError + 'p {
        move |source| SriovError::Netlink { dev: self.dev.clone(), pf: pf.to_string(), source }
    }

    /// Claims the journal at `path`. A stale one — its tandem died — is restored first, as
    /// `tandem cleanup` would; a live one means the device is someone else's.
    fn claim(&self, path: PathBuf, record: DeviceRecord) -> Result<Journal<DeviceRecord>, SriovError> {
        for _ in 0..2 {
            if let Some(journal) = Journal::claim(path.clone(), record.clone())? {
                return Ok(journal);
            }
            // None: a claim cut short by a kill, now deleted; the next round claims the name.
            if let Some(existing) = Journal::<DeviceRecord>::load(path.clone())? {
                self.refuse_live(&existing)?;
                restore_journal(self.host, existing)?;
            }
        }
        Err(JournalError::Write { path, source: std::io::ErrorKind::AlreadyExists.into() }.into())
    }

    fn refuse_live(&self, journal: &Journal<DeviceRecord>) -> Result<(), SriovError> {
        let owner = journal.record.owner;
        if !owner.is_alive() {
            return Ok(());
        }
        Err(SriovError::InUse {
            dev: self.dev.clone(),
            bdf: journal.record.bdf.clone().unwrap_or_else(|| describe(&journal.record)),
            pid: owner.pid,
            journal: journal.path().to_path_buf(),
        })
    }

    /// The same device may be journaled under another name (a VF given as `--device`, or the
    /// other way round): refuse it if that lease is live, put it back if stale.
    fn refuse_other_claims(&self, bdf: &str, own: &Path) -> Result<(), SriovError> {
        for path in state::list(&self.host.runtime_dir)? {
            if path == own || state::is_pf_journal(&path) {
                continue;
            }
            // A damaged journal is `tandem cleanup`'s to report.
            let Ok(Some(other)) = Journal::<DeviceRecord>::load(path) else { continue };
            if other.record.bdf.as_deref() == Some(bdf) {
                self.refuse_live(&other)?;
                restore_journal(self.host, other)?;
            }
        }
        Ok(())
    }

    /// Records the device, its group and its driver before anything changes.
    fn record_device(&self, journal: &mut Journal<DeviceRecord>, bdf: &str) -> Result<u32, SriovError> {
        let sysfs = &self.host.sysfs;
        let group = sysfs.iommu_group(bdf).map_err(self.sysfs())?;
        let record = &mut journal.record;
        record.bdf = Some(bdf.to_string());
        record.group = Some(group);
        record.driver = sysfs.driver(bdf).map_err(self.sysfs())?;
        record.driver_override = sysfs.driver_override(bdf).map_err(self.sysfs())?;
        Ok(group)
    }

    /// What would make the binding fail, found before anything is changed.
    fn check_ready(&self, bdf: &str, group: u32) -> Result<(), SriovError> {
        self.host.sysfs.check_group(group, bdf).map_err(self.sysfs())?;
        self.host.sysfs.require_vfio_pci().map_err(self.sysfs())
    }

    /// Moves the device to vfio-pci and waits for its group node.
    fn bind_vfio(&self, journal: &mut Journal<DeviceRecord>, bdf: &str, group: u32) -> Result<(), SriovError> {
        let sysfs = &self.host.sysfs;
        journal.record.phase = Phase::Binding;
        journal.save()?;
        if sysfs.driver(bdf).map_err(self.sysfs())?.as_deref() != Some(VFIO_PCI) {
            // The override first, so that nothing else can grab the device once it is unbound.
            sysfs.set_driver_override(bdf, Some(VFIO_PCI)).map_err(self.sysfs())?;
            sysfs.unbind(bdf).map_err(self.sysfs())?;
            sysfs.probe(bdf).map_err(self.sysfs())?;
            let driver = sysfs.driver(bdf).map_err(self.sysfs())?;
            if driver.as_deref() != Some(VFIO_PCI) {
                return Err(self.sysfs()(SysfsError::NotOnVfio { bdf: bdf.to_string(), driver }));
            }
        }
        sysfs.wait_vfio_node(group, bdf).map_err(self.sysfs())?;
        journal.record.phase = Phase::Bound;
        journal.save()?;
        Ok(())
    }

    /// Makes sure VF `spec.index` exists, creating `want` VFs on a PF that has none if allowed.
    fn ensure_vfs(&self, spec: &VfSpec, origin: &VfOrigin, want: u32) -> Result<(), SriovError> {
        let sysfs = &self.host.sysfs;
        let (dev, pf, index) = (self.dev.clone(), spec.pf.clone(), spec.index);
        let Some(total) = sysfs.sriov_totalvfs(&origin.pf_bdf).map_err(self.sysfs())? else {
            return Err(SriovError::NotSriov { dev, pf, pf_bdf: origin.pf_bdf.clone() });
        };
        if index >= total {
            return Err(SriovError::NoSuchIndex { dev, pf, index, total });
        }
        let numvfs = sysfs.sriov_numvfs(&origin.pf_bdf).map_err(self.sysfs())?;
        if index < numvfs {
            return Ok(());
        }
        if !spec.create {
            return Err(SriovError::TooFewVfs { dev, pf, index, numvfs });
        }
        if numvfs != 0 {
            // Resizing means going through 0, which pulls every VF from whoever uses it.
            return Err(SriovError::WontResize { dev, pf, index, numvfs });
        }
        self.create_vfs(origin, want.max(index + 1).min(total))
    }

    fn create_vfs(&self, origin: &VfOrigin, count: u32) -> Result<(), SriovError> {
        let sysfs = &self.host.sysfs;
        let path = self.host.runtime_dir.join(state::pf_journal_name(&origin.pf_bdf));
        if path.exists() {
            // Left by a tandem that died before removing its VFs (they are gone: numvfs is 0).
            // Finish its restore so that the autoprobe recorded below is the host's own. (None:
            // a claim cut short, now deleted, which had changed nothing.)
            if let Some(stale) = Journal::load(path.clone())? {
                restore_pf_journal(self.host, stale)?;
            }
        }
        let record = PfRecord {
            owner: Owner::current()?,
            phase: PfPhase::Claimed,
            pf: origin.pf.clone(),
            pf_bdf: origin.pf_bdf.clone(),
            autoprobe: sysfs.sriov_autoprobe(&origin.pf_bdf).map_err(self.sysfs())?,
            numvfs: count,
        };
        let mut pf = Journal::claim(path.clone(), record)?
            .ok_or_else(|| JournalError::Write { path, source: std::io::ErrorKind::AlreadyExists.into() })?;
        pf.record.phase = PfPhase::Autoprobe;
        pf.save()?;
        // New VFs stay unbound: a host driver probing them while the PF re-initialises can
        // wedge them, and they are going to vfio-pci anyway.
        if pf.record.autoprobe {
            sysfs.set_sriov_autoprobe(&origin.pf_bdf, false).map_err(self.sysfs())?;
        }
        pf.record.phase = PfPhase::NumVfs;
        pf.save()?;
        sysfs.set_sriov_numvfs(&origin.pf_bdf, count).map_err(self.sysfs())?;
        pf.record.phase = PfPhase::Created;
        pf.save()?;
        Ok(())
    }

    fn setup_vf(&self, spec: &VfSpec, want: u32, journal: &mut Journal<DeviceRecord>) -> Result<Taken, SriovError> {
        let sysfs = &self.host.sysfs;
        let Some(origin) = journal.record.vf.clone() else {
            return Err(JournalError::Corrupt { path: journal.path().into(), reason: "no pf=".into() }.into());
        };
        self.ensure_vfs(spec, &origin, want)?;
        let bdf = sysfs
            .virtfn(&origin.pf_bdf, spec.index)
            .map_err(self.sysfs())?
            .ok_or_else(|| SriovError::MissingVf { dev: self.dev.clone(), pf: spec.pf.clone(), index: spec.index })?;
        self.refuse_other_claims(&bdf, journal.path())?;
        let group = self.record_device(journal, &bdf)?;
        // Journaled even when the spec changes nothing: the guest can set its VF's MAC through
        // the VF->PF mailbox (where the PF has not fixed one, or with trust on), and some PF
        // drivers keep it across the VF's reset, so a restore puts back whatever differs from
        // this. A PF that cannot report it matters only when the spec has settings to make.
        let original = match self.host.netlink.vf_config(origin.pf_ifindex, spec.index) {
            Ok(original) => Some(original),
            Err(e) if spec.wants_netlink() => return Err(self.netlink(&spec.pf)(e)),
            Err(_) => None,
        };
        journal.record.original = original;
        let target = original.filter(|_| spec.wants_netlink()).map(|original| (original, wanted(spec, original)));
        journal.record.phase = Phase::Recorded;
        journal.save()?;
        self.check_ready(&bdf, group)?;

        // Before the binding, so that the guest's driver probes with the settings in place.
        if let Some((original, target)) = target {
            for attr in VfAttr::ALL {
                if !attr.differs(&original, &target) {
                    continue;
                }
                journal.record.changed.push(attr);
                journal.record.phase = Phase::Netlink;
                journal.save()?;
                attr.apply(&*self.host.netlink, origin.pf_ifindex, spec.index, &target)
                    .map_err(self.netlink(&spec.pf))?;
            }
        }
        self.bind_vfio(journal, &bdf, group)?;

        let mut warnings = Vec::new();
        if sysfs.admin_up(&spec.pf) == Some(false) {
            warnings.push(format!(
                "{}: {} is down: the guest's VF driver waits for the PF (igbvf says \"PF still in reset \
                 state\") until it is up: `ip link set {} up`",
                self.dev, spec.pf, spec.pf
            ));
        }
        Ok(Taken { bdf, group, warnings })
    }

    fn setup_device(&self, journal: &mut Journal<DeviceRecord>, bdf: &str) -> Result<Taken, SriovError> {
        self.refuse_other_claims(bdf, journal.path())?;
        let group = self.record_device(journal, bdf)?;
        journal.record.phase = Phase::Recorded;
        journal.save()?;
        self.check_ready(bdf, group)?;
        self.bind_vfio(journal, bdf, group)?;
        Ok(Taken { bdf: bdf.to_string(), group, warnings: Vec::new() })
    }

    /// Runs a set-up on a claimed journal; on failure, undoes what it did before returning the error.
    fn finish(
        &self,
        mut journal: Journal<DeviceRecord>,
        setup: impl FnOnce(&mut Journal<DeviceRecord>) -> Result<Taken, SriovError>,
    ) -> Result<(Lease, Taken), SriovError> {
        match setup(&mut journal) {
            Ok(taken) => Ok((Lease { host: self.host.clone(), journal: Some(journal) }, taken)),
            Err(error) => match restore_journal(self.host, journal) {
                Ok(_) => Err(error),
                Err(restore) => Err(SriovError::AndRestore { error: Box::new(error), restore: Box::new(restore) }),
            },
        }
    }
}

/// The VF's settings with the ones `spec` asks for.
fn wanted(spec: &VfSpec, original: VfConfig) -> VfConfig {
    let mut target = original;
    if let Some(mac) = spec.mac {
        target.mac = mac;
    }
    if let Some(vlan) = spec.vlan {
        (target.vlan, target.qos) = (vlan, 0);
    }
    target.spoofchk = spec.spoofchk.unwrap_or(original.spoofchk);
    target.trust = spec.trust.unwrap_or(original.trust);
    target
}

/// A host PCI device on vfio-pci, as both kinds of lease hold it.
#[derive(Debug)]
pub struct HeldDevice {
    lease: Lease,
    id: String,
    taken: Taken,
    sysfs_path: PathBuf,
}

impl HeldDevice {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &str {
        &self.taken.bdf
    }

    /// Its IOMMU group; `/dev/vfio/<group>` exists.
    pub fn group(&self) -> u32 {
        self.taken.group
    }

    /// The directory VFIO opens the device by.
    pub fn sysfs_path(&self) -> &Path {
        &self.sysfs_path
    }

    /// Things worth telling the user that did not stop the lease (the PF's link is down, …).
    pub fn warnings(&self) -> &[String] {
        &self.taken.warnings
    }

    /// Puts the device back (see the lease types); returns what could not be restored
    /// exactly but needs no retry.
    fn release(mut self) -> Result<Vec<String>, SriovError> {
        self.lease.release()
    }
}

/// A VF of an SR-IOV NIC, on vfio-pci with its MAC, VLAN and flags set on the PF, until
/// released or dropped.
///
/// Release it only after the VFIO device and container are closed: vfio-pci blocks an unbind
/// (and the PF a VF removal) while a process holds the device.
#[derive(Debug)]
pub struct VfLease(HeldDevice, VfSpec);

impl std::ops::Deref for VfLease {
    type Target = HeldDevice;
    fn deref(&self) -> &HeldDevice {
        &self.0
    }
}

impl VfLease {
    /// Takes one VF, creating `index + 1` VFs on a PF that has none when `spec.create`.
    pub fn acquire(spec: &VfSpec, host: &Host) -> Result<Self, SriovError> {
        Self::take(spec, host, spec.index.saturating_add(1))
    }

    /// Takes several VFs; with `create=on`, the PF gets as many VFs as the highest index among
    /// them needs, in one go (a PF cannot grow without dropping the VFs it has). On failure,
    /// those already taken are put back.
    pub fn acquire_all(specs: &[VfSpec], host: &Host) -> Result<Vec<Self>, SriovError> {
        specs
            .iter()
            .map(|spec| {
                let want =
                    specs.iter().filter(|s| s.pf == spec.pf).map(|s| s.index.saturating_add(1)).max().unwrap_or(1);
                Self::take(spec, host, want)
            })
            .collect()
    }

    fn take(spec: &VfSpec, host: &Host, want: u32) -> Result<Self, SriovError> {
        let ctx = Ctx::vf(host, spec);
        let _lock = RuntimeLock::take(&host.runtime_dir)?;
        let pf_bdf = host.sysfs.netdev_bdf(&spec.pf).map_err(ctx.sysfs())?;
        let pf_ifindex = host.sysfs.ifindex(&spec.pf).map_err(ctx.sysfs())?;
        let record = DeviceRecord {
            owner: Owner::current()?,
            phase: Phase::Claimed,
            id: spec.id.clone(),
            vf: Some(VfOrigin { pf: spec.pf.clone(), pf_bdf: pf_bdf.clone(), pf_ifindex, index: spec.index }),
            bdf: None,
            group: None,
            driver: None,
            driver_override: None,
            original: None,
            changed: Vec::new(),
        };
        let journal = ctx.claim(host.runtime_dir.join(state::vf_journal_name(&pf_bdf, spec.index)), record)?;
        let (lease, taken) = ctx.finish(journal, |j| ctx.setup_vf(spec, want, j))?;
        let sysfs_path = host.sysfs.device_path(&taken.bdf);
        Ok(Self(HeldDevice { lease, id: spec.id.clone(), taken, sysfs_path }, spec.clone()))
    }

    /// Whether the PF has this VF now (a PF that removed its VFs has none until they are
    /// made again).
    pub fn vf_present(&self) -> bool {
        let (host, spec) = (&self.0.lease.host, &self.1);
        let Ok(pf_bdf) = host.sysfs.netdev_bdf(&spec.pf) else { return false };
        matches!(host.sysfs.virtfn(&pf_bdf, spec.index), Ok(Some(_)))
    }

    /// Takes the VF again after the host removed it and made it anew (its PF's VFs
    /// re-created): the same steps as at the start on the new device, its state recorded
    /// afresh, since that is what the host now has and gets back at the end. On failure
    /// the lease is released (the new VF restored) and the error returned; the next
    /// retake starts from scratch.
    pub fn retake(&mut self) -> Result<(), SriovError> {
        // Never makes VFs: the PF's VFs are the host's now (and a PF journal of Tandem's
        // own, from create=on, still says how to undo the first making).
        let (host, spec) = (self.0.lease.host.clone(), VfSpec { create: false, ..self.1.clone() });
        if self.0.lease.journal.is_none() {
            // An earlier retake failed and gave everything back: a lease from scratch.
            *self = Self::take(&spec, &host, spec.index.saturating_add(1))?;
            return Ok(());
        }
        let ctx = Ctx::vf(&host, &spec);
        let _lock = RuntimeLock::take(&host.runtime_dir)?;
        let Some(mut journal) = self.0.lease.journal.take() else {
            return Err(SriovError::NoVfSettings { dev: self.0.id.clone() });
        };
        let record = &mut journal.record;
        (record.phase, record.bdf, record.group) = (Phase::Claimed, None, None);
        (record.driver, record.driver_override, record.original) = (None, None, None);
        record.changed.clear();
        journal.save()?;
        let (lease, taken) = ctx.finish(journal, |j| ctx.setup_vf(&spec, spec.index.saturating_add(1), j))?;
        self.0.sysfs_path = host.sysfs.device_path(&taken.bdf);
        (self.0.lease, self.0.taken) = (lease, taken);
        Ok(())
    }

    /// Sets the VF's MAC on the PF while leased: all zeroes makes the PF's switch stop
    /// steering the guest's frames to the VF (a failover VF out of the guest). The
    /// release puts the original MAC back, as for any setting that differs from it.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), SriovError> {
        let record = self.0.lease.journal.as_ref().map(|j| &j.record);
        let (Some(vf), Some(_original)) = (record.and_then(|r| r.vf.as_ref()), record.and_then(|r| r.original)) else {
            return Err(SriovError::NoVfSettings { dev: self.0.id.clone() });
        };
        let host = &self.0.lease.host;
        host.netlink.set_mac(vf.pf_ifindex, vf.index, mac).map_err(|source| SriovError::Netlink {
            dev: self.0.id.clone(),
            pf: vf.pf.clone(),
            source,
        })
    }

    /// The PF's interface name and this VF's index on it.
    pub fn pf(&self) -> Option<(&str, u32)> {
        let vf = self.0.lease.journal.as_ref()?.record.vf.as_ref()?;
        Some((vf.pf.as_str(), vf.index))
    }

    /// Puts the VF back: settings, driver, and the PF's VF count if Tandem created them and no
    /// other lease uses them. Returns what could not be restored exactly but needs no retry.
    pub fn release(self) -> Result<Vec<String>, SriovError> {
        self.0.release()
    }
}

/// Any PCI device on vfio-pci until released or dropped; see [`VfLease`] for the order.
#[derive(Debug)]
pub struct DeviceLease(HeldDevice);

impl std::ops::Deref for DeviceLease {
    type Target = HeldDevice;
    fn deref(&self) -> &HeldDevice {
        &self.0
    }
}

impl DeviceLease {
    pub fn acquire(spec: &DeviceSpec, host: &Host) -> Result<Self, SriovError> {
        let ctx = Ctx { host, dev: format!("{} ({})", spec.id, spec.bdf) };
        let _lock = RuntimeLock::take(&host.runtime_dir)?;
        host.sysfs.require_device(&spec.bdf).map_err(ctx.sysfs())?;
        let record = DeviceRecord {
            owner: Owner::current()?,
            phase: Phase::Claimed,
            id: spec.id.clone(),
            vf: None,
            bdf: Some(spec.bdf.clone()),
            group: None,
            driver: None,
            driver_override: None,
            original: None,
            changed: Vec::new(),
        };
        let journal = ctx.claim(host.runtime_dir.join(state::device_journal_name(&spec.bdf)), record)?;
        let (lease, taken) = ctx.finish(journal, |j| ctx.setup_device(j, &spec.bdf))?;
        let sysfs_path = host.sysfs.device_path(&taken.bdf);
        Ok(Self(HeldDevice { lease, id: spec.id.clone(), taken, sysfs_path }))
    }

    /// Puts the device back on its original driver (or leaves it unbound if it had none).
    pub fn release(self) -> Result<Vec<String>, SriovError> {
        self.0.release()
    }
}
