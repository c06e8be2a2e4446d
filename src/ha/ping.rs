//! Ping targets (`[cluster] ping`, heartbeat's `ping` directive): how many addresses on the
//! client network this node reaches. It owns the prober thread — ICMP echo requests to every
//! target each `ping-interval`, from one raw socket — and [`Reach`], the pure count of the
//! targets that answered within `ping-dead-time`. The count goes to the heartbeat
//! ([`Heartbeat::publish_reach`]), which announces it to the peer and tells the engines; the
//! rules that use it are the machine's (`cluster::machine::reach`).
//!
//! The thread never touches the engine: it only publishes a number. It waits for replies no
//! longer than until the next round is due (at most [`MAX_WAIT`]), so it notices its
//! cancellation token promptly. A target whose route is gone (the client interface down)
//! fails at `send`: that is simply no reply. Only IPv4 targets (the configuration refuses
//! others); the raw socket needs `CAP_NET_RAW`, as the AoE target does.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use pnet::packet::icmp::echo_reply::EchoReplyPacket;
use pnet::packet::icmp::echo_request::MutableEchoRequestPacket;
use pnet::packet::icmp::{IcmpPacket, IcmpTypes};
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::Packet;
use pnet::transport::{
    icmp_packet_iter, transport_channel, TransportChannelType, TransportProtocol,
    TransportReceiver, TransportSender,
};
use tokio_util::sync::CancellationToken;

use super::service::Heartbeat;
use crate::ratelimit::LogLimiter;
use crate::supervisor::Supervisor;

/// The longest the thread waits in one receive: how late it may notice its token.
pub const MAX_WAIT: Duration = Duration::from_millis(200);
/// Bytes of payload in each echo request.
const PAYLOAD: usize = 16;

/// Which targets answered within the dead time: the pure part of the prober.
#[derive(Debug, Clone)]
pub struct Reach {
    targets: Vec<Ipv4Addr>,
    last_reply: Vec<Option<Instant>>,
    dead_time: Duration,
}

impl Reach {
    /// No target has answered yet.
    pub fn new(targets: Vec<Ipv4Addr>, dead_time: Duration) -> Reach {
        let last_reply = vec![None; targets.len()];
        Reach {
            targets,
            last_reply,
            dead_time,
        }
    }

    /// An echo reply from `from` arrived at `now`; `false` if `from` is not a target.
    pub fn replied(&mut self, from: Ipv4Addr, now: Instant) -> bool {
        match self.targets.iter().position(|&t| t == from) {
            Some(i) => {
                self.last_reply[i] = Some(now);
                true
            }
            None => false,
        }
    }

    /// How many targets answered within the dead time before `now`.
    pub fn count(&self, now: Instant) -> u8 {
        self.last_reply
            .iter()
            .filter(|t| t.is_some_and(|t| now.saturating_duration_since(t) < self.dead_time))
            .count() as u8
    }

    /// The targets.
    pub fn targets(&self) -> &[Ipv4Addr] {
        &self.targets
    }
}

/// What the prober needs.
#[derive(Debug, Clone)]
pub struct PingSettings {
    /// The targets (IPv4).
    pub targets: Vec<Ipv4Addr>,
    /// Time between rounds of echo requests.
    pub interval: Duration,
    /// A target silent this long is unreachable.
    pub dead_time: Duration,
}

impl PingSettings {
    /// The settings of `[cluster]`, or `None` without ping targets.
    pub fn from_config(cluster: &crate::config::Cluster) -> Option<PingSettings> {
        let targets: Vec<Ipv4Addr> = cluster
            .ping_targets()
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        (!targets.is_empty()).then(|| PingSettings {
            targets,
            interval: cluster.ping_interval(),
            dead_time: cluster.ping_dead_time(),
        })
    }
}

/// Opens the raw ICMP socket and starts the prober thread in `group`; it publishes our reach
/// (0 until targets answer) to `heartbeat` until the group stops.
pub fn start(settings: PingSettings, heartbeat: Heartbeat, group: &Supervisor) -> io::Result<()> {
    let (tx, rx) = transport_channel(
        4096,
        TransportChannelType::Layer4(TransportProtocol::Ipv4(IpNextHeaderProtocols::Icmp)),
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("ping: cannot open a raw ICMP socket: {e}"),
        )
    })?;
    heartbeat.publish_reach(Some(0));
    let prober = Prober {
        reach: Reach::new(settings.targets.clone(), settings.dead_time),
        interval: settings.interval,
        identifier: rand::random(),
        sequence: 0,
        tx,
        rx,
        heartbeat,
        published: Some(0),
    };
    tracing::info!(
        "ping targets {:?}: an echo request each every {:?}, unreachable after {:?} without a reply",
        settings.targets,
        settings.interval,
        settings.dead_time
    );
    group.spawn("ping", move |token| prober.run(token))?;
    Ok(())
}

struct Prober {
    reach: Reach,
    interval: Duration,
    identifier: u16,
    sequence: u16,
    tx: TransportSender,
    rx: TransportReceiver,
    heartbeat: Heartbeat,
    published: Option<u8>,
}

impl Prober {
    fn run(mut self, token: CancellationToken) {
        let mut next_round = Instant::now();
        while !token.is_cancelled() {
            let now = Instant::now();
            if now >= next_round {
                self.send_round();
                next_round = now + self.interval;
            }
            let wait = next_round
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), MAX_WAIT);
            self.receive(wait);
            self.publish(Instant::now());
        }
    }

    fn send_round(&mut self) {
        self.sequence = self.sequence.wrapping_add(1);
        let mut buf = [0u8; 8 + PAYLOAD];
        let mut request = MutableEchoRequestPacket::new(&mut buf).expect("buffer fits");
        request.set_icmp_type(IcmpTypes::EchoRequest);
        request.set_identifier(self.identifier);
        request.set_sequence_number(self.sequence);
        let checksum =
            pnet::packet::icmp::checksum(&IcmpPacket::new(request.packet()).expect("fits"));
        request.set_checksum(checksum);
        for &target in self.reach.targets().to_vec().iter() {
            if let Err(e) = self.tx.send_to(
                IcmpPacket::new(request.packet()).expect("fits"),
                IpAddr::V4(target),
            ) {
                // No route (the client interface is down): no reply, nothing more.
                static SEND_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60), 2);
                crate::warn_limited!(SEND_LOG, %target, "cannot send an echo request: {e}");
            }
        }
    }

    /// Takes in the echo replies that arrive within `wait` (ours: our identifier).
    fn receive(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut replies = icmp_packet_iter(&mut self.rx);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match replies.next_with_timeout(left.max(Duration::from_millis(1))) {
                Ok(Some((packet, IpAddr::V4(from)))) => {
                    if packet.get_icmp_type() != IcmpTypes::EchoReply {
                        continue;
                    }
                    let Some(reply) = EchoReplyPacket::new(packet.packet()) else {
                        continue;
                    };
                    if reply.get_identifier() == self.identifier {
                        self.reach.replied(from, Instant::now());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    static RECV_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(60), 2);
                    crate::warn_limited!(RECV_LOG, "ping: receive failed: {e}");
                    std::thread::sleep(wait.min(MAX_WAIT));
                    return;
                }
            }
        }
    }

    fn publish(&mut self, now: Instant) {
        let count = self.reach.count(now);
        if Some(count) != self.published {
            tracing::info!(
                "ping: reaching {count} of {} targets",
                self.reach.targets().len()
            );
            self.published = Some(count);
            self.heartbeat.publish_reach(Some(count));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_counts_until_its_dead_time_passes() {
        let t0 = Instant::now();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        let mut reach = Reach::new(vec![a, b], Duration::from_secs(3));
        assert_eq!(reach.count(t0), 0);
        assert!(reach.replied(a, t0));
        assert!(!reach.replied(Ipv4Addr::new(10, 0, 0, 9), t0));
        assert_eq!(reach.count(t0), 1);
        assert!(reach.replied(b, t0 + Duration::from_secs(1)));
        assert_eq!(reach.count(t0 + Duration::from_secs(2)), 2);
        // a's reply is 3 s old: no longer counted; b's still is.
        assert_eq!(reach.count(t0 + Duration::from_secs(3)), 1);
        assert_eq!(reach.count(t0 + Duration::from_secs(4)), 0);
    }
}
