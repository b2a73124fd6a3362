//! The one thread that runs every device worker (virtio queue processing, tap and
//! file backends) on event-manager: devices wait on eventfds, nothing polls.
//!
//! Workers are added and removed from other threads (a vCPU writing DRIVER_OK or a
//! reset, the API thread on hot-unplug) through the manager's remote endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::virtio::Worker;
use event_manager::{EventManager, RemoteEndpoint, SubscriberId, SubscriberOps};

use crate::seccomp::{SeccompFilters, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the device event loop: {0}")]
    Create(String),
    #[error("cannot start the device event-loop thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the device event loop is not running; the VM is shutting down")]
    Gone,
    #[error("no device worker with id {0}")]
    UnknownWorker(u64),
}

pub struct DeviceEventLoop {
    endpoint: RemoteEndpoint<Worker>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Our ids for the manager's subscriber ids, which are opaque.
    ids: Mutex<(u64, HashMap<u64, SubscriberId>)>,
}

impl DeviceEventLoop {
    /// Starts the loop's thread, filtered with `seccomp` before it handles any event.
    pub fn start(seccomp: &SeccompFilters) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Worker>::new().map_err(|e| EventLoopError::Create(format!("{e:?}")))?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = stop.clone();
        let thread = crate::seccomp::spawn("devices", seccomp, ThreadKind::Devices, move || {
            while !stop_rx.load(Ordering::Acquire) {
                // An error here is an epoll failure on our own fds; retrying cannot
                // help and spinning would burn a core, so the loop ends and the
                // devices stop answering (the guest sees timeouts, not a crash).
                if manager.run().is_err() {
                    break;
                }
            }
        })
        .map_err(EventLoopError::Spawn)?;
        Ok(Self { endpoint, stop, thread: Mutex::new(Some(thread)), ids: Mutex::new((0, HashMap::new())) })
    }

    /// Runs `worker` on the loop; returns an id to remove it with.
    pub fn add(&self, worker: Worker) -> Result<u64, EventLoopError> {
        let sid = self
            .endpoint
            .call_blocking(
                move |ops: &mut dyn SubscriberOps<Subscriber = Worker>| -> Result<SubscriberId, event_manager::Error> {
                    Ok(ops.add_subscriber(worker))
                },
            )
            .map_err(|_| EventLoopError::Gone)?;
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.0 += 1;
        let id = ids.0;
        ids.1.insert(id, sid);
        Ok(id)
    }

    /// Stops `id` and drops its worker (closing the fds it owns).
    pub fn remove(&self, id: u64) -> Result<(), EventLoopError> {
        let sid = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&id)
            .ok_or(EventLoopError::UnknownWorker(id))?;
        self.endpoint
            .call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Worker>| ops.remove_subscriber(sid).map(drop))
            .map_err(|_| EventLoopError::Gone)
    }
}

/// The loop as the virtio-pci transport sees it. `stop` is only ever called from vCPU
/// threads (a driver reset) or the API thread, never from the loop's own thread, so the
/// blocking call cannot wait on itself.
impl pci::virtio_pci::WorkerHost for DeviceEventLoop {
    fn start(&self, worker: Worker) -> std::io::Result<pci::virtio_pci::WorkerId> {
        self.add(worker).map_err(std::io::Error::other)
    }

    fn stop(&self, id: pci::virtio_pci::WorkerId) {
        // Unknown ids are workers that already failed or were removed: nothing to stop.
        let _ = self.remove(id);
    }
}

impl DeviceEventLoop {
    /// Stops the loop and drops every worker still on it. Devices hold the loop in an
    /// `Arc`, so the VM stops it explicitly before it unmaps the guest memory the
    /// workers point into. Idempotent.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the loop so it sees the flag; if the channel is gone the thread is too.
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use std::os::unix::io::AsRawFd;
    use std::sync::mpsc;
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Echo {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            if let Ok(n) = self.evt.read() {
                let _ = self.seen.send(n);
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn workers_run_and_are_removed() {
        let lp = DeviceEventLoop::start(&Default::default()).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let id = lp.add(Box::new(Echo { evt: evt.try_clone().unwrap(), seen: tx })).unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), 3);
        lp.remove(id).unwrap();
        assert!(matches!(lp.remove(id), Err(EventLoopError::UnknownWorker(_))));
        // The worker (and its sender) is gone: nothing more can arrive.
        evt.write(1).unwrap();
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err());
        assert!(evt.as_raw_fd() >= 0);
    }
}
