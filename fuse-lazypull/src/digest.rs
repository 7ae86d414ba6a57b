//! Content digests (`sha256:<64 hex>`): parsing, computing and checking.
//! OWNER: H7a. SKELETON: keep these signatures; add what you need.

/// A validated `sha256:` digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        todo!("H7a")
    }
    /// The 64 hex characters, for file names.
    pub fn hex(&self) -> &str {
        todo!("H7a")
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Digest {
    type Err = crate::registry::RegistryError;
    fn from_str(s: &str) -> Result<Digest, Self::Err> {
        todo!("H7a")
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
