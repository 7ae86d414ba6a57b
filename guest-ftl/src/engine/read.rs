//! The read path under the engine's lock: blocks come from the write buffer or the device. (The
//! FTL runs most reads without the lock, see [`crate::ftl`]; it looks the blocks up here.)

use host_ftl::{opcode, Status};

use super::Engine;
use crate::error::{FtlError, Result};
use crate::flash::device_err;
use crate::io::Cmd;
use crate::layout::{LBA_BYTES, NO_SLOT};

impl Engine {
    /// Reads slots from the write buffer or the device: per slot its data, or the status it
    /// failed with. Lines whose blocks warn of high ECC are queued for refresh.
    pub async fn read_slots(&mut self, slots: &[u32]) -> Result<Vec<std::result::Result<Vec<u8>, Status>>> {
        let mut out: Vec<std::result::Result<Vec<u8>, Status>> = vec![Err(Status::SUCCESS); slots.len()];
        let mut dev: Vec<(usize, u32)> = Vec::new();
        for (i, &slot) in slots.iter().enumerate() {
            match self.blocks.buffer().data(slot) {
                Some(d) => out[i] = Ok(d.to_vec()),
                None => dev.push((i, slot)),
            }
        }
        let per = self.lay.max_cmd_slots.max(1) as usize;
        let spl = self.lay.spl as usize;
        let cmds: Vec<Cmd> = dev
            .chunks(per)
            .map(|group| {
                let addrs = group
                    .iter()
                    .flat_map(|&(_, s)| self.lay.ppas(self.lay.chunk_of(s), self.lay.offset_of(s), 1))
                    .collect();
                Cmd::read(addrs)
            })
            .collect();
        let done = self.flash.run(cmds).await?;
        let mut refresh = Vec::new();
        let mut retry = Vec::new();
        for (group, d) in dev.chunks(per).zip(&done) {
            for (k, &(i, slot)) in group.iter().enumerate() {
                let bad = (k * spl..(k + 1) * spl).any(|a| d.failed(a));
                if !bad || d.cqe.status.data_valid() {
                    out[i] = Ok(d.data[k * LBA_BYTES..(k + 1) * LBA_BYTES].to_vec());
                    if bad {
                        refresh.push(slot);
                    }
                } else {
                    retry.push((i, slot));
                }
            }
        }
        // A command with a failure names only its first status: ask again one slot at a time.
        for (i, slot) in retry {
            let cmd = Cmd::read(self.lay.ppas(self.lay.chunk_of(slot), self.lay.offset_of(slot), 1));
            let d = self.flash.run(vec![cmd]).await?;
            let Some(d) = d.into_iter().next() else { continue };
            if d.cqe.status.data_valid() {
                if !d.cqe.status.is_success() {
                    refresh.push(slot);
                }
                out[i] = Ok(d.data);
            } else {
                if d.cqe.status == Status::INTERNAL_ERROR {
                    return Err(device_err(opcode::VECTOR_READ, d.cqe.status));
                }
                self.notices.needed();
                out[i] = Err(d.cqe.status);
            }
        }
        for slot in refresh {
            self.queue_refresh(slot);
        }
        Ok(out)
    }

    /// A read of `slot` warned of high ECC: its line is queued for relocation.
    pub fn queue_refresh(&mut self, slot: u32) {
        let lines = self.blocks.lines();
        if let Some(gen) = lines.chunks().get(self.lay.chunk_of(slot) as usize).and_then(|c| c.line()) {
            if !lines.is_urgent(gen) {
                tracing::info!(gen, slot, "high ECC warning; line queued for refresh");
                self.blocks.lines_mut().queue_urgent(gen);
            }
        }
    }

    /// The contents of logical blocks `first..first + n`.
    pub async fn read_lbas(&mut self, first: u32, n: u32) -> Result<Vec<u8>> {
        let mut out = vec![0u8; n as usize * LBA_BYTES];
        let mut want = Vec::new();
        for k in 0..n {
            let lba = first + k;
            if self.blocks.mapping().is_lost(lba) {
                return Err(FtlError::Lost { lba, slot: NO_SLOT, status: Status::OFFLINE_CHUNK });
            }
            let e = self.blocks.mapping().get(lba);
            if e.is_mapped() {
                want.push((k, e.slot));
            }
        }
        let slots: Vec<u32> = want.iter().map(|&(_, s)| s).collect();
        let got = self.read_slots(&slots).await?;
        for (&(k, slot), r) in want.iter().zip(got) {
            match r {
                Ok(d) => out[k as usize * LBA_BYTES..(k as usize + 1) * LBA_BYTES].copy_from_slice(&d),
                Err(status) => return Err(FtlError::Lost { lba: first + k, slot, status }),
            }
        }
        Ok(out)
    }

    /// Fills `out` (`n` blocks) with what logical blocks `first..first + n` hold without asking
    /// the device: zeros where unmapped, the write buffer's data where it has them. The rest
    /// are left to the caller, as (block of the request, slot) in `dev`.
    pub fn read_without_device(&self, first: u32, n: u32, out: &mut [u8], dev: &mut Vec<(usize, u32)>) -> Result<()> {
        let block = |k: usize| k * LBA_BYTES..(k + 1) * LBA_BYTES;
        let map = self.blocks.mapping();
        for k in 0..n {
            let lba = first + k;
            if map.is_lost(lba) {
                return Err(FtlError::Lost { lba, slot: NO_SLOT, status: Status::OFFLINE_CHUNK });
            }
            let e = map.get(lba);
            let k = k as usize;
            if !e.is_mapped() {
                out[block(k)].fill(0);
                continue;
            }
            match self.blocks.buffer().data(e.slot) {
                Some(d) => out[block(k)].copy_from_slice(d),
                None => dev.push((k, e.slot)),
            }
        }
        Ok(())
    }
}
