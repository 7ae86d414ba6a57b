//! Image references: `[host[:port]/]repository[:tag][@digest]`, with Docker's defaults
//! (docker.io, library/, latest). OWNER: H7a. SKELETON: keep these signatures; add what you need.

use crate::digest::Digest;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` of the registry.
    pub registry: String,
    /// Repository path, e.g. `library/debian`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl std::str::FromStr for ImageRef {
    type Err = crate::registry::RegistryError;
    fn from_str(s: &str) -> Result<ImageRef, Self::Err> {
        todo!("H7a")
    }
}
