//! Multiple-mount protection on the frame path: the Query Config a guarded blade broadcasts
//! for its own address, and the look at every received frame that raises the blade's alarm
//! when another MAC answers for that address.

use super::Route;
use crate::export::aoe::blade::Port;
use crate::export::aoe::probe;
use crate::net::Interface;
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use crate::wire::aoe::Frame;
use crate::wire::MacAddr;
use std::io;
use std::time::Instant;

/// Broadcasts a Query Config for the address of every guarded blade whose gate is open, from
/// the MAC the blade answers from: whatever answers it from another MAC is a rival (see
/// [`screen`]). `send` sends one frame now.
pub(super) fn send_queries(
    iface: &Interface,
    current: &Port,
    routes: &[Route],
    send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) {
    for route in routes.iter().filter(|r| r.guard.is_some()) {
        // A blade asks only while it answers: one that does not is nobody's rival (the
        // node that answers instead is its rightful successor), and a query from a service
        // MAC would steer the bridges' forwarding entry for it away from that node.
        if !route.gate.may_answer() {
            continue;
        }
        let (shelf, slot) = route.address;
        let query = probe::config_query(route.port_for(current).mac, shelf, slot);
        if let Err(err) = send(&query) {
            static QUERY_LOG: LogLimiter = LogLimiter::network();
            warn_limited!(QUERY_LOG, iface = %iface.name, %err, "rival query not sent");
        }
    }
}

/// Looks at a received frame before it is answered: a response is never answered, but one
/// for a guarded blade's address from another node raises that blade's
/// [`RivalAlarm`](crate::export::aoe::RivalAlarm). Returns whether the frame is a request to
/// answer.
///
/// A blade at a service MAC never sends from the interface's MAC, and the port's socket never
/// hears its own frames (`PACKET_IGNORE_OUTGOING`): a response for its address from its own
/// service MAC comes from another node that took the MAC, and is a rival's too — the one kind
/// of rival a query can never reach, as a bridge does not send a frame back to the port it
/// learned the destination on, but whose refresh announces it hears.
pub(super) fn screen(frame: &[u8], routes: &[Route], interface_mac: MacAddr) -> bool {
    let Ok(view) = Frame::new_checked(frame) else {
        // The blade counts it.
        return true;
    };
    if view.is_response() {
        for route in routes {
            let Some(alarm) = &route.guard else { continue };
            // Multiple-mount protection guards a blade that answers: a node that woke from a
            // pause with its gate shut hears its successor, which is no conflict.
            if !route.gate.may_answer() {
                continue;
            }
            let (shelf, slot) = route.address;
            if let Some(rival) = probe::responder(frame, shelf, slot, interface_mac) {
                alarm.raise(rival, shelf, slot, Instant::now());
            }
        }
        return false;
    }
    // Our own rival queries, should the kernel loop them back (ignoring outgoing frames is
    // best effort): the blade must not answer its own question.
    let src = view.src();
    src != interface_mac && routes.iter().all(|r| r.service_mac != Some(src))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::aoe::server::tests::{
        guarded_route, CLIENT_MAC, INTERFACE_MAC, SERVICE_MAC,
    };
    use crate::wire::aoe;
    use std::sync::atomic::Ordering;

    fn query_from(src: MacAddr) -> Vec<u8> {
        probe::config_query(src, 0, 5)
    }

    fn answer_from(src: MacAddr) -> Vec<u8> {
        let mut frame = query_from(src);
        Frame::new_unchecked(&mut frame[..]).set_version_flags(aoe::VERSION, aoe::FLAG_RESPONSE);
        frame
    }

    #[test]
    fn another_node_answering_from_our_service_mac_is_a_rival() {
        let (route, raised) = guarded_route(Some(SERVICE_MAC));
        let routes = [route];
        // Our socket never hears its own frames: an answer from the service MAC is another
        // node's, one that took the MAC.
        assert!(!screen(&answer_from(SERVICE_MAC), &routes, INTERFACE_MAC));
        assert!(!screen(&answer_from(CLIENT_MAC), &routes, INTERFACE_MAC));
        // The interface's MAC is the port's own.
        assert!(!screen(&answer_from(INTERFACE_MAC), &routes, INTERFACE_MAC));
        assert_eq!(raised.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_answer_from_the_interface_mac_is_not_a_rival_of_a_blade_at_it() {
        let (route, raised) = guarded_route(None);
        let routes = [route];
        assert!(!screen(&answer_from(INTERFACE_MAC), &routes, INTERFACE_MAC));
        assert!(!screen(&answer_from(CLIENT_MAC), &routes, INTERFACE_MAC));
        assert_eq!(raised.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn our_own_queries_are_never_requests_to_answer() {
        let (route, _) = guarded_route(Some(SERVICE_MAC));
        let routes = [route];
        assert!(!screen(&query_from(SERVICE_MAC), &routes, INTERFACE_MAC));
        assert!(!screen(&query_from(INTERFACE_MAC), &routes, INTERFACE_MAC));
        assert!(screen(&query_from(CLIENT_MAC), &routes, INTERFACE_MAC));
    }
}
