//! A blade at a service MAC on the `recvmmsg`/`sendmmsg` frame path. A binary of its own: the
//! frame path is chosen by an environment variable, which no other test in this process may
//! race.

mod common;

use common::service_mac;

#[test]
fn a_service_mac_on_the_mmsg_path_is_served_moves_announces_and_sees_rivals() {
    // The only test in this binary: nothing else reads the environment meanwhile.
    std::env::set_var("TWINBLADE_AOE_IO", "mmsg");
    service_mac::a_blade_at_a_service_mac_is_found_and_served_there_and_only_there();
    service_mac::the_service_mac_moves_to_another_node_and_the_client_follows_without_rediscovery();
    service_mac::announces_repeat_while_the_gate_is_open_and_stop_when_it_closes();
    service_mac::a_second_node_at_the_same_service_mac_is_reported_as_a_rival();
}
