//! Targets that serve a [`BlockDevice`](crate::block::BlockDevice) to clients.
//!
//! Exports see only the `BlockDevice` trait: they parse client requests, run them against the
//! device and encode the answers. They never know whether the device is a plain file or a
//! replicated one.

pub mod aoe;
pub mod nbd;
