//! The control API: HTTP + JSON on a Unix socket (and Prometheus metrics, optionally on TCP).
//!
//! | request | does |
//! |---|---|
//! | `GET /v1/disks` | lists disks |
//! | `POST /v1/disks` with a `DiskSpec` | creates a disk |
//! | `GET /v1/disks/NAME` | one disk, with its counters |
//! | `DELETE /v1/disks/NAME` | deletes a disk no export is using and no clone depends on |
//! | `POST /v1/disks/NAME/clone` with a `CloneRequest` | makes a linked clone of the disk |
//! | `POST /v1/disks/NAME/flatten` | copies the rest of a clone's data in and cuts its link |
//! | `GET /v1/exports` | lists vhost-user exports |
//! | `POST /v1/exports` with an `ExportSpec` | exports a disk over vhost-user |
//! | `DELETE /v1/exports/NAME` | stops a disk's vhost-user export |
//! | `GET /metrics` | Prometheus text |

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use catalog::{Backend, Catalog, CatalogError, DiskSpec, Entry};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use io_filters::FilterSpec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use vdisk::disk::KindSnapshot;
use vdisk::nbd::NbdServer;
use vdisk::{error_chain, BlockDevice, LookupError, RequestKind};

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
    /// The filters as configured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterSpec>,
    /// The chain as built, nearest the VM first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The disk a linked clone reads its unwritten blocks from.
    #[serde(default)]
    pub parent: Option<String>,
    /// The linked clones of this disk; while there are any, it is read-only.
    #[serde(default)]
    pub children: Vec<String>,
}

/// A request for a linked clone of a disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The new disk's name.
    pub name: String,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub copy_on_read: bool,
    /// Filters of the clone's own, besides its linked_clone filter.
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
}

/// What a flatten did.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlattenView {
    pub name: String,
    /// 4 KiB blocks copied from the parent.
    pub copied_blocks: u64,
    /// The former parent, and whether it is writable again.
    pub parent: String,
    pub parent_writable: bool,
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
            Err(reason) => (format!("unavailable: {}", error_chain(&**reason)), 0, None),
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
            filters: spec.filters.clone(),
            chain: self
                .catalog
                .filters()
                .chain_of(&entry.record.id)
                .unwrap_or_default()
                .into_iter()
                .map(String::from)
                .collect(),
            parent: self.catalog.parents(&spec.name).into_iter().next(),
            children: self.catalog.dependents(&spec.name),
        }
    }
}

/// The URI fio, qemu-img and nbdinfo take for an export on a Unix socket.
pub fn nbd_uri(name: &str, socket: &std::path::Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// Serves HTTP/1.1 on one accepted connection.
/// How long a client may take to send a request's headers: a client that opens a connection and
/// trickles bytes holds it no longer than this.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections each listener serves at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 64;

pub async fn serve_connection<S>(stream: S, state: Arc<ApiState>, scope: Scope)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(&state, scope, req).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
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
        (_, &Method::POST, ["v1", "disks", parent, "clone"]) => {
            let req: CloneRequest = match read_json(req).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            clone(state, parent, req).await
        }
        (_, &Method::POST, ["v1", "disks", name, "flatten"]) => flatten(state, name).await,
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

/// Makes a linked clone, then flushes the parent, now read-only, so that everything the clone
/// reads from it is durable.
async fn clone(state: &Arc<ApiState>, parent: &str, req: CloneRequest) -> Response<Full<Bytes>> {
    let spec = match state.catalog.clone_spec(parent, &req.name, req.backend, req.copy_on_read, req.filters) {
        Ok(spec) => spec,
        Err(e) => return catalog_error(&e),
    };
    let catalog = state.catalog.clone();
    let entry = match tokio::task::spawn_blocking(move || catalog.create(spec)).await {
        Ok(Ok(entry)) => entry,
        Ok(Err(e)) => return catalog_error(&e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("clone failed: {e}")),
    };
    if let Ok(disk) = state.catalog.disk(parent) {
        if let Err(e) = disk.device().flush().await {
            tracing::warn!(disk = %parent, error = %error_chain(&e), "cannot flush the parent of a new clone");
        }
    }
    json(StatusCode::CREATED, &state.view(&entry, false))
}

async fn flatten(state: &Arc<ApiState>, name: &str) -> Response<Full<Bytes>> {
    let parent = state.catalog.parents(name).into_iter().next().unwrap_or_default();
    match state.catalog.flatten(name).await {
        Ok(copied_blocks) => {
            let parent_writable = state.catalog.disk(&parent).map(|d| !d.info().read_only).unwrap_or(false);
            json(StatusCode::OK, &FlattenView { name: name.to_owned(), copied_blocks, parent, parent_writable })
        }
        Err(e) => catalog_error(&e),
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
        ExportsError::Disk(LookupError::NotFound(_)) => error(StatusCode::NOT_FOUND, &error_chain(e)),
        ExportsError::Disk(LookupError::Unavailable { .. }) => error(StatusCode::SERVICE_UNAVAILABLE, &error_chain(e)),
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
        | CatalogError::ZeroSize
        | CatalogError::TooLarge { .. }
        | CatalogError::Filters { .. }
        | CatalogError::Chain { .. }
        | CatalogError::NotAClone(_)
        | CatalogError::NoFtl { .. }
        | CatalogError::Ftl { .. }
        | CatalogError::BadOverProvisioning(_) => StatusCode::BAD_REQUEST,
        CatalogError::NameTaken(_) | CatalogError::InUse { .. } | CatalogError::HasDependents { .. } => {
            StatusCode::CONFLICT
        }
        CatalogError::NotFound(_) => StatusCode::NOT_FOUND,
        CatalogError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        CatalogError::File { .. }
        | CatalogError::Corrupt { .. }
        | CatalogError::BadId(_)
        | CatalogError::BadRecord(_)
        | CatalogError::SizeMismatch { .. }
        | CatalogError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
