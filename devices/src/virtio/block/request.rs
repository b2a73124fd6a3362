//! Turning a descriptor chain into a virtio-blk request (virtio 1.2, 5.2.6).
//!
//! No framing is assumed (2.6.4): the 16-byte header is the first 16 device-readable
//! bytes wherever the descriptors split them, the status is the last device-writable
//! byte, and the data is what lies between. Every way a driver can get this wrong ends in
//! a [`ParseError`], never a panic.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestMemoryBackend};

use super::sg::{GuestSg, GuestSlice};
use super::SECTOR_SIZE;
use crate::virtio::GuestMemory;

/// struct virtio_blk_outhdr: le32 type, le32 reserved (ioprio), le64 sector.
const HEADER_LEN: usize = 16;
/// struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
pub(crate) const SEGMENT_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A well-formed request: its buffers are inside guest RAM and point the right way.
pub(crate) struct Request<'a> {
    pub(crate) kind: RequestType,
    pub(crate) sector: u64,
    /// IN, GET_ID: device-writable; OUT, DISCARD, WRITE_ZEROES: device-readable (a whole
    /// number of segments for the latter two); empty otherwise.
    pub(crate) data: GuestSg<'a>,
    /// The one-byte status.
    pub(crate) status: GuestSlice<'a>,
}

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("the chain is empty or its head descriptor cannot be read")]
    Empty,
    #[error("the chain is cut short (a loop, a next index or indirect table out of range, or over 4 GiB)")]
    Truncated,
    #[error("the last descriptor is not device-writable, so there is no status byte")]
    StatusNotWritable,
    #[error("the last descriptor is empty, so there is no status byte")]
    StatusEmpty,
    #[error("a descriptor ({addr:#x}, {len} bytes) lies outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request header is {0} bytes; it needs 16")]
    ShortHeader(usize),
    #[error("{kind:?} request carries {len} bytes of {dir} data it has no use for")]
    WrongDirection { kind: RequestType, dir: &'static str, len: usize },
    #[error("{kind:?} request has no data")]
    NoData { kind: RequestType },
    #[error("{kind:?} request data is {len} bytes, not a multiple of {unit}")]
    BadLength { kind: RequestType, len: usize, unit: usize },
}

/// A chain that cannot be executed.
pub(crate) enum ParseError<'a> {
    /// There is a status byte: complete the chain with IOERR.
    Reject { status: GuestSlice<'a>, why: Malformed },
    /// There is no usable status byte: return the chain with nothing written.
    Drop(Malformed),
}

impl ParseError<'_> {
    pub(crate) fn reason(&self) -> &Malformed {
        match self {
            Self::Reject { why, .. } | Self::Drop(why) => why,
        }
    }
}

/// Walks the whole chain. virtio-queue ends iteration silently on a loop, an out-of-range
/// index, an unreadable descriptor or a bad indirect table; a chain whose last descriptor
/// still says NEXT was therefore cut short and is refused.
fn collect(chain: DescriptorChain<&GuestMemory>) -> Result<Vec<Descriptor>, Malformed> {
    let mut descs = Vec::new();
    for desc in chain {
        let more = desc.has_next();
        descs.push(desc);
        if !more {
            return Ok(descs);
        }
    }
    Err(if descs.is_empty() { Malformed::Empty } else { Malformed::Truncated })
}

fn slices<'a>(mem: &'a GuestMemory, desc: &Descriptor, len: u32, sg: &mut GuestSg<'a>) -> Result<(), Malformed> {
    let bad = Malformed::BadAddress { addr: desc.addr().raw_value(), len: desc.len() };
    for slice in mem.get_slices(desc.addr(), len as usize) {
        sg.push(slice.map_err(|_| bad.clone())?);
    }
    Ok(())
}

pub(crate) fn parse<'a>(
    mem: &'a GuestMemory,
    chain: DescriptorChain<&'a GuestMemory>,
) -> Result<Request<'a>, ParseError<'a>> {
    let descs = collect(chain).map_err(ParseError::Drop)?;
    let (last, rest) = descs.split_last().ok_or(ParseError::Drop(Malformed::Empty))?;
    if !last.is_write_only() {
        return Err(ParseError::Drop(Malformed::StatusNotWritable));
    }
    if last.len() == 0 {
        return Err(ParseError::Drop(Malformed::StatusEmpty));
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len() - 1))
        .and_then(|addr| mem.get_slice(addr, 1).ok())
        .ok_or(ParseError::Drop(Malformed::BadAddress { addr: last.addr().raw_value(), len: last.len() }))?;
    let reject = |why| ParseError::Reject { status, why };

    let mut readable = GuestSg::default();
    let mut writable = GuestSg::default();
    let mut seen_writable = false;
    for desc in rest {
        if desc.is_write_only() {
            seen_writable = true;
            slices(mem, desc, desc.len(), &mut writable).map_err(reject)?;
        } else if seen_writable {
            return Err(reject(Malformed::ReadableAfterWritable));
        } else {
            slices(mem, desc, desc.len(), &mut readable).map_err(reject)?;
        }
    }
    // The status descriptor may hold data before its last byte.
    slices(mem, last, last.len() - 1, &mut writable).map_err(reject)?;

    let mut header = [0u8; HEADER_LEN];
    if readable.read_at(0, &mut header) < HEADER_LEN {
        return Err(reject(Malformed::ShortHeader(readable.len())));
    }
    let readable = readable.split_off(HEADER_LEN);
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
    let kind = RequestType::from_raw(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes(s);

    let wrong = |dir, len| reject(Malformed::WrongDirection { kind, dir, len });
    let data = match kind {
        RequestType::In | RequestType::GetId if !readable.is_empty() => {
            return Err(wrong("device-readable", readable.len()))
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes if !writable.is_empty() => {
            return Err(wrong("device-writable", writable.len()))
        }
        RequestType::In | RequestType::GetId => writable,
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => readable,
        // Any data a flush or an unknown request carries is ignored.
        RequestType::Flush | RequestType::Unsupported(_) => GuestSg::default(),
    };
    let unit = match kind {
        RequestType::In | RequestType::Out => SECTOR_SIZE as usize,
        RequestType::Discard | RequestType::WriteZeroes => SEGMENT_LEN,
        _ => 1,
    };
    if data.is_empty() && !matches!(kind, RequestType::Flush | RequestType::Unsupported(_)) {
        return Err(reject(Malformed::NoData { kind }));
    }
    if !data.len().is_multiple_of(unit) {
        return Err(reject(Malformed::BadLength { kind, len: data.len(), unit }));
    }
    Ok(Request { kind, sector, data, status })
}
