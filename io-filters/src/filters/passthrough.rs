//! A filter that lets every request through and watches every completion: what the framework
//! itself costs, for benchmarks and tests.

use crate::chain::{Filter, Verdict};
use crate::request::{Completion, Request};

#[derive(Default)]
pub struct Passthrough;

impl Filter for Passthrough {
    fn kind(&self) -> &'static str {
        "passthrough"
    }

    fn pre(&self, _req: &mut Request) -> Verdict {
        Verdict::Continue
    }

    fn watches_completions(&self) -> bool {
        true
    }

    fn post(&self, done: Completion<'_>) {
        std::hint::black_box(done.head);
    }
}
