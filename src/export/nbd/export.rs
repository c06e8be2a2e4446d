//! An NBD export: the device a client selects by name, and what the server derives from it
//! once (size, transmission flags, limits) for the handshake and the transmission phase to
//! share.

use std::sync::Arc;

use crate::block::{BlockDevice, Capabilities, Sequencer};
use crate::ha::gate::ServeGate;
use crate::wire::nbd::{transmission_flags as tf, MAX_STRING};

/// One export: a named device.
pub struct Export {
    /// Name clients select it by (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`). The empty name also
    /// selects the first export.
    pub name: String,
    /// Free-text description (`NBD_INFO_DESCRIPTION`); empty for none.
    pub description: String,
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device allows them.
    pub read_only: bool,
    /// Minimum block size advertised (1 for byte granularity, 512 or 4096 for `O_DIRECT`).
    pub min_block_size: u32,
    /// Whether this node may answer for the export right now: replies (and the handshake's
    /// export info) are held while it is closed. See [`super::server`].
    pub gate: Arc<ServeGate>,
}

impl Export {
    /// A writable export of `device` named `name`, byte-granular, with a gate that is always
    /// open (a standalone server; a replicated resource sets its own [`Export::gate`]).
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            read_only: false,
            min_block_size: 1,
            gate: ServeGate::always_open(),
        }
    }
}

/// How often a connection holding replies looks at a closed serve gate again.
pub const GATE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Returns once `gate` allows answering, or once requests held behind it should fail
/// (`on-no-quorum = io-error`: [`ServeGate::failing`]), polling every [`GATE_POLL`]; never, if
/// it stays shut under `suspend-io`. Callers race it against their own reasons to give up
/// (shutdown, a timeout).
pub(crate) async fn gate_opens_or_fails(gate: &ServeGate) {
    while !gate.may_answer() && !gate.failing() {
        tokio::time::sleep(GATE_POLL).await;
    }
}

/// Why [`Server::add_export`](super::Server::add_export) refused an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Another export has this name.
    #[error("duplicate export name {0:?}")]
    Duplicate(String),
    /// The name is longer than the protocol allows.
    #[error("export name longer than 4096 bytes")]
    NameTooLong,
    /// The minimum block size is not a power of two up to 64 KiB.
    #[error("invalid minimum block size {0}")]
    BlockSize(u32),
}

/// An export with what the server derives from it.
pub(crate) struct ExportState {
    pub(crate) export: Export,
    pub(crate) size: u64,
    pub(crate) flags: u16,
    pub(crate) max_payload: u32,
    pub(super) caps: Capabilities,
    pub(super) read_only: bool,
    pub(super) seq: Sequencer,
}

impl ExportState {
    /// Checks `export` and derives its transmission flags from the device's capabilities.
    pub(super) fn new(export: Export, max_payload: u32) -> Result<Self, ExportError> {
        if export.name.len() > MAX_STRING {
            return Err(ExportError::NameTooLong);
        }
        let b = export.min_block_size;
        if !b.is_power_of_two() || b > 65536 {
            return Err(ExportError::BlockSize(b));
        }
        let caps = export.device.capabilities();
        let read_only = export.read_only || caps.read_only;
        let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::CAN_MULTI_CONN;
        if read_only {
            flags |= tf::READ_ONLY;
        } else {
            // Every device can write zeroes (the trait's default writes zero buffers).
            flags |= tf::SEND_WRITE_ZEROES;
            if caps.discard {
                flags |= tf::SEND_TRIM;
            }
        }
        let size = export.device.size();
        Ok(ExportState {
            export,
            size,
            flags,
            max_payload,
            caps,
            read_only,
            seq: Sequencer::new(),
        })
    }

    pub(crate) fn preferred_block_size(&self) -> u32 {
        self.export.min_block_size.max(4096)
    }
}
