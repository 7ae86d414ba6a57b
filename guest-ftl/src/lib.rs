//! One flash translation layer per VM.
//!
//! This crate will own the guest FTL: a logical-to-physical map over the VM's partition of the
//! open-channel device, a striped write path with a write buffer, garbage collection, trim, wear
//! levelling and crash recovery. It speaks to the host FTL driver only through the queue-pair
//! boundary of `host-ftl` and is itself a `vdisk::BlockDevice`. It is filled by the guest FTL issue.
