//! Asking the wire who answers for one `eS.L`: the Query Config frame both the promotion guard
//! ([`responders`], "nobody answers e0.3") and the serving blade's multiple-mount protection
//! (see [`super::server`]) broadcast, and the test that tells a rival's answer from anything
//! else on the wire.
//!
//! Building and recognising frames is pure ([`config_query`], [`responder`]); only
//! [`responders`] and [`responders_counted`] (which also counts the answers to each query: two
//! nodes at one shared service MAC answer one query twice) touch a socket. [`RivalAlarm`] is what a serving blade calls when it hears
//! a rival, at most once a second per rival.

use crate::net::{Interface, PacketSocket};
use crate::wire::aoe::{self, Command, Frame, HeaderRepr, PacketRepr};
use crate::wire::MacAddr;
use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a serving blade asks the wire whether anyone else answers for its address, and
/// how often it raises the alarm for one rival at most.
pub const RIVAL_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Rivals remembered for rate limiting at most: spoofed source MACs must not grow the table
/// without bound.
const MAX_REMEMBERED_RIVALS: usize = 64;

/// Multiple-mount protection of a serving blade: called with the MAC of any other node heard
/// answering for the blade's own `eS.L` (two nodes answering for one address corrupt the
/// initiator's view of the disk; the engine stops serving and raises an alarm).
pub struct RivalAlarm {
    callback: Box<dyn Fn(MacAddr) + Send + Sync>,
    /// When each rival last raised the alarm.
    last_raised: Mutex<HashMap<MacAddr, Instant>>,
}

impl RivalAlarm {
    /// An alarm calling `callback` with each rival's MAC (at most once a second per MAC).
    /// It is called on the port's frame thread, so it must not block: hand the news on.
    pub fn new(callback: impl Fn(MacAddr) + Send + Sync + 'static) -> RivalAlarm {
        RivalAlarm {
            callback: Box::new(callback),
            last_raised: Mutex::new(HashMap::new()),
        }
    }

    /// Reports `rival` answering for `eshelf.slot` heard at `now`: logs and calls the
    /// callback, unless this rival did so less than [`RIVAL_CHECK_INTERVAL`] ago. Returns
    /// whether it did.
    pub fn raise(&self, rival: MacAddr, shelf: u16, slot: u8, now: Instant) -> bool {
        {
            let mut last = self.last_raised.lock().unwrap_or_else(|e| e.into_inner());
            if last
                .get(&rival)
                .is_some_and(|&at| now.saturating_duration_since(at) < RIVAL_CHECK_INTERVAL)
            {
                return false;
            }
            if last.len() >= MAX_REMEMBERED_RIVALS {
                last.retain(|_, at| now.saturating_duration_since(*at) < RIVAL_CHECK_INTERVAL);
            }
            if last.len() < MAX_REMEMBERED_RIVALS {
                last.insert(rival, now);
            }
        }
        // Bounded by the table above (once a second per rival, at most 64 rivals remembered);
        // beyond that the global limiter keeps spoofed MACs from flooding the log.
        static RIVAL_LOG: crate::ratelimit::LogLimiter = crate::ratelimit::LogLimiter::network();
        if let Some(suppressed) = RIVAL_LOG.check() {
            tracing::error!(
                suppressed,
                "another MAC {rival} answers e{shelf}.{slot}: multiple-mount protection"
            );
        }
        (self.callback)(rival);
        true
    }
}

impl std::fmt::Debug for RivalAlarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RivalAlarm").finish_non_exhaustive()
    }
}

/// Tag of the queries we broadcast. Bit 31 set keeps it apart from the tags initiators use
/// for their requests (the Linux driver sets it on its own config queries too; the tag is
/// only echoed, never interpreted, so sharing the bit is harmless).
pub const PROBE_TAG: u32 = 0x8000_7462;

/// A broadcast Query Config (read) for `shelf.slot` from `src`, padded to the Ethernet
/// minimum: every blade serving that address answers it.
pub fn config_query(src: MacAddr, shelf: u16, slot: u8) -> Vec<u8> {
    PacketRepr::config_query(HeaderRepr {
        dst: MacAddr::BROADCAST,
        src,
        version: aoe::VERSION,
        response: false,
        error: None,
        shelf,
        slot,
        command: Command::Config,
        tag: PROBE_TAG,
    })
    .to_frame()
}

/// The sender of `frame` if it is a response for exactly `shelf.slot` (any command: a config
/// answer, an ATA reply, an announce) from a MAC other than `own`. Such a frame means another
/// node is serving that address.
pub fn responder(frame: &[u8], shelf: u16, slot: u8, own: MacAddr) -> Option<MacAddr> {
    let view = Frame::new_checked(frame).ok()?;
    if view.ethertype() != aoe::ETHERTYPE || !view.is_response() {
        return None;
    }
    if (view.shelf(), view.slot()) != (shelf, slot) {
        return None;
    }
    let src = view.src();
    (src != own).then_some(src)
}

/// What the wire said about one `eS.L` ([`responders_counted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Responders {
    /// The MACs (other than the interface's own) heard answering for the address, each once,
    /// in the order first heard: answers to our queries, announces, any other response.
    pub macs: Vec<MacAddr>,
    /// Responses for the address heard from those MACs, all kinds together. Never 0 while
    /// `macs` is not empty.
    pub answers: usize,
    /// The most answers any single one of our queries got (each query has a tag of its own
    /// and goes out once). 2 or more: two nodes answer, even when both answer from one shared
    /// service MAC, which `macs` cannot tell apart.
    pub most_per_query: usize,
}

impl Responders {
    /// Nobody answered.
    pub fn is_empty(&self) -> bool {
        self.answers == 0
    }
}

/// Tags of the queries [`responders_counted`] sends: bit 31 set as [`PROBE_TAG`]'s, then 15
/// bits that differ from call to call (so a late answer to an earlier call's query, heard on
/// this call's socket, is not taken for an answer to this one's), then the attempt.
fn query_tag(call: u32, attempt: u32) -> u32 {
    0x8000_0000 | (call & 0x7FFF) << 16 | (attempt & 0xFFFF)
}

/// Broadcasts a Query Config for `shelf.slot` on `interface` `attempts` times, spread over
/// `wait`, and returns the MACs (other than the interface's own) that answered for that
/// address, each once, in the order first heard. Empty: nobody serves it on this wire.
///
/// A blade at a service MAC shared by two nodes answers from one MAC whichever node serves:
/// two nodes answering at once show here as one MAC, which is still "answered";
/// [`responders_counted`] tells how many answered.
///
/// Needs CAP_NET_RAW. Waits the whole of `wait` (it cannot know that nobody else will answer).
pub fn responders(
    interface: &str,
    shelf: u16,
    slot: u8,
    wait: Duration,
    attempts: u32,
) -> Result<Vec<MacAddr>, io::Error> {
    responders_counted(interface, shelf, slot, wait, attempts).map(|found| found.macs)
}

/// [`responders`], counting: every query carries a tag of its own and is sent once, so two
/// answers carrying one query's tag are two answering nodes whatever their source MACs (a
/// shared service MAC included).
pub fn responders_counted(
    interface: &str,
    shelf: u16,
    slot: u8,
    wait: Duration,
    attempts: u32,
) -> Result<Responders, io::Error> {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .wrapping_add(std::process::id());
    let iface = Interface::by_name(interface)?;
    let socket = PacketSocket::open(&iface, aoe::ETHERTYPE)?;
    let mut query = config_query(iface.mac, shelf, slot);
    let attempts = attempts.clamp(1, 0xFFFF);
    let started = Instant::now();
    let deadline = started + wait;
    let spacing = wait / attempts;
    let mut sent = 0;
    let mut found = Responders::default();
    let mut per_query = vec![0usize; attempts as usize];
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = Instant::now();
        // Each attempt goes out at its share of `wait`, so a responder that missed one query
        // (a full queue, a link flapping) has later ones to answer.
        if sent < attempts && now >= started + spacing * sent {
            Frame::new_unchecked(&mut query[..]).set_tag(query_tag(call, sent));
            socket.send(&query)?;
            sent += 1;
            continue;
        }
        let Some(left) = deadline.checked_duration_since(now) else {
            break;
        };
        let next_send = if sent < attempts {
            (started + spacing * sent).saturating_duration_since(now)
        } else {
            left
        };
        let Some(len) = socket.recv(&mut buf, left.min(next_send))? else {
            continue;
        };
        count_response(
            &buf[..len],
            shelf,
            slot,
            iface.mac,
            call,
            sent,
            &mut found,
            &mut per_query,
        );
    }
    Ok(found)
}

/// Counts `frame` into `found` if it is a rival's response for `shelf.slot`, and into
/// `per_query` if it answers one of the `sent` queries of call `call`.
#[allow(clippy::too_many_arguments)]
fn count_response(
    frame: &[u8],
    shelf: u16,
    slot: u8,
    own: MacAddr,
    call: u32,
    sent: u32,
    found: &mut Responders,
    per_query: &mut [usize],
) {
    let Some(mac) = responder(frame, shelf, slot, own) else {
        return;
    };
    found.answers += 1;
    if !found.macs.contains(&mac) {
        found.macs.push(mac);
    }
    let view = Frame::new_unchecked(frame);
    if view.command() != Command::Config {
        return;
    }
    let tag = view.tag();
    if let Some(n) = (0..sent).find(|&n| query_tag(call, n) == tag) {
        per_query[n as usize] += 1;
        found.most_per_query = found.most_per_query.max(per_query[n as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::aoe::{ArgRepr, ConfigCommand, ConfigRepr};

    const OURS: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const RIVAL: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn answer_from(src: MacAddr, shelf: u16, slot: u8) -> Vec<u8> {
        let mut frame = config_query(src, shelf, slot);
        let mut view = Frame::new_unchecked(&mut frame[..]);
        view.set_version_flags(aoe::VERSION, aoe::FLAG_RESPONSE);
        frame
    }

    #[test]
    fn the_alarm_fires_once_a_second_per_rival() {
        let calls = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let alarm = RivalAlarm::new(move |mac| seen.lock().unwrap().push(mac));
        let t0 = Instant::now();
        let other = MacAddr([2, 0, 0, 0, 0, 3]);
        assert!(alarm.raise(RIVAL, 0, 3, t0));
        assert!(!alarm.raise(RIVAL, 0, 3, t0 + Duration::from_millis(500)));
        assert!(alarm.raise(other, 0, 3, t0 + Duration::from_millis(500)));
        assert!(alarm.raise(RIVAL, 0, 3, t0 + Duration::from_secs(1)));
        assert_eq!(*calls.lock().unwrap(), vec![RIVAL, other, RIVAL]);
    }

    #[test]
    fn a_query_is_a_broadcast_config_read_for_the_address() {
        let frame = config_query(OURS, 7, 3);
        let parsed = PacketRepr::parse(&Frame::new_checked(&frame[..]).unwrap()).unwrap();
        assert_eq!(parsed.header.dst, MacAddr::BROADCAST);
        assert_eq!(parsed.header.src, OURS);
        assert!(!parsed.header.response);
        assert_eq!((parsed.header.shelf, parsed.header.slot), (7, 3));
        assert!(matches!(
            parsed.arg,
            ArgRepr::Config(ConfigRepr {
                command: ConfigCommand::Read,
                ..
            })
        ));
        assert!(frame.len() >= aoe::MIN_FRAME_LEN);
    }

    #[test]
    fn only_responses_for_the_address_from_others_count() {
        assert_eq!(
            responder(&answer_from(RIVAL, 7, 3), 7, 3, OURS),
            Some(RIVAL)
        );
        assert_eq!(
            responder(&answer_from(OURS, 7, 3), 7, 3, OURS),
            None,
            "our own"
        );
        assert_eq!(
            responder(&answer_from(RIVAL, 7, 4), 7, 3, OURS),
            None,
            "another slot"
        );
        assert_eq!(
            responder(&answer_from(RIVAL, 8, 3), 7, 3, OURS),
            None,
            "another shelf"
        );
        assert_eq!(
            responder(&config_query(RIVAL, 7, 3), 7, 3, OURS),
            None,
            "a request"
        );
        assert_eq!(responder(&[0u8; 10], 7, 3, OURS), None, "truncated");
    }

    fn answer_to(src: MacAddr, tag: u32) -> Vec<u8> {
        let mut frame = answer_from(src, 7, 3);
        Frame::new_unchecked(&mut frame[..]).set_tag(tag);
        frame
    }

    #[test]
    fn query_tags_differ_per_attempt_and_per_call_and_keep_bit_31() {
        let tags: Vec<u32> = (0..3)
            .flat_map(|call| (0..3).map(move |n| query_tag(call, n)))
            .collect();
        for (i, a) in tags.iter().enumerate() {
            assert_eq!(a & 0x8000_0000, 0x8000_0000);
            assert!(tags[i + 1..].iter().all(|b| b != a), "{a:#x} repeats");
        }
    }

    #[test]
    fn two_answers_to_one_query_from_one_mac_are_two_responders() {
        // Two nodes at one shared service MAC both answer the second query.
        let mut found = Responders::default();
        let mut per_query = vec![0; 3];
        for frame in [
            answer_to(RIVAL, query_tag(9, 0)),
            answer_to(RIVAL, query_tag(9, 1)),
            answer_to(RIVAL, query_tag(9, 1)),
        ] {
            count_response(&frame, 7, 3, OURS, 9, 3, &mut found, &mut per_query);
        }
        assert_eq!(found.macs, vec![RIVAL]);
        assert_eq!((found.answers, found.most_per_query), (3, 2));
        assert!(!found.is_empty());
    }

    #[test]
    fn announces_and_stale_answers_count_as_answers_not_per_query() {
        let mut found = Responders::default();
        let mut per_query = vec![0; 2];
        let other = MacAddr([2, 0, 0, 0, 0, 3]);
        for frame in [
            answer_to(RIVAL, 0),               // an announce
            answer_to(other, query_tag(8, 0)), // an earlier call's query
            answer_to(RIVAL, query_tag(9, 1)), // a query not sent yet
            answer_to(OURS, query_tag(9, 0)),  // our own MAC
            answer_from(RIVAL, 7, 4),          // another slot
        ] {
            count_response(&frame, 7, 3, OURS, 9, 1, &mut found, &mut per_query);
        }
        assert_eq!(found.macs, vec![RIVAL, other]);
        assert_eq!((found.answers, found.most_per_query), (3, 0));
        // One answer each from two MACs to one query.
        let mut found = Responders::default();
        let mut per_query = vec![0; 1];
        for frame in [
            answer_to(RIVAL, query_tag(9, 0)),
            answer_to(other, query_tag(9, 0)),
        ] {
            count_response(&frame, 7, 3, OURS, 9, 1, &mut found, &mut per_query);
        }
        assert_eq!((found.macs.len(), found.most_per_query), (2, 2));
        assert!(Responders::default().is_empty());
    }
}
