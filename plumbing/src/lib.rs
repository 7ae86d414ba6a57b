//! Plumbing that several vstor crates share, written once. It sits below every other crate and
//! depends on none of them.

pub mod clock;
pub mod lock;
pub mod metrics;
pub mod rate;

pub use lock::lock;
