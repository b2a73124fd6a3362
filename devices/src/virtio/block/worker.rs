//! The running half of a virtio-blk device: drains the request queue whenever the driver
//! notifies it, has the requests executed and tells the driver about the results.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::execute::Executor;
use super::BlockCounters;
use crate::virtio::{GuestMemory, VirtioInterrupt, VirtioInterruptType};

pub(crate) struct BlockWorker {
    mem: GuestMemory,
    queue: Queue,
    queue_index: u16,
    /// The queue's notification: a KVM ioeventfd the driver's kick signals.
    notify: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    exec: Executor,
    /// Set when the driver corrupted the rings: the queue is left alone until reset.
    broken: bool,
}

impl BlockWorker {
    pub(crate) fn new(
        mem: GuestMemory,
        queue: Queue,
        queue_index: u16,
        notify: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
        exec: Executor,
    ) -> Self {
        Self { mem, queue, queue_index, notify, interrupt, exec, broken: false }
    }

    /// Marks the queue unusable until the driver resets the device: its rings cannot be
    /// read or written, or claim more entries than the queue has.
    fn break_queue(&mut self, e: virtio_queue::Error) {
        self.exec.log.warn(format_args!(
            "queue {} is corrupt ({e}); ignoring it until the driver resets the device",
            self.queue_index
        ));
        self.broken = true;
    }

    /// Processes every available request, then signals the driver once if any
    /// completed and it wants to hear about it.
    pub(crate) fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let mut completed = 0usize;
        loop {
            // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY so the driver stops
            // kicking while we drain; with it, a no-op (the driver only kicks when the
            // avail index passes avail_event, which enable_notification moves).
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                return self.break_queue(e);
            }
            loop {
                let chain = match self.queue.iter(&self.mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => return self.break_queue(e),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let used_len = self.exec.handle_chain(&self.mem, chain);
                match self.queue.add_used(&self.mem, head, used_len) {
                    Ok(()) => completed += 1,
                    // A head index beyond the queue (already counted and logged as an
                    // empty chain) cannot be returned: only that ring entry is lost.
                    Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                    Err(e) => return self.break_queue(e),
                }
            }
            // Re-enabling and re-checking closes the race with a driver that added
            // requests after our last look while it still saw notifications disabled.
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return self.break_queue(e),
            }
        }
        if completed > 0 {
            self.signal_used();
        }
    }

    /// One interrupt for a whole drain, and only if the driver asked for it (used_event
    /// with EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT is not honoured by virtio-queue).
    fn signal_used(&mut self) {
        // If used_event cannot be read, interrupt anyway: a spurious interrupt is
        // harmless, a missed one hangs the driver.
        if self.queue.needs_notification(&self.mem).unwrap_or(true) {
            BlockCounters::add(&self.exec.counters.interrupts, 1);
            if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(self.queue_index)) {
                self.exec.log.warn(format_args!("cannot raise the queue interrupt: {e}"));
            }
        }
    }
}

impl MutEventSubscriber for BlockWorker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.notify, EventSet::IN)) {
            self.exec.log.warn(format_args!("cannot watch queue {} notifications: {e}", self.queue_index));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() != self.notify.as_raw_fd() {
            return;
        }
        // Consume the notification before draining: a kick that arrives during the drain
        // re-arms the eventfd and costs at most one empty pass.
        match self.notify.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Level-triggered: an eventfd that cannot be read would wake us forever.
                self.exec.log.warn(format_args!("cannot read queue notifications ({e}); no longer watching them"));
                let _ = ops.remove(events);
                return;
            }
        }
        self.process_queue();
    }
}
