//! The FUSE file system over a merged [`crate::tree::Tree`]. OWNER: H7c.
