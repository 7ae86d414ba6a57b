//! A real OCI registry on loopback, a proxy in front of it that injects faults or demands auth,
//! and images built with umoci and pushed with skopeo.
//!
//! Used by fuse-lazypull's tests and by the root package's end-to-end tests. Needs
//! `docker-registry`, `umoci`, `skopeo` and GNU `tar` (scripts/setup.sh installs them); device
//! nodes and owners need root (CI runs as root).
//!
//! - [`Registry::start`]: `docker-registry serve` on a free 127.0.0.1 port with storage in a
//!   temporary directory, killed on drop. [`Registry::host`] is `127.0.0.1:PORT`.
//! - [`Proxy::start`]: an HTTP/1.1 proxy to a registry on another free port. It can demand
//!   [`Auth::Basic`] or [`Auth::Bearer`] credentials (serving the token realm itself at `/token`),
//!   and, switchable at any time through [`Proxy::set_faults`]: stall every answer, delay it,
//!   answer 503, corrupt or truncate blob bodies. It counts blob GETs and blob bytes sent.
//! - [`ImageBuilder`]: an OCI layout with one image; each [`ImageBuilder::layer`] call stages a
//!   directory ([`Layer`]: files, dirs, symlinks, hard links, whiteouts, opaque dirs, xattrs,
//!   device nodes, modes, owners, large and sparse files), tars it with GNU tar (pax, xattrs,
//!   numeric owners) and appends it with `umoci raw add-layer` (so whiteouts and opaque markers
//!   are exactly what the test asks for). [`ImageBuilder::push`] copies it to a registry with
//!   skopeo (OCI or Docker media types); [`ImageBuilder::unpack`] gives the reference tree from
//!   `umoci unpack`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// A `docker-registry` on 127.0.0.1, killed (and its storage removed) on drop.
pub struct Registry {
    child: Child,
    port: u16,
    storage: tempfile::TempDir,
}

/// A test CA and a server certificate it signed for 127.0.0.1 (made with openssl).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn make(dir: &Path) -> TlsFiles {
        let f = |n: &str| dir.join(n);
        let openssl = || {
            let mut c = Command::new("openssl");
            c.current_dir(dir);
            c
        };
        run(openssl()
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vstor test CA"])
            .args(["-keyout", "ca.key", "-out", "ca.pem"]));
        run(openssl().args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"]).args([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]));
        std::fs::write(f("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").expect("ext file");
        run(openssl().args(["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"]).args([
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]));
        TlsFiles { ca: f("ca.pem"), cert: f("server.pem"), key: f("server.key") }
    }
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// A registry that speaks HTTPS only, with this certificate and key.
    pub fn start_tls(tls: &TlsFiles) -> Registry {
        Registry::start_with(Some(tls))
    }

    fn start_with(tls: Option<&TlsFiles>) -> Registry {
        let storage = tempfile::tempdir().expect("temp dir");
        for _ in 0..5 {
            let port = free_port();
            let config = storage.path().join("config.yml");
            let mut yaml = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.path().join("data").display()
            );
            if let Some(tls) = tls {
                yaml.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    tls.cert.display(),
                    tls.key.display()
                ));
            }
            std::fs::write(&config, yaml).expect("writing the registry config");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting docker-registry (scripts/setup.sh installs it)");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // Port taken meanwhile: try another.
                }
                // Over TLS, a plain request gets 400: the registry is up.
                let ready = if tls.is_some() { Some(400) } else { Some(200) };
                if http_status(port, "/v2/") == ready {
                    return Registry { child, port, storage };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT/NAME`
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }

    /// Bytes the registry stores (all blobs and manifests).
    pub fn storage_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| match e.file_type() {
                            Ok(t) if t.is_dir() => walk(&e.path()),
                            _ => e.metadata().map_or(0, |m| m.len()),
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(self.storage.path())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status of a plain GET on loopback, or None if nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What the proxy demands of clients.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    /// `WWW-Authenticate: Basic`; the client must send these.
    Basic {
        user: String,
        password: String,
    },
    /// `WWW-Authenticate: Bearer realm=http://PROXY/token`; the realm wants these (basic auth)
    /// and hands out tokens the proxy then accepts.
    Bearer {
        user: String,
        password: String,
    },
}

/// Faults the proxy injects; change them with [`Proxy::set_faults`].
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Hold every answer until this is cleared.
    pub stall: bool,
    /// Wait this long before every answer.
    pub delay: Duration,
    /// Answer this many requests with 503.
    pub fail_requests: u32,
    /// Flip a byte in this many blob bodies.
    pub corrupt_blobs: u32,
    /// Send half of this many blob bodies, then close the connection.
    pub truncate_blobs: u32,
    /// Answer blob GETs with a 307 to another path on the proxy that serves them without auth,
    /// as registries send blob GETs to their storage.
    pub redirect_blobs: bool,
    /// Drop the `Range` header, so blob GETs get the whole blob (200), as from a registry that
    /// does not do ranges.
    pub ignore_range: bool,
}

#[derive(Default)]
struct ProxyState {
    faults: Mutex<Faults>,
    tokens: Mutex<Vec<String>>,
    blob_requests: AtomicU64,
    blob_bytes: AtomicU64,
    auth_failures: AtomicU64,
}

/// An HTTP proxy in front of a registry, injecting faults and demanding auth.
pub struct Proxy {
    port: u16,
    upstream: u16,
    auth: Auth,
    state: Arc<ProxyState>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(registry: &Registry, auth: Auth) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = Proxy {
            port,
            upstream: registry.port(),
            auth,
            state: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let ctx = Arc::new(ProxyCtx {
            port,
            upstream: proxy.upstream,
            auth: proxy.auth.clone(),
            state: Arc::clone(&proxy.state),
            stop: Arc::clone(&proxy.stop),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if ctx.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let ctx = Arc::clone(&ctx);
                std::thread::spawn(move || {
                    let _ = ctx.serve(conn);
                });
            }
        });
        proxy
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }

    pub fn set_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.state.faults.lock().unwrap());
    }

    /// Blob GETs answered with a body so far.
    pub fn blob_requests(&self) -> u64 {
        self.state.blob_requests.load(Ordering::SeqCst)
    }

    /// Blob body bytes sent so far.
    pub fn blob_bytes(&self) -> u64 {
        self.state.blob_bytes.load(Ordering::SeqCst)
    }

    /// Requests refused for missing or wrong credentials.
    pub fn auth_failures(&self) -> u64 {
        self.state.auth_failures.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.state.faults.lock().unwrap().stall = false;
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

struct ProxyCtx {
    port: u16,
    upstream: u16,
    auth: Auth,
    state: Arc<ProxyState>,
    stop: Arc<AtomicBool>,
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A request or status line and its headers.
type Head = (String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some((first.trim_end().to_owned(), headers)))
}

fn read_body(r: &mut impl BufRead, headers: &[(String, String)], to_eof: bool) -> std::io::Result<Vec<u8>> {
    let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

impl ProxyCtx {
    fn serve(&self, conn: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut writer = conn;
        loop {
            let Some((first, headers)) = read_head(&mut reader)? else { return Ok(()) };
            let mut parts = first.split_whitespace();
            let method = parts.next().unwrap_or("").to_owned();
            let path = parts.next().unwrap_or("/").to_owned();
            let body = read_body(&mut reader, &headers, false)?;
            let req = Request { method, path, headers, body };
            let (resp, truncate) = self.answer(&req)?;
            let mut head = format!("HTTP/1.1 {} X\r\n", resp.status);
            for (k, v) in &resp.headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            if !resp.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
                head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
            }
            head.push_str("\r\n");
            writer.write_all(head.as_bytes())?;
            if req.method == "HEAD" {
                continue;
            }
            if truncate {
                writer.write_all(&resp.body[..resp.body.len() / 2])?;
                return Ok(()); // Closing the connection mid-body.
            }
            writer.write_all(&resp.body)?;
        }
    }

    fn answer(&self, req: &Request) -> std::io::Result<(Response, bool)> {
        // Faults first: a stalled or failing registry stalls or fails everything.
        loop {
            let stall = self.state.faults.lock().unwrap().stall;
            if !stall || self.stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let delay = self.state.faults.lock().unwrap().delay;
        std::thread::sleep(delay);
        {
            let mut f = self.state.faults.lock().unwrap();
            if f.fail_requests > 0 {
                f.fail_requests -= 1;
                return Ok((simple(503, "injected failure"), false));
            }
        }
        if req.path.starts_with("/token") {
            return Ok((self.token(req), false));
        }
        let redirected = req.path.strip_prefix("/storage");
        if redirected.is_none() {
            if let Some(refused) = self.check_auth(req) {
                self.state.auth_failures.fetch_add(1, Ordering::SeqCst);
                return Ok((refused, false));
            }
        }
        let is_blob = req.method == "GET" && req.path.contains("/blobs/sha256:");
        if is_blob && redirected.is_none() && self.state.faults.lock().unwrap().redirect_blobs {
            let mut r = simple(307, "redirect");
            r.headers.push(("Location".into(), format!("http://127.0.0.1:{}/storage{}", self.port, req.path)));
            return Ok((r, false));
        }
        let forwarded;
        let req = match redirected {
            Some(path) => {
                forwarded = Request {
                    method: req.method.clone(),
                    path: path.to_owned(),
                    headers: req.headers.clone(),
                    body: req.body.clone(),
                };
                &forwarded
            }
            None => req,
        };
        let mut resp = self.forward(req)?;
        let mut truncate = false;
        if is_blob && (resp.status == 200 || resp.status == 206) {
            let mut f = self.state.faults.lock().unwrap();
            if f.corrupt_blobs > 0 && !resp.body.is_empty() {
                f.corrupt_blobs -= 1;
                let mid = resp.body.len() / 2;
                resp.body[mid] ^= 0x55;
            } else if f.truncate_blobs > 0 && resp.body.len() > 1 {
                f.truncate_blobs -= 1;
                truncate = true;
            }
            self.state.blob_requests.fetch_add(1, Ordering::SeqCst);
            let sent = if truncate { resp.body.len() / 2 } else { resp.body.len() };
            self.state.blob_bytes.fetch_add(sent as u64, Ordering::SeqCst);
        }
        Ok((resp, truncate))
    }

    fn check_auth(&self, req: &Request) -> Option<Response> {
        let given = req.header("authorization").unwrap_or("");
        match &self.auth {
            Auth::None => None,
            Auth::Basic { user, password } => {
                if given == basic(user, password) {
                    return None;
                }
                let mut r = simple(401, "authentication required");
                r.headers.push(("WWW-Authenticate".into(), "Basic realm=\"test-registry\"".into()));
                Some(r)
            }
            Auth::Bearer { .. } => {
                let ok = given
                    .strip_prefix("Bearer ")
                    .is_some_and(|t| self.state.tokens.lock().unwrap().iter().any(|k| k == t));
                if ok {
                    return None;
                }
                let repo = req
                    .path
                    .strip_prefix("/v2/")
                    .and_then(|p| ["/manifests/", "/blobs/", "/tags/"].iter().find_map(|m| p.find(m).map(|i| &p[..i])));
                let scope = repo.map(|r| format!(",scope=\"repository:{r}:pull\"")).unwrap_or_default();
                let mut r = simple(401, "authentication required");
                r.headers.push((
                    "WWW-Authenticate".into(),
                    format!("Bearer realm=\"http://127.0.0.1:{}/token\",service=\"test-registry\"{scope}", self.port),
                ));
                Some(r)
            }
        }
    }

    fn token(&self, req: &Request) -> Response {
        let Auth::Bearer { user, password } = &self.auth else {
            return simple(404, "no token realm");
        };
        if req.header("authorization") != Some(basic(user, password).as_str()) {
            self.state.auth_failures.fetch_add(1, Ordering::SeqCst);
            return simple(401, "bad credentials for the token realm");
        }
        let mut tokens = self.state.tokens.lock().unwrap();
        let token = format!("token-{}", tokens.len() + 1);
        tokens.push(token.clone());
        Response {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: format!("{{\"token\":\"{token}\",\"expires_in\":300}}").into_bytes(),
        }
    }

    /// Sends the request to the registry on a connection of its own and reads the whole answer.
    fn forward(&self, req: &Request) -> std::io::Result<Response> {
        let mut up = TcpStream::connect(("127.0.0.1", self.upstream))?;
        let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
        let ignore_range = self.state.faults.lock().unwrap().ignore_range;
        for (k, v) in &req.headers {
            let skip = ["authorization", "connection", "host", "content-length", "transfer-encoding"];
            let dropped = ignore_range && k.eq_ignore_ascii_case("range");
            if !skip.iter().any(|s| k.eq_ignore_ascii_case(s)) && !dropped {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str(&format!(
            "Host: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            self.upstream,
            req.body.len()
        ));
        up.write_all(head.as_bytes())?;
        up.write_all(&req.body)?;
        let mut reader = BufReader::new(up);
        let (status_line, headers) = read_head(&mut reader)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer from the registry"))?;
        let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(502);
        let body = if req.method == "HEAD" { Vec::new() } else { read_body(&mut reader, &headers, true)? };
        let upstream = format!("127.0.0.1:{}", self.upstream);
        let own = format!("127.0.0.1:{}", self.port);
        let headers = headers
            .into_iter()
            // A HEAD answer keeps the registry's Content-Length; others get their body's.
            .filter(|(k, _)| {
                let hop = ["connection", "transfer-encoding"].iter().any(|s| k.eq_ignore_ascii_case(s));
                let length = k.eq_ignore_ascii_case("content-length") && req.method != "HEAD";
                !hop && !length
            })
            .map(|(k, v)| (k, v.replace(&upstream, &own)))
            .collect();
        Ok(Response { status, headers, body })
    }
}

fn simple(status: u16, msg: &str) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: format!("{{\"errors\":[{{\"code\":\"TEST\",\"message\":\"{msg}\"}}]}}").into_bytes(),
    }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding (here so that users of this module need no base64 crate).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An OCI image layout holding one image (tag `latest`) built layer by layer.
pub struct ImageBuilder {
    dir: tempfile::TempDir,
    layers: usize,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    pub fn new() -> ImageBuilder {
        let dir = tempfile::tempdir().expect("temp dir");
        let builder = ImageBuilder { dir, layers: 0 };
        run(Command::new("umoci").arg("init").arg("--layout").arg(builder.layout()));
        run(Command::new("umoci").arg("new").arg("--image").arg(builder.image()));
        builder
    }

    /// The OCI layout directory.
    pub fn layout(&self) -> PathBuf {
        self.dir.path().join("oci")
    }

    fn image(&self) -> String {
        format!("{}:latest", self.layout().display())
    }

    /// Stages a layer with `build` and appends it to the image.
    pub fn layer(&mut self, build: impl FnOnce(&mut Layer)) -> &mut Self {
        let n = self.layers;
        self.layers += 1;
        let root = self.dir.path().join(format!("layer{n}"));
        std::fs::create_dir_all(&root).expect("staging dir");
        let mut layer = Layer { root: root.clone() };
        build(&mut layer);
        let tar = self.dir.path().join(format!("layer{n}.tar"));
        let mut names: Vec<_> = std::fs::read_dir(&root)
            .expect("listing the staging dir")
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        names.sort();
        let mut cmd = Command::new("tar");
        cmd.args(["--create", "--format=pax", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name"])
            .arg("--file")
            .arg(&tar)
            .arg("-C")
            .arg(&root);
        if names.is_empty() {
            cmd.arg("--files-from=/dev/null");
        }
        cmd.arg("--").args(&names);
        run(&mut cmd);
        run(Command::new("umoci")
            .args(["raw", "add-layer", "--history.created_by", &format!("test layer {n}"), "--image"])
            .arg(self.image())
            .arg(&tar));
        std::fs::remove_file(&tar).expect("removing the layer tar");
        self
    }

    /// Pushes the image to `127.0.0.1:PORT/NAME:TAG` (`name_tag` is `NAME:TAG`) with OCI media
    /// types; returns the reference.
    pub fn push(&self, registry_host: &str, name_tag: &str) -> String {
        self.push_as(registry_host, name_tag, false)
    }

    /// Pushes with Docker schema 2 media types if `docker`.
    pub fn push_as(&self, registry_host: &str, name_tag: &str, docker: bool) -> String {
        let reference = format!("{registry_host}/{name_tag}");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if docker {
            cmd.args(["--format", "v2s2"]);
        }
        cmd.arg(format!("oci:{}", self.image())).arg(format!("docker://{reference}"));
        run(&mut cmd);
        reference
    }

    /// `umoci unpack` of the image into `dest` (a bundle); returns the root file system.
    pub fn unpack(&self, dest: &Path) -> PathBuf {
        run(Command::new("umoci").arg("unpack").arg("--image").arg(self.image()).arg(dest));
        dest.join("rootfs")
    }
}

/// A layer being staged: paths are relative to the image root.
pub struct Layer {
    root: PathBuf,
}

impl Layer {
    fn path(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel.trim_start_matches('/'));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("creating parent dirs");
        }
        p
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn file(&mut self, rel: &str, contents: &[u8], mode: u32) -> &mut Self {
        let p = self.path(rel);
        std::fs::write(&p, contents).expect("writing a file");
        self.chmod(rel, mode)
    }

    pub fn dir(&mut self, rel: &str, mode: u32) -> &mut Self {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).expect("creating a dir");
        self.chmod(rel, mode)
    }

    pub fn symlink(&mut self, rel: &str, target: &str) -> &mut Self {
        let p = self.path(rel);
        std::os::unix::fs::symlink(target, &p).expect("creating a symlink");
        self
    }

    /// A hard link at `rel` to `existing`, a file staged earlier in this layer.
    pub fn hardlink(&mut self, rel: &str, existing: &str) -> &mut Self {
        let p = self.path(rel);
        std::fs::hard_link(self.root.join(existing), &p).expect("creating a hard link");
        self
    }

    /// Deletes `rel` of lower layers (`.wh.NAME`).
    pub fn whiteout(&mut self, rel: &str) -> &mut Self {
        let p = self.path(rel);
        let name = p.file_name().expect("whiteout of a name").to_string_lossy().into_owned();
        let wh = p.with_file_name(format!(".wh.{name}"));
        std::fs::write(wh, b"").expect("writing a whiteout");
        self
    }

    /// Makes directory `rel` hide lower layers' contents (`.wh..wh..opq`).
    pub fn opaque(&mut self, rel: &str) -> &mut Self {
        let p = self.path(&format!("{}/.wh..wh..opq", rel.trim_end_matches('/')));
        std::fs::write(p, b"").expect("writing an opaque marker");
        self
    }

    pub fn chmod(&mut self, rel: &str, mode: u32) -> &mut Self {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.root.join(rel), std::fs::Permissions::from_mode(mode)).expect("chmod");
        self
    }

    pub fn chown(&mut self, rel: &str, uid: u32, gid: u32) -> &mut Self {
        std::os::unix::fs::lchown(self.root.join(rel), Some(uid), Some(gid)).expect("chown (needs root)");
        self
    }

    pub fn xattr(&mut self, rel: &str, name: &str, value: &[u8]) -> &mut Self {
        let path = std::ffi::CString::new(self.root.join(rel).as_os_str().as_bytes()).expect("path");
        let name = std::ffi::CString::new(name).expect("xattr name");
        // SAFETY: both strings are NUL-terminated and live across the call; value is a valid
        // slice of the given length.
        let rc = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
        self
    }

    fn mknod(&mut self, rel: &str, kind: libc::mode_t, major: u32, minor: u32) -> &mut Self {
        let path = std::ffi::CString::new(self.path(rel).as_os_str().as_bytes()).expect("path");
        // SAFETY: path is NUL-terminated and lives across the call.
        let rc = unsafe { libc::mknod(path.as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
        assert_eq!(rc, 0, "mknod (needs root): {}", std::io::Error::last_os_error());
        self
    }

    pub fn char_dev(&mut self, rel: &str, major: u32, minor: u32) -> &mut Self {
        self.mknod(rel, libc::S_IFCHR, major, minor)
    }

    pub fn block_dev(&mut self, rel: &str, major: u32, minor: u32) -> &mut Self {
        self.mknod(rel, libc::S_IFBLK, major, minor)
    }

    pub fn fifo(&mut self, rel: &str) -> &mut Self {
        self.mknod(rel, libc::S_IFIFO, 0, 0)
    }

    /// A file of `size` pseudo-random (incompressible) bytes from `seed`.
    pub fn large_file(&mut self, rel: &str, size: u64, seed: u64) -> &mut Self {
        let p = self.path(rel);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).expect("creating a large file"));
        let mut rng = crate::Rng::new(seed);
        let mut left = size;
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            rng.fill(&mut buf);
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n]).expect("writing a large file");
            left -= n as u64;
        }
        f.flush().expect("flushing a large file");
        self.chmod(rel, 0o644)
    }

    /// A sparse file of `size` bytes with `data` written at the given offsets.
    pub fn sparse_file(&mut self, rel: &str, size: u64, data: &[(u64, &[u8])]) -> &mut Self {
        use std::os::unix::fs::FileExt;
        let p = self.path(rel);
        let f = std::fs::File::create(&p).expect("creating a sparse file");
        f.set_len(size).expect("sizing a sparse file");
        for (off, bytes) in data {
            f.write_all_at(bytes, *off).expect("writing a sparse file");
        }
        self.chmod(rel, 0o644)
    }
}
