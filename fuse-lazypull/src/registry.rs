//! The OCI distribution client: manifests and indexes (OCI and Docker media types), ranged blob
//! GETs, blob and manifest pushes, with anonymous, basic and bearer-token auth.
//!
//! The public API is blocking (the FUSE side runs on threads). It is built on `ureq`: pooled
//! keep-alive connections, redirects followed (registries send blob GETs to storage elsewhere;
//! the `Authorization` header goes along only to the same host), TLS through rustls with the
//! `ring` provider and the webpki roots (plus [`RegistryConfig::ca_files`]). Plain HTTP is used
//! for loopback registries (127.0.0.0/8, `::1`, `localhost`, as Docker does) unless listed in
//! [`RegistryConfig::https`], and for those listed in [`RegistryConfig::insecure`].
//!
//! Every request has bounded connect and read timeouts and an overall deadline (see
//! [`MIN_BYTES_PER_SEC`]); transport errors, 5xx/429 answers and short bodies are retried with
//! exponential backoff. Manifests and whole blobs are checked against their sha256 before they
//! are returned; ranged reads are not (a range cannot be), and the cache checks whole blobs and
//! the layer code checks chunks.
//!
//! # Credentials
//! [`RegistryConfig::credentials`] maps a registry host (`host[:port]` as in image references,
//! `docker.io` for Docker Hub) to a username and password. [`RegistryConfig::auth_file`] names a
//! Docker-style `config.json` / containers `auth.json` (`{"auths": {"HOST": {"auth":
//! base64("user:pass")}}}`); entries in `credentials` win over the file. With credentials the
//! client answers a `Basic` challenge directly and sends them to a `Bearer` token realm; without,
//! it asks the token realm anonymously. Tokens are cached per host, repository and access.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;

use crate::digest::{BadDigest, Digest};
use crate::reference::{BadReference, ImageRef};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Manifests larger than this are refused (a registry must not make us hold unbounded JSON).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Layers of one image at most: each costs a blob, an index and an overlayfs lower directory,
/// and a 4 MiB manifest could name some 30 000. Docker's overlay2 driver refuses images of more
/// than 128 layers too.
pub const MAX_LAYERS: usize = 128;
/// Whole-blob GETs into memory (configs) are limited to this.
const MAX_WHOLE_BLOB_BYTES: u64 = 64 << 20;
/// A registry that ignores `Range` answers a ranged GET with the whole blob (200): the bytes
/// before the range are read and dropped, never held. Past this many the blob is refused
/// instead, since every range of it (the background fetch asks for every 4 MiB) would transfer
/// the blob from its start again.
const MAX_SKIPPED_PREFIX: u64 = 64 << 20;
/// A request may take twice the configured timeout, plus a second for every MiB it sends or
/// receives: a registry slower than 1 MiB/s is taken for failing (and the request is retried).
/// Without an overall deadline, a registry that sends a byte just within the read timeout holds
/// a request for years.
const MIN_BYTES_PER_SEC: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    BadReference(#[from] BadReference),
    #[error(transparent)]
    BadDigest(#[from] BadDigest),
    /// A missing tag, manifest, repository or blob.
    #[error("{reference}: not found in the registry ({detail})")]
    NotFound { reference: String, detail: String },
    #[error("{registry}: not authorized ({detail})")]
    Unauthorized { registry: String, detail: String },
    #[error("{method} {url}: HTTP {status}: {detail}")]
    Http { method: String, url: String, status: u16, detail: String },
    #[error("{method} {url}: connection failed")]
    Transport {
        method: String,
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("{method} {url}: reading the response failed")]
    Body {
        method: String,
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: expected {expected}, the registry sent {actual}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("{reference}: bad manifest: {detail}")]
    BadManifest { reference: String, detail: String },
    #[error("{reference}: no linux/amd64 image in the index (it has: {available})")]
    NoPlatform { reference: String, available: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry configuration: {0}")]
    Config(String),
    /// The registry answers a ranged GET with the whole blob, and the range starts past
    /// [`MAX_SKIPPED_PREFIX`]: asking again cannot help.
    #[error("GET {url}: the registry ignores Range; bytes from {start} would come after all those before them")]
    IgnoresRange { url: String, start: u64 },
}

/// A username and password for one registry.
#[derive(Clone, Default, serde::Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Which registries to reach how. Loopback registries (127.0.0.0/8, ::1, localhost) are spoken
/// to over plain HTTP, as Docker does; so are those listed in `insecure`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// Registry hosts (`host[:port]`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Registry hosts reached over HTTPS even on loopback.
    pub https: Vec<String>,
    /// PEM files of CA certificates trusted besides the webpki roots (a private registry's CA).
    pub ca_files: Vec<PathBuf>,
    /// Credentials per registry host (`docker.io` for Docker Hub).
    pub credentials: BTreeMap<String, Credentials>,
    /// A Docker `config.json` or containers `auth.json` to take credentials from.
    pub auth_file: Option<PathBuf>,
    /// Connect timeout, and the longest wait for any read or write on a connection. A whole
    /// request may take twice this plus a second per MiB it moves.
    pub timeout_secs: u64,
    /// How many times a failed request (connection error, 5xx, 429, short body) is retried.
    pub retries: u32,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            insecure: Vec::new(),
            https: Vec::new(),
            ca_files: Vec::new(),
            credentials: BTreeMap::new(),
            auth_file: None,
            timeout_secs: 30,
            retries: 3,
        }
    }
}

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A resolved image: the linux/amd64 manifest of a reference.
#[derive(Clone, Debug)]
pub struct Image {
    pub reference: ImageRef,
    /// Digest of the (platform) manifest.
    pub digest: Digest,
    pub config: Descriptor,
    /// Bottom layer first.
    pub layers: Vec<Descriptor>,
}

/// A manifest as fetched: its bytes were checked against `digest`.
#[derive(Clone, Debug)]
pub struct RawManifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Vec<u8>,
}

/// The body of a blob push.
pub enum BlobBody<'a> {
    Bytes(&'a [u8]),
    /// A file, streamed (re-opened for every retry).
    File(&'a Path),
}

pub struct Registry {
    config: RegistryConfig,
    agent: ureq::Agent,
    /// Credentials from `config.credentials` and the auth file, by host.
    credentials: BTreeMap<String, Credentials>,
    /// What each host asked for last, and the tokens it gave.
    auth: Mutex<HashMap<String, HostAuth>>,
    bytes_fetched: AtomicU64,
}

#[derive(Default)]
struct HostAuth {
    basic: bool,
    /// Bearer tokens by `repository:actions`.
    tokens: HashMap<String, String>,
}

/// What a request is for: which host, repository and access (for auth and error messages).
struct Scope<'a> {
    host: &'a str,
    repository: &'a str,
    push: bool,
}

impl Scope<'_> {
    fn key(&self) -> String {
        format!("{}:{}", self.repository, if self.push { "pull,push" } else { "pull" })
    }
}

/// A response read into memory.
struct Reply {
    status: u16,
    content_type: String,
    docker_digest: Option<String>,
    location: Option<String>,
    content_range: Option<String>,
    url: String,
    body: Vec<u8>,
    /// Bytes read and dropped before `body` (the prefix of a whole blob sent for a range).
    skipped: u64,
}

enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    File(&'a Path),
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Result<Arc<Registry>, RegistryError> {
        let mut credentials = match &config.auth_file {
            Some(path) => read_auth_file(path)?,
            None => BTreeMap::new(),
        };
        credentials.extend(config.credentials.iter().map(|(k, v)| (k.clone(), v.clone())));
        let timeout = Duration::from_secs(config.timeout_secs.max(1));
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls_config(&config.ca_files)?)
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .timeout_write(timeout)
            .redirects(5)
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .max_idle_connections_per_host(16)
            .user_agent("vstor-lazypull")
            .build();
        Ok(Arc::new(Registry {
            config,
            agent,
            credentials,
            auth: Mutex::new(HashMap::new()),
            bytes_fetched: AtomicU64::new(0),
        }))
    }

    /// Resolves a reference to its linux/amd64 manifest (through an index if there is one).
    pub fn resolve(&self, image: &ImageRef) -> Result<Image, RegistryError> {
        let raw = self.fetch_manifest(image)?;
        let raw = if is_index(&raw.media_type) {
            let entry = choose_platform(image, &raw.bytes)?;
            let by_digest = ImageRef { digest: Some(entry), ..image.clone() };
            let platform = self.fetch_manifest(&by_digest)?;
            if is_index(&platform.media_type) {
                return Err(bad_manifest(image, "an index entry for linux/amd64 is itself an index"));
            }
            platform
        } else {
            raw
        };
        let (config, layers) = parse_manifest(image, &raw.bytes)?;
        Ok(Image { reference: image.clone(), digest: raw.digest, config, layers })
    }

    /// Fetches the manifest or index a reference names, checked against the reference's digest
    /// (or the registry's `Docker-Content-Digest` when fetched by tag).
    pub fn fetch_manifest(&self, image: &ImageRef) -> Result<RawManifest, RegistryError> {
        let url = format!("{}/manifests/{}", self.repo_url(image), image.manifest_reference());
        let accept = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST].join(", ");
        let reply = self
            .exchange(
                &self.scope(image, false),
                "GET",
                &url,
                &[("Accept", accept)],
                Body::Empty,
                Limit::Refuse(MAX_MANIFEST_BYTES),
            )
            .map_err(|e| not_found_as(e, image, "no such manifest, tag or repository"))?;
        let actual = Digest::of(&reply.body);
        let expected = match (&image.digest, &reply.docker_digest) {
            (Some(d), _) => Some(d.clone()),
            (None, Some(header)) => Some(header.parse::<Digest>()?),
            (None, None) => None,
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(RegistryError::DigestMismatch { what: format!("manifest of {image}"), expected, actual });
            }
        }
        let media_type = manifest_media_type(image, &reply.content_type, &reply.body)?;
        Ok(RawManifest { media_type, digest: actual, bytes: reply.body })
    }

    /// Fetches a whole blob into memory (configs and other small blobs), checked against its
    /// digest.
    pub fn fetch_blob(&self, image: &ImageRef, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.repo_url(image));
        let reply = self
            .exchange(&self.scope(image, false), "GET", &url, &[], Body::Empty, Limit::Refuse(MAX_WHOLE_BLOB_BYTES))
            .map_err(|e| not_found_as(e, image, &format!("no blob {digest}")))?;
        self.bytes_fetched.fetch_add(reply.body.len() as u64, Ordering::Relaxed);
        let actual = Digest::of(&reply.body);
        if actual != *digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob of {image}"),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(reply.body)
    }

    /// Fetches `range` of a blob (a ranged GET; the caller checks digests). A registry that
    /// ignores `Range` and sends the whole blob (200) is handled by cutting the range out.
    pub fn fetch_range(&self, image: &ImageRef, digest: &Digest, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let url = format!("{}/blobs/{digest}", self.repo_url(image));
        let want = range.end - range.start;
        let header = [("Range", format!("bytes={}-{}", range.start, range.end - 1))];
        let scope = self.scope(image, false);
        let limit = Limit::Range { start: range.start, len: want };
        let mut attempt = 0;
        loop {
            let reply = self
                .exchange(&scope, "GET", &url, &header, Body::Empty, limit)
                .map_err(|e| not_found_as(e, image, &format!("no blob {digest}")))?;
            self.bytes_fetched.fetch_add(reply.body.len() as u64 + reply.skipped, Ordering::Relaxed);
            let got = match reply.status {
                206 => {
                    let start = reply.content_range.as_deref().and_then(content_range_start);
                    if start.is_some_and(|s| s != range.start) {
                        return Err(RegistryError::Http {
                            method: "GET".into(),
                            url,
                            status: 206,
                            detail: format!("asked for bytes from {}, got {:?}", range.start, reply.content_range),
                        });
                    }
                    (reply.body.len() as u64 == want).then_some(reply.body)
                }
                _ if range.start > MAX_SKIPPED_PREFIX => {
                    return Err(RegistryError::IgnoresRange { url, start: range.start });
                }
                _ => (reply.skipped == range.start && reply.body.len() as u64 == want).then_some(reply.body),
            };
            match got {
                Some(bytes) => return Ok(bytes),
                None if attempt < self.config.retries => {
                    tracing::warn!(%url, "short ranged read, retrying");
                    backoff(attempt);
                    attempt += 1;
                }
                None => {
                    return Err(RegistryError::Http {
                        method: "GET".into(),
                        url,
                        status: reply.status,
                        detail: format!("short body for bytes {}..{}", range.start, range.end),
                    })
                }
            }
        }
    }

    /// Whether the repository already has a blob (a HEAD).
    pub fn blob_exists(&self, image: &ImageRef, digest: &Digest) -> Result<bool, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.repo_url(image));
        match self.exchange(&self.scope(image, true), "HEAD", &url, &[], Body::Empty, Limit::Refuse(0)) {
            Ok(_) => Ok(true),
            Err(RegistryError::Http { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob (one POST to open the upload, one PUT with the digest), unless the
    /// repository already has it.
    pub fn push_blob(&self, image: &ImageRef, digest: &Digest, body: BlobBody<'_>) -> Result<(), RegistryError> {
        if self.blob_exists(image, digest)? {
            return Ok(());
        }
        let scope = self.scope(image, true);
        let url = format!("{}/blobs/uploads/", self.repo_url(image));
        let reply = self.exchange(&scope, "POST", &url, &[], Body::Empty, Limit::Refuse(1 << 16))?;
        let Some(location) = reply.location else {
            return Err(RegistryError::Http {
                method: "POST".into(),
                url,
                status: reply.status,
                detail: "no Location for the upload".into(),
            });
        };
        let put_url = join_url(&reply.url, &location);
        let sep = if put_url.contains('?') { '&' } else { '?' };
        let put_url = format!("{put_url}{sep}digest={}", percent_encode(digest.as_str()));
        let headers = [("Content-Type", "application/octet-stream".to_owned())];
        let body = match body {
            BlobBody::Bytes(b) => Body::Bytes(b),
            BlobBody::File(p) => Body::File(p),
        };
        self.exchange(&scope, "PUT", &put_url, &headers, body, Limit::Refuse(1 << 16))?;
        Ok(())
    }

    /// Uploads a manifest (or index) under the reference's tag (or digest); returns its digest.
    pub fn push_manifest(&self, image: &ImageRef, media_type: &str, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let url = format!("{}/manifests/{}", self.repo_url(image), image.manifest_reference());
        let headers = [("Content-Type", media_type.to_owned())];
        self.exchange(&self.scope(image, true), "PUT", &url, &headers, Body::Bytes(bytes), Limit::Refuse(1 << 16))?;
        Ok(Digest::of(bytes))
    }

    /// Bytes received from registries so far (blob bodies), for tests and benchmarks.
    pub fn bytes_fetched(&self) -> u64 {
        self.bytes_fetched.load(Ordering::Relaxed)
    }

    fn scope<'a>(&self, image: &'a ImageRef, push: bool) -> Scope<'a> {
        Scope { host: &image.registry, repository: &image.repository, push }
    }

    /// `SCHEME://API-HOST/v2/REPOSITORY`.
    fn repo_url(&self, image: &ImageRef) -> String {
        let scheme = if self.is_plain(&image.registry) { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", api_host(&image.registry), image.repository)
    }

    /// Whether `registry` is spoken to over plain HTTP: loopback ones (unless listed in
    /// `https`) and those listed in `insecure`.
    fn is_plain(&self, registry: &str) -> bool {
        let listed = |hosts: &[String]| hosts.iter().any(|h| h == registry);
        (is_loopback(api_host(registry)) && !listed(&self.config.https)) || listed(&self.config.insecure)
    }

    /// One request with auth, retries and the body read into memory (at most `limit` bytes).
    /// Non-2xx answers become [`RegistryError::Http`].
    fn exchange(
        &self,
        scope: &Scope<'_>,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
        limit: Limit,
    ) -> Result<Reply, RegistryError> {
        let mut attempt = 0;
        let mut auth_rounds = 0;
        loop {
            let mut req = self.agent.request(method, url);
            for (name, value) in headers {
                req = req.set(name, value);
            }
            if let Some(value) = self.auth_header(scope) {
                req = req.set("Authorization", &value);
            }
            let sent = match &body {
                Body::Empty => req.timeout(self.deadline(limit.bytes())).call(),
                Body::Bytes(b) => req.timeout(self.deadline(limit.bytes() + b.len() as u64)).send_bytes(b),
                Body::File(path) => {
                    let file = std::fs::File::open(path)
                        .map_err(|source| RegistryError::Io { what: format!("opening {}", path.display()), source })?;
                    let len = file
                        .metadata()
                        .map_err(|source| RegistryError::Io { what: format!("reading {}", path.display()), source })?
                        .len();
                    req.timeout(self.deadline(limit.bytes() + len)).set("Content-Length", &len.to_string()).send(file)
                }
            };
            let retryable = match sent {
                Ok(resp) => match read_reply(method, resp, limit) {
                    Ok(reply) => return Ok(reply),
                    Err(e) => e,
                },
                Err(ureq::Error::Status(401, resp)) if auth_rounds < 2 => {
                    auth_rounds += 1;
                    let challenge = resp.header("www-authenticate").unwrap_or("").to_owned();
                    self.authenticate(scope, &challenge)?;
                    continue;
                }
                Err(ureq::Error::Status(status, resp)) => {
                    let err = status_error(method, url, status, resp);
                    if status == 401 || status == 403 {
                        return Err(RegistryError::Unauthorized {
                            registry: scope.host.to_owned(),
                            detail: err.to_string(),
                        });
                    }
                    if status < 500 && status != 429 {
                        return Err(err);
                    }
                    err
                }
                Err(ureq::Error::Transport(t)) => {
                    RegistryError::Transport { method: method.to_owned(), url: url.to_owned(), source: Box::new(t) }
                }
            };
            if attempt >= self.config.retries {
                return Err(retryable);
            }
            tracing::warn!(error = %retryable, attempt, "registry request failed, retrying");
            backoff(attempt);
            attempt += 1;
        }
    }

    /// How long a whole request that moves `bytes` may take: see [`MIN_BYTES_PER_SEC`].
    fn deadline(&self, bytes: u64) -> Duration {
        let base = Duration::from_secs(self.config.timeout_secs.max(1)).saturating_mul(2);
        base.saturating_add(Duration::from_secs(bytes / MIN_BYTES_PER_SEC))
    }

    fn auth_header(&self, scope: &Scope<'_>) -> Option<String> {
        let auth = plumbing::lock(&self.auth);
        let host = auth.get(scope.host)?;
        if let Some(token) = host.tokens.get(&scope.key()) {
            return Some(format!("Bearer {token}"));
        }
        if host.basic {
            let creds = self.credentials.get(scope.host)?;
            return Some(basic_header(creds));
        }
        None
    }

    /// Answers a 401's challenge: remembers to send basic credentials, or gets a bearer token.
    fn authenticate(&self, scope: &Scope<'_>, challenge: &str) -> Result<(), RegistryError> {
        let unauthorized = |detail: String| RegistryError::Unauthorized { registry: scope.host.to_owned(), detail };
        let parsed =
            Challenge::parse(challenge).ok_or_else(|| unauthorized(format!("unusable challenge {challenge:?}")))?;
        let creds = self.credentials.get(scope.host);
        match parsed.scheme.as_str() {
            "basic" => {
                if creds.is_none() {
                    return Err(unauthorized("the registry wants a username and password; none configured".into()));
                }
                let mut auth = plumbing::lock(&self.auth);
                let host = auth.entry(scope.host.to_owned()).or_default();
                if host.basic {
                    return Err(unauthorized("the registry refused the configured username and password".into()));
                }
                host.basic = true;
                Ok(())
            }
            "bearer" => {
                let realm =
                    parsed.params.get("realm").ok_or_else(|| unauthorized("bearer challenge without realm".into()))?;
                // Credentials go to the realm: never in the clear for a registry spoken to over
                // HTTPS.
                let https = realm.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
                let http = realm.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://"));
                let allowed = https || (http && self.is_plain(scope.host));
                if !allowed {
                    return Err(unauthorized(format!(
                        "token realm {realm} is not HTTPS, and the registry is not listed as insecure"
                    )));
                }
                let mut query = Vec::new();
                if let Some(service) = parsed.params.get("service") {
                    query.push(format!("service={}", percent_encode(service)));
                }
                let wanted = format!("repository:{}", scope.key());
                let asked = parsed.params.get("scope").cloned().unwrap_or_default();
                for s in [asked.as_str(), wanted.as_str()] {
                    if !s.is_empty() && !query.iter().any(|q| q == &format!("scope={}", percent_encode(s))) {
                        query.push(format!("scope={}", percent_encode(s)));
                    }
                }
                let url = if query.is_empty() { realm.clone() } else { format!("{realm}?{}", query.join("&")) };
                let mut req = self.agent.get(&url).timeout(self.deadline(TOKEN_REPLY_BYTES));
                if let Some(c) = creds {
                    req = req.set("Authorization", &basic_header(c));
                }
                let resp = match req.call() {
                    Ok(resp) => resp,
                    Err(ureq::Error::Status(status, resp)) => {
                        return Err(unauthorized(status_error("GET", &url, status, resp).to_string()));
                    }
                    Err(ureq::Error::Transport(t)) => {
                        return Err(RegistryError::Transport { method: "GET".into(), url, source: Box::new(t) });
                    }
                };
                let reply = read_reply("GET", resp, Limit::Refuse(TOKEN_REPLY_BYTES))?;
                #[derive(serde::Deserialize)]
                struct TokenReply {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let token: TokenReply = serde_json::from_slice(&reply.body)
                    .map_err(|e| unauthorized(format!("token realm {realm} sent bad JSON: {e}")))?;
                let token = token
                    .token
                    .or(token.access_token)
                    .ok_or_else(|| unauthorized(format!("token realm {realm} sent no token")))?;
                let mut auth = plumbing::lock(&self.auth);
                let host = auth.entry(scope.host.to_owned()).or_default();
                if host.tokens.get(&scope.key()) == Some(&token) {
                    return Err(unauthorized("the registry refused the token its realm gave".into()));
                }
                host.tokens.insert(scope.key(), token);
                Ok(())
            }
            other => Err(unauthorized(format!("unsupported auth scheme {other:?}"))),
        }
    }
}

/// rustls with the ring provider, trusting the webpki roots and the given CA files.
fn tls_config(ca_files: &[PathBuf]) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for path in ca_files {
        let pem = std::fs::read(path)
            .map_err(|source| RegistryError::Io { what: format!("reading CA file {}", path.display()), source })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| RegistryError::Config(format!("CA file {}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| RegistryError::Config(format!("CA file {}: {e}", path.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(RegistryError::Config(format!("CA file {} holds no certificate", path.display())));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn backoff(attempt: u32) {
    std::thread::sleep(Duration::from_millis(100u64 << attempt.min(6)));
}

fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

/// A token realm's answer is at most this long.
const TOKEN_REPLY_BYTES: u64 = 1 << 20;

/// How much of a body to read.
#[derive(Clone, Copy)]
enum Limit {
    /// Refuse a longer body.
    Refuse(u64),
    /// The answer to a GET of `len` bytes from `start`: a 206 longer than `len` is refused; of a
    /// whole blob (200, a registry that ignores `Range`) the first `start` bytes are read and
    /// dropped (up to [`MAX_SKIPPED_PREFIX`]; beyond, nothing is read) and `len` are kept.
    Range { start: u64, len: u64 },
}

impl Limit {
    /// The most bytes an answer within the limit carries.
    fn bytes(self) -> u64 {
        match self {
            Limit::Refuse(n) => n,
            Limit::Range { start, len } => len.saturating_add(start.min(MAX_SKIPPED_PREFIX)),
        }
    }
}

fn read_reply(method: &str, resp: ureq::Response, limit: Limit) -> Result<Reply, RegistryError> {
    let header = |name: &str| resp.header(name).map(str::to_owned);
    let status = resp.status();
    let content_type = header("content-type").unwrap_or_default();
    let docker_digest = header("docker-content-digest");
    let location = header("location");
    let content_range = header("content-range");
    let url = resp.get_url().to_owned();
    let declared = header("content-length").and_then(|v| v.parse::<u64>().ok());
    let mut body = Vec::new();
    let mut skipped = 0;
    let (limit, skip) = match limit {
        Limit::Refuse(n) => (n, None),
        Limit::Range { start, len } if status == 200 => (len, Some(start)),
        Limit::Range { len, .. } => (len, None),
    };
    let body_error = |source| RegistryError::Body { method: method.to_owned(), url: url.clone(), source };
    if let (false, Some(start)) = (method == "HEAD", skip) {
        if start <= MAX_SKIPPED_PREFIX {
            let mut reader = resp.into_reader();
            skipped = std::io::copy(&mut (&mut reader).take(start), &mut std::io::sink()).map_err(body_error)?;
            if skipped == start {
                reader.take(limit).read_to_end(&mut body).map_err(body_error)?;
            }
        }
    } else if method != "HEAD" {
        if declared.is_some_and(|n| n > limit) {
            return Err(RegistryError::Http {
                method: method.to_owned(),
                url,
                status,
                detail: format!("body of {} bytes is over the limit of {limit}", declared.unwrap_or(0)),
            });
        }
        resp.into_reader()
            .take(limit.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|source| RegistryError::Body { method: method.to_owned(), url: url.clone(), source })?;
        if body.len() as u64 > limit {
            return Err(RegistryError::Http {
                method: method.to_owned(),
                url,
                status,
                detail: format!("body over the limit of {limit} bytes"),
            });
        }
        if let Some(n) = declared {
            if body.len() as u64 != n {
                return Err(RegistryError::Body {
                    method: method.to_owned(),
                    url,
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("got {} of {n} bytes", body.len()),
                    ),
                });
            }
        }
    }
    Ok(Reply { status, content_type, docker_digest, location, content_range, url, body, skipped })
}

/// An error answer, with the registry's own error code and message when it sent them.
fn status_error(method: &str, url: &str, status: u16, resp: ureq::Response) -> RegistryError {
    let mut body = Vec::new();
    let _ = resp.into_reader().take(64 << 10).read_to_end(&mut body);
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    let detail = match serde_json::from_slice::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|i| format!("{}: {}", i.code.as_deref().unwrap_or("?"), i.message.as_deref().unwrap_or("")))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned(),
    };
    RegistryError::Http { method: method.to_owned(), url: url.to_owned(), status, detail }
}

/// A 404 names the reference and what was missing.
fn not_found_as(e: RegistryError, image: &ImageRef, what: &str) -> RegistryError {
    match e {
        RegistryError::Http { status: 404, detail, .. } => {
            RegistryError::NotFound { reference: image.to_string(), detail: format!("{what}; registry said {detail}") }
        }
        other => other,
    }
}

fn bad_manifest(image: &ImageRef, detail: &str) -> RegistryError {
    RegistryError::BadManifest { reference: image.to_string(), detail: detail.to_owned() }
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

#[derive(serde::Deserialize)]
struct ManifestJson {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    digest: Digest,
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// The manifest's media type: the Content-Type if specific, else the `mediaType` field, else
/// what its fields show.
fn manifest_media_type(image: &ImageRef, content_type: &str, bytes: &[u8]) -> Result<String, RegistryError> {
    let parsed: ManifestJson =
        serde_json::from_slice(bytes).map_err(|e| bad_manifest(image, &format!("not manifest JSON: {e}")))?;
    let content_type = content_type.split(';').next().unwrap_or("").trim();
    let known = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];
    if known.contains(&content_type) {
        return Ok(content_type.to_owned());
    }
    if let Some(mt) = parsed.media_type.as_deref() {
        if known.contains(&mt) {
            return Ok(mt.to_owned());
        }
        return Err(bad_manifest(image, &format!("unsupported manifest media type {mt}")));
    }
    if parsed.schema_version != Some(2) {
        return Err(bad_manifest(image, "only schemaVersion 2 manifests are supported"));
    }
    match (&parsed.manifests, &parsed.config) {
        (Some(_), None) => Ok(OCI_INDEX.to_owned()),
        (None, Some(_)) => Ok(OCI_MANIFEST.to_owned()),
        _ => Err(bad_manifest(image, &format!("cannot tell the manifest's type (Content-Type {content_type:?})"))),
    }
}

/// The linux/amd64 entry of an index (or its only entry if that has no platform).
pub(crate) fn choose_platform(image: &ImageRef, bytes: &[u8]) -> Result<Digest, RegistryError> {
    let parsed: ManifestJson =
        serde_json::from_slice(bytes).map_err(|e| bad_manifest(image, &format!("not index JSON: {e}")))?;
    let entries = parsed.manifests.unwrap_or_default();
    if let Some(e) =
        entries.iter().find(|e| e.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
    {
        return Ok(e.digest.clone());
    }
    if let [only] = entries.as_slice() {
        if only.platform.is_none() {
            return Ok(only.digest.clone());
        }
    }
    let available = entries
        .iter()
        .map(|e| e.platform.as_ref().map_or("unknown".to_owned(), |p| format!("{}/{}", p.os, p.architecture)))
        .collect::<Vec<_>>()
        .join(", ");
    Err(RegistryError::NoPlatform { reference: image.to_string(), available })
}

/// The config and layers of an image manifest.
pub(crate) fn parse_manifest(image: &ImageRef, bytes: &[u8]) -> Result<(Descriptor, Vec<Descriptor>), RegistryError> {
    let parsed: ManifestJson =
        serde_json::from_slice(bytes).map_err(|e| bad_manifest(image, &format!("not manifest JSON: {e}")))?;
    let config = parsed.config.ok_or_else(|| bad_manifest(image, "no config"))?;
    let layers = parsed.layers.ok_or_else(|| bad_manifest(image, "no layers"))?;
    if layers.len() > MAX_LAYERS {
        return Err(bad_manifest(image, &format!("{} layers, more than {MAX_LAYERS}", layers.len())));
    }
    Ok((config, layers))
}

/// Whether a `host[:port]` is loopback (plain HTTP like Docker).
/// The host that serves `registry`'s API.
fn api_host(registry: &str) -> &str {
    if registry == crate::reference::DEFAULT_REGISTRY {
        "registry-1.docker.io"
    } else {
        registry
    }
}

fn is_loopback(host_port: &str) -> bool {
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

/// Resolves a `Location` (absolute, or relative to the response's URL).
fn join_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let origin_end =
        base.find("://").map(|i| i + 3).and_then(|s| base[s..].find('/').map(|j| s + j)).unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir_end = base.rfind('/').filter(|&i| i >= origin_end).map_or(base.len(), |i| i + 1);
        format!("{}{location}", &base[..dir_end])
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A parsed `WWW-Authenticate` header: `Scheme k="v",k2=v2`.
#[derive(Debug, PartialEq)]
pub(crate) struct Challenge {
    /// Lowercase.
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub(crate) fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() {
            return None;
        }
        let mut params = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if key.is_empty() {
                break;
            }
            if chars.next() != Some('=') {
                return None;
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    return None;
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
            params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
    }
}

/// Credentials of a Docker `config.json` / containers `auth.json`.
fn read_auth_file(path: &Path) -> Result<BTreeMap<String, Credentials>, RegistryError> {
    let bytes = std::fs::read(path)
        .map_err(|source| RegistryError::Io { what: format!("reading auth file {}", path.display()), source })?;
    parse_auth_file(&bytes).map_err(|e| RegistryError::Config(format!("auth file {}: {e}", path.display())))
}

pub(crate) fn parse_auth_file(bytes: &[u8]) -> Result<BTreeMap<String, Credentials>, String> {
    #[derive(serde::Deserialize)]
    struct AuthFile {
        #[serde(default)]
        auths: BTreeMap<String, AuthEntry>,
    }
    #[derive(serde::Deserialize)]
    struct AuthEntry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: AuthFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (key, entry) in file.auths {
        let creds = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("{key}: auth is not base64: {e}"))?;
                let raw = String::from_utf8(raw).map_err(|_| format!("{key}: auth is not UTF-8"))?;
                let (u, p) = raw.split_once(':').ok_or_else(|| format!("{key}: auth is not user:password"))?;
                Credentials { username: u.to_owned(), password: p.to_owned() }
            }
            (None, Some(username), Some(password)) => Credentials { username, password },
            _ => continue,
        };
        // Keys may be URLs ("https://index.docker.io/v1/"); keep the host.
        let host = key.trim_start_matches("https://").trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        let host = if host == "index.docker.io" || host == "registry-1.docker.io" { "docker.io" } else { host };
        out.insert(host.to_owned(), creds);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageRef {
        "127.0.0.1:5000/test/img:v1".parse().unwrap()
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn chooses_linux_amd64_from_oci_and_docker_indexes() {
        for media_type in [OCI_INDEX, DOCKER_MANIFEST_LIST] {
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"{media_type}","manifests":[
                {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D1}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D2}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
                {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D3}","size":1,"platform":{{"os":"windows","architecture":"amd64"}}}}]}}"#
            );
            assert_eq!(manifest_media_type(&image(), "application/json", index.as_bytes()).unwrap(), media_type);
            assert_eq!(choose_platform(&image(), index.as_bytes()).unwrap().as_str(), D2);
        }
    }

    #[test]
    fn index_without_amd64_names_what_it_has() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
        );
        let err = choose_platform(&image(), index.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("linux/arm64") && err.contains("test/img"), "{err}");
        // An index with one entry and no platform (an OCI layout's) means that entry.
        let single =
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1}}]}}"#);
        assert_eq!(choose_platform(&image(), single.as_bytes()).unwrap().as_str(), D1);
    }

    #[test]
    fn parses_docker_and_oci_manifests() {
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":"{D1}"}},
            "layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","size":10,"digest":"{D2}"}},
                      {{"mediaType":"{DOCKER_LAYER_GZIP}","size":20,"digest":"{D3}"}}]}}"#
        );
        assert_eq!(manifest_media_type(&image(), "", docker.as_bytes()).unwrap(), DOCKER_MANIFEST);
        let (config, layers) = parse_manifest(&image(), docker.as_bytes()).unwrap();
        assert_eq!(config.digest.as_str(), D1);
        assert_eq!(layers.iter().map(|l| l.size).collect::<Vec<_>>(), [10, 20]);
        // OCI without mediaType field: the Content-Type says it, or the fields do.
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","size":7,"digest":"{D1}"}},
            "layers":[{{"mediaType":"{OCI_LAYER_GZIP}","size":10,"digest":"{D2}","annotations":{{"a":"b"}}}}]}}"#
        );
        assert_eq!(
            manifest_media_type(&image(), &format!("{OCI_MANIFEST}; charset=utf-8"), oci.as_bytes()).unwrap(),
            OCI_MANIFEST
        );
        assert_eq!(manifest_media_type(&image(), "application/json", oci.as_bytes()).unwrap(), OCI_MANIFEST);
        let (_, layers) = parse_manifest(&image(), oci.as_bytes()).unwrap();
        assert_eq!(layers[0].annotations.get("a").map(String::as_str), Some("b"));
        // Schema 1 and garbage are refused with the reference named.
        let v1 = r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        let err =
            manifest_media_type(&image(), "application/vnd.docker.distribution.manifest.v1+prettyjws", v1.as_bytes())
                .unwrap_err()
                .to_string();
        assert!(err.contains("test/img"), "{err}");
        assert!(manifest_media_type(&image(), "", b"not json").is_err());
        // A bad digest inside a manifest is refused.
        let bad = r#"{"schemaVersion":2,"config":{"mediaType":"x","size":1,"digest":"sha256:xyz"},"layers":[]}"#;
        assert!(parse_manifest(&image(), bad.as_bytes()).is_err());
    }

    /// An image of more than MAX_LAYERS layers is refused.
    #[test]
    fn a_manifest_of_too_many_layers_is_refused() {
        let manifest = |n: usize| {
            let layer = format!(r#"{{"mediaType":"{OCI_LAYER_GZIP}","size":10,"digest":"{D2}"}}"#);
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","size":7,"digest":"{D1}"}},"layers":[{}]}}"#,
                vec![layer; n].join(",")
            )
        };
        assert_eq!(parse_manifest(&image(), manifest(MAX_LAYERS).as_bytes()).unwrap().1.len(), MAX_LAYERS);
        let err = parse_manifest(&image(), manifest(MAX_LAYERS + 1).as_bytes()).unwrap_err();
        assert!(matches!(&err, RegistryError::BadManifest { detail, .. } if detail.contains("129 layers")), "{err:?}");
    }

    #[test]
    fn parses_auth_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:samalba/my-app:pull,push");
        let c = Challenge::parse(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "basic-realm");
        let c = Challenge::parse("Bearer realm=http://x/token, service=reg").unwrap();
        assert_eq!(c.params["realm"], "http://x/token");
        assert_eq!(c.params["service"], "reg");
        assert_eq!(Challenge::parse(r#"Bearer realm="unclosed"#), None);
        assert_eq!(Challenge::parse(""), None);
    }

    #[test]
    fn reads_docker_auth_files() {
        let json = r#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "127.0.0.1:5000":{"username":"u2","password":"p:2"},
            "ghcr.io":{}}}"#;
        let creds = parse_auth_file(json.as_bytes()).unwrap();
        assert_eq!(creds["docker.io"].username, "user");
        assert_eq!(creds["docker.io"].password, "pass");
        assert_eq!(creds["127.0.0.1:5000"].password, "p:2");
        assert!(!creds.contains_key("ghcr.io"));
        assert!(!format!("{:?}", creds["docker.io"]).contains("pass\""));
        assert!(parse_auth_file(br#"{"auths":{"x":{"auth":"!!"}}}"#).is_err());
    }

    /// A registry spoken to over HTTPS whose challenge names a plain-HTTP token realm would
    /// have credentials sent in the clear: refused before any request.
    #[test]
    fn a_plain_http_token_realm_is_refused_for_an_https_registry() {
        let reg = Registry::new(RegistryConfig::default()).unwrap();
        let scope = Scope { host: "registry.example", repository: "a", push: false };
        for realm in ["http://auth.example/token", "ftp://auth.example/token", "/token"] {
            let err = reg.authenticate(&scope, &format!("Bearer realm=\"{realm}\",service=\"r\"")).unwrap_err();
            assert!(err.to_string().contains("is not HTTPS"), "{realm}: {err}");
        }
        let local = Scope { host: "127.0.0.1:5000", repository: "a", push: false };
        let err = reg.authenticate(&local, "Bearer realm=\"http://127.0.0.1:1/token\"").unwrap_err();
        assert!(!err.to_string().contains("is not HTTPS"), "a plain registry may use a plain realm: {err}");
    }

    #[test]
    fn loopback_and_urls() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.3.2.1"));
        assert!(is_loopback("localhost:80"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
        assert!(!is_loopback("registry.example"));
        let reg =
            Registry::new(RegistryConfig { insecure: vec!["10.0.0.1:5000".into()], ..Default::default() }).unwrap();
        let r = |s: &str| reg.repo_url(&s.parse().unwrap());
        assert_eq!(r("10.0.0.1:5000/a"), "http://10.0.0.1:5000/v2/a");
        assert_eq!(r("127.0.0.1:5000/a"), "http://127.0.0.1:5000/v2/a");
        assert_eq!(r("quay.io/a/b"), "https://quay.io/v2/a/b");
        assert_eq!(r("debian"), "https://registry-1.docker.io/v2/library/debian");
        assert_eq!(
            join_url("http://h:1/v2/a/blobs/uploads/", "/v2/a/blobs/uploads/u?s=1"),
            "http://h:1/v2/a/blobs/uploads/u?s=1"
        );
        assert_eq!(join_url("http://h:1/v2/a/blobs/uploads/", "http://o/x"), "http://o/x");
        assert_eq!(join_url("http://h:1/v2/a/blobs/uploads/", "u"), "http://h:1/v2/a/blobs/uploads/u");
        assert_eq!(content_range_start("bytes 10-19/100"), Some(10));
        assert_eq!(percent_encode("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
    }
}
