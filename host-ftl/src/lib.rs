//! The open-channel SSD and its host FTL driver.
//!
//! This crate will own the Open-Channel SSD 2.0 device model (geometry, chunk state machine,
//! 64-byte NVMe vector commands, out-of-band metadata, file and memory media, timing and fault
//! injection) and the host FTL driver that partitions the device's parallel units between guests,
//! validates and translates every command, meters each guest for fairness and reclaims a removed
//! guest's chunks in the background. It is filled by the issue that builds the device model.
