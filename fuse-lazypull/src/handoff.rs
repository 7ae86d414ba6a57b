//! Putting overlayfs beneath the FUSE mount at the same path, then detaching FUSE. OWNER: H7c.
