//! `vstor serve`: opens the state and the catalog, makes the configured disks, starts the exports
//! and the control API, and runs until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use catalog::{Catalog, CatalogError, DiskSpec, FlashBackend};
use io_filters::{FilterFramework, FilterSpec, LINKED_CLONE};
use state_store::Store;
use vdisk::nbd::NbdServer;

use crate::api::{self, ApiState, Scope};
use crate::config::Config;
use crate::exports::VhostExports;
use vdisk::size::format_size;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the state store (is another vstor serving {path}?)")]
    Store {
        path: PathBuf,
        #[source]
        source: state_store::StoreError,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Flash(#[from] catalog::FlashError),
    #[error("disk {name:?} exists with {existing}, but the config asks for {wanted}")]
    DiskMismatch { name: String, existing: String, wanted: String },
    #[error("cannot listen on {what} {addr}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot export disk {disk:?} over vhost-user")]
    Export {
        disk: String,
        #[source]
        source: crate::exports::ExportsError,
    },
    #[error("NBD default export {0:?} is not a disk")]
    NoDefaultExport(String),
    #[error("a startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

pub fn serve(config: Config) -> Result<(), DaemonError> {
    // Whatever the daemon creates (disk files, state, sockets, logs of the store) is its user's
    // alone, whatever umask it was started with.
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.worker_threads)
        .thread_name("vstor")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> Result<(), DaemonError> {
    let data_dir = absolute(&config.data_dir);
    state_store::private_dir(&data_dir).map_err(|source| DaemonError::DataDir { path: data_dir.clone(), source })?;
    let filters = FilterFramework::new();
    let store_path = data_dir.join("state");
    let store =
        Store::open(&store_path).map_err(|source| DaemonError::Store { path: data_dir.to_path_buf(), source })?;
    let flash =
        Arc::new(FlashBackend::open(&config.ocssd, &data_dir, store.clone(), tokio::runtime::Handle::current())?);
    let (catalog, created) = {
        let data_dir = data_dir.clone();
        let disks = config.disks.clone();
        let filters = filters.clone();
        let flash = flash.clone();
        tokio::task::spawn_blocking(move || open_catalog(store, &data_dir, &disks, filters, flash)).await??
    };
    let catalog = Arc::new(catalog);
    if let Some(name) = &config.nbd.default_export {
        if catalog.entry(name).is_err() {
            return Err(DaemonError::NoDefaultExport(name.clone()));
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    let mut sockets = Vec::new();
    let nbd_socket = config.nbd_socket().map(|p| absolute(&p));
    let nbd = config.nbd.enabled.then(|| NbdServer::new(catalog.clone(), config.nbd.default_export.clone()));
    if let (Some(server), Some(path)) = (&nbd, &nbd_socket) {
        let listener = bind_unix("NBD socket", path)?;
        sockets.push(path.clone());
        tasks.spawn(server.clone().serve_unix(listener));
    }
    if let (Some(server), Some(addr)) = (&nbd, config.nbd.tcp) {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| DaemonError::Listen {
            what: "NBD TCP address",
            addr: addr.to_string(),
            source,
        })?;
        tasks.spawn(server.clone().serve_tcp(listener));
    }
    let vhost = Arc::new(VhostExports::new(
        catalog.clone(),
        absolute(&config.vhost_user_dir()),
        tokio::runtime::Handle::current(),
    ));
    for spec in &config.vhost_user {
        vhost.add(spec).map_err(|e| DaemonError::Export { disk: spec.disk.clone(), source: e })?;
    }
    let state = Arc::new(ApiState {
        catalog: catalog.clone(),
        nbd: nbd.clone(),
        nbd_socket: nbd_socket.clone(),
        vhost: vhost.clone(),
    });
    let api_socket = absolute(&config.api_socket());
    let api_listener = bind_unix("control socket", &api_socket)?;
    sockets.push(api_socket.clone());
    tasks.spawn(serve_api_unix(api_listener, state.clone()));
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| DaemonError::Listen {
            what: "metrics address",
            addr: addr.to_string(),
            source,
        })?;
        tasks.spawn(serve_metrics_tcp(listener, state.clone()));
    }

    print_banner(&catalog, &created, &data_dir, &api_socket, nbd_socket.as_deref(), &vhost, &config);
    println!("FTL disks:   on an {}", flash.description);
    wait_for_signal().await;
    tracing::info!("shutting down");
    tasks.abort_all();
    tokio::task::spawn_blocking(move || vhost.stop_all()).await?;
    // Filters keep state that a flush makes durable (a clone's bitmap, checksums) and FTLs
    // checkpoint their maps: a clean stop loses nothing its clients wrote, and the next start
    // recovers nothing.
    catalog.close().await;
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Opens the catalog and creates the configured disks that do not exist yet; a configured disk
/// that exists with another shape is an error rather than a silent change.
fn open_catalog(
    store: Arc<Store>,
    data_dir: &Path,
    disks: &[DiskSpec],
    filters: Arc<FilterFramework>,
    flash: Arc<FlashBackend>,
) -> Result<(Catalog, Vec<String>), DaemonError> {
    let catalog = Catalog::open(store, &data_dir.join("disks"), filters, Some(flash))?;
    let mut created = Vec::new();
    for disk in parents_first(disks) {
        let wanted = disk.clone();
        match catalog.entry(&disk.name) {
            Ok(entry) => {
                let have = &entry.record.spec;
                if (have.size, have.block_size, have.read_only, &have.backend, own_filters(have))
                    != (wanted.size, wanted.block_size, wanted.read_only, &wanted.backend, own_filters(&wanted))
                {
                    return Err(DaemonError::DiskMismatch {
                        name: disk.name.clone(),
                        existing: shape(have),
                        wanted: shape(&wanted),
                    });
                }
            }
            Err(CatalogError::NotFound(_)) => {
                catalog.create(wanted)?;
                created.push(disk.name.clone());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((catalog, created))
}

/// A disk's filters but its linked_clone filter, which `disk flatten` removes from the record
/// while the config may still name it.
fn own_filters(spec: &DiskSpec) -> Vec<&FilterSpec> {
    spec.filters.iter().filter(|f| f.kind != LINKED_CLONE).collect()
}

/// The configured disks in an order that creates each parent before its clones.
fn parents_first(disks: &[DiskSpec]) -> Vec<&DiskSpec> {
    let mut out: Vec<&DiskSpec> = Vec::new();
    let mut left: Vec<&DiskSpec> = disks.iter().collect();
    while !left.is_empty() {
        let ready = left.iter().position(|d| {
            d.parents().iter().all(|t| out.iter().any(|o| &o.name == t) || !left.iter().any(|l| &l.name == t))
        });
        // A cycle the config check missed: go on in file order and let the catalog refuse it.
        out.push(left.remove(ready.unwrap_or(0)));
    }
    out
}

fn shape(spec: &DiskSpec) -> String {
    let filters: Vec<&str> = own_filters(spec).iter().map(|f| f.kind.as_str()).collect();
    format!(
        "size {}, block size {}, {:?}{}{}",
        format_size(spec.size),
        spec.block_size,
        spec.backend,
        if spec.read_only { ", read-only" } else { "" },
        if filters.is_empty() { String::new() } else { format!(", filters {}", filters.join(",")) }
    )
}

/// Binds a Unix socket, replacing a stale socket file a killed daemon left behind.
fn bind_unix(what: &'static str, path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let err = |source| DaemonError::Listen { what, addr: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another process is listening there")));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(err)?;
        }
    }
    tokio::net::UnixListener::bind(path).map_err(err)
}

async fn serve_api_unix(listener: tokio::net::UnixListener, state: Arc<ApiState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(api::MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("control connection refused: {} are open", api::MAX_CONNECTIONS);
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    api::serve_connection(stream, state, Scope::Control).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_metrics_tcp(listener: tokio::net::TcpListener, state: Arc<ApiState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(api::MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("metrics connection refused: {} are open", api::MAX_CONNECTIONS);
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    api::serve_connection(stream, state, Scope::MetricsOnly).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Tells the user what is served and how to reach it.
fn print_banner(
    catalog: &Catalog,
    created: &[String],
    data_dir: &Path,
    api: &Path,
    nbd: Option<&Path>,
    vhost: &VhostExports,
    config: &Config,
) {
    println!("vstor {} serving from {}", env!("CARGO_PKG_VERSION"), data_dir.display());
    for entry in catalog.entries() {
        let spec = &entry.record.spec;
        let status = match &entry.disk {
            Ok(_) if created.contains(&spec.name) => "created".to_owned(),
            Ok(_) => "ok".to_owned(),
            Err(reason) => format!("UNAVAILABLE: {reason}"),
        };
        let backend = match spec.backend {
            catalog::Backend::Raw { .. } => "raw file".to_owned(),
            catalog::Backend::Ftl { over_provisioning } => {
                format!("guest FTL ({over_provisioning}% over-provisioning) -> host FTL -> open-channel SSD")
            }
        };
        println!(
            "  disk {:<12} {:>10}  {}-byte blocks  {backend}  [{status}]",
            spec.name,
            format_size(spec.size),
            spec.block_size
        );
    }
    println!("control API: {}  (vstor --api {} disk list)", api.display(), api.display());
    if let Some(nbd) = nbd {
        println!("NBD socket:  {}", nbd.display());
        if let Some(name) =
            catalog.entries().first().map(|e| config.nbd.default_export.clone().unwrap_or(e.record.spec.name.clone()))
        {
            let uri = api::nbd_uri(&name, nbd);
            println!("  fio --name=t --ioengine=nbd --uri='{uri}' --rw=randread --bs=4k --size=64M");
            println!("  qemu-img info '{uri}'");
        }
    }
    for export in vhost.list() {
        println!("vhost-user:  {} -> {}  ({} queues)", export.disk, export.socket.display(), export.num_queues);
        println!(
            "  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    -chardev socket,id=vu0,path={} -device vhost-user-blk-pci,chardev=vu0,num-queues={}",
            export.socket.display(),
            export.num_queues
        );
    }
    if let Some(tcp) = config.nbd.tcp {
        println!("NBD TCP:     nbd://{tcp}/NAME");
    }
    if let Some(m) = config.metrics.listen {
        println!("metrics:     http://{m}/metrics");
    }
}
