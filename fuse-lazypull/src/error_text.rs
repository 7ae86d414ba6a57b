//! An error with its causes as one line of text, for logs and messages: [`plumbing::error_chain`],
//! under the name the crate's modules use. It sits below them all (the crate's
//! [`crate::error::Error`] gathers every module's error and sits above them).

/// An error with its causes, `outer: inner: innermost`.
pub use plumbing::error_chain as chain;
