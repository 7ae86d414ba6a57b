//! A vhost-user-blk client on libblkio (the `blkio` crate), for driving vstor as a VM would.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub struct VhostClient {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

/// Size of the shared buffer every request goes through.
pub const REGION: usize = 4 << 20;

impl VhostClient {
    /// Connects to a vhost-user-blk socket with `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize) -> Result<VhostClient, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().expect("UTF-8 socket path"))?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues as i32)?;
        let started = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")? as usize;
        let region = blkio.alloc_mem_region(REGION.next_multiple_of(align))?;
        blkio.map_mem_region(&region)?;
        Ok(VhostClient { blkio, queues: started.queues, region })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    fn buf(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    /// Waits for one completion on queue `q` and returns its `ret` (0 or -errno).
    fn wait(&mut self, q: usize) -> i32 {
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let n = self.queues[q].do_io(&mut done, 1, None, None).expect("do_io");
        assert_eq!(n, 1, "one completion");
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { done[0].assume_init_read() }.ret
    }

    /// Writes `data` at `offset` through queue `q`.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8], fua: bool) -> i32 {
        assert!(data.len() <= REGION);
        // SAFETY: the region is REGION bytes of mapped memory owned by this client.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(), data.len()) };
        let flags = if fua { ReqFlags::FUA } else { ReqFlags::empty() };
        let buf = self.buf();
        self.queues[q].write(offset, buf, data.len(), 0, flags);
        self.wait(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= REGION);
        let buf = self.buf();
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        match self.wait(q) {
            0 => {
                let mut out = vec![0u8; len];
                // SAFETY: as in `write`.
                unsafe { std::ptr::copy_nonoverlapping(self.buf(), out.as_mut_ptr(), len) };
                Ok(out)
            }
            err => Err(err),
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Sends `n` 4 KiB writes of distinct patterns on queue `q` before waiting for any, then
    /// collects every completion: many requests in flight at once.
    pub fn write_many(&mut self, q: usize, base: u64, n: usize) -> Vec<i32> {
        assert!(n * 4096 <= REGION);
        for i in 0..n {
            // SAFETY: each request has its own 4 KiB of the region.
            unsafe { std::ptr::write_bytes(self.buf().add(i * 4096), pattern(base, i), 4096) };
            // SAFETY: the same 4 KiB, inside the region.
            let buf = unsafe { self.buf().add(i * 4096) };
            self.queues[q].write(base + (i * 4096) as u64, buf, 4096, i, ReqFlags::empty());
        }
        let mut done: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut rets = vec![i32::MIN; n];
        let mut got = 0;
        while got < n {
            let k = self.queues[q].do_io(&mut done[..n - got], 1, None, None).expect("do_io");
            for c in &done[..k] {
                // SAFETY: do_io initialised the first `k` completions.
                let c = unsafe { c.assume_init_read() };
                rets[c.user_data] = c.ret;
            }
            got += k;
        }
        rets
    }
}

/// The byte `write_many` fills request `i` at `base` with.
pub fn pattern(base: u64, i: usize) -> u8 {
    ((base >> 12) as usize + i * 7 + 1) as u8
}

impl Drop for VhostClient {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
