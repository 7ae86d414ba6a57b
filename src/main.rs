//! The `vstor` command: the daemon (`vstor serve`) and the client of its control API.

mod api;
mod client;
mod config;
mod daemon;
mod exports;
mod image;
mod metrics;

use std::path::PathBuf;
use std::process::ExitCode;

use catalog::{Backend, DiskSpec};
use clap::{Parser, Subcommand};
use hyper::Method;
use vdisk::error_chain;

use crate::api::{CloneRequest, DiskView, FlattenView};
use crate::client::Client;
use crate::config::{Config, API_SOCKET_NAME, DEFAULT_DATA_DIR};
use crate::exports::{ExportSpec, ExportView};
use vdisk::size::{format_size, parse_size};

#[derive(Parser)]
#[command(
    name = "vstor",
    version,
    about = "Storage virtualization for VMs: disks over NBD, with their state kept durably"
)]
struct Cli {
    /// The daemon's control socket (default: ./vstor-data/api.sock).
    #[arg(long, env = "VSTOR_API", global = true)]
    api: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the daemon. Without --config it serves one 1 GiB disk, vm0, over NBD from ./vstor-data.
    Serve {
        /// A TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Creates, lists, shows and deletes disks of a running daemon.
    Disk {
        #[command(subcommand)]
        command: DiskCommand,
    },
    /// Adds, removes and lists vhost-user exports of a running daemon.
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Prints the daemon's metrics in Prometheus text format.
    Metrics,
    /// Mounts OCI images lazily from a registry and manages the shared image cache.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Exports a disk over vhost-user-blk.
    Add {
        disk: String,
        /// Socket path (default: <data_dir>/vhost-user/DISK.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Number of queues offered (default 2).
        #[arg(long)]
        queues: Option<usize>,
    },
    /// Stops a disk's vhost-user export, disconnecting its VM.
    Remove { disk: String },
    /// Lists vhost-user exports.
    List,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Creates a disk.
    Create {
        name: String,
        /// Capacity, e.g. 10G or 512M.
        #[arg(long)]
        size: String,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        #[command(flatten)]
        backend: BackendArgs,
        #[arg(long)]
        read_only: bool,
        /// A filter: TYPE or TYPE:KEY=VALUE,... e.g. integrity, cache:size=64M,
        /// throttle:iops=1000,group=tenant-a. Repeat for more.
        #[arg(long = "filter", value_name = "SPEC")]
        filters: Vec<String>,
    },
    /// Makes CHILD a linked clone of PARENT: it reads what it has not written from PARENT, which
    /// stays read-only while it has clones.
    Clone {
        parent: String,
        child: String,
        /// What holds the clone's own bytes.
        #[command(flatten)]
        backend: BackendArgs,
        /// Copy the blocks read from the parent into the clone.
        #[arg(long)]
        copy_on_read: bool,
        /// More filters of the clone's own (as for `disk create`).
        #[arg(long = "filter", value_name = "SPEC")]
        filters: Vec<String>,
    },
    /// Copies the rest of a linked clone's data from its parent and cuts the link.
    Flatten { name: String },
    /// Lists disks.
    List,
    /// Shows one disk with its counters.
    Info { name: String },
    /// Deletes a disk and its data.
    Delete { name: String },
}

/// What holds a disk's bytes, as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    /// A sparse file in the data directory.
    Raw,
    /// A guest FTL on a partition of the daemon's open-channel SSD.
    Ftl,
}

/// How `disk create` and `disk clone` say what holds a disk's bytes.
#[derive(Debug, clap::Args)]
struct BackendArgs {
    /// What holds the disk's bytes.
    #[arg(long, value_enum, default_value_t = BackendKind::Raw)]
    backend: BackendKind,
    /// Bypass the page cache (O_DIRECT); raw disks only.
    #[arg(long)]
    direct: bool,
    /// Percent of flash kept beyond the disk's size for garbage collection; FTL disks only.
    #[arg(long, default_value_t = 11)]
    over_provisioning: u32,
}

impl BackendArgs {
    fn spec(&self) -> Result<Backend, String> {
        match self.backend {
            BackendKind::Raw => Ok(Backend::Raw { direct: self.direct }),
            BackendKind::Ftl if self.direct => Err("--direct is for raw disks; an FTL disk has no file".into()),
            BackendKind::Ftl => Ok(Backend::Ftl { over_provisioning: self.over_provisioning }),
        }
    }
}

fn main() -> ExitCode {
    // Test builds only (the `failpoints` feature): the fail points FAILPOINTS names.
    let _failpoints = failpoint::setup();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VSTOR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Disk { command } => client_command(cli.api, command),
        Command::Export { command } => export_command(cli.api, command),
        Command::Metrics => client_metrics(cli.api),
        Command::Image { command } => image::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>) -> Result<(), String> {
    let config = match config {
        Some(path) => Config::load(&path).map_err(|e| error_chain(&e))?,
        None => Config::embedded(),
    };
    daemon::serve(config).map_err(|e| error_chain(&e))
}

fn client(api: Option<PathBuf>) -> Client {
    Client::new(&api.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join(API_SOCKET_NAME)))
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    Ok(rt.block_on(f))
}

fn client_metrics(api: Option<PathBuf>) -> Result<(), String> {
    let text = block_on(client(api).text("/metrics"))?.map_err(|e| error_chain(&e))?;
    print!("{text}");
    Ok(())
}

fn client_command(api: Option<PathBuf>, command: DiskCommand) -> Result<(), String> {
    let client = client(api);
    let fail = |e: client::ClientError| error_chain(&e);
    match command {
        DiskCommand::Create { name, size, block_size, backend, read_only, filters } => {
            let backend = backend.spec()?;
            let size = parse_size(&size).map_err(|e| e.to_string())?;
            let filters = filters.iter().map(|f| parse_filter(f)).collect::<Result<Vec<_>, _>>()?;
            let spec = DiskSpec { name, size, block_size, read_only, backend, filters };
            let body = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
            let view: Option<DiskView> = block_on(client.call(Method::POST, "/v1/disks", Some(body)))?.map_err(fail)?;
            if let Some(v) = view {
                println!("created disk {} ({}, {}-byte blocks)", v.name, format_size(v.size), v.block_size);
                if let Some(uri) = v.nbd_uri {
                    println!("  {uri}");
                }
            }
        }
        DiskCommand::Clone { parent, child, backend, copy_on_read, filters } => {
            let backend = backend.spec()?;
            let filters = filters.iter().map(|f| parse_filter(f)).collect::<Result<Vec<_>, _>>()?;
            let req = CloneRequest { name: child, backend, copy_on_read, filters };
            let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            let path = format!("/v1/disks/{parent}/clone");
            let view: Option<DiskView> = block_on(client.call(Method::POST, &path, Some(body)))?.map_err(fail)?;
            if let Some(v) = view {
                println!("created disk {} as a linked clone of {parent} ({})", v.name, format_size(v.size));
                if let Some(uri) = v.nbd_uri {
                    println!("  {uri}");
                }
            }
        }
        DiskCommand::Flatten { name } => {
            let path = format!("/v1/disks/{name}/flatten");
            let view: Option<FlattenView> = block_on(client.call(Method::POST, &path, None))?.map_err(fail)?;
            if let Some(v) = view {
                println!(
                    "flattened {}: copied {} blocks of 4 KiB from {}, which is {}",
                    v.name,
                    v.copied_blocks,
                    v.parent,
                    if v.parent_writable { "writable again" } else { "still read-only (other clones)" }
                );
            }
        }
        DiskCommand::List => {
            let views: Vec<DiskView> =
                block_on(client.call(Method::GET, "/v1/disks", None))?.map_err(fail)?.unwrap_or_default();
            println!("{:<20} {:>10} {:>6} {:<8} {:>5}  STATUS", "NAME", "SIZE", "BLOCK", "BACKEND", "CONNS");
            for v in views {
                let backend = match v.backend {
                    Backend::Raw { direct: true } => "raw/dio",
                    Backend::Raw { direct: false } => "raw",
                    Backend::Ftl { .. } => "ftl",
                };
                println!(
                    "{:<20} {:>10} {:>6} {:<8} {:>5}  {}",
                    v.name,
                    format_size(v.size),
                    v.block_size,
                    backend,
                    v.connections,
                    v.status
                );
            }
        }
        DiskCommand::Info { name } => {
            let path = format!("/v1/disks/{name}");
            let view: Option<DiskView> = block_on(client.call(Method::GET, &path, None))?.map_err(fail)?;
            println!("{}", serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?);
        }
        DiskCommand::Delete { name } => {
            let path = format!("/v1/disks/{name}");
            block_on(client.call::<serde_json::Value>(Method::DELETE, &path, None))?.map_err(fail)?;
            println!("deleted disk {name}");
        }
    }
    Ok(())
}

/// Reads a `--filter` argument: TYPE or TYPE:KEY=VALUE,... Values that read as numbers or
/// booleans are passed as such; `order` sets the filter's place in the chain.
fn parse_filter(text: &str) -> Result<io_filters::FilterSpec, String> {
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    if kind.is_empty() {
        return Err(format!("invalid --filter {text:?}: expected TYPE or TYPE:KEY=VALUE,..."));
    }
    let mut spec = io_filters::FilterSpec { kind: kind.to_owned(), order: None, options: serde_json::Map::new() };
    for pair in rest.split(',').filter(|p| !p.is_empty()) {
        let (key, value) =
            pair.split_once('=').ok_or_else(|| format!("invalid --filter {text:?}: {pair:?} is not KEY=VALUE"))?;
        if key == "order" {
            spec.order = Some(value.parse().map_err(|_| format!("invalid --filter {text:?}: order must be a number"))?);
            continue;
        }
        let value = match value {
            "true" => serde_json::Value::Bool(true),
            "false" => serde_json::Value::Bool(false),
            v => v.parse::<u64>().map(Into::into).unwrap_or_else(|_| serde_json::Value::String(v.to_owned())),
        };
        spec.options.insert(key.to_owned(), value);
    }
    Ok(spec)
}

fn export_command(api: Option<PathBuf>, command: ExportCommand) -> Result<(), String> {
    let client = client(api);
    let fail = |e: client::ClientError| error_chain(&e);
    match command {
        ExportCommand::Add { disk, socket, queues } => {
            let socket = socket.map(|s| std::path::absolute(&s).unwrap_or(s));
            let spec = ExportSpec { disk, socket, num_queues: queues };
            let body = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
            let view: Option<ExportView> =
                block_on(client.call(Method::POST, "/v1/exports", Some(body)))?.map_err(fail)?;
            if let Some(v) = view {
                println!("exported {} over vhost-user at {} ({} queues)", v.disk, v.socket.display(), v.num_queues);
            }
        }
        ExportCommand::Remove { disk } => {
            let path = format!("/v1/exports/{disk}");
            block_on(client.call::<serde_json::Value>(Method::DELETE, &path, None))?.map_err(fail)?;
            println!("stopped the vhost-user export of {disk}");
        }
        ExportCommand::List => {
            let views: Vec<ExportView> =
                block_on(client.call(Method::GET, "/v1/exports", None))?.map_err(fail)?.unwrap_or_default();
            println!("{:<20} {:<15} {:>6} {:<9}  SOCKET", "DISK", "KIND", "QUEUES", "CONNECTED");
            for v in views {
                println!(
                    "{:<20} {:<15} {:>6} {:<9}  {}",
                    v.disk,
                    v.kind,
                    v.num_queues,
                    if v.connected { "yes" } else { "no" },
                    v.socket.display()
                );
            }
        }
    }
    Ok(())
}
