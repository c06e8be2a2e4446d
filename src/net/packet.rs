//! `AF_PACKET` sockets and interface queries.

use crate::wire::MacAddr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// What the target needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// Kernel interface index.
    pub index: u32,
    /// Hardware address.
    pub mac: MacAddr,
}

impl Interface {
    /// Looks up an interface by name in the current network namespace.
    pub fn by_name(name: &str) -> io::Result<Interface> {
        let found = pnet::datalink::interfaces()
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no interface named {name:?}"),
                )
            })?;
        let mac = found.mac.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface {name:?} has no MAC address"),
            )
        })?;
        Ok(Interface {
            name: found.name,
            index: found.index,
            mac: MacAddr(mac.octets()),
        })
    }

    /// Reads the interface's current MTU (it can change while we run).
    pub fn mtu(&self) -> io::Result<u32> {
        let sock = udp_socket()?;
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: `req` is a properly initialised ifreq with a NUL-terminated name; SIOCGIFMTU
        // writes only `ifr_mtu` inside it; the fd is a valid socket for the whole call.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: after a successful SIOCGIFMTU the union holds the MTU.
        #[allow(unsafe_code)]
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        Ok(mtu.max(0) as u32)
    }
}

/// Makes the packet socket `fd` receive frames addressed to `mac` on interface `ifindex`
/// (`PACKET_ADD_MEMBERSHIP` with `PACKET_MR_UNICAST`): the kernel adds `mac` to the
/// interface's unicast filter (or puts the interface in promiscuous mode if it has none)
/// for as long as the socket stays open. Closing the socket — also when the process is killed —
/// takes the address away again; the interface's own MAC never changes.
pub(super) fn add_unicast_membership(
    fd: libc::c_int,
    ifindex: u32,
    mac: MacAddr,
) -> io::Result<()> {
    let mut address = [0u8; 8];
    address[..6].copy_from_slice(&mac.0);
    let request = libc::packet_mreq {
        mr_ifindex: ifindex as libc::c_int,
        mr_type: libc::PACKET_MR_UNICAST as libc::c_ushort,
        mr_alen: 6,
        mr_address: address,
    };
    // SAFETY: passes a pointer to a live, fully initialised packet_mreq and its exact size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &request as *const libc::packet_mreq as *const libc::c_void,
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn udp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned fd is owned by OwnedFd exactly once.
    #[allow(unsafe_code)]
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// A raw packet socket bound to one interface and one ethertype.
///
/// `send` and `recv` take `&self` and may be called from different threads at once.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    /// SO_RCVTIMEO currently set, in microseconds (0: none).
    receive_timeout_us: std::sync::atomic::AtomicU64,
}

impl PacketSocket {
    /// Opens a socket on `iface` receiving only frames of `ethertype`, not our own outgoing ones.
    pub fn open(iface: &Interface, ethertype: u16) -> io::Result<PacketSocket> {
        let proto = ethertype.to_be();
        // SAFETY: plain socket(2) call; the fd is immediately owned by OwnedFd.
        #[allow(unsafe_code)]
        let fd = unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let sock = PacketSocket {
            fd,
            ifindex: iface.index,
            receive_timeout_us: std::sync::atomic::AtomicU64::new(0),
        };
        // Our own replies would otherwise come back to us on the same socket.
        let _ = sock.set_int_option(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        let mut addr = sock.sockaddr(ethertype, [0; 6]);
        addr.sll_pkttype = 0;
        // SAFETY: `addr` is a fully initialised sockaddr_ll and the length passed is its size.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Receives frames addressed to `mac` too, for as long as this socket is open (see
    /// `PACKET_MR_UNICAST` in packet(7)). Frames sent from this socket may carry `mac` as
    /// their source whether or not it was joined; joining is what brings the answers back.
    pub fn join_unicast(&self, mac: MacAddr) -> io::Result<()> {
        add_unicast_membership(self.fd.as_raw_fd(), self.ifindex, mac)
    }

    fn sockaddr(&self, ethertype: u16, dst: [u8; 6]) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        #[allow(unsafe_code)]
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
        addr
    }

    fn set_int_option(&self, level: i32, name: i32, value: i32) -> io::Result<()> {
        // SAFETY: passes a pointer to a live i32 and its exact size.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                &value as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sets the kernel receive and send buffers to at least `bytes` each (root may exceed
    /// the sysctl limits, which is what lets us hold every advertised buffer).
    pub fn set_buffer_sizes(&self, bytes: usize) -> io::Result<()> {
        let bytes = bytes.min(i32::MAX as usize) as i32;
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if self.set_int_option(libc::SOL_SOCKET, force, bytes).is_err() {
                self.set_int_option(libc::SOL_SOCKET, plain, bytes)?;
            }
        }
        Ok(())
    }

    /// Receives one frame into `buf`, waiting at most `timeout`. `Ok(None)` on timeout.
    /// Frames longer than `buf` are truncated to it (callers size `buf` for the MTU).
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(err)
            };
        }
        if rc == 0 {
            return Ok(None);
        }
        self.try_recv(buf)
    }

    /// Receives one frame if one is queued, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(n as usize))
    }

    /// Sends one complete Ethernet frame (destination MAC taken from the frame itself).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.send_batch(&[frame])
    }

    /// Sends several complete frames with as few `sendmmsg` calls as the kernel allows.
    /// Returns once every frame is queued.
    pub fn send_batch(&self, frames: &[&[u8]]) -> io::Result<()> {
        self.send_frames(frames, true).map(|_| ())
    }

    /// Queues as many of `frames` as the send queue takes now, never waiting for room: returns
    /// how many were queued (the rest are dropped, as a full link drops them).
    pub fn try_send_batch(&self, frames: &[&[u8]]) -> io::Result<usize> {
        self.send_frames(frames, false)
    }

    fn send_frames(&self, frames: &[&[u8]], wait_for_room: bool) -> io::Result<usize> {
        let flags = if wait_for_room { 0 } else { libc::MSG_DONTWAIT };
        let mut sent = 0;
        while sent < frames.len() {
            let batch = &frames[sent..frames.len().min(sent + 64)];
            let mut addrs = Vec::with_capacity(batch.len());
            for frame in batch {
                if frame.len() < 14 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "frame shorter than an Ethernet header",
                    ));
                }
                let mut dst = [0u8; 6];
                dst.copy_from_slice(&frame[..6]);
                addrs.push(self.sockaddr(u16::from_be_bytes([frame[12], frame[13]]), dst));
            }
            let mut iovecs: Vec<libc::iovec> = batch
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                })
                .collect();
            // SAFETY: mmsghdr is plain old data; all-zero is valid before we fill it in.
            #[allow(unsafe_code)]
            let mut headers: Vec<libc::mmsghdr> = (0..batch.len())
                .map(|_| unsafe { std::mem::zeroed() })
                .collect();
            for (i, header) in headers.iter_mut().enumerate() {
                header.msg_hdr.msg_name =
                    &mut addrs[i] as *mut libc::sockaddr_ll as *mut libc::c_void;
                header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                header.msg_hdr.msg_iov = &mut iovecs[i];
                header.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: every header points at a live iovec and sockaddr that outlive the call;
            // the iovecs point at frames borrowed for the whole call.
            #[allow(unsafe_code)]
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    headers.as_mut_ptr(),
                    headers.len() as u32,
                    flags,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The send queue is full: wait for room rather than lose a reply.
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) if wait_for_room => {
                        std::thread::sleep(Duration::from_micros(50));
                        continue;
                    }
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) => return Ok(sent),
                    _ => return Err(err),
                }
            }
            sent += n as usize;
        }
        Ok(sent)
    }

    /// Receives up to `bufs.len()` frames with one blocking `recvmmsg`, waiting at most
    /// `timeout` for the first. Writes each frame's length into `lens` and returns how many
    /// arrived (0 on timeout).
    pub fn recv_batch(
        &self,
        bufs: &mut [Vec<u8>],
        lens: &mut [usize],
        timeout: Duration,
    ) -> io::Result<usize> {
        // The timeout lives in the socket (SO_RCVTIMEO), so a batch costs one syscall, not a
        // poll plus a receive; it is only set again when it changes.
        let micros = timeout.as_micros().clamp(1, u64::MAX as u128) as u64;
        if self
            .receive_timeout_us
            .swap(micros, std::sync::atomic::Ordering::Relaxed)
            != micros
        {
            let tv = libc::timeval {
                tv_sec: (micros / 1_000_000) as libc::time_t,
                tv_usec: (micros % 1_000_000) as libc::suseconds_t,
            };
            // SAFETY: passes a pointer to a live timeval and its exact size.
            #[allow(unsafe_code)]
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let count = bufs.len().min(lens.len());
        let mut iovecs: Vec<libc::iovec> = bufs[..count]
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain old data; all-zero is valid before we fill it in.
        #[allow(unsafe_code)]
        let mut headers: Vec<libc::mmsghdr> =
            (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (header, iov) in headers.iter_mut().zip(iovecs.iter_mut()) {
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each header points at a live iovec over a live, exclusively borrowed buffer.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                headers.as_mut_ptr(),
                count as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        for (len, header) in lens.iter_mut().zip(&headers[..n as usize]) {
            *len = header.msg_len as usize;
        }
        Ok(n as usize)
    }
}
