//! `PACKET_MMAP` (TPACKET_V2) receive and transmit rings on one packet socket.
//!
//! The kernel writes received frames into a shared ring and sends frames we place in another,
//! so a busy frame path makes no syscall per frame: it reads frames where the kernel put them,
//! builds replies in place in the transmit ring (a read's data is `pread` straight into the
//! outgoing frame), and kicks the transmit ring once per batch. It sleeps in `poll` only when
//! the receive ring is empty.
//!
//! Ownership of each slot is handed back and forth through its status word, with acquire /
//! release ordering as the kernel's documentation requires.

use super::packet::Interface;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Bytes per ring slot: a 9000-byte MTU frame plus the slot header, rounded to a power of two.
pub const SLOT_SIZE: usize = 16 * 1024;
/// Bytes of frame a transmit slot holds.
pub const TX_CAPACITY: usize = SLOT_SIZE - TX_DATA_OFFSET;
const BLOCK_SIZE: usize = 1 << 20;
const SLOTS_PER_BLOCK: usize = BLOCK_SIZE / SLOT_SIZE;
/// Where frame data starts in a transmit slot: TPACKET2_HDRLEN - sizeof(sockaddr_ll).
const TX_DATA_OFFSET: usize = 32;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_SENDING: u32 = 2;
const TP_STATUS_WRONG_FORMAT: u32 = 4;

/// `struct tpacket_req`.
#[repr(C)]
struct TpacketReq {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
}

/// A socket with mapped receive and transmit rings.
pub struct PacketRing {
    fd: OwnedFd,
    /// The interface the socket is bound to.
    ifindex: u32,
    map: *mut u8,
    map_len: usize,
    rx: RxRing,
    tx: TxRing,
}

/// The receive half of a [`PacketRing`].
pub struct RxRing {
    base: *mut u8,
    slots: usize,
    next: usize,
}

/// The transmit half of a [`PacketRing`].
pub struct TxRing {
    fd: libc::c_int,
    base: *mut u8,
    slots: usize,
    next: usize,
    pending: usize,
    staged: usize,
}

// SAFETY: the mapping is owned by the ring alone and touched only through `&mut` borrows of
// its halves, which the borrow checker keeps apart.
#[allow(unsafe_code)]
unsafe impl Send for PacketRing {}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl PacketRing {
    /// Opens a socket on `iface` for `ethertype` with `rx_blocks` and `tx_blocks` MiB of ring.
    #[allow(unsafe_code)]
    pub fn open(
        iface: &Interface,
        ethertype: u16,
        rx_blocks: usize,
        tx_blocks: usize,
    ) -> io::Result<PacketRing> {
        // SAFETY: socket(2); the fd is owned by OwnedFd at once.
        let fd = unsafe {
            let fd = cvt(libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ethertype.to_be()),
            ))?;
            OwnedFd::from_raw_fd(fd)
        };
        let raw = fd.as_raw_fd();
        let set =
            |level: i32, name: i32, value: *const libc::c_void, len: usize| -> io::Result<()> {
                // SAFETY: value points at `len` live bytes for the duration of the call.
                cvt(unsafe { libc::setsockopt(raw, level, name, value, len as libc::socklen_t) })
                    .map(|_| ())
            };
        let version: i32 = libc::tpacket_versions::TPACKET_V2 as i32;
        set(
            libc::SOL_PACKET,
            libc::PACKET_VERSION,
            &version as *const i32 as *const _,
            4,
        )?;
        let one: i32 = 1;
        let _ = set(
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            &one as *const i32 as *const _,
            4,
        );
        let _ = set(
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const i32 as *const _,
            4,
        );
        for (option, blocks) in [
            (libc::PACKET_RX_RING, rx_blocks),
            (libc::PACKET_TX_RING, tx_blocks),
        ] {
            let request = TpacketReq {
                block_size: BLOCK_SIZE as u32,
                block_nr: blocks as u32,
                frame_size: SLOT_SIZE as u32,
                frame_nr: (blocks * SLOTS_PER_BLOCK) as u32,
            };
            set(
                libc::SOL_PACKET,
                option,
                &request as *const TpacketReq as *const _,
                std::mem::size_of::<TpacketReq>(),
            )?;
        }
        let map_len = (rx_blocks + tx_blocks) * BLOCK_SIZE;
        // SAFETY: maps the rings the kernel just allocated for this socket; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = map as *mut u8;
        let rx_slots = rx_blocks * SLOTS_PER_BLOCK;
        let ring = PacketRing {
            rx: RxRing {
                base: map,
                slots: rx_slots,
                next: 0,
            },
            tx: TxRing {
                fd: raw,
                // SAFETY: the TX ring follows the RX ring inside the mapping.
                base: unsafe { map.add(rx_slots * SLOT_SIZE) },
                slots: tx_blocks * SLOTS_PER_BLOCK,
                next: 0,
                pending: 0,
                staged: 0,
            },
            fd,
            ifindex: iface.index,
            map,
            map_len,
        };
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = iface.index as i32;
        // SAFETY: a fully initialised sockaddr_ll and its exact size.
        cvt(unsafe {
            libc::bind(
                raw,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        })?;
        Ok(ring)
    }

    /// Receives frames addressed to `mac` too, for as long as the ring's socket is open (see
    /// [`super::PacketSocket::join_unicast`]).
    pub fn join_unicast(&self, mac: crate::wire::MacAddr) -> io::Result<()> {
        super::packet::add_unicast_membership(self.fd.as_raw_fd(), self.ifindex, mac)
    }

    /// The two halves, usable at the same time.
    pub fn split(&mut self) -> (&mut RxRing, &mut TxRing) {
        (&mut self.rx, &mut self.tx)
    }

    /// Waits up to `timeout` until a received frame is ready. Returns whether one is.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        if self.rx.ready() {
            return Ok(true);
        }
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        Ok(self.rx.ready())
    }

    /// Sets the kernel's socket buffer sizes (the rings hold the frames; this bounds skbs in flight).
    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        let value = bytes.min(i32::MAX as usize) as i32;
        // SAFETY: passes a pointer to a live i32 and its size.
        #[allow(unsafe_code)]
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &value as *const i32 as *const _,
                4,
            )
        })
        .map(|_| ())
    }
}

impl Drop for PacketRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `open`; no references into it survive
        // (every slice handed out borrows `self`).
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.map as *mut libc::c_void, self.map_len);
        }
    }
}

fn slot_status(slot: *mut u8) -> &'static AtomicU32 {
    // SAFETY: every slot starts with the 4-byte aligned tp_status word, shared with the kernel
    // for as long as the mapping lives (which outlives every use here).
    #[allow(unsafe_code)]
    unsafe {
        &*(slot as *const AtomicU32)
    }
}

impl RxRing {
    fn slot(&self, index: usize) -> *mut u8 {
        // SAFETY (for callers): slot `index < slots` lies inside the RX part of the mapping.
        #[allow(unsafe_code)]
        unsafe {
            self.base.add(index * SLOT_SIZE)
        }
    }

    fn ready(&self) -> bool {
        slot_status(self.slot(self.next)).load(Ordering::Acquire) & TP_STATUS_USER != 0
    }

    /// The next received frame, if the kernel has handed one over. The slot stays ours until
    /// [`RxRing::release`].
    pub fn next(&self) -> Option<&[u8]> {
        if !self.ready() {
            return None;
        }
        let slot = self.slot(self.next);
        // SAFETY: the kernel handed the slot over (status USER, acquire); the header is a
        // tpacket2_hdr, and tp_mac/tp_snaplen are checked to lie inside the slot.
        #[allow(unsafe_code)]
        unsafe {
            let header = &*(slot as *const libc::tpacket2_hdr);
            let start = usize::from(header.tp_mac);
            let len = header.tp_snaplen as usize;
            if start + len > SLOT_SIZE {
                return Some(&[]);
            }
            Some(std::slice::from_raw_parts(slot.add(start), len))
        }
    }

    /// Hands the current slot back to the kernel and moves to the next.
    pub fn release(&mut self) {
        slot_status(self.slot(self.next)).store(TP_STATUS_KERNEL, Ordering::Release);
        self.next = (self.next + 1) % self.slots;
    }

    /// The received frame `ahead` slots past the current one, if the kernel has handed over
    /// every slot up to it. Frames stay ours until released, so a batch can be looked at as
    /// a whole and handed back with [`RxRing::release_many`].
    pub fn peek(&self, ahead: usize) -> Option<&[u8]> {
        if ahead >= self.slots {
            return None;
        }
        let slot = self.slot((self.next + ahead) % self.slots);
        if slot_status(slot).load(Ordering::Acquire) & TP_STATUS_USER == 0 {
            return None;
        }
        // SAFETY: as in `next`: the kernel handed the slot over (status USER, acquire) and
        // tp_mac/tp_snaplen are checked to lie inside the slot.
        #[allow(unsafe_code)]
        unsafe {
            let header = &*(slot as *const libc::tpacket2_hdr);
            let start = usize::from(header.tp_mac);
            let len = header.tp_snaplen as usize;
            if start + len > SLOT_SIZE {
                return Some(&[]);
            }
            Some(std::slice::from_raw_parts(slot.add(start), len))
        }
    }

    /// Hands the current slot and the `count - 1` after it back to the kernel, in order.
    pub fn release_many(&mut self, count: usize) {
        for _ in 0..count.min(self.slots) {
            self.release();
        }
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.slots
    }
}

impl TxRing {
    fn slot(&self, index: usize) -> *mut u8 {
        // SAFETY (for callers): slot `index < slots` lies inside the TX part of the mapping.
        #[allow(unsafe_code)]
        unsafe {
            self.base.add(index * SLOT_SIZE)
        }
    }

    /// A free slot's frame buffer, waiting for the kernel to free one if the ring is full.
    /// Not while slots are staged (see [`TxRing::stage`]).
    pub fn buffer(&mut self) -> io::Result<&mut [u8]> {
        debug_assert_eq!(self.staged, 0, "buffer() while slots are staged");
        self.wait_free(self.next)?;
        Ok(self.data_mut(self.next))
    }

    /// Reserves the next free slot after those already staged, waiting for the kernel to free
    /// it if need be, and returns its position among the staged slots. Staged slots are
    /// filled in any order ([`TxRing::staged_buffer`], [`TxRing::set_staged_len`]) and
    /// queued together, in ring order, by [`TxRing::commit_staged`]; until then the kernel
    /// sends none of them (it stops at the first slot not handed over).
    pub fn stage(&mut self) -> io::Result<usize> {
        if self.staged + 1 >= self.slots {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "every transmit slot is staged",
            ));
        }
        let index = (self.next + self.staged) % self.slots;
        self.wait_free(index)?;
        self.staged += 1;
        Ok(self.staged - 1)
    }

    /// The frame buffer of staged slot `position` (as returned by [`TxRing::stage`]).
    pub fn staged_buffer(&mut self, position: usize) -> &mut [u8] {
        assert!(position < self.staged, "slot {position} is not staged");
        self.data_mut((self.next + position) % self.slots)
    }

    /// The frame buffers of several staged slots at once (distinct positions, each as
    /// returned by [`TxRing::stage`]), in the order given.
    pub fn staged_buffers(&mut self, positions: &[usize]) -> Vec<&mut [u8]> {
        let mut seen = positions.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), positions.len(), "staged slots asked for twice");
        positions
            .iter()
            .map(|&position| {
                assert!(position < self.staged, "slot {position} is not staged");
                let slot = self.slot((self.next + position) % self.slots);
                // SAFETY: each slot is ours (staged) and the positions are distinct, so the
                // slices do not overlap; `&mut self` keeps any other buffer of this ring from
                // being handed out while they live.
                #[allow(unsafe_code)]
                unsafe {
                    std::slice::from_raw_parts_mut(slot.add(TX_DATA_OFFSET), TX_CAPACITY)
                }
            })
            .collect()
    }

    /// Sets the length of the frame in staged slot `position`.
    pub fn set_staged_len(&mut self, position: usize, len: usize) {
        assert!(position < self.staged, "slot {position} is not staged");
        let slot = self.slot((self.next + position) % self.slots);
        // SAFETY: the slot is ours (staged: status AVAILABLE, seen with acquire) and the
        // kernel does not look at it before `commit_staged` releases it.
        #[allow(unsafe_code)]
        unsafe {
            (*(slot as *mut libc::tpacket2_hdr)).tp_len = len.min(TX_CAPACITY) as u32;
        }
    }

    /// Hands every staged slot to the kernel, in ring order (it sends them at the next kick).
    pub fn commit_staged(&mut self) {
        for _ in 0..self.staged {
            let slot = self.slot(self.next);
            slot_status(slot).store(TP_STATUS_SEND_REQUEST, Ordering::Release);
            self.next = (self.next + 1) % self.slots;
            self.pending += 1;
        }
        self.staged = 0;
    }

    /// Gives every staged slot back unsent (a reply that must not go out after all).
    pub fn discard_staged(&mut self) {
        // Staging only reserved the slots: they are still AVAILABLE to us, never seen by the
        // kernel, so forgetting them is all it takes.
        self.staged = 0;
    }

    /// Frames staged and not yet committed.
    pub fn staged(&self) -> usize {
        self.staged
    }

    fn data_mut(&mut self, index: usize) -> &mut [u8] {
        let slot = self.slot(index);
        // SAFETY: the caller owns slot `index` (status AVAILABLE, seen with acquire) and the
        // data area lies within it; `&mut self` keeps any other buffer of this ring from being
        // handed out meanwhile.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(slot.add(TX_DATA_OFFSET), TX_CAPACITY)
        }
    }

    /// Waits until slot `index` is free, kicking the ring so the kernel frees slots.
    fn wait_free(&mut self, index: usize) -> io::Result<()> {
        let slot = self.slot(index);
        let mut spins = 0u32;
        loop {
            let status = slot_status(slot).load(Ordering::Acquire);
            if status == TP_STATUS_AVAILABLE || status & TP_STATUS_WRONG_FORMAT != 0 {
                break;
            }
            if status & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING) != 0 {
                // Every slot holds a frame not sent yet: kick the ring and wait for room.
                self.kick()?;
                spins += 1;
                if spins > 1000 {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
        Ok(())
    }

    /// Queues the frame written into the current slot's buffer (its first `len` bytes).
    pub fn commit(&mut self, len: usize) {
        let slot = self.slot(self.next);
        // SAFETY: the slot is ours (see `buffer`); tp_len is written before the status store
        // (release) that hands the slot to the kernel.
        #[allow(unsafe_code)]
        unsafe {
            (*(slot as *mut libc::tpacket2_hdr)).tp_len = len as u32;
        }
        slot_status(slot).store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.next = (self.next + 1) % self.slots;
        self.pending += 1;
    }

    /// Asks the kernel to send every queued slot.
    pub fn kick(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: a send with a null buffer of length 0 is how a TX ring is flushed.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::send(self.fd, std::ptr::null(), 0, libc::MSG_DONTWAIT) };
            if rc >= 0 {
                self.pending = 0;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => return Ok(()),
                _ => return Err(err),
            }
        }
    }

    /// Frames queued since the last kick.
    pub fn pending(&self) -> usize {
        self.pending
    }
}
