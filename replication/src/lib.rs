//! Replication of disks to a second site.
//!
//! This crate will own the gateway appliances, the ordered site-to-site write stream, appliance
//! load scores and rebalancing, resync, failover and failback. It is filled by the replication
//! issue.
