//! What a registry sends: manifests, image indexes, `WWW-Authenticate` challenges and token
//! answers, through [`Registry::resolve`] against a small HTTP server on loopback that answers
//! with the fuzz input; and image references and digests as a user or an index gives them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuse_lazypull::digest::Digest;
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{Descriptor, Registry, RegistryConfig};

/// What the server answers for the current input.
#[derive(Clone, Default)]
struct Script {
    /// Answer a manifest request without an `Authorization` header with 401 and this challenge.
    challenge: Option<String>,
    /// Whether manifests come with a `Docker-Content-Digest` header (their true digest).
    digest_header: bool,
    token: Vec<u8>,
    /// Content type and body of the manifest asked for by tag, and of the one asked for by digest.
    by_tag: (String, Vec<u8>),
    by_digest: (String, Vec<u8>),
}

struct Server {
    port: u16,
    script: Arc<Mutex<Script>>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = script.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let script = shared.lock().unwrap().clone();
                answer(conn, &script);
            }
        });
        Server { port, script }
    })
}

/// Reads one request and answers it from the script; anything that is not a whole request in
/// time (a TLS hello, say) gets the connection closed.
fn answer(mut conn: TcpStream, script: &Script) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(n) if n > 0 && head.len() < (64 << 10) => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let authorized = head.lines().any(|l| l.to_ascii_lowercase().starts_with("authorization:"));
    let mut headers = Vec::new();
    let (status, content_type, body) = if let Some(reference) = path.split("/manifests/").nth(1) {
        match &script.challenge {
            Some(challenge) if !authorized => {
                headers.push(format!("WWW-Authenticate: {challenge}"));
                (401, "application/json".to_owned(), b"{}".to_vec())
            }
            _ => {
                let (ct, body) = if reference.starts_with("sha256:") { &script.by_digest } else { &script.by_tag };
                if script.digest_header {
                    headers.push(format!("Docker-Content-Digest: {}", Digest::of(body)));
                }
                (200, ct.clone(), body.clone())
            }
        }
    } else if path.starts_with("/v2/") {
        (404, "application/json".to_owned(), b"{\"errors\":[{\"code\":\"NOT_FOUND\"}]}".to_vec())
    } else {
        (200, "application/json".to_owned(), script.token.clone())
    };
    let mut reply = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    if !content_type.is_empty() {
        reply.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    for h in headers {
        reply.push_str(&h);
        reply.push_str("\r\n");
    }
    reply.push_str("\r\n");
    let _ = conn.write_all(reply.as_bytes());
    let _ = conn.write_all(&body);
}

/// One header line's worth of the input: no line breaks.
fn header_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace(['\r', '\n'], "")
}

/// Whether every URL in a challenge points at our server (the client fetches tokens from the
/// realm it names, and the fuzzer must not send it anywhere else). Conservative: any `http`
/// must be followed by our origin, with or without the challenge's backslash escapes.
fn only_our_server(challenge: &str, port: u16) -> bool {
    let ours = [format!("http://127.0.0.1:{port}/"), format!("https://127.0.0.1:{port}/")];
    [challenge.to_owned(), challenge.replace('\\', "")].iter().all(|s| {
        let lower = s.to_ascii_lowercase();
        lower.match_indices("http").all(|(i, _)| ours.iter().any(|o| lower[i..].starts_with(o.as_str())))
    })
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Where the seeds put the server's origin (the port differs from run to run).
pub const SERVER_MARK: &str = "@SRV@";
/// Where the seeds put the digest of the manifest served by digest.
pub const DIGEST_MARK: &str = "sha256:@BODY2@";

/// A registry's answers. First byte: bit 0 asks for auth first, bit 1 sends
/// `Docker-Content-Digest`. The rest, in six parts: the challenge, the token answer, the content
/// type and body of the manifest or index served by tag, and those of the manifest served by
/// digest. [`SERVER_MARK`] in the challenge becomes the server's origin, [`DIGEST_MARK`] in the
/// first body the digest of the second.
pub fn registry(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let [challenge, token, ct1, body1, ct2, body2] = crate::parts(rest, 6)[..] else { return };
    let server = server();
    let origin = format!("http://127.0.0.1:{}", server.port);
    let challenge = header_text(challenge).replace(SERVER_MARK, &origin);
    if !only_our_server(&challenge, server.port) {
        return;
    }
    let body2 = body2.to_vec();
    let body1 = replace(body1, DIGEST_MARK.as_bytes(), Digest::of(&body2).as_str().as_bytes());
    *server.script.lock().unwrap() = Script {
        challenge: (flags & 1 == 1).then_some(challenge),
        digest_header: flags & 2 == 2,
        token: token.to_vec(),
        by_tag: (header_text(ct1), body1.clone()),
        by_digest: (header_text(ct2), body2.clone()),
    };

    let config = RegistryConfig { timeout_secs: 1, retries: 0, ..RegistryConfig::default() };
    let registry = Registry::new(config).unwrap();
    let image: ImageRef = format!("127.0.0.1:{}/fuzz/image:v1", server.port).parse().unwrap();
    let result = registry.resolve(&image);
    crate::debug!(
        "registry: {:?}",
        result.as_ref().map(|r| r.layers.len()).map_err(|e| fuse_lazypull::error::chain(e))
    );
    match result {
        Ok(resolved) => {
            assert!(
                resolved.digest == Digest::of(&body1) || resolved.digest == Digest::of(&body2),
                "the resolved manifest's digest is not that of what was served"
            );
            assert_eq!(resolved.reference, image);
            for d in std::iter::once(&resolved.config).chain(&resolved.layers) {
                let back: Descriptor = serde_json::from_slice(&serde_json::to_vec(d).unwrap()).expect("descriptor");
                assert_eq!(&back, d, "a descriptor changes when written and read");
            }
        }
        Err(e) => {
            // Typed, and naming the image or the server.
            let _ = fuse_lazypull::error::chain(&e);
        }
    }
}

/// An image reference as a user writes one, and a digest as an index names one: what parses
/// prints back as text that parses to the same.
pub fn image_reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match s.parse::<ImageRef>() {
        Ok(r) => {
            let shown = r.to_string();
            let back: ImageRef =
                shown.parse().unwrap_or_else(|e| panic!("{s:?} prints as {shown:?}, which fails: {e}"));
            assert_eq!(back, r, "{s:?} prints as {shown:?}, which parses to another reference");
            assert!(r.tag.is_some() || r.digest.is_some());
            let _ = r.manifest_reference();
        }
        // The refusal is its own type (BadReference); it says why.
        Err(e) => assert!(!e.to_string().is_empty(), "{s:?}"),
    }
    match s.parse::<Digest>() {
        Ok(d) => {
            assert_eq!(d.hex().len(), 64);
            assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
        Err(e) => assert!(!e.to_string().is_empty(), "{s:?}"),
    }
}
