//! The built-in filters.

pub mod cache;
pub mod integrity;
pub mod linked_clone;
pub mod passthrough;
pub mod stats;
pub mod throttle;
