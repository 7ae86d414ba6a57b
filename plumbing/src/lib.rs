//! Plumbing that several vstor crates share, written once. It sits below every other crate and
//! depends on none of them.

pub mod clock;
pub mod error_text;
pub mod lock;
pub mod metrics;
pub mod rate;

pub use error_text::error_chain;
pub use lock::lock;
