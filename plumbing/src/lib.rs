//! Plumbing that several vstor crates share, written once. It sits below every other crate and
//! depends on none of them.

pub mod lock;
pub mod metrics;

pub use lock::lock;
