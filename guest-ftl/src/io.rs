//! Running batches of vector commands through a [`FlashChannel`].
//!
//! Each command of a batch gets its own piece of the DMA region (address list, data, OOB), laid
//! out one after the other; the batch is submitted at once and awaited together. A batch that
//! does not fit the region is run in several rounds, in order, so commands that must follow each
//! other (writes to one chunk) are never put in one batch by callers.

use futures_util::future::join_all;
use host_ftl::command::FUA as FUA_BIT;
use host_ftl::{opcode, Cqe, Sqe};

use crate::channel::{next_cid, FlashChannel};
use crate::error::{FtlError, Result};

/// One vector command (or a flush, with no addresses).
#[derive(Debug)]
pub struct Cmd {
    pub op: u8,
    pub addrs: Vec<u64>,
    /// Data to write (`block_size` per address); empty for other commands.
    pub data: Vec<u8>,
    /// OOB to write (`oob_size` per address); empty for other commands.
    pub oob: Vec<u8>,
    pub fua: bool,
}

impl Cmd {
    pub fn read(addrs: Vec<u64>) -> Cmd {
        Cmd { op: opcode::VECTOR_READ, addrs, data: Vec::new(), oob: Vec::new(), fua: false }
    }

    pub fn write(addrs: Vec<u64>, data: Vec<u8>, oob: Vec<u8>) -> Cmd {
        Cmd { op: opcode::VECTOR_WRITE, addrs, data, oob, fua: false }
    }

    pub fn reset(addrs: Vec<u64>) -> Cmd {
        Cmd { op: opcode::VECTOR_RESET, addrs, data: Vec::new(), oob: Vec::new(), fua: false }
    }

    pub fn flush() -> Cmd {
        Cmd { op: opcode::FLUSH, addrs: Vec::new(), data: Vec::new(), oob: Vec::new(), fua: false }
    }

    fn bytes(&self, bs: usize, os: usize) -> (usize, usize, usize) {
        let n = self.addrs.len();
        let list = if n > 1 { n * 8 } else { 0 };
        match self.op {
            opcode::VECTOR_READ | opcode::VECTOR_WRITE => (list, n * bs, n * os),
            _ => (list, 0, 0),
        }
    }
}

/// A completion, with the data and OOB a read brought back.
#[derive(Debug)]
pub struct Done {
    pub cqe: Cqe,
    pub data: Vec<u8>,
    pub oob: Vec<u8>,
}

impl Done {
    /// Whether address `i` failed (or warned).
    pub fn failed(&self, i: usize) -> bool {
        i < 64 && self.cqe.bitmap() & (1 << i) != 0
    }
}

struct Placed {
    list: u64,
    data: u64,
    oob: u64,
}

/// Runs the commands, overlapping as many as the region holds; completions in command order.
pub async fn run(ch: &dyn FlashChannel, cmds: Vec<Cmd>) -> Result<Vec<Done>> {
    let geo = ch.geometry();
    let (bs, os) = (geo.block_size as usize, geo.oob_size as usize);
    let cap = ch.region().len() as usize;
    let mut out = Vec::with_capacity(cmds.len());
    let mut start = 0;
    while start < cmds.len() {
        let mut at = 0usize;
        let mut placed = Vec::new();
        let mut end = start;
        while end < cmds.len() {
            let (l, d, o) = cmds[end].bytes(bs, os);
            if at + l + d + o > cap {
                break;
            }
            placed.push(Placed { list: at as u64, data: (at + l) as u64, oob: (at + l + d) as u64 });
            at += l + d + o;
            end += 1;
        }
        if end == start {
            return Err(FtlError::Config(format!("the DMA region of {cap} bytes cannot hold one command")));
        }
        let mut futs = Vec::with_capacity(end - start);
        for (cmd, p) in cmds[start..end].iter().zip(&placed) {
            let mem = ch.region();
            let sqe = if cmd.op == opcode::FLUSH {
                Sqe::flush(next_cid())
            } else {
                let lba = if cmd.addrs.len() == 1 {
                    cmd.addrs[0]
                } else {
                    mem.write_u64s(p.list, &cmd.addrs).map_err(FtlError::Dma)?;
                    p.list
                };
                if cmd.op == opcode::VECTOR_WRITE {
                    mem.write(p.data, &cmd.data).map_err(FtlError::Dma)?;
                    mem.write(p.oob, &cmd.oob).map_err(FtlError::Dma)?;
                }
                let mut s = Sqe::vector(cmd.op, next_cid(), cmd.addrs.len(), lba, p.data, p.oob)
                    .map_err(|e| FtlError::Config(e.to_string()))?;
                if cmd.fua {
                    s.cdw12 |= FUA_BIT;
                }
                s
            };
            futs.push(ch.submit(sqe));
        }
        let cqes = join_all(futs).await;
        for ((cmd, p), cqe) in cmds[start..end].iter().zip(&placed).zip(cqes) {
            let (_, d, o) = cmd.bytes(bs, os);
            let (data, oob) = if cmd.op == opcode::VECTOR_READ {
                let mem = ch.region();
                (mem.read_vec(p.data, d).map_err(FtlError::Dma)?, mem.read_vec(p.oob, o).map_err(FtlError::Dma)?)
            } else {
                (Vec::new(), Vec::new())
            };
            out.push(Done { cqe, data, oob });
        }
        start = end;
    }
    Ok(out)
}
