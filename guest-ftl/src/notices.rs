//! When the device's chunk notifications (log page 0xD0) are read: every `notify_every`
//! requests, and before the next request after a media error, which may have come with one.

/// The bookkeeping of chunk notifications.
pub struct Notices {
    /// Requests between two polls.
    every: u32,
    /// The newest notification acted on (its count, `nc`).
    seen: u64,
    /// Requests since the last poll.
    requests: u32,
    /// A media error happened: poll before the next request.
    needed: bool,
}

impl Notices {
    pub fn new(every: u32) -> Notices {
        Notices { every, seen: 0, requests: 0, needed: false }
    }

    /// A request starts: whether the notifications are due now. Answering yes starts the count
    /// of requests anew.
    pub fn request_due(&mut self) -> bool {
        self.requests += 1;
        if self.needed || self.requests >= self.every {
            self.requests = 0;
            self.needed = false;
            return true;
        }
        false
    }

    /// A media error: poll before the next request.
    pub fn needed(&mut self) {
        self.needed = true;
    }

    /// The newest notification acted on; older ones are not read again.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Notification `nc` has been read.
    pub fn saw(&mut self, nc: u64) {
        self.seen = self.seen.max(nc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_every_so_many_requests_and_after_a_media_error() {
        let mut n = Notices::new(3);
        assert_eq!([n.request_due(), n.request_due(), n.request_due()], [false, false, true]);
        n.needed();
        assert!(n.request_due(), "a media error makes the next request poll");
        assert!(!n.request_due());
        n.saw(7);
        n.saw(5);
        assert_eq!(n.seen(), 7);
    }
}
