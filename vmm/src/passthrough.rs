//! Host devices moving into and out of a running guest: the control socket's
//! `device-add` / `device-remove` and the failover pairs' own moves (see [`crate::failover`])
//! all go through [`Passthrough`], which owns the order of the steps: the host-side
//! switch of a failover pair's traffic, the guest's ACPI hot-plug, VFIO, and the lease
//! that puts the device back on the host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::device_manager::{DeviceManager, DeviceStats, DriverReady, Removal};
use crate::failover::{Cause, FailoverEvent, FailoverEvents, FailoverPair, PairState, Switch};
use crate::sriov::{DeviceLease, DeviceSpec, Host, Leases, SriovError, VfLease, VfSpec};
use devices::Notices;

/// How long the guest gets to give a device back before Tandem takes it anyway.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    #[error("{0}")]
    NotFound(String),
    /// The request is fine but the VM's state refuses it (in use, held back, present).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Failed(String),
}

/// What `device-add` asks for.
#[derive(Debug, Clone)]
pub enum AddRequest {
    Vf(VfSpec),
    Device(DeviceSpec),
    /// A failover VF Tandem holds out of the guest (removed earlier, or its PF was down).
    Parked(String),
}

/// A device the guest got, for the caller to report.
#[derive(Debug, Clone)]
pub struct Plugged {
    pub id: String,
    pub bdf: String,
    pub slot: u8,
}

/// The NICs of the VM a runtime-added failover VF may pair with: (id, tap, MAC, standby).
#[derive(Debug, Clone)]
pub struct NicInfo {
    pub id: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub standby: bool,
}

pub struct Passthrough {
    devices: Arc<Mutex<DeviceManager>>,
    leases: Arc<Mutex<Leases>>,
    host: Host,
    pairs: Vec<FailoverPair>,
    nics: Vec<NicInfo>,
    switch: Switch,
    events: Arc<FailoverEvents>,
    eject_timeout: Duration,
    notices: Notices,
}

impl Passthrough {
    pub fn new(
        devices: Arc<Mutex<DeviceManager>>,
        leases: Arc<Mutex<Leases>>,
        pairs: Vec<FailoverPair>,
        nics: Vec<NicInfo>,
        switch: Switch,
        events: Arc<FailoverEvents>,
        host: Host,
    ) -> Self {
        let notices = host.notices.clone();
        Self { devices, leases, host, pairs, nics, switch, events, eject_timeout: EJECT_TIMEOUT, notices }
    }

    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    pub fn devices(&self) -> &Arc<Mutex<DeviceManager>> {
        &self.devices
    }

    pub fn pairs(&self) -> &[FailoverPair] {
        &self.pairs
    }

    fn dm(&self) -> std::sync::MutexGuard<'_, DeviceManager> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_bus(&self, id: &str) -> bool {
        self.dm().pci_devices().iter().any(|e| e.id == id)
    }

    fn pair_index(&self, vf: &str) -> Option<usize> {
        self.pairs.iter().position(|p| p.vf == vf)
    }

    fn known_ids(&self) -> String {
        let mut ids: Vec<String> = self.dm().pci_devices().iter().map(|e| e.id.clone()).collect();
        ids.extend(
            self.pairs.iter().filter(|p| p.state != PairState::Plugged).map(|p| format!("{} ({})", p.vf, p.state)),
        );
        ids.join(", ")
    }

    /// Plugs a new device or a parked failover VF into the running guest.
    pub fn add(&mut self, request: AddRequest) -> Result<Plugged, PlugError> {
        match request {
            AddRequest::Parked(id) => {
                let Some(i) = self.pair_index(&id) else {
                    return Err(PlugError::NotFound(format!(
                        "no device {id:?} is held out of the guest; held now: {}; to add a new one give vf=SPEC or \
                         device=SPEC",
                        self.pairs
                            .iter()
                            .filter(|p| p.state != PairState::Plugged)
                            .map(|p| p.vf.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                };
                match self.pairs[i].state {
                    PairState::Parked(Cause::Host) => {
                        // The host has had the VF since: take it from whatever it is on now.
                        self.retake(i)?;
                        self.plug_pair(i)
                    }
                    PairState::Plugged => Err(PlugError::Conflict(format!("{id} is in the guest already"))),
                    PairState::Held => Err(PlugError::Conflict(format!(
                        "{id} is held back until the guest's driver of {} negotiates VIRTIO_NET_F_STANDBY (its \
                         net_failover has not claimed the standby yet); it is plugged then, by itself",
                        self.pairs[i].net
                    ))),
                    PairState::Parked(_) => self.plug_pair(i),
                }
            }
            AddRequest::Vf(spec) => {
                self.check_new_id(&spec.id)?;
                let spec = self.pair_spec(spec)?;
                let lease = VfLease::acquire(&spec, &self.host).map_err(lease_error)?;
                if let Some(net) = &spec.failover {
                    let pair = self.new_pair(&spec, net, &lease)?;
                    for w in lease.warnings() {
                        self.notices.warn(format_args!("{}: {w}", spec.id));
                    }
                    self.leases().vfs.push(lease);
                    self.pairs.push(pair);
                    let i = self.pairs.len() - 1;
                    return self.plug_pair(i);
                }
                let sysfs = lease.sysfs_path().to_path_buf();
                self.leases().vfs.push(lease);
                self.plug_leased(&spec.id, &sysfs, None)
            }
            AddRequest::Device(spec) => {
                self.check_new_id(&spec.id)?;
                let lease = DeviceLease::acquire(&spec, &self.host).map_err(lease_error)?;
                let sysfs = lease.sysfs_path().to_path_buf();
                self.leases().devices.push(lease);
                self.plug_leased(&spec.id, &sysfs, None)
            }
        }
    }

    fn check_new_id(&self, id: &str) -> Result<(), PlugError> {
        if self.on_bus(id) || self.pair_index(id).is_some() {
            return Err(PlugError::Conflict(format!(
                "the VM already has a device {id:?}: give the new one another id="
            )));
        }
        Ok(())
    }

    /// A runtime `vf=...,failover=NET` takes the standby's MAC, as at start.
    fn pair_spec(&self, mut spec: VfSpec) -> Result<VfSpec, PlugError> {
        let Some(net) = &spec.failover else { return Ok(spec) };
        let Some(nic) = self.nics.iter().find(|n| &n.id == net) else {
            return Err(PlugError::BadRequest(format!(
                "failover={net}: the VM has no --net with id {net}; its NICs: {}",
                self.nics.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ")
            )));
        };
        if !nic.standby {
            return Err(PlugError::BadRequest(format!(
                "failover={net}: {net} was started without standby=on, so the guest has no failover master for it"
            )));
        }
        if self.pairs.iter().any(|p| &p.net == net) {
            return Err(PlugError::Conflict(format!("{net} is already the standby of another VF")));
        }
        match (spec.mac, nic.mac) {
            (Some(a), Some(b)) if a != b => {
                return Err(PlugError::BadRequest(format!("mac= differs from {net}'s: a failover pair shares one MAC")))
            }
            (_, Some(mac)) => spec.mac = Some(mac),
            (_, None) => {}
        }
        Ok(spec)
    }

    fn new_pair(&self, spec: &VfSpec, net: &str, lease: &VfLease) -> Result<FailoverPair, PlugError> {
        let nic = self.nics.iter().find(|n| n.id == net);
        let (Some(nic), Some(mac), Some((pf, _))) = (nic, spec.mac, lease.pf()) else {
            return Err(PlugError::Failed(format!("{}: failover pair with {net} is incomplete", spec.id)));
        };
        let mut pair = FailoverPair::new(&spec.id, net, &nic.tap, pf, mac, spec.auto_failover());
        // Its standby is running already (a VF is added to a booted guest).
        pair.standby_seen = true;
        pair.state = PairState::Parked(Cause::User);
        Ok(pair)
    }

    /// Puts a leased host device on the bus and tells the guest; gives the lease back on
    /// failure.
    fn plug_leased(
        &mut self,
        id: &str,
        sysfs: &std::path::Path,
        ready: Option<DriverReady>,
    ) -> Result<Plugged, PlugError> {
        let added = {
            let mut dm = self.dm();
            dm.add_passthrough(id, sysfs, ready).and_then(|r| dm.announce(id, r.slot).map(|()| r))
        };
        match added {
            Ok(r) => {
                if let Some(fd) = r.request {
                    self.events.send(FailoverEvent::WatchRequest(id.to_string(), fd));
                }
                Ok(Plugged { id: id.to_string(), bdf: r.bdf, slot: r.slot })
            }
            Err(e) => {
                // Never announced: off the bus again without asking the guest.
                self.dm().discard_pci_device(id);
                self.events.send(FailoverEvent::Unwatch(id.to_string()));
                if self.pair_index(id).is_none() {
                    if let Some(Err(r)) = self.leases().release(id) {
                        self.notices.warn(format_args!("{id}: {r}"));
                    }
                }
                Err(PlugError::Failed(format!("{id}: {e}")))
            }
        }
    }

    /// Plugs the VF of pair `i`: its MAC back on the PF first (the guest's driver reads
    /// it when it probes), then the device; once that driver turns its interrupts on,
    /// the host steers the guest's frames to the VF again.
    fn plug_pair(&mut self, i: usize) -> Result<Plugged, PlugError> {
        let (id, mac) = (self.pairs[i].vf.clone(), self.pairs[i].mac);
        let sysfs = {
            let leases = self.leases();
            let lease =
                leases.vfs.iter().find(|l| l.id() == id).ok_or_else(|| PlugError::Failed(format!("{id}: no lease")))?;
            lease.set_mac(mac).map_err(|e| PlugError::Failed(e.to_string()))?;
            lease.sysfs_path().to_path_buf()
        };
        let events = self.events.clone();
        let ready_id = id.clone();
        let ready: DriverReady = Arc::new(move || events.send(FailoverEvent::VfReady(ready_id.clone())));
        let plugged = match self.plug_leased(&id, &sysfs, Some(ready)) {
            Ok(p) => p,
            Err(e) => {
                if let Some(lease) = self.leases().vfs.iter().find(|l| l.id() == id) {
                    let _ = lease.set_mac([0; 6]);
                }
                return Err(e);
            }
        };
        self.pairs[i].state = PairState::Plugged;
        self.notices.info(format_args!(
            "{id}: plugged into the guest at 00:{:02x}.0 (failover primary of {})",
            plugged.slot, self.pairs[i].net
        ));
        Ok(plugged)
    }

    /// Takes device `id` out of the running guest. A failover VF stays leased, parked
    /// with its traffic moved to the standby; any other host device goes back to the host.
    pub fn remove(&mut self, id: &str, cause: Cause) -> Result<Removal, PlugError> {
        let removed = self.take_out(id, cause);
        if removed.is_ok() {
            self.events.send(FailoverEvent::Unwatch(id.to_string()));
        }
        removed
    }

    fn take_out(&mut self, id: &str, cause: Cause) -> Result<Removal, PlugError> {
        if !self.on_bus(id) {
            let held = self.pair_index(id).map(|i| &self.pairs[i]);
            return Err(match held {
                Some(p) => {
                    PlugError::Conflict(format!("{id} is not in the guest now ({}): nothing to remove", p.state))
                }
                None => PlugError::NotFound(format!("no device {id:?}; the VM has: {}", self.known_ids())),
            });
        }
        let Some(i) = self.pair_index(id) else {
            let (removal, stats) = self
                .dm()
                .remove_pci_device(id, self.eject_timeout, || {})
                .map_err(|e| PlugError::Failed(format!("removing {id}: {e}")))?;
            if let DeviceStats::Passthrough { .. } = stats {
                // The device is closed (VFIO released it): the host gets it back now.
                match self.leases().release(id) {
                    Some(Ok(warnings)) => warnings.iter().for_each(|w| self.notices.warn(format_args!("{id}: {w}"))),
                    Some(Err(e)) => {
                        return Err(PlugError::Failed(format!(
                            "{id} left the guest, but restoring it on the host failed: {e}; run `tandem cleanup`"
                        )))
                    }
                    None => {}
                }
            }
            return Ok(removal);
        };
        let pair = self.pairs[i].clone();
        // Frames for the guest go to the standby's tap before the guest lets go of the VF:
        // the guest takes them there as soon as its failover master has dropped the VF.
        self.switch.to_standby(&pair);
        let (leases, notices) = (self.leases.clone(), self.notices.clone());
        let (removal, _) = self
            .dm()
            .remove_pci_device(id, self.eject_timeout, || {
                // The guest's VF driver stopped: the PF's switch stops steering the MAC to
                // the VF, and the guest's frames reach it over the standby from now on.
                let leases = leases.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(lease) = leases.vfs.iter().find(|l| l.id() == pair.vf) {
                    if let Err(e) = lease.set_mac([0; 6]) {
                        notices.warn(format_args!("{}: cannot clear its MAC on the PF: {e}", pair.vf));
                    }
                }
            })
            .map_err(|e| PlugError::Failed(format!("removing {id}: {e}")))?;
        self.pairs[i].state = PairState::Parked(cause);
        Ok(removal)
    }

    /// The host asked for device `id` back (VFIO's request interrupt: an unbind, or its PF
    /// removing its VFs, which waits until Tandem closes the device): out of the guest,
    /// a failover VF's traffic moved to its standby first.
    pub fn host_request(&mut self, id: &str) {
        if !self.on_bus(id) {
            return;
        }
        let what = if self.pair_index(id).is_some() { "moving the guest's traffic to the standby and " } else { "" };
        self.notices.info(format_args!(
            "{id}: the host wants the device back (an unbind or a VF removal): {what}unplugging it"
        ));
        if let Some(i) = self.pair_index(id) {
            self.pairs[i].host_vf_gone = None;
        }
        match self.remove(id, Cause::Host) {
            Ok(r) => self.notices.info(format_args!("{id}: unplugged and closed for the host ({})", removal_text(&r))),
            Err(e) => self.notices.warn(format_args!("{id}: unplugging it for the host failed: {e}")),
        }
    }

    /// Whether a passthrough device has traffic counters to keep up to date.
    pub fn has_vf_traffic(&self) -> bool {
        self.dm().has_vf_traffic()
    }

    /// Brings the passthrough devices' traffic counters up to date.
    pub fn sample_vf_traffic(&self) {
        self.dm().sample_vf_traffic();
    }

    /// Whether an auto pair waits for the host to give its VF back.
    pub fn awaits_host_vf(&self) -> bool {
        self.pairs.iter().any(|p| p.auto && p.state == PairState::Parked(Cause::Host))
    }

    /// Auto pairs whose VF the host took: once the VF has gone from its PF and is back
    /// (on two looks in a row, so that the host has finished making it), with the PF's
    /// link up, it is taken again and plugged. A VF that never went (unbound by hand)
    /// stays the host's until `device-add`.
    pub fn host_vfs_check(&mut self) {
        for i in 0..self.pairs.len() {
            let (vf, pf) = (self.pairs[i].vf.clone(), self.pairs[i].pf.clone());
            if !self.pairs[i].auto || self.pairs[i].state != PairState::Parked(Cause::Host) {
                continue;
            }
            let present = self.leases().vfs.iter().find(|l| l.id() == vf).is_some_and(|l| l.vf_present());
            let gone = &mut self.pairs[i].host_vf_gone;
            if !present {
                if gone.is_none() {
                    self.notices
                        .info(format_args!("{vf}: gone from {pf}; plugged back by itself when {pf} has it again"));
                }
                *gone = Some(0);
                continue;
            }
            let Some(back) = gone.as_mut() else { continue };
            *back = back.saturating_add(1);
            if *back < 2 || !self.pf_has_link(&pf) {
                continue;
            }
            self.notices.info(format_args!("{vf}: {pf} has the VF again: taking it and plugging it back"));
            let back = self.retake(i).and_then(|()| self.plug_pair(i));
            if let Err(e) = back {
                // Not again by itself until the VF goes and comes back once more.
                self.pairs[i].host_vf_gone = None;
                self.notices
                    .warn(format_args!("{vf}: cannot plug it back: {e}; `tandem ctl device-add {vf}` tries again"));
            }
        }
    }

    /// Takes pair `i`'s VF from the host again (see [`VfLease::retake`]).
    fn retake(&mut self, i: usize) -> Result<(), PlugError> {
        let id = self.pairs[i].vf.clone();
        let retaken = self.leases().vfs.iter_mut().find(|l| l.id() == id).map(|l| l.retake());
        match retaken {
            Some(Ok(())) => {
                self.pairs[i].host_vf_gone = None;
                Ok(())
            }
            Some(Err(e)) => Err(PlugError::Failed(format!("{id}: taking the VF from the host again: {e}"))),
            None => Err(PlugError::Failed(format!("{id}: no lease"))),
        }
    }

    /// The guest's driver of NIC `net` negotiated STANDBY: plug the VF held back for it.
    pub fn standby_negotiated(&mut self, net: &str) {
        let Some(i) = self.pairs.iter().position(|p| p.net == net) else { return };
        self.pairs[i].standby_seen = true;
        if self.pairs[i].state == PairState::Held {
            let vf = self.pairs[i].vf.clone();
            if self.pairs[i].auto && !self.pf_has_link(&self.pairs[i].pf) {
                self.notices.info(format_args!(
                    "{vf}: the guest negotiated STANDBY on {net}, but {} has no link: the VF waits for it",
                    self.pairs[i].pf
                ));
                self.pairs[i].state = PairState::Parked(Cause::Link);
                return;
            }
            self.notices.info(format_args!("{vf}: the guest negotiated STANDBY on {net}: plugging the VF"));
            if let Err(e) = self.plug_pair(i) {
                self.notices.warn(format_args!("{vf}: cannot plug it: {e}; `tandem ctl device-add {vf}` retries"));
                self.pairs[i].state = PairState::Parked(Cause::User);
            }
        }
    }

    /// Whether `pf` has its link (unknown counts as yes: the link watch corrects it).
    fn pf_has_link(&self, pf: &str) -> bool {
        let Ok(ifindex) = self.host.sysfs.ifindex(pf) else { return true };
        crate::sriov::linkwatch::link_state(ifindex).map_or(true, |e| e.up)
    }

    /// The guest's VF driver is up: the host sends its frames to the VF again.
    pub fn vf_ready(&mut self, vf: &str) {
        if let Some(pair) = self.pairs.iter().find(|p| p.vf == vf && p.state == PairState::Plugged) {
            self.switch.to_primary(pair);
        }
    }

    /// The link of PF `pf` went down or came back: move its auto pairs' VFs out or in.
    pub fn pf_link(&mut self, pf: &str, up: bool) {
        for i in 0..self.pairs.len() {
            let p = &self.pairs[i];
            if p.pf != pf || !p.auto {
                continue;
            }
            let vf = p.vf.clone();
            match (up, p.state) {
                (false, PairState::Plugged) => {
                    self.notices.info(format_args!(
                        "{vf}: {pf} lost its link: moving the guest's traffic to {} and unplugging the VF",
                        p.net
                    ));
                    match self.remove(&vf, Cause::Link) {
                        Ok(r) => self.notices.info(format_args!("{vf}: unplugged ({})", removal_text(&r))),
                        Err(e) => self.notices.warn(format_args!("{vf}: automatic unplug failed: {e}")),
                    }
                }
                (true, PairState::Parked(Cause::Link)) => {
                    self.notices.info(format_args!("{vf}: {pf} has its link again: plugging the VF back"));
                    if let Err(e) = self.plug_pair(i) {
                        self.notices.warn(format_args!("{vf}: automatic re-plug failed: {e}"));
                    }
                }
                _ => {}
            }
        }
    }
}

pub fn removal_text(r: &Removal) -> String {
    match r {
        Removal::Ejected { waited, stopped: Some(stopped) } => format!(
            "its driver stopped after {} ms, the guest gave it back in {} ms",
            stopped.as_millis(),
            waited.as_millis()
        ),
        Removal::Ejected { waited, stopped: None } => format!("the guest gave it back in {} ms", waited.as_millis()),
        Removal::Forced { waited } => {
            format!("the guest did not give it back within {} ms; removed anyway", waited.as_millis())
        }
    }
}

fn lease_error(e: SriovError) -> PlugError {
    match e {
        SriovError::InUse { .. } => PlugError::Conflict(e.to_string()),
        other => PlugError::Failed(other.to_string()),
    }
}
