//! The witness: a third vote for a pair that has lost sight of itself. A small process on a
//! third machine (`twinblade witness`) that gives the right to serve a resource *alone* to at
//! most one node per data generation, and remembers what it gave across its own restarts.
//!
//! # What a grant means
//!
//! A node that lost its peer and wants to serve without it — a secondary promoting itself, or a
//! primary that must go on acknowledging writes its peer will not have — *claims* the resource
//! from the data generation it holds (its current generation UUID, which both nodes share while
//! connected). The witness grants the first claim for a (pair, resource, generation) and
//! answers every later claim for the same generation with the same holder. The holder then
//! starts a new generation of its own (DRBD's new current UUID), so its next claim, after the
//! next failure, is about a generation nobody holds yet; the other node, still at the old
//! generation, can never get a grant for it. When the two meet again, the handshake resyncs the
//! loser from the winner and both share the winner's generation.
//!
//! So two nodes that cannot see each other but both reach the witness never both serve alone,
//! and a node that reaches neither its peer nor the witness never serves alone (the node side
//! enforces that: see [`crate::cluster`]).
//!
//! # Parts
//!
//! * [`book`]: the pure record of grants and its file format (written before any answer).
//! * [`server`]: the UDP service (`twinblade witness`): one socket, many pairs, each with its
//!   own shared secret.
//! * [`client`]: what a node uses to claim or query, with a timeout and retries.
//!
//! The datagram is [`crate::wire::witness`].

pub mod book;
pub mod client;
pub mod server;

pub use book::{Book, BookError};
pub use client::{ask, Answer, AskError, Request};
pub use server::{WitnessConfig, WitnessError, WitnessServer};

/// The witness's UDP port unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7791;

/// The fuzz target's second half: bytes read as a sequence of claims and queries from two
/// nodes; the book must never give one generation to two nodes, and must read back what it
/// wrote.
pub fn fuzz_book(data: &[u8]) {
    let mut book = Book::default();
    let mut holders: std::collections::HashMap<u64, String> = Default::default();
    for chunk in data.chunks(2) {
        let node = if chunk[0] & 1 == 0 { "alpha" } else { "beta" };
        let generation = u64::from(chunk.get(1).copied().unwrap_or(0) % 8);
        let resource = if chunk[0] & 2 == 0 { "r0" } else { "r1" };
        let key = generation + if resource == "r0" { 0 } else { 100 };
        if chunk[0] & 4 == 0 {
            let outcome = book.claim("lab", resource, node, generation);
            let holder = holders.entry(key).or_insert_with(|| node.to_string());
            assert_eq!(&outcome.holder, holder, "one holder per generation");
        } else {
            let _ = book.query("lab", resource, generation);
        }
    }
    let text = book.to_text();
    assert_eq!(
        Book::from_text(&text).expect("reads back what it wrote"),
        book
    );
}
