//! The event-loop half of an activated device.
//!
//! It waits on every enabled queue's notification eventfd and on each active queue
//! pair's tap fd, whose epoll interest follows what the pair can do:
//! - EPOLLIN while reception can make progress; dropped when the driver has posted no
//!   receive buffers (or the tap failed), restored when the driver notifies the
//!   receive queue — so a busy tap with no guest buffers never wakes the loop;
//! - EPOLLOUT only while transmission waits for room in the tap (EAGAIN).
//!
//! Each handler drains what it can (within a budget, to stay fair to the loop's other
//! devices), then signals the driver at most once per queue, honouring EVENT_IDX.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::backend::NetBackend;
use super::counters::NetCounters;
use super::ctrl::{process_ctrl, Command};
use super::rx::{Rx, RxStop};
use super::tx::{process_tx, TxStop};
use crate::notice::DeviceNotices;
use crate::virtio::{GuestMemory, VirtioInterrupt, VirtioInterruptType};

/// Frames read per tap wake-up, chains sent per notification, before yielding.
const RX_BUDGET: usize = 256;
const TX_BUDGET: usize = 256;

/// What an epoll event is about, carried in its data word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    RxQueue(usize),
    TxQueue(usize),
    CtrlQueue,
    Tap(usize),
}

impl Source {
    fn token(self) -> u32 {
        // Pair indices are below MAX_QUEUE_PAIRS (256), well within 16 bits.
        let (kind, pair) = match self {
            Source::RxQueue(p) => (1, p),
            Source::TxQueue(p) => (2, p),
            Source::CtrlQueue => (3, 0),
            Source::Tap(p) => (4, p),
        };
        (kind << 16) | (pair as u32 & 0xffff)
    }

    fn from_token(token: u32) -> Option<Self> {
        let pair = (token & 0xffff) as usize;
        match token >> 16 {
            1 => Some(Source::RxQueue(pair)),
            2 => Some(Source::TxQueue(pair)),
            3 => Some(Source::CtrlQueue),
            4 => Some(Source::Tap(pair)),
            _ => None,
        }
    }
}

/// An enabled virtqueue.
pub(super) struct QueueSlot {
    pub(super) index: u16,
    pub(super) queue: Queue,
    pub(super) notify: EventFd,
    /// The ring is unusable (outside guest RAM, inconsistent indices): ignored until
    /// the driver resets the device.
    pub(super) broken: bool,
}

impl QueueSlot {
    pub(super) fn new(index: u16, queue: Queue, notify: EventFd) -> Self {
        Self { index, queue, notify, broken: false }
    }

    fn mark_broken(&mut self, log: &DeviceNotices, e: virtio_queue::Error) {
        log.warn(format_args!(
            "queue {} is unusable ({e}); ignoring it until the driver resets the device",
            self.index
        ));
        self.broken = true;
    }

    /// Raises the queue's interrupt unless the driver asked not to be told (EVENT_IDX).
    fn signal(&mut self, mem: &GuestMemory, interrupt: &dyn VirtioInterrupt, log: &DeviceNotices) {
        signal_queue(&mut self.queue, self.index, mem, interrupt, log);
    }
}

fn signal_queue(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemory,
    interrupt: &dyn VirtioInterrupt,
    log: &DeviceNotices,
) {
    // If used_event cannot be read, err on the side of an interrupt too many.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
            log.warn(format_args!("cannot raise the interrupt of queue {index}: {e}"));
        }
    }
}

/// One receive/transmit queue pair and its tap queue.
pub(super) struct Pair {
    rx: Option<QueueSlot>,
    tx: Option<QueueSlot>,
    backend: Box<dyn NetBackend>,
    rx_state: Rx,
    /// The driver uses this pair (the first one always; others after MQ_VQ_PAIRS_SET).
    active: bool,
    /// The tap queue reported an error: no longer watched.
    failed: bool,
    /// Reception can make progress: wants EPOLLIN.
    rx_armed: bool,
    /// Transmission waits for EPOLLOUT.
    tx_blocked: bool,
    /// What epoll watches on the tap fd, if it is registered.
    registered: Option<EventSet>,
}

impl Pair {
    pub(super) fn new(
        rx: Option<QueueSlot>,
        tx: Option<QueueSlot>,
        backend: Box<dyn NetBackend>,
        rx_state: Rx,
        active: bool,
    ) -> Self {
        let rx_armed = active && rx.is_some();
        Self { rx, tx, backend, rx_state, active, failed: false, rx_armed, tx_blocked: false, registered: None }
    }

    /// Brings the tap fd's epoll registration in line with the pair's state.
    fn sync_tap(&mut self, index: usize, ops: &mut EventOps, counters: &NetCounters, log: &DeviceNotices) {
        let want = (self.active && !self.failed).then(|| {
            let mut set = EventSet::empty();
            if self.rx_armed {
                set |= EventSet::IN;
            }
            if self.tx_blocked {
                set |= EventSet::OUT;
            }
            set
        });
        let fd = self.backend.as_fd().as_raw_fd();
        let token = Source::Tap(index).token();
        let result = match (self.registered, want) {
            (None, Some(set)) => ops.add(Events::with_data_raw(fd, token, set)),
            (Some(cur), Some(set)) if cur != set => ops.modify(Events::with_data_raw(fd, token, set)),
            (Some(cur), None) => ops.remove(Events::with_data_raw(fd, token, cur)),
            _ => return,
        };
        match result {
            Ok(()) => self.registered = want,
            Err(e) => {
                let n = counters.add_backend_error();
                log.recurring(n, format_args!("cannot update the event loop's watch of tap queue {index}: {e}"));
            }
        }
    }
}

/// The running device: an event-manager subscriber.
pub struct NetWorker {
    log: DeviceNotices,
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    counters: Arc<NetCounters>,
    pairs: Vec<Pair>,
    ctrl: Option<QueueSlot>,
}

impl NetWorker {
    pub(super) fn new(
        log: DeviceNotices,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        counters: Arc<NetCounters>,
        pairs: Vec<Pair>,
        ctrl: Option<QueueSlot>,
    ) -> Self {
        Self { log, mem, interrupt, counters, pairs, ctrl }
    }

    /// What epoll watches on pair `index`'s tap fd (None: not registered).
    #[cfg(test)]
    pub(super) fn tap_interest(&self, index: usize) -> Option<EventSet> {
        self.pairs[index].registered
    }

    fn run_rx(&mut self, index: usize) {
        let Self { log, mem, interrupt, counters, pairs, .. } = self;
        let Some(pair) = pairs.get_mut(index) else { return };
        let usable = pair.active && !pair.failed;
        let Some(rx) = pair.rx.as_mut().filter(|rx| usable && !rx.broken) else {
            pair.rx_armed = false;
            return;
        };
        let out = pair.rx_state.process(mem, &mut rx.queue, pair.backend.as_fd(), counters, RX_BUDGET, log);
        match out.stop {
            RxStop::TapEmpty | RxStop::Budget => {}
            RxStop::NoBuffers => pair.rx_armed = false,
            RxStop::Backend(e) => {
                pair.rx_armed = false;
                let n = counters.add_backend_error();
                log.recurring(
                    n,
                    format_args!("reading tap queue {index} failed: {e}; retrying at the driver's next notification"),
                );
            }
            RxStop::Broken(e) => {
                pair.rx_armed = false;
                rx.mark_broken(log, e);
            }
        }
        if out.completed > 0 {
            rx.signal(mem, interrupt.as_ref(), log);
        }
    }

    fn run_tx(&mut self, index: usize) {
        let Self { log, mem, interrupt, counters, pairs, .. } = self;
        let Some(pair) = pairs.get_mut(index) else { return };
        if pair.tx_blocked {
            return; // resumes on EPOLLOUT
        }
        let Some(tx) = pair.tx.as_mut().filter(|tx| !tx.broken) else { return };
        // Also for a pair the driver no longer uses (or whose tap failed): its detached
        // tap queue refuses the frames, which are then dropped and counted rather than
        // left to stall the driver.
        let index = tx.index;
        let mut signal = |queue: &mut Queue| signal_queue(queue, index, mem, interrupt.as_ref(), log);
        let out = process_tx(mem, &mut tx.queue, pair.backend.as_fd(), counters, TX_BUDGET, log, &mut signal);
        match out.stop {
            TxStop::Drained => {}
            TxStop::TapFull => pair.tx_blocked = true,
            TxStop::Budget => {
                // Come back after the event loop's other work: a notification to
                // ourselves, since the driver will not send another (notifications
                // are off while we have chains to process).
                if let Err(e) = tx.notify.write(1) {
                    log.warn(format_args!("cannot reschedule queue {}: {e}", tx.index));
                }
            }
            TxStop::Broken(e) => tx.mark_broken(log, e),
        }
    }

    fn sync_tap(&mut self, index: usize, ops: &mut EventOps) {
        if let Some(pair) = self.pairs.get_mut(index) {
            pair.sync_tap(index, ops, &self.counters, &self.log);
        }
    }

    fn on_rx_notify(&mut self, index: usize, ops: &mut EventOps) {
        let mem = &self.mem;
        let Some(pair) = self.pairs.get_mut(index) else { return };
        if let Some(rx) = pair.rx.as_mut().filter(|rx| !rx.broken) {
            // The driver posted buffers. Notifications go off while we have some: the
            // receive path turns them back on when it runs out. (With EVENT_IDX this is
            // a no-op; avail_event then stays where the shortage left it.)
            let _ = rx.queue.disable_notification(mem);
            pair.rx_armed = pair.active && !pair.failed;
        }
        // Try at once: the buffers may complete a frame parked in the spill buffer, or
        // take frames that waited in the tap.
        self.run_rx(index);
        self.sync_tap(index, ops);
    }

    fn on_tap_event(&mut self, index: usize, set: EventSet, ops: &mut EventOps) {
        let Some(pair) = self.pairs.get_mut(index) else { return };
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            // A tun queue reports EPOLLERR once its interface is gone; level-triggered,
            // it would wake the loop forever. Stop watching it; frames the driver still
            // sends on this pair are dropped (and counted) by the failing writes.
            pair.failed = true;
            pair.rx_armed = false;
            pair.tx_blocked = false;
            self.counters.add_backend_error();
            self.log.warn(format_args!("tap queue {index} reported an error; no longer using it"));
            self.sync_tap(index, ops);
            self.run_tx(index);
            return;
        }
        if set.contains(EventSet::OUT) {
            pair.tx_blocked = false;
            self.run_tx(index);
        }
        if set.contains(EventSet::IN) && self.pairs[index].rx_armed {
            self.run_rx(index);
        }
        self.sync_tap(index, ops);
    }

    fn on_ctrl_notify(&mut self, ops: &mut EventOps) {
        let Self { log, mem, interrupt, counters, pairs, ctrl } = self;
        let Some(ctrl) = ctrl.as_mut().filter(|c| !c.broken) else { return };
        let out = process_ctrl(mem, &mut ctrl.queue, counters, log, &mut |command| match command {
            Command::SetQueuePairs(n) => set_active_pairs(pairs, n, ops, counters, log),
            // The tap gives us every frame; the guest's stack filters what it gets.
            Command::RxMode | Command::MacTable => true,
            Command::Unsupported { .. } => false,
        });
        if let Some(e) = out.broken {
            ctrl.mark_broken(log, e);
        }
        if out.completed > 0 {
            ctrl.signal(mem, interrupt.as_ref(), log);
        }
    }
}

/// MQ_VQ_PAIRS_SET: the first `n` pairs are used, the others' tap queues detached (so
/// the host stops steering frames to them) and no longer watched.
fn set_active_pairs(
    pairs: &mut [Pair],
    n: u16,
    ops: &mut EventOps,
    counters: &NetCounters,
    log: &DeviceNotices,
) -> bool {
    let n = usize::from(n);
    if n == 0 || n > pairs.len() {
        return false;
    }
    let mut ok = true;
    for (i, pair) in pairs.iter_mut().enumerate() {
        let want = i < n;
        if pair.active == want {
            continue;
        }
        if let Err(e) = pair.backend.set_queue_enabled(want) {
            counters.add_backend_error();
            log.warn(format_args!("cannot {} tap queue {i}: {e}", if want { "attach" } else { "detach" }));
            ok = false;
            continue;
        }
        pair.active = want;
        pair.rx_armed = want && pair.rx.as_ref().is_some_and(|rx| !rx.broken);
        pair.sync_tap(i, ops, counters, log);
    }
    ok
}

impl MutEventSubscriber for NetWorker {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = |slot: &QueueSlot, source: Source| {
            if let Err(e) = ops.add(Events::with_data(&slot.notify, source.token(), EventSet::IN)) {
                self.counters.add_backend_error();
                self.log.warn(format_args!("cannot watch queue {}: {e}", slot.index));
                return;
            }
            // A pass over queues the driver may have filled before we were watching.
            // Receive queues need none: EPOLLIN on the tap starts them.
            if !matches!(source, Source::RxQueue(_)) {
                let _ = slot.notify.write(1);
            }
        };
        for (i, pair) in self.pairs.iter().enumerate() {
            if let Some(rx) = &pair.rx {
                watch(rx, Source::RxQueue(i));
            }
            if let Some(tx) = &pair.tx {
                watch(tx, Source::TxQueue(i));
            }
        }
        if let Some(ctrl) = &self.ctrl {
            watch(ctrl, Source::CtrlQueue);
        }
        for i in 0..self.pairs.len() {
            self.sync_tap(i, ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let source = Source::from_token(events.data());
        // Consume the notification; EAGAIN (nothing pending) is harmless.
        let drain = |slot: Option<&QueueSlot>| {
            if let Some(slot) = slot {
                let _ = slot.notify.read();
            }
        };
        match source {
            Some(Source::RxQueue(i)) => {
                drain(self.pairs.get(i).and_then(|p| p.rx.as_ref()));
                self.on_rx_notify(i, ops);
            }
            Some(Source::TxQueue(i)) => {
                drain(self.pairs.get(i).and_then(|p| p.tx.as_ref()));
                self.run_tx(i);
                self.sync_tap(i, ops);
            }
            Some(Source::CtrlQueue) => {
                drain(self.ctrl.as_ref());
                self.on_ctrl_notify(ops);
            }
            Some(Source::Tap(i)) => self.on_tap_event(i, events.event_set(), ops),
            None => {
                let n = self.counters.add_backend_error();
                self.log.recurring(n, format_args!("unexpected event {:#x}", events.data()));
            }
        }
    }
}
