//! A request the NBD connection runs on tokio's blocking pool ([`Op`]), and how a device error
//! becomes the NBD error a reply carries.

use crate::block::{BlockDevice, BlockError};
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use crate::wire::nbd::{errno, SimpleReplyRepr};

static DEVICE_LOG: LogLimiter = LogLimiter::network();

/// The NBD error for a device error (logged, rate-limited).
pub(super) fn device_error(err: &BlockError) -> u32 {
    warn_limited!(DEVICE_LOG, error = %err, "nbd: device error");
    errno::from_host(err.errno())
}

/// A request run on the blocking pool.
pub(super) enum Op {
    /// `buf` is the whole reply: 16 header bytes, then room for the data.
    Read {
        offset: u64,
        buf: Vec<u8>,
    },
    Write {
        data: Vec<u8>,
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
}

impl Op {
    /// Runs the request; returns the complete reply and, for a write, its payload buffer.
    pub(super) fn run(self, device: &dyn BlockDevice, handle: u64) -> (Vec<u8>, Option<Vec<u8>>) {
        let header = |error: u32| SimpleReplyRepr { error, handle }.to_bytes().to_vec();
        let (result, payload) = match self {
            Op::Read { offset, mut buf } => {
                return match device.read_at(&mut buf[SimpleReplyRepr::LEN..], offset) {
                    Ok(()) => {
                        SimpleReplyRepr { error: 0, handle }.emit(&mut buf);
                        (buf, None)
                    }
                    Err(err) => (header(device_error(&err)), Some(buf)),
                };
            }
            Op::Write { data, offset, fua } => (device.write_at(&data, offset, fua), Some(data)),
            Op::Flush => (device.flush(), None),
            Op::Trim { offset, len } => (device.discard(offset, len), None),
            Op::Zeroes { offset, len, fua } => (device.write_zeroes(offset, len, fua), None),
        };
        match result {
            Ok(()) => (header(0), payload),
            Err(err) => (header(device_error(&err)), payload),
        }
    }
}
