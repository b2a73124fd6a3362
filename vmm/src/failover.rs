//! Failover pairs: a VF (the guest's fast path) and a virtio-net standby with the same
//! MAC, which the guest's net_failover drives as one NIC. Tandem keeps the pair's host
//! side consistent with what is in the guest:
//!
//! - the VF is held back until the guest's virtio-net driver negotiates STANDBY (a
//!   guest without net_failover would see two unrelated NICs with one MAC), then
//!   hot-plugged;
//! - when the VF leaves (`device-remove`, or its PF lost its link), the guest's frames
//!   are steered to the standby first — the bridge entry of the MAC moved to the tap —
//!   and the VF's MAC is cleared on the PF as soon as the guest's VF driver has stopped
//!   (it frees its interrupts), not only at the eject, which waits for the PCI teardown;
//! - when it comes back, its MAC is restored before the guest probes it, and the bridge
//!   entry moves back only once the guest's VF driver turns its interrupts on, i.e. can
//!   receive: until then the standby keeps carrying the traffic.
//!
//! Everything that changes the pair runs on one worker thread, in
//! [`crate::passthrough::Passthrough`]: vCPU threads post [`FailoverEvent`]s, and a
//! [`VmHandle`](crate::VmHandle)'s device-add and device-remove run there as jobs, so that
//! all host-device work is done under one seccomp filter (`ThreadKind::HostDevices`)
//! and the control socket's thread needs none of it.

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Notices;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::passthrough::Passthrough;
use crate::sriov::bridge::{bridge_port, Fdb};
use crate::sriov::linkwatch::LinkWatch;

/// Why a failover VF is out of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `device-remove`: it comes back only with `device-add`.
    User,
    /// Its PF lost its link: it comes back by itself when the link does.
    Link,
    /// The host took the VF back (an unbind, or its PF removing its VFs): an auto pair's
    /// VF comes back by itself once the PF has made it again; an unbound one, which the
    /// host still has, only with `device-add`.
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Waiting for the guest to negotiate STANDBY.
    Held,
    Plugged,
    Parked(Cause),
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Held => "held back until the guest negotiates STANDBY",
            Self::Plugged => "plugged",
            Self::Parked(Cause::User) => "parked by device-remove",
            Self::Parked(Cause::Link) => "parked while its PF has no link",
            Self::Parked(Cause::Host) => "given back to the host, which asked for it",
        })
    }
}

impl PairState {
    /// One word for the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Plugged => "plugged",
            Self::Parked(Cause::User) => "parked",
            Self::Parked(Cause::Link) => "parked-link-down",
            Self::Parked(Cause::Host) => "parked-host-took-it",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FailoverPair {
    /// The VF's device id.
    pub vf: String,
    /// The standby NIC's id.
    pub net: String,
    /// The standby's tap.
    pub tap: String,
    /// The VF's PF interface.
    pub pf: String,
    pub mac: [u8; 6],
    /// Follow the PF's link (`auto=on`, the default for a pair).
    pub auto: bool,
    pub state: PairState,
    /// The guest's driver of the standby has negotiated STANDBY at least once.
    pub standby_seen: bool,
    /// Parked for the host: `None` until its VF has gone from the PF, then the looks in a
    /// row that found it back.
    pub host_vf_gone: Option<u8>,
}

impl FailoverPair {
    pub fn new(vf: &str, net: &str, tap: &str, pf: &str, mac: [u8; 6], auto: bool) -> Self {
        Self {
            vf: vf.to_string(),
            net: net.to_string(),
            tap: tap.to_string(),
            pf: pf.to_string(),
            mac,
            auto,
            state: PairState::Held,
            standby_seen: false,
            host_vf_gone: None,
        }
    }
}

/// Host-device work another thread hands the worker, run under the devices' lock.
pub type Job = Box<dyn FnOnce(&mut Passthrough) + Send>;

/// What the worker is told.
pub enum FailoverEvent {
    /// The guest's driver of this NIC negotiated STANDBY and started it.
    Standby(String),
    /// The guest's driver of this VF enabled its first interrupt.
    VfReady(String),
    /// Watch this passthrough device's VFIO request interrupt: the host wants it back.
    WatchRequest(String, Arc<EventFd>),
    /// That device left the bus: stop watching it (and close the worker's end).
    Unwatch(String),
    /// Run this (a device-add or device-remove) here.
    Job(Job),
    Stop,
}

impl std::fmt::Debug for FailoverEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standby(n) => write!(f, "Standby({n})"),
            Self::VfReady(n) => write!(f, "VfReady({n})"),
            Self::WatchRequest(n, _) => write!(f, "WatchRequest({n})"),
            Self::Unwatch(n) => write!(f, "Unwatch({n})"),
            Self::Job(_) => f.write_str("Job"),
            Self::Stop => f.write_str("Stop"),
        }
    }
}

/// The worker's mailbox: a channel and an eventfd that wakes its poll.
pub struct FailoverEvents {
    tx: Mutex<Sender<FailoverEvent>>,
    wake: EventFd,
    /// The worker takes events: from its spawn until its loop ends.
    running: AtomicBool,
}

impl FailoverEvents {
    pub fn new() -> std::io::Result<(Arc<Self>, Receiver<FailoverEvent>)> {
        let (tx, rx) = channel();
        let events = Self { tx: Mutex::new(tx), wake: EventFd::new(EFD_NONBLOCK)?, running: AtomicBool::new(false) };
        Ok((Arc::new(events), rx))
    }

    /// Whether a worker takes the events sent now (a job sent while none does would wait
    /// for one that may never come).
    pub fn worker_running(&self) -> bool {
        self.running.load(Acquire)
    }

    /// Never blocks: callable from a vCPU thread holding a device lock.
    pub fn send(&self, event: FailoverEvent) {
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(event);
        let _ = self.wake.write(1);
    }
}

/// Moves a pair's MAC between the bridge ports of its two paths.
pub struct Switch {
    fdb: Arc<dyn Fdb>,
    sysfs_root: PathBuf,
    notices: Notices,
}

impl Switch {
    pub fn new(fdb: Arc<dyn Fdb>, sysfs_root: impl Into<PathBuf>, notices: Notices) -> Self {
        Self { fdb, sysfs_root: sysfs_root.into(), notices }
    }

    /// The bridge sends the pair's frames to the standby's tap, if the tap is a port of
    /// one (otherwise whatever connects the tap is the user's to steer).
    pub fn to_standby(&self, pair: &FailoverPair) {
        let Some(tap) = bridge_port(&self.sysfs_root, &pair.tap) else { return };
        match self.fdb.point(&tap, pair.mac) {
            Ok(()) => self
                .notices
                .info(format_args!("{}: bridge {} now sends its MAC to {}", pair.vf, tap.bridge, tap.ifname)),
            Err(e) => self
                .notices
                .warn(format_args!("{}: cannot point bridge {} at {}: {e}", pair.vf, tap.bridge, tap.ifname)),
        }
    }

    /// The bridge sends them to the VF's path again: to the PF when it is a port of the
    /// same bridge, else back to learning.
    pub fn to_primary(&self, pair: &FailoverPair) {
        let Some(tap) = bridge_port(&self.sysfs_root, &pair.tap) else { return };
        let pf = bridge_port(&self.sysfs_root, &pair.pf).filter(|p| p.bridge_ifindex == tap.bridge_ifindex);
        let r = match &pf {
            Some(pf) => self.fdb.point(pf, pair.mac),
            None => self.fdb.forget(&tap, pair.mac),
        };
        match r {
            Ok(()) => self.notices.info(format_args!(
                "{}: the guest's VF driver is up; bridge {} sends its MAC to {}",
                pair.vf,
                tap.bridge,
                pf.as_ref().map_or("the port it learns", |p| p.ifname.as_str())
            )),
            Err(e) => {
                self.notices.warn(format_args!("{}: cannot point bridge {} back at the VF: {e}", pair.vf, tap.bridge))
            }
        }
    }
}

/// The thread that acts on [`FailoverEvent`]s and on the PFs' link changes.
pub struct FailoverWorker {
    events: Arc<FailoverEvents>,
    thread: Option<JoinHandle<()>>,
}

impl FailoverWorker {
    /// `pfs` are the PFs whose links the auto pairs follow, by ifindex.
    pub fn spawn(
        passthrough: Arc<Mutex<Passthrough>>,
        events: Arc<FailoverEvents>,
        rx: Receiver<FailoverEvent>,
        pfs: HashMap<u32, String>,
        seccomp: &crate::seccomp::SeccompFilters,
    ) -> std::io::Result<Self> {
        // Opened here so that a host without rtnetlink fails the start, not later.
        let watch = if pfs.is_empty() {
            None
        } else {
            Some(LinkWatch::open().map_err(|e| std::io::Error::other(format!("watching the PFs' links: {e}")))?)
        };
        let wake = events.clone();
        let kind = crate::seccomp::ThreadKind::HostDevices;
        events.running.store(true, Release);
        let spawned = crate::seccomp::spawn("failover", seccomp, kind, move || {
            let running = wake.clone();
            run(passthrough, wake, &rx, watch, pfs);
            // Before `rx` goes, and with it the jobs still queued: their askers then see
            // the worker gone (the VM ending), not a failure.
            running.running.store(false, Release);
            drop(rx);
        });
        match spawned {
            Ok(thread) => Ok(Self { events, thread: Some(thread) }),
            Err(e) => {
                events.running.store(false, Release);
                Err(e)
            }
        }
    }
}

impl Drop for FailoverWorker {
    fn drop(&mut self) {
        self.events.send(FailoverEvent::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a VF's traffic counters are read when nothing else asks: its byte counters
/// wrap at 4 GiB, 34 s at 1 Gb/s.
const TRAFFIC_EVERY: Duration = Duration::from_secs(10);

fn run(
    passthrough: Arc<Mutex<Passthrough>>,
    events: Arc<FailoverEvents>,
    rx: &Receiver<FailoverEvent>,
    mut watch: Option<LinkWatch>,
    pfs: HashMap<u32, String>,
) {
    // The links as last seen: act on changes only (a PF sends many RTM_NEWLINKs). A PF
    // whose state cannot be read counts as up: its first event corrects it.
    let mut up: HashMap<u32, bool> =
        pfs.keys().map(|&i| (i, crate::sriov::linkwatch::link_state(i).map_or(true, |e| e.up))).collect();
    let lock = || passthrough.lock().unwrap_or_else(|e| e.into_inner());
    let notices = lock().notices().clone();
    // Devices whose host may ask for them back. A device off the bus has dropped its
    // end of the eventfd: it is watched no longer.
    let mut requests: Vec<(String, Arc<EventFd>)> = Vec::new();
    let mut sampled = Instant::now();
    loop {
        requests.retain(|(_, fd)| Arc::strong_count(fd) > 1);
        let mut fds = vec![libc::pollfd { fd: events.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(w) = &watch {
            fds.push(libc::pollfd { fd: w.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let first_request = fds.len();
        fds.extend(requests.iter().map(|(_, fd)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // A VF the host took is looked for each second: its return (a PF making its VFs
        // again) sends no event of its own. A VF's traffic counters are read every
        // TRAFFIC_EVERY, well within the time its 32-bit registers take to wrap.
        let (awaits_host, traffic) = {
            let p = lock();
            (p.awaits_host_vf(), p.has_vf_traffic())
        };
        let timeout = match (awaits_host, traffic) {
            (true, _) => 1000,
            (false, true) => TRAFFIC_EVERY.saturating_sub(sampled.elapsed()).as_millis() as i32 + 1,
            (false, false) => -1,
        };
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            notices.warn(format_args!("the failover worker stops: poll: {e}"));
            return;
        }
        // Before the events below change `requests`: `fds` follows its order now.
        let asked: Vec<String> = fds[first_request..]
            .iter()
            .zip(&requests)
            .filter(|(p, _)| p.revents != 0)
            .map(|(_, (id, fd))| {
                let _ = fd.read();
                id.clone()
            })
            .collect();
        let _ = events.wake.read();
        while let Ok(event) = rx.try_recv() {
            match event {
                FailoverEvent::Stop => return,
                FailoverEvent::Standby(net) => lock().standby_negotiated(&net),
                FailoverEvent::VfReady(vf) => lock().vf_ready(&vf),
                FailoverEvent::WatchRequest(id, fd) => requests.push((id, fd)),
                FailoverEvent::Unwatch(id) => requests.retain(|(r, _)| *r != id),
                FailoverEvent::Job(job) => {
                    // A bug in one request must not end the worker; its asker hears of it
                    // (the job's answer channel closes).
                    if catch_unwind(AssertUnwindSafe(|| job(&mut lock()))).is_err() {
                        notices.warn(format_args!("a device-add or device-remove failed (see the log above)"));
                    }
                }
            }
        }
        for id in asked {
            lock().host_request(&id);
        }
        if awaits_host {
            lock().host_vfs_check();
        }
        if traffic && sampled.elapsed() >= TRAFFIC_EVERY {
            lock().sample_vf_traffic();
            sampled = Instant::now();
        }
        let Some(w) = watch.as_mut() else { continue };
        match w.read_events() {
            Ok(changes) => {
                for change in changes {
                    let Some(pf) = pfs.get(&change.ifindex) else { continue };
                    let now = change.up && !change.removed;
                    if up.insert(change.ifindex, now) != Some(now) {
                        lock().pf_link(pf, now);
                    }
                }
            }
            Err(e) => {
                notices.warn(format_args!("no longer following the PFs' links: {e}"));
                watch = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sriov::bridge::tests::TempTree;
    use crate::sriov::bridge::{BridgePort, FdbError};

    /// Records what the switch asked of the bridge.
    #[derive(Default)]
    struct FakeFdb(Mutex<Vec<String>>);

    impl Fdb for FakeFdb {
        fn point(&self, port: &BridgePort, _mac: [u8; 6]) -> Result<(), FdbError> {
            self.0.lock().unwrap().push(format!("point {}", port.ifname));
            Ok(())
        }
        fn forget(&self, port: &BridgePort, _mac: [u8; 6]) -> Result<(), FdbError> {
            self.0.lock().unwrap().push(format!("forget {}", port.ifname));
            Ok(())
        }
    }

    fn pair() -> FailoverPair {
        FailoverPair::new("vf0", "sb0", "tfo", "eth0", [2, 0, 0, 0, 0, 1], true)
    }

    #[test]
    fn the_mac_moves_to_the_tap_and_back_to_the_pf_of_the_same_bridge() {
        let t = TempTree::new("switch-same");
        t.add("br0", 4, None, false);
        t.add("tfo", 7, Some("br0"), true);
        t.add("eth0", 2, Some("br0"), true);
        let fdb = Arc::new(FakeFdb::default());
        let switch = Switch::new(fdb.clone(), &t.0, Notices::discard());
        switch.to_standby(&pair());
        switch.to_primary(&pair());
        assert_eq!(*fdb.0.lock().unwrap(), ["point tfo", "point eth0"]);
    }

    #[test]
    fn with_the_pf_elsewhere_the_bridge_learns_the_vf_path_again() {
        let t = TempTree::new("switch-other");
        t.add("br0", 4, None, false);
        t.add("br1", 5, None, false);
        t.add("tfo", 7, Some("br0"), true);
        t.add("eth0", 2, Some("br1"), true);
        let fdb = Arc::new(FakeFdb::default());
        let switch = Switch::new(fdb.clone(), &t.0, Notices::discard());
        switch.to_standby(&pair());
        switch.to_primary(&pair());
        assert_eq!(*fdb.0.lock().unwrap(), ["point tfo", "forget tfo"]);
    }

    #[test]
    fn a_tap_on_no_bridge_is_left_alone() {
        let t = TempTree::new("switch-none");
        t.add("tfo", 7, None, false);
        let fdb = Arc::new(FakeFdb::default());
        let switch = Switch::new(fdb.clone(), &t.0, Notices::discard());
        switch.to_standby(&pair());
        switch.to_primary(&pair());
        assert!(fdb.0.lock().unwrap().is_empty());
    }

    #[test]
    fn events_wake_the_worker_and_arrive_in_order() {
        let (events, rx) = FailoverEvents::new().unwrap();
        events.send(FailoverEvent::Standby("sb0".into()));
        events.send(FailoverEvent::VfReady("vf0".into()));
        assert!(events.wake.read().unwrap() >= 1, "the eventfd was signalled");
        assert!(matches!(rx.try_recv(), Ok(FailoverEvent::Standby(n)) if n == "sb0"));
        assert!(matches!(rx.try_recv(), Ok(FailoverEvent::VfReady(n)) if n == "vf0"));
    }
}
