//! The serve gate on the `recvmmsg`/`sendmmsg` frame path. A binary of its own: the frame path
//! is chosen by an environment variable, which no other test in this process may race.

mod common;

#[test]
fn a_closed_gate_answers_nothing_until_it_opens_on_the_mmsg_path() {
    // The only test in this binary: nothing else reads the environment meanwhile.
    std::env::set_var("TWINBLADE_AOE_IO", "mmsg");
    common::aoe_gate::closed_gate_withholds_answers_until_it_opens();
}
