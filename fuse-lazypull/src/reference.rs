//! Image references: `[host[:port]/]repository[:tag][@digest]`, with Docker's defaults
//! (docker.io, library/, latest).
//!
//! The grammar is Docker's (`distribution/reference`): the first path component is a registry
//! host only if it contains a `.` or a `:` or is `localhost`; repository components are lowercase
//! alphanumerics joined by `.`, `_`, `__` or runs of `-`; a tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`;
//! a digest is `sha256:<64 hex>`. A reference with neither tag nor digest means `:latest`.

use crate::digest::Digest;

/// Text that is not an image reference.
#[derive(Debug, thiserror::Error)]
#[error("bad image reference {text:?}: {why}")]
pub struct BadReference {
    pub text: String,
    pub why: String,
}

/// The registry a reference without a host names.
pub const DEFAULT_REGISTRY: &str = "docker.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` of the registry.
    pub registry: String,
    /// Repository path, e.g. `library/debian`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// What to ask the registry's manifest endpoint for: the digest if there is one, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = BadReference;
    fn from_str(s: &str) -> Result<ImageRef, Self::Err> {
        let bad = |why: &str| BadReference { text: s.to_owned(), why: why.to_owned() };
        if s.is_empty() {
            return Err(bad("empty reference"));
        }
        if s.len() > 512 {
            return Err(bad("longer than 512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?)),
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(bad)?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if is_host(first) => (first.to_owned(), path.to_owned()),
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        check_host(&registry).map_err(bad)?;
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_owned() } else { registry };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_repository(&repository).map_err(bad)?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(ImageRef { registry, repository, tag, digest })
    }
}

/// Docker's rule: the first component names a registry if it looks like a host.
fn is_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn check_host(host: &str) -> Result<(), &'static str> {
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err("unclosed '[' in the registry host");
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return Err("bad IPv6 registry address");
        }
        (None, after.strip_prefix(':').map(Some).unwrap_or(if after.is_empty() { None } else { Some("") }))
    } else {
        match host.split_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err("bad registry host name");
        }
    }
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err("bad registry port");
        }
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), &'static str> {
    if repo.is_empty() {
        return Err("empty repository name");
    }
    if repo.len() > 255 {
        return Err("repository name longer than 255 characters");
    }
    if repo.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("repository name must be lowercase");
    }
    for component in repo.split('/') {
        check_component(component)?;
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn check_component(c: &str) -> Result<(), &'static str> {
    const MSG: &str = "repository components are lowercase letters and digits joined by '.', '_', '__' or '-'";
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(MSG);
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(MSG);
        }
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    if bytes.is_empty() || bytes.len() > 128 {
        return Err("a tag is 1 to 128 characters");
    }
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err("a tag is letters, digits, '_', '.' and '-', not starting with '.' or '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_defaults() {
        let r = parse("debian");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/debian", Some("latest"))
        );
        let r = parse("bitnami/redis:7.2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "bitnami/redis", Some("7.2"))
        );
        let r = parse("index.docker.io/library/alpine");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        let r = parse("127.0.0.1:5000/test/img:v1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "test/img", Some("v1"))
        );
        let r = parse("localhost/img");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "img"));
        let d = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let r = parse(&format!("quay.io/a/b@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().map(|d| d.as_str()), Some(d));
        assert_eq!(r.manifest_reference(), d);
        let r = parse(&format!("ghcr.io/a/b:t@{d}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.manifest_reference(), d);
        let r = parse("[::1]:5000/x:y");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("[::1]:5000", "x", Some("y")));
        // A component without '.' or ':' is a repository path, not a host.
        let r = parse("myorg/sub/img");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("docker.io", "myorg/sub/img"));
        let r = parse("a__b/c-----d/e.f_g");
        assert_eq!(r.repository, "a__b/c-----d/e.f_g");
    }

    #[test]
    fn bad_references_say_why() {
        for bad in [
            "",
            "Debian",
            "debian:",
            "debian:-x",
            "host:5000/",
            "a//b",
            "a/b/",
            "-a/b",
            "a..b",
            "a___b",
            "a@sha256:1234",
            "a@md5:d41d8cd98f00b204e9800998ecf8427e",
            "bad_host.x:port/img",
            "host.example:99999999/img",
            "a b",
        ] {
            let err = bad.parse::<ImageRef>().expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains("bad image reference"), "{bad}: {msg}");
        }
        let long_tag = format!("img:{}", "t".repeat(129));
        assert!(long_tag.parse::<ImageRef>().is_err());
    }
}
