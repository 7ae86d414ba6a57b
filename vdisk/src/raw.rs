//! Raw-file disks: the disk's bytes are the file's bytes, served through io_uring.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use io_uring::{opcode, types};

use crate::buffer::IoBuf;
use crate::device::{BlockDevice, BlockError, DeviceInfo, IoFuture, IoResult};
use crate::uring::Uring;

/// A disk backed by a regular file of exactly its capacity.
pub struct RawFile {
    file: File,
    info: DeviceInfo,
    uring: Uring,
    /// Whether the file system takes each [`ZeroMethod`]; cleared on its first EOPNOTSUPP.
    zero_support: [AtomicBool; 2],
}

/// The fallocate modes that make a range read as zeroes without writing it.
#[derive(Debug, Clone, Copy)]
enum ZeroMethod {
    /// Zeroes the range and keeps it allocated.
    ZeroRange = 0,
    /// Deallocates the range (tmpfs has this but not ZeroRange).
    PunchHole = 1,
}

impl ZeroMethod {
    fn mode(self) -> i32 {
        match self {
            ZeroMethod::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ZeroMethod::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// Size of the zero buffers written when no fallocate mode is supported.
const ZERO_CHUNK: u64 = 1 << 20;

impl RawFile {
    /// Creates a new sparse file of `capacity` bytes, readable by its owner only; fails if it
    /// exists.
    pub fn create(path: &Path, capacity: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.set_len(capacity)?;
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Opens an existing file as a disk. With `direct`, I/O bypasses the page cache (O_DIRECT).
    /// Must be called inside a tokio runtime.
    pub fn open(path: &Path, block_size: u32, read_only: bool, direct: bool) -> io::Result<RawFile> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        let capacity = file.metadata()?.len();
        if capacity % u64::from(block_size) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has {capacity} bytes, not a multiple of the {block_size}-byte block size", path.display()),
            ));
        }
        let info = DeviceInfo { capacity, block_size, read_only };
        Ok(RawFile { file, info, uring: Uring::new()?, zero_support: [AtomicBool::new(true), AtomicBool::new(true)] })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Runs a fallocate mode over a range.
    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> IoResult<()> {
        let fd = self.fd();
        // SAFETY: the entry holds no pointers.
        let op =
            unsafe { self.uring.submit((), |_| opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build()) };
        op.await.0.map(drop).map_err(BlockError::Io)
    }

    /// Makes a range read as zeroes with the first of `methods` the file system supports,
    /// falling back to writing zeroes. What the file system refused is remembered.
    async fn zero(&self, offset: u64, len: u64, methods: &[ZeroMethod]) -> IoResult<()> {
        for &method in methods {
            let supported = &self.zero_support[method as usize];
            if !supported.load(Relaxed) {
                continue;
            }
            match self.fallocate(offset, len, method.mode()).await {
                Err(BlockError::Io(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => supported.store(false, Relaxed),
                done => return done,
            }
        }
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(ZERO_CHUNK);
            self.transfer(true, offset + done, IoBuf::zeroed(chunk as usize), false).await?;
            done += chunk;
        }
        Ok(())
    }

    async fn fdatasync(&self) -> IoResult<()> {
        let fd = self.fd();
        // SAFETY: the entry holds no pointers.
        let op =
            unsafe { self.uring.submit((), |_| opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build()) };
        op.await.0.map(drop).map_err(BlockError::Io)
    }

    /// Reads or writes all of `buf`, resubmitting the rest after a short transfer.
    async fn transfer(&self, write: bool, offset: u64, mut buf: IoBuf, fua: bool) -> IoResult<IoBuf> {
        let len = buf.len();
        let mut done = 0usize;
        let fd = self.fd();
        while done < len {
            let pos = offset + done as u64;
            let chunk = (len - done) as u32;
            let start = done;
            // SAFETY: the pointer stays inside `buf`, whose heap memory the operation owns.
            let op = unsafe {
                self.uring.submit(buf, |b| {
                    let ptr = b.as_mut_ptr().add(start);
                    if write {
                        let flags = if fua { libc::RWF_DSYNC } else { 0 };
                        opcode::Write::new(fd, ptr, chunk).offset(pos).rw_flags(flags).build()
                    } else {
                        opcode::Read::new(fd, ptr, chunk).offset(pos).build()
                    }
                })
            };
            let (res, back) = op.await;
            buf = back;
            match res {
                Ok(0) => return Err(BlockError::ShortTransfer { offset, len: len as u64, done: done as u64 }),
                Ok(n) => done += n as usize,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
                Err(e) => return Err(BlockError::Io(e)),
            }
        }
        Ok(buf)
    }
}

impl BlockDevice for RawFile {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(self.transfer(false, offset, buf, false))
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(self.transfer(true, offset, buf, fua))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.fdatasync())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.zero(offset, len, &[ZeroMethod::PunchHole]))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.zero(offset, len, &[ZeroMethod::ZeroRange, ZeroMethod::PunchHole]).await?;
            if fua {
                self.fdatasync().await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{check_range, RequestKind};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write { block: u64, blocks: u64, byte: u8, fua: bool },
        Read { block: u64, blocks: u64 },
        Discard { block: u64, blocks: u64 },
        WriteZeroes { block: u64, blocks: u64 },
        Flush,
    }

    const BS: u64 = 512;
    const BLOCKS: u64 = 64;

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..BLOCKS + 2, 0..10u64);
        prop_oneof![
            (range.clone(), any::<u8>(), any::<bool>()).prop_map(|((block, blocks), byte, fua)| Op::Write {
                block,
                blocks,
                byte,
                fua
            }),
            range.clone().prop_map(|(block, blocks)| Op::Read { block, blocks }),
            range.clone().prop_map(|(block, blocks)| Op::Discard { block, blocks }),
            range.prop_map(|(block, blocks)| Op::WriteZeroes { block, blocks }),
            Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The raw-file backend agrees with a byte array on every operation, and bad ranges are
        /// refused by the check without touching the data.
        #[test]
        fn raw_file_matches_a_byte_array(ops in proptest::collection::vec(op(), 1..60), direct in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.raw");
            RawFile::create(&path, BLOCKS * BS).unwrap();
            rt.block_on(async {
                // O_DIRECT is not available on every file system (tmpfs); fall back to buffered.
                let dev = RawFile::open(&path, BS as u32, false, direct)
                    .or_else(|_| RawFile::open(&path, BS as u32, false, false)).unwrap();
                let mut model = vec![0u8; (BLOCKS * BS) as usize];
                for op in ops {
                    let (kind, block, blocks) = match op {
                        Op::Write { block, blocks, .. } => (RequestKind::Write, block, blocks),
                        Op::Read { block, blocks } => (RequestKind::Read, block, blocks),
                        Op::Discard { block, blocks } => (RequestKind::Discard, block, blocks),
                        Op::WriteZeroes { block, blocks } => (RequestKind::WriteZeroes, block, blocks),
                        Op::Flush => (RequestKind::Flush, 0, 0),
                    };
                    let (off, len) = (block * BS, blocks * BS);
                    let valid = check_range(&dev.info(), kind, off, len).is_ok();
                    let expect_valid = kind == RequestKind::Flush || (blocks > 0 && block + blocks <= BLOCKS);
                    prop_assert_eq!(valid, expect_valid);
                    if !valid { continue; }
                    let range = off as usize..(off + len) as usize;
                    match op {
                        Op::Write { byte, fua, .. } => {
                            let buf = IoBuf::copy_from(&vec![byte; len as usize]);
                            dev.write(off, buf, fua).await.unwrap();
                            model[range].fill(byte);
                        }
                        Op::Read { .. } => {
                            let buf = dev.read(off, IoBuf::zeroed(len as usize)).await.unwrap();
                            prop_assert_eq!(buf.as_slice(), &model[range]);
                        }
                        Op::Discard { .. } => {
                            dev.discard(off, len).await.unwrap();
                            model[range].fill(0);
                        }
                        Op::WriteZeroes { .. } => {
                            dev.write_zeroes(off, len, false).await.unwrap();
                            model[range].fill(0);
                        }
                        Op::Flush => dev.flush().await.unwrap(),
                    }
                }
                let all = dev.read(0, IoBuf::zeroed(model.len())).await.unwrap();
                prop_assert_eq!(all.as_slice(), &model[..]);
                Ok(())
            })?;
        }
    }

    #[test]
    fn many_requests_in_flight_and_dropped_futures() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        RawFile::create(&path, 1 << 20).unwrap();
        rt.block_on(async {
            let dev = std::sync::Arc::new(RawFile::open(&path, 512, false, false).unwrap());
            let mut tasks = Vec::new();
            for i in 0..256u64 {
                let dev = dev.clone();
                tasks.push(tokio::spawn(async move {
                    let data = IoBuf::copy_from(&[i as u8; 4096]);
                    dev.write(i * 4096, data, false).await.unwrap();
                    let back = dev.read(i * 4096, IoBuf::zeroed(4096)).await.unwrap();
                    assert!(back.as_slice().iter().all(|&b| b == i as u8));
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // Futures dropped before completion must not free buffers the kernel still fills.
            for _ in 0..64 {
                drop(dev.read(0, IoBuf::zeroed(65536)));
            }
            dev.flush().await.unwrap();
        });
    }
}
