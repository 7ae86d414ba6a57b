//! The control API: HTTP + JSON on a Unix socket (and Prometheus metrics, optionally on TCP).
//!
//! | request | does |
//! |---|---|
//! | `GET /v1/disks` | lists disks |
//! | `POST /v1/disks` with a `DiskSpec` | creates a disk |
//! | `GET /v1/disks/NAME` | one disk, with its counters |
//! | `DELETE /v1/disks/NAME` | deletes a disk no export is using |
//! | `GET /v1/exports` | lists vhost-user exports |
//! | `POST /v1/exports` with an `ExportSpec` | exports a disk over vhost-user |
//! | `DELETE /v1/exports/NAME` | stops a disk's vhost-user export |
//! | `GET /metrics` | Prometheus text |

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use vdisk::catalog::{error_chain, Backend, Entry};
use vdisk::disk::KindSnapshot;
use vdisk::nbd::NbdServer;
use vdisk::{Catalog, CatalogError, DiskSpec, RequestKind};

use crate::exports::{ExportSpec, ExportsError, VhostExports};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 << 10;

/// What the API serves from.
pub struct ApiState {
    pub catalog: Arc<Catalog>,
    pub nbd: Option<Arc<NbdServer>>,
    /// Absolute path of the NBD Unix socket, to tell clients their URI.
    pub nbd_socket: Option<PathBuf>,
    pub vhost: Arc<VhostExports>,
}

/// Which requests a listener answers.
#[derive(Clone, Copy)]
pub enum Scope {
    /// Everything: the control socket.
    Control,
    /// Only `GET /metrics`: the TCP metrics listener.
    MetricsOnly,
}

/// A disk as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskView {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub backend: Backend,
    pub path: PathBuf,
    /// "ok", or why the disk cannot be served.
    pub status: String,
    pub nbd_uri: Option<String>,
    pub connections: usize,
    pub stats: Option<std::collections::BTreeMap<String, KindSnapshot>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiState {
    fn view(&self, entry: &Entry, with_stats: bool) -> DiskView {
        let spec = &entry.record.spec;
        let (status, connections, stats) = match &entry.disk {
            Ok(disk) => {
                let stats = with_stats.then(|| {
                    RequestKind::ALL.iter().map(|k| (k.name().to_owned(), disk.stats().snapshot(*k))).collect()
                });
                ("ok".to_owned(), disk.users(), stats)
            }
            Err(reason) => (format!("unavailable: {reason}"), 0, None),
        };
        DiskView {
            name: spec.name.clone(),
            id: entry.record.id.clone(),
            size: spec.size,
            block_size: spec.block_size,
            read_only: spec.read_only,
            backend: spec.backend.clone(),
            path: entry.path.clone(),
            status,
            nbd_uri: self.nbd_socket.as_ref().map(|s| nbd_uri(&spec.name, s)),
            connections,
            stats,
        }
    }
}

/// The URI fio, qemu-img and nbdinfo take for an export on a Unix socket.
pub fn nbd_uri(name: &str, socket: &std::path::Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// Serves HTTP/1.1 on one accepted connection.
pub async fn serve_connection<S>(stream: S, state: Arc<ApiState>, scope: Scope)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(&state, scope, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!(error = %e, "api connection ended");
    }
}

async fn route(state: &Arc<ApiState>, scope: Scope, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (scope, req.method(), segments.as_slice()) {
        (_, &Method::GET, ["metrics"]) => {
            let text = crate::metrics::render(&state.catalog, state.nbd.as_ref().map(|n| n.stats()));
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut()
                .insert("content-type", hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
            resp
        }
        (Scope::MetricsOnly, _, _) => error(StatusCode::NOT_FOUND, "only /metrics is served here"),
        (_, &Method::GET, ["v1", "disks"]) => {
            let views: Vec<DiskView> = state.catalog.entries().iter().map(|e| state.view(e, false)).collect();
            json(StatusCode::OK, &views)
        }
        (_, &Method::GET, ["v1", "disks", name]) => match state.catalog.entry(name) {
            Ok(entry) => json(StatusCode::OK, &state.view(&entry, true)),
            Err(e) => catalog_error(&e),
        },
        (_, &Method::POST, ["v1", "disks"]) => {
            let spec: DiskSpec = match read_json(req).await {
                Ok(s) => s,
                Err(resp) => return resp,
            };
            let catalog = state.catalog.clone();
            match tokio::task::spawn_blocking(move || catalog.create(spec)).await {
                Ok(Ok(entry)) => json(StatusCode::CREATED, &state.view(&entry, false)),
                Ok(Err(e)) => catalog_error(&e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("create failed: {e}")),
            }
        }
        (_, &Method::DELETE, ["v1", "disks", name]) => {
            let (catalog, name) = (state.catalog.clone(), name.to_string());
            match tokio::task::spawn_blocking(move || catalog.delete(&name)).await {
                Ok(Ok(())) => {
                    Response::builder().status(StatusCode::NO_CONTENT).body(Full::default()).unwrap_or_default()
                }
                Ok(Err(e)) => catalog_error(&e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("delete failed: {e}")),
            }
        }
        (_, &Method::GET, ["v1", "exports"]) => json(StatusCode::OK, &state.vhost.list()),
        (_, &Method::POST, ["v1", "exports"]) => {
            let spec: ExportSpec = match read_json(req).await {
                Ok(s) => s,
                Err(resp) => return resp,
            };
            match state.vhost.add(&spec) {
                Ok(view) => json(StatusCode::CREATED, &view),
                Err(e) => exports_error(&e),
            }
        }
        (_, &Method::DELETE, ["v1", "exports", name]) => {
            let (vhost, name) = (state.vhost.clone(), name.to_string());
            match tokio::task::spawn_blocking(move || vhost.remove(&name)).await {
                Ok(Ok(())) => {
                    Response::builder().status(StatusCode::NO_CONTENT).body(Full::default()).unwrap_or_default()
                }
                Ok(Err(e)) => exports_error(&e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("remove failed: {e}")),
            }
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {} {path}", req.method())),
    }
}

/// Reads a JSON request body of at most MAX_BODY bytes.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, &format!("cannot read request body: {e}"))),
    };
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid request: {e}")))
}

fn exports_error(e: &ExportsError) -> Response<Full<Bytes>> {
    match e {
        ExportsError::Disk(e) => catalog_error(e),
        ExportsError::AlreadyExported(_) => error(StatusCode::CONFLICT, &error_chain(e)),
        ExportsError::NotExported(_) => error(StatusCode::NOT_FOUND, &error_chain(e)),
        ExportsError::Export(_) => error(StatusCode::BAD_REQUEST, &error_chain(e)),
    }
}

fn catalog_error(e: &CatalogError) -> Response<Full<Bytes>> {
    let status = match e {
        CatalogError::InvalidName(_)
        | CatalogError::BadBlockSize(_)
        | CatalogError::SizeNotMultiple { .. }
        | CatalogError::ZeroSize => StatusCode::BAD_REQUEST,
        CatalogError::NameTaken(_) | CatalogError::InUse { .. } => StatusCode::CONFLICT,
        CatalogError::NotFound(_) => StatusCode::NOT_FOUND,
        CatalogError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        CatalogError::File { .. } | CatalogError::Corrupt { .. } | CatalogError::Store(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, &error_chain(e))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error: message.to_owned() })
}
