//! The control queue (VIRTIO_NET_F_CTRL_VQ, offered with VIRTIO_NET_F_MQ): each chain
//! is `{ u8 class; u8 command; data }` (device-readable) then one `u8 ack`
//! (device-writable).
//!
//! Answered: MQ_VQ_PAIRS_SET (the worker switches queue pairs before the command is
//! completed, as the spec requires); RX-mode and MAC-table commands, acknowledged OK
//! because the tap hands us every frame anyway (no filtering is done). Everything else
//! — commands of features not offered — is answered VIRTIO_NET_ERR.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};

use super::chain::{parse, read_at, return_chain, write_at, Malformed};
use super::counters::NetCounters;
use crate::notice::DeviceNotices;
use crate::virtio::GuestMemory;

/// No command needs more than this (a MAC table of a few thousand entries).
const MAX_COMMAND_LEN: usize = 64 * 1024;

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    /// MQ_VQ_PAIRS_SET: use this many queue pairs.
    SetQueuePairs(u16),
    /// An RX-mode switch (promiscuous, all-multicast, ...).
    RxMode,
    /// MAC_TABLE_SET: the unicast and multicast filter tables.
    MacTable,
    /// A command this device does not implement, or one with too little data.
    Unsupported { class: u8, command: u8 },
}

#[derive(Debug)]
pub(super) struct CtrlOutcome {
    pub(super) completed: usize,
    /// Set when the queue became unusable (until the driver resets the device).
    pub(super) broken: Option<QueueError>,
}

fn decode(class: u8, command: u8, data: &[u8]) -> Command {
    let (class32, command32) = (u32::from(class), u32::from(command));
    match (class32, command32) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if data.len() >= 2 => {
            Command::SetQueuePairs(u16::from_le_bytes([data[0], data[1]]))
        }
        (VIRTIO_NET_CTRL_RX, c) if c <= VIRTIO_NET_CTRL_RX_NOBCAST => Command::RxMode,
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => Command::MacTable,
        _ => Command::Unsupported { class, command },
    }
}

/// Answers every queued command. `handle` carries a command out and says whether it
/// succeeded; it runs before the command is completed.
pub(super) fn process_ctrl(
    mem: &GuestMemory,
    queue: &mut Queue,
    counters: &NetCounters,
    log: &DeviceNotices,
    handle: &mut dyn FnMut(Command) -> bool,
) -> CtrlOutcome {
    let mut completed = 0;
    let broken = 'outer: loop {
        if let Err(e) = queue.disable_notification(mem) {
            break Some(e);
        }
        let mut popped = 0;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => break 'outer Some(e),
            };
            let Some(chain) = chain else { break };
            popped += 1;
            let head = chain.head_index();
            let parsed = parse(mem, chain, MAX_COMMAND_LEN).and_then(|p| {
                if p.readable_len < 2 || p.writable_len < 1 {
                    Err(Malformed::TooShort)
                } else {
                    Ok(p)
                }
            });
            let used_len = match parsed {
                Err(m) => {
                    let n = counters.add_malformed();
                    log.recurring(n, format_args!("control chain {head} rejected: {m}"));
                    0
                }
                Ok(p) => {
                    let mut header = [0u8; 2];
                    read_at(mem, &p.readable, 0, &mut header);
                    let mut data = [0u8; 2];
                    let got = read_at(mem, &p.readable, 2, &mut data);
                    let command = decode(header[0], header[1], &data[..got]);
                    let ok = handle(command);
                    if !ok {
                        let n = counters.add_ctrl_rejected();
                        log.recurring(n, format_args!("control command {command:?} answered VIRTIO_NET_ERR"));
                    }
                    let ack = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
                    write_at(mem, &p.writable, 0, &[ack]);
                    1
                }
            };
            match return_chain(mem, queue, head, used_len) {
                Ok(added) => completed += usize::from(added),
                Err(e) => break 'outer Some(e),
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            Ok(_) => break None,
            Err(e) => break Some(e),
        }
    };
    CtrlOutcome { completed, broken }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::net::test_util::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    /// Posts `command` + `data` with its ack byte at `ack`, as descriptors `first..`.
    fn post(mem: &GuestMemory, vq: &DriverQueue<'_>, first: u16, cmd: &[u8]) -> u64 {
        let at = BUF + u64::from(first) * 0x100;
        mem.write_slice(cmd, GuestAddress(at)).unwrap();
        let ack = at + 0x80;
        mem.write_obj(0xffu8, GuestAddress(ack)).unwrap();
        vq.add_desc_chains(&[desc(at, cmd.len() as u32, NEXT, first + 1), desc(ack, 1, W, 0)], first).unwrap();
        ack
    }

    #[test]
    fn commands_are_answered() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let counters = NetCounters::default();
        let acks = [
            post(&mem, &vq, 0, &[4, 0, 3, 0]),                   // MQ_VQ_PAIRS_SET 3
            post(&mem, &vq, 2, &[4, 0, 9, 0]),                   // MQ_VQ_PAIRS_SET 9 (refused by the handler)
            post(&mem, &vq, 4, &[0, 0, 1]),                      // RX_PROMISC on
            post(&mem, &vq, 6, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), // MAC_TABLE_SET, empty tables
            post(&mem, &vq, 8, &[2, 0, 1, 0]),                   // VLAN_ADD: not offered
            post(&mem, &vq, 10, &[4, 0, 1]),                     // MQ_VQ_PAIRS_SET with one data byte
        ];
        let mut seen = Vec::new();
        let out = process_ctrl(&mem, &mut q, &counters, &DeviceNotices::default(), &mut |c| {
            seen.push(c);
            c != Command::SetQueuePairs(9) && !matches!(c, Command::Unsupported { .. })
        });
        assert!(out.broken.is_none() && out.completed == 6, "{out:?}");
        assert_eq!(
            seen,
            vec![
                Command::SetQueuePairs(3),
                Command::SetQueuePairs(9),
                Command::RxMode,
                Command::MacTable,
                Command::Unsupported { class: 2, command: 0 },
                Command::Unsupported { class: 4, command: 0 },
            ]
        );
        let got: Vec<u8> = acks.iter().map(|&a| mem.read_obj(GuestAddress(a)).unwrap()).collect();
        assert_eq!(got, vec![0, 1, 0, 0, 1, 1]);
        assert_eq!(used(&vq), vec![(0, 1), (2, 1), (4, 1), (6, 1), (8, 1), (10, 1)]);
        assert_eq!(counters.snapshot().ctrl_rejected, 3);
    }

    #[test]
    fn malformed_commands_are_rejected() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let counters = NetCounters::default();
        vq.add_desc_chains(
            &[
                desc(BUF, 2, 0, 0),    // no ack byte
                desc(BUF, 1, NEXT, 2), // one-byte header
                desc(BUF + 0x80, 1, W, 0),
                desc(BUF, 2, W | NEXT, 4), // ack before the command
                desc(BUF + 0x80, 1, 0, 0),
            ],
            0,
        )
        .unwrap();
        let out =
            process_ctrl(&mem, &mut q, &counters, &DeviceNotices::default(), &mut |_| panic!("no command is valid"));
        assert!(out.broken.is_none(), "{out:?}");
        assert_eq!(used(&vq), vec![(0, 0), (1, 0), (3, 0)]);
        assert_eq!(counters.snapshot().malformed_chains, 3);
    }
}
