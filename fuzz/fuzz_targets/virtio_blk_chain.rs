#![no_main]
//! virtio-blk as a hostile driver meets it: the real device on a 64-sector image
//! (a memfd, or a file under the temp directory for O_DIRECT), activated with rings the
//! input writes, its worker run on an event loop as the VMM runs it, while the driver
//! posts, lies about and rewrites its rings and requests, resets and starts again.
//!
//! Checked: no panic; the event loop always goes idle; no more chains used than made
//! available, no used id outside the table; the image never changes size, and a
//! read-only disk never changes at all; the capacity reads back unchanged; the counters
//! add up (malformed requests are errors, and no more errors than requests).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::{Block, BlockConfig, SECTOR_SIZE};
use devices::virtio::{ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, VirtioInterruptType, Worker};
use event_manager::{EventManager, SubscriberId, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use tandem_fuzz::driver::{guest_memory, poke, DriverQueue};
use tandem_fuzz::Input;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SECTORS: u64 = 64;
const IMAGE_LEN: usize = (SECTORS * SECTOR_SIZE) as usize;
const MAX_ROUNDS: usize = 256;

/// An image file kept open for the whole run, and a path that reopens it.
struct Image {
    file: File,
    path: PathBuf,
}

/// A memfd: no file left behind, hole punching works, O_DIRECT does not.
fn memfd_image() -> Image {
    // SAFETY: a NUL-terminated name and no flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"tandem-fuzz-blk".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    Image { path: PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())), file }
}

/// A real file for O_DIRECT, removed at exit.
fn direct_image() -> Image {
    extern "C" fn remove() {
        if let Some(image) = DIRECT.get() {
            let _ = std::fs::remove_file(&image.path);
        }
    }
    let path = std::env::temp_dir().join(format!("tandem-fuzz-blk-{}.img", std::process::id()));
    let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("direct image");
    // SAFETY: `remove` is a plain function that only reads a static.
    unsafe { libc::atexit(remove) };
    Image { file, path }
}

static MEMFD: OnceLock<Image> = OnceLock::new();
static DIRECT: OnceLock<Image> = OnceLock::new();

/// The image, with the same content at the start of every run: sector `i` full of `i`.
fn fresh(image: &'static OnceLock<Image>, make: fn() -> Image) -> &'static Image {
    let image = image.get_or_init(make);
    let content: Vec<u8> = (0..SECTORS).flat_map(|i| [i as u8; SECTOR_SIZE as usize]).collect();
    image.file.set_len(IMAGE_LEN as u64).expect("image size");
    image.file.write_all_at(&content, 0).expect("image content");
    image
}

struct Irq;

impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        assert_eq!(kind, VirtioInterruptType::Queue(0), "virtio-blk has one queue and no config changes");
        Ok(())
    }
}

struct Rig {
    mem: GuestMemory,
    block: Block,
    image: &'static Image,
    readonly: bool,
    em: EventManager<Worker>,
    worker: Option<SubscriberId>,
    ring: Option<(DriverQueue, EventFd)>,
}

impl Rig {
    fn new(input: &mut Input) -> Option<Self> {
        let flags = input.u8();
        let (readonly, direct) = (flags & 1 != 0, flags & 6 == 6);
        let image = if direct { fresh(&DIRECT, direct_image) } else { fresh(&MEMFD, memfd_image) };
        let id_len = usize::from(input.u8() % 24);
        let id = String::from_utf8_lossy(input.bytes(id_len)).into_owned();
        let config = BlockConfig { path: image.path.clone(), readonly, direct, id };
        // A serial the device refuses is the VMM's error to report, not the guest's.
        let block = Block::new(config).ok()?;
        let em = EventManager::new().expect("event manager");
        Some(Self { mem: guest_memory(), block, image, readonly, em, worker: None, ring: None })
    }

    fn activate(&mut self, input: &mut Input) {
        let mut features = input.u64();
        if input.u8() < 0xf0 {
            features |= 1 << VIRTIO_F_VERSION_1;
        }
        self.block.set_acked_features(features & self.block.features());
        let event_idx = features & self.block.features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.ring = None;
        let mut activated = Vec::new();
        // The transport hands over the queues the driver enabled, by their index: here
        // the one queue, or none.
        let count = u16::from(input.u8() < 0xf0);
        for index in 0..count {
            let size = 1u16 << (input.u8() % 9);
            let ring = DriverQueue::new(&self.mem, index, size);
            let Some(queue) = ring.queue(self.block.queue_max_sizes()[0], event_idx, &self.mem) else { continue };
            let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            if self.ring.is_none() {
                self.ring = Some((ring, notify.try_clone().expect("eventfd")));
            }
            activated.push(ActivatedQueue { index, queue, notify });
        }
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(Irq);
        if let Ok(worker) = self.block.activate(self.mem.clone(), irq, activated) {
            self.worker = Some(self.em.add_subscriber(worker));
        }
    }

    fn reset(&mut self) {
        if let Some(id) = self.worker.take() {
            drop(self.em.remove_subscriber(id).expect("worker"));
        }
        self.block.reset();
    }

    fn settle(&mut self) {
        let idle = (0..MAX_ROUNDS).any(|_| self.em.run_with_timeout(0).expect("event loop") == 0);
        assert!(idle, "the worker still had events after {MAX_ROUNDS} event-loop passes: a busy loop");
        if let Some((ring, _)) = &mut self.ring {
            ring.take_used(&self.mem);
        }
        let len = self.image.file.metadata().expect("image metadata").len();
        assert_eq!(len, IMAGE_LEN as u64, "the image changed size");
        if self.readonly {
            let mut now = vec![0u8; IMAGE_LEN];
            self.image.file.read_exact_at(&mut now, 0).expect("image content");
            let intact = now.chunks(SECTOR_SIZE as usize).enumerate().all(|(i, s)| s.iter().all(|&b| b == i as u8));
            assert!(intact, "a read-only disk was written");
        }
        let s = self.block.counters().snapshot();
        assert!(s.malformed <= s.errors && s.errors + s.unsupported <= s.requests, "counters: {s:?}");
        let mut capacity = [0u8; 8];
        self.block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Some(mut rig) = Rig::new(&mut input) else { return };
    rig.activate(&mut input);
    while !input.is_empty() {
        let op = input.u8();
        match op % 12 {
            ring @ 0..=4 => {
                if let Some((ring_queue, _)) = &mut rig.ring {
                    ring_queue.act(&rig.mem, ring, &mut input);
                }
            }
            5 | 6 => poke(&rig.mem, &mut input),
            7 | 8 => {
                if let Some((_, kick)) = &rig.ring {
                    let _ = kick.write(1);
                }
            }
            9 | 10 => rig.settle(),
            _ => {
                rig.settle();
                rig.reset();
                rig.activate(&mut input);
            }
        }
    }
    rig.settle();
});
