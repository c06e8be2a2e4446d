//! A blade at a service MAC on the ring frame path (see `common/service_mac.rs`).

mod common;

use common::service_mac;

#[test]
fn a_blade_at_a_service_mac_is_found_and_served_there_and_only_there() {
    service_mac::a_blade_at_a_service_mac_is_found_and_served_there_and_only_there();
}

#[test]
fn the_service_mac_moves_to_another_node_and_the_client_follows_without_rediscovery() {
    service_mac::the_service_mac_moves_to_another_node_and_the_client_follows_without_rediscovery();
}

#[test]
fn announces_repeat_while_the_gate_is_open_and_stop_when_it_closes() {
    service_mac::announces_repeat_while_the_gate_is_open_and_stop_when_it_closes();
}

#[test]
fn a_second_node_at_the_same_service_mac_is_reported_as_a_rival() {
    service_mac::a_second_node_at_the_same_service_mac_is_reported_as_a_rival();
}
