//! An error with its causes as one line of text, for logs and messages. Every module uses it, so
//! it sits below them all (the crate's [`crate::error::Error`] gathers every module's error and
//! sits above them).

/// An error with its causes, `outer: inner: innermost`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
