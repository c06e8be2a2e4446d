//! A blade telling the wire where it lives: the unsolicited config response sent when its
//! gate opens, and for a blade at a service MAC the opening burst and the refresh that keep
//! every bridge's forwarding entry for the MAC pointing at this node.

use super::Route;
use crate::export::aoe::blade::Port;
use crate::net::Interface;
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use std::io;
use std::time::{Duration, Instant};

/// Announces sent in a row when the gate of a blade at a service MAC opens. The announce is
/// also what moves every bridge's forwarding entry for the MAC to this node, so one lost frame
/// must not leave the entry pointing at the node the MAC came from. A blade at its
/// interface's MAC announces once, as vblade does.
pub const SERVICE_ANNOUNCE_BURST: u32 = 3;
/// Time between the announces of that burst.
pub const ANNOUNCE_SPACING: Duration = Duration::from_millis(100);
/// How often a blade at a service MAC announces itself while its gate stays open (keepalived's
/// `garp_master_refresh`): one stray frame from the node the MAC came from — one that woke up
/// from a freeze — steers a bridge's forwarding entry away until the owner sends again, and a
/// blade nobody asks anything sends nothing else. A little under a second, so that waking up
/// late never stretches the gap between two announces beyond one.
pub const ANNOUNCE_REFRESH: Duration = Duration::from_millis(900);

/// When one blade announces itself next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct AnnounceSchedule {
    /// When the next announce is due; `None` while the gate is closed, and after the single
    /// announce of a blade that does not refresh.
    pub(super) next: Option<Instant>,
    /// Announces of the opening burst left after the next one.
    burst_left: u32,
}

impl AnnounceSchedule {
    /// The gate opened at `now`: `burst` announces start now.
    pub(super) fn opened(&mut self, now: Instant, burst: u32) {
        self.next = Some(now);
        self.burst_left = burst.saturating_sub(1);
    }

    /// The gate is closed: nothing more until it opens again.
    pub(super) fn closed(&mut self) {
        *self = AnnounceSchedule::default();
    }

    /// Whether an announce is due at `now`; if so, it counts as sent and the following one
    /// is scheduled (after the burst, every [`ANNOUNCE_REFRESH`] if `refresh`).
    pub(super) fn take_due(&mut self, now: Instant, refresh: bool) -> bool {
        if self.next.is_none_or(|due| due > now) {
            return false;
        }
        self.next = if self.burst_left > 0 {
            self.burst_left -= 1;
            Some(now + ANNOUNCE_SPACING)
        } else if refresh {
            Some(now + ANNOUNCE_REFRESH)
        } else {
            None
        };
        true
    }
}

/// Sends the blade's unsolicited config response from `port.mac` (broadcast, or to each
/// masked MAC) and counts it. `first`: the first since the gate opened (logged).
pub(super) fn announce(
    scratch: &mut [u8],
    iface: &Interface,
    port: &Port,
    route: &Route,
    first: bool,
    send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) {
    static ANNOUNCE_LOG: LogLimiter = LogLimiter::network();
    let blade = route.lock();
    for dst in blade.announce_destinations() {
        let len = blade.announce(port, dst, scratch);
        // The gate was open an instant ago, but it is the gate at send time that counts.
        if !route.may_send(1) {
            return;
        }
        match send(&scratch[..len]) {
            Ok(()) => route.stats.count_announce(),
            Err(err) => {
                warn_limited!(ANNOUNCE_LOG, blade = %blade.config().name(), iface = %iface.name, %err, "announce failed")
            }
        }
    }
    if first {
        tracing::info!(blade = %blade.config().name(), iface = %iface.name, mac = %port.mac, "announced");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Announces `schedule` sends when looked at every `step` from `start` until `end`.
    fn announces_between(
        schedule: &mut AnnounceSchedule,
        start: Instant,
        end: Duration,
        step: Duration,
        refresh: bool,
    ) -> Vec<Duration> {
        let mut sent = Vec::new();
        let mut at = Duration::ZERO;
        while at <= end {
            if schedule.take_due(start + at, refresh) {
                sent.push(at);
            }
            at += step;
        }
        sent
    }

    #[test]
    fn a_blade_at_its_interface_mac_announces_once_when_the_gate_opens() {
        let start = Instant::now();
        let mut schedule = AnnounceSchedule::default();
        assert!(!schedule.take_due(start, false), "closed: nothing due");
        schedule.opened(start, 1);
        let sent = announces_between(
            &mut schedule,
            start,
            Duration::from_secs(5),
            Duration::from_millis(10),
            false,
        );
        assert_eq!(sent, vec![Duration::ZERO]);
    }

    #[test]
    fn a_service_mac_announces_a_burst_then_refreshes_while_open() {
        let start = Instant::now();
        let mut schedule = AnnounceSchedule::default();
        schedule.opened(start, SERVICE_ANNOUNCE_BURST);
        let sent = announces_between(
            &mut schedule,
            start,
            Duration::from_millis(4_950),
            Duration::from_millis(10),
            true,
        );
        // Three 100 ms apart, then one every 900 ms: 0, 100, 200, 1100, 2000, 2900, 3800, 4700.
        assert_eq!(sent.len(), 8, "{sent:?}");
        assert_eq!(&sent[..3], &[0, 100, 200].map(Duration::from_millis));
        for pair in sent.windows(2) {
            assert!(pair[1] - pair[0] <= Duration::from_secs(1), "{sent:?}");
        }
    }

    #[test]
    fn announces_stop_when_the_gate_closes_and_restart_with_a_burst() {
        let start = Instant::now();
        let step = Duration::from_millis(10);
        let mut schedule = AnnounceSchedule::default();
        schedule.opened(start, SERVICE_ANNOUNCE_BURST);
        let before = announces_between(&mut schedule, start, Duration::from_secs(2), step, true);
        assert_eq!(before.len(), 5, "{before:?}");
        schedule.closed();
        let later = start + Duration::from_secs(3);
        let while_closed =
            announces_between(&mut schedule, later, Duration::from_secs(5), step, true);
        assert!(while_closed.is_empty(), "{while_closed:?}");
        let reopened = start + Duration::from_secs(10);
        schedule.opened(reopened, SERVICE_ANNOUNCE_BURST);
        let after = announces_between(
            &mut schedule,
            reopened,
            Duration::from_millis(250),
            step,
            true,
        );
        assert_eq!(after.len(), 3, "{after:?}");
    }
}
