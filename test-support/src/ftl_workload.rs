//! Random 4 KiB overwrite workloads for the guest FTL benchmarks (`ftl_wa`, `ftl_throughput`):
//! uniform, Zipf and hot/cold, over a shuffled block order, from a fixed seed.

use crate::Rng;

#[derive(Clone, Copy, Debug)]
pub enum Workload {
    Uniform,
    Zipf(f64),
    /// `writes` of the writes go to the first `blocks` of the blocks (shuffled).
    HotCold {
        blocks: f64,
        writes: f64,
    },
}

impl Workload {
    pub fn name(&self) -> String {
        match self {
            Workload::Uniform => "uniform".into(),
            Workload::Zipf(s) => format!("zipf {s}"),
            Workload::HotCold { blocks, writes } => format!("{:.0}/{:.0}", writes * 100.0, blocks * 100.0),
        }
    }
}

/// Draws logical blocks for a workload over `n` blocks.
pub struct Gen {
    w: Workload,
    n: u64,
    cdf: Vec<f64>,
    perm: Vec<u32>,
    rng: Rng,
}

impl Gen {
    pub fn new(w: Workload, n: u64, seed: u64) -> Gen {
        // The state itself, not a seed: the recorded results come from this stream.
        let mut rng = Rng::from_state(seed | 1);
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in (1..perm.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        let cdf = match w {
            Workload::Zipf(s) => {
                let mut acc = 0.0;
                let mut c: Vec<f64> = (1..=n)
                    .map(|k| {
                        acc += 1.0 / (k as f64).powf(s);
                        acc
                    })
                    .collect();
                let total = acc;
                c.iter_mut().for_each(|x| *x /= total);
                c
            }
            _ => Vec::new(),
        };
        Gen { w, n, cdf, perm, rng }
    }

    /// The next logical block to write.
    pub fn next_block(&mut self) -> u64 {
        let rank = match self.w {
            Workload::Uniform => self.rng.next_u64() % self.n,
            Workload::Zipf(_) => {
                let u = self.rng.unit();
                self.cdf.partition_point(|&c| c < u).min(self.n as usize - 1) as u64
            }
            Workload::HotCold { blocks, writes } => {
                let hot = ((self.n as f64 * blocks) as u64).max(1);
                if self.rng.unit() < writes {
                    self.rng.next_u64() % hot
                } else {
                    hot + self.rng.next_u64() % (self.n - hot).max(1)
                }
            }
        };
        u64::from(self.perm[rank as usize])
    }
}
