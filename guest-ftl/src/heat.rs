//! How fast blocks die: the update-frequency estimates behind cost-benefit victims and the
//! hot/cold bound.
//!
//! Each line keeps a [`Heat`], measured from the overwrites and trims of its blocks; a stream's
//! rate pools the heat of its lines ([`pooled_rates`]), and is what a line with few deaths of its
//! own is taken to have.

/// How many deaths' worth a line's prior (its stream's update frequency) weighs in the line's
/// own estimate: a fresh line is taken to be like its stream until it shows otherwise.
const PRIOR_DEATHS: f64 = 2.0;

/// How fast a line's blocks die: a Poisson estimate of their update frequency (deaths per valid
/// block per write). Deaths and exposure (valid blocks × writes) count in proportion to the
/// line's age when they happen, so the estimate follows the blocks still in the line rather than
/// the hottest ones, which died first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heat {
    /// The sequence number when the line was opened.
    born: u64,
    /// The sequence number exposure is counted up to.
    since: u64,
    /// Deaths, each weighed by the line's age at the time.
    deaths: f64,
    /// Valid blocks × writes, weighed by the line's age: the integral of valid × age.
    exposure: f64,
}

impl Heat {
    /// A line opened at sequence number `now`.
    pub fn new(now: u64) -> Heat {
        Heat { born: now, since: now, deaths: 0.0, exposure: 0.0 }
    }

    /// Counts the exposure of the line's `valid` blocks up to `now` (before `valid` changes).
    pub fn expose(&mut self, valid: u32, now: u64) {
        if now <= self.since {
            return;
        }
        let (a, b) = ((self.since - self.born) as f64, (now - self.born) as f64);
        self.exposure += f64::from(valid) * (b * b - a * a) / 2.0;
        self.since = now;
    }

    /// One of the line's valid blocks was overwritten or trimmed at `now`.
    pub fn death(&mut self, now: u64) {
        self.deaths += now.saturating_sub(self.born) as f64;
    }

    /// Deaths and exposure up to `now`, in units of the line's age (a death now counts 1).
    pub fn weighed(&self, valid: u32, now: u64) -> (f64, f64) {
        let mut h = *self;
        h.expose(valid, now);
        let age = now.saturating_sub(self.born).max(1) as f64;
        (h.deaths / age, h.exposure / age)
    }

    /// The estimated update frequency of the line's blocks, `prior` weighing as
    /// [`PRIOR_DEATHS`] deaths.
    pub fn rate(&self, valid: u32, now: u64, prior: f64) -> f64 {
        let (d, e) = self.weighed(valid, now);
        (d + PRIOR_DEATHS) / (e + PRIOR_DEATHS / prior)
    }
}

/// Each stream's update frequency, pooled over its lines (and, as their prior, over all lines):
/// what a line whose own deaths are still few is taken to have. `lines` gives each line's
/// stream, heat and valid blocks; `streams` is the number of streams.
pub fn pooled_rates<'a>(lines: impl Iterator<Item = (usize, &'a Heat, u32)>, streams: usize, now: u64) -> Vec<f64> {
    let mut per = vec![(0.0, 0.0); streams];
    let mut all = (0.0, 0.0);
    for (stream, heat, valid) in lines {
        let (d, e) = heat.weighed(valid, now);
        if let Some(p) = per.get_mut(stream) {
            p.0 += d;
            p.1 += e;
        }
        all.0 += d;
        all.1 += e;
    }
    let global = (all.0 + 1.0) / (all.1 + 1.0);
    per.iter().map(|&(d, e)| (d + PRIOR_DEATHS) / (e + PRIOR_DEATHS / global)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_estimates_the_rate_of_the_blocks_still_in_the_line() {
        // 64 blocks, each dying at rate 1/1000 per write: about 1/1000.
        let mut h = Heat::new(0);
        let mut valid = 64u32;
        let mut t = 0;
        while valid > 32 {
            t += 1000 / u64::from(valid); // expected wait for the next of `valid` deaths
            h.expose(valid, t);
            h.death(t);
            valid -= 1;
        }
        let f = h.rate(valid, t, 1e-3);
        assert!((f - 1e-3).abs() < 2e-4, "{f}");
        // Half the blocks die at once, the rest never: the estimate falls towards the survivors'.
        let mut h = Heat::new(0);
        h.expose(64, 10);
        for _ in 0..32 {
            h.death(10);
        }
        h.expose(32, 10);
        let early = h.rate(32, 100, 1e-3);
        let late = h.rate(32, 10_000, 1e-3);
        assert!(late < early / 10.0, "{early} {late}");
    }
}
