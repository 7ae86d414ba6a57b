//! The NBD export: every disk the lookup knows is an export of the same name.

pub mod proto;
mod server;

pub use server::{NbdServer, NbdStats};

#[cfg(test)]
mod tests;
