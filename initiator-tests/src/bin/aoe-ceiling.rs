//! `aoe-ceiling`: the smallest AoE responder that does no disk I/O, for benchmarks.
//!
//! It measures what the lab path itself allows (veth, bridge, packet sockets, syscalls), so
//! it shares no code with twinblade: its own raw socket, its own byte offsets, batched
//! `recvmmsg`/`sendmmsg`, one thread. Reads return zeros, writes are acknowledged and
//! dropped, IDENTIFY reports the given capacity, config queries get bufcnt 64.
//!
//! Usage: `aoe-ceiling IFACE SHELF SLOT SECTORS`

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;

const ETH_P_AOE: u16 = 0x88A2;
const BATCH: usize = 64;
const BUF: usize = 9216 + 1024;

fn check(rc: i64, what: &str) -> io::Result<i64> {
    if rc < 0 {
        let err = io::Error::last_os_error();
        Err(io::Error::new(err.kind(), format!("{what}: {err}")))
    } else {
        Ok(rc)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: aoe-ceiling IFACE SHELF SLOT SECTORS");
        std::process::exit(2);
    }
    let shelf: u16 = args[2].parse().expect("shelf");
    let slot: u8 = args[3].parse().expect("slot");
    let sectors: u64 = args[4].parse().expect("sectors");
    if let Err(err) = serve(&args[1], shelf, slot, sectors) {
        eprintln!("aoe-ceiling: {err}");
        std::process::exit(1);
    }
}

fn serve(iface: &str, shelf: u16, slot: u8, sectors: u64) -> io::Result<()> {
    let name = CString::new(iface).expect("interface name");
    // SAFETY: FFI calls with valid arguments; buffers outlive every call that uses them.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {iface}"),
            ));
        }
        let fd = check(
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_AOE.to_be()),
            ) as i64,
            "socket",
        )? as i32;
        let one: i32 = 1;
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            &one as *const i32 as *const _,
            4,
        );
        let size: i32 = 8 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const i32 as *const _,
            4,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            &size as *const i32 as *const _,
            4,
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_AOE.to_be();
        addr.sll_ifindex = index as i32;
        check(
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) as i64,
            "bind",
        )?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        check(
            libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) as i64,
            "SIOCGIFHWADDR",
        )?;
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(req.ifr_ifru.ifru_hwaddr.sa_data.iter()) {
            *m = *b as u8;
        }
        check(
            libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) as i64,
            "SIOCGIFMTU",
        )?;
        let mtu = req.ifr_ifru.ifru_mtu as usize;
        let max_sectors = ((mtu - 36) / 512).min(255) as u8;
        let mut inbox = vec![[0u8; BUF]; BATCH];
        let mut outbox = vec![[0u8; BUF]; BATCH];
        let mut in_iov: Vec<libc::iovec> = inbox
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut _,
                iov_len: BUF,
            })
            .collect();
        let mut in_msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| std::mem::zeroed()).collect();
        for (m, iov) in in_msgs.iter_mut().zip(in_iov.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut out_iov: Vec<libc::iovec> = outbox
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut _,
                iov_len: 0,
            })
            .collect();
        let mut out_addr: Vec<libc::sockaddr_ll> = (0..BATCH).map(|_| addr).collect();
        let mut out_msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| std::mem::zeroed()).collect();
        eprintln!("aoe-ceiling: e{shelf}.{slot} on {iface} mtu {mtu}, {sectors} sectors, no I/O");
        loop {
            let n = libc::recvmmsg(
                fd,
                in_msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            );
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::last_os_error());
            }
            let mut k = 0;
            for i in 0..n as usize {
                let len = in_msgs[i].msg_len as usize;
                let f = &inbox[i][..len];
                if len < 24 || f[14] & 0x08 != 0 {
                    continue;
                }
                let s = u16::from_be_bytes([f[16], f[17]]);
                if (s != shelf && s != 0xFFFF) || (f[18] != slot && f[18] != 0xFF) {
                    continue;
                }
                let out = &mut outbox[k];
                out[..24].copy_from_slice(&f[..24]);
                out[..6].copy_from_slice(&f[6..12]);
                out[6..12].copy_from_slice(&mac);
                out[14] = 0x10 | 0x08;
                out[15] = 0;
                out[16..18].copy_from_slice(&shelf.to_be_bytes());
                out[18] = slot;
                let reply_len = match f[19] {
                    1 if len >= 32 => {
                        out[24..26].copy_from_slice(&64u16.to_be_bytes());
                        out[26..28].copy_from_slice(&0x4000u16.to_be_bytes());
                        out[28] = max_sectors;
                        out[29] = 0x10 | (f[29] & 0x0F);
                        out[30..32].copy_from_slice(&[0, 0]);
                        60
                    }
                    0 if len >= 36 => {
                        out[24..36].copy_from_slice(&f[24..36]);
                        let count = usize::from(f[26]);
                        let cmd = f[27];
                        out[25] = 0;
                        out[26] = 0;
                        out[27] = 0x40;
                        match cmd {
                            0xEC => {
                                let id = &mut out[36..36 + 512];
                                id.fill(0);
                                id[166..168].copy_from_slice(&0x0400u16.to_le_bytes());
                                id[172..174].copy_from_slice(&0x0400u16.to_le_bytes());
                                id[200..208].copy_from_slice(&sectors.to_le_bytes());
                                36 + 512
                            }
                            0x20 | 0x24 => {
                                out[36..36 + count * 512].fill(0);
                                36 + count * 512
                            }
                            _ => 60,
                        }
                    }
                    _ => continue,
                };
                out_iov[k].iov_len = reply_len;
                out_addr[k].sll_addr[..6].copy_from_slice(&f[6..12]);
                out_addr[k].sll_halen = 6;
                out_msgs[k].msg_hdr.msg_iov = &mut out_iov[k];
                out_msgs[k].msg_hdr.msg_iovlen = 1;
                out_msgs[k].msg_hdr.msg_name = &mut out_addr[k] as *mut _ as *mut _;
                out_msgs[k].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                k += 1;
            }
            let mut sent = 0;
            while sent < k {
                let rc = libc::sendmmsg(fd, out_msgs[sent..].as_mut_ptr(), (k - sent) as u32, 0);
                if rc < 0 {
                    let err = io::Error::last_os_error();
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EINTR | libc::ENOBUFS | libc::EAGAIN)
                    ) {
                        continue;
                    }
                    return Err(err);
                }
                sent += rc as usize;
            }
        }
    }
}
