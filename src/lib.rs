//! # crsync
//!
//! CRDT peer-to-peer replication of SQLite databases, built on cr-sqlite.
//! This facade re-exports the public API of the crsync crates.
#![doc = "See the project README for set-up and examples."]

pub use crsync_peer::*;
