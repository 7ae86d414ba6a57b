//! The daemon's configuration: a TOML file, or the embedded defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use catalog::{Backend, DiskSpec, OcssdConfig};
use serde::Deserialize;

use crate::exports::ExportSpec;

/// Where a daemon keeps its state when nothing else is said, relative to where it starts.
pub const DEFAULT_DATA_DIR: &str = "vstor-data";
/// The control socket's name inside the data directory.
pub const API_SOCKET_NAME: &str = "api.sock";
/// Worker threads the runtime may be given: far more than any host has cores.
const MAX_WORKER_THREADS: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Holds the state store, the disks' files and, by default, the sockets.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Disks the daemon makes sure exist when it starts.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpec>,
    /// Disks exported over vhost-user from the start.
    #[serde(default)]
    pub vhost_user: Vec<ExportSpec>,
    /// The emulated open-channel SSD that FTL disks live on.
    #[serde(default)]
    pub ocssd: OcssdConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The control socket; default `<data_dir>/api.sock`.
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Unix socket of the NBD export; default `<data_dir>/nbd.sock`.
    pub socket: Option<PathBuf>,
    /// TCP address of the NBD export, e.g. "127.0.0.1:10809"; off unless given.
    pub tcp: Option<SocketAddr>,
    /// The disk a client gets when it names no export.
    pub default_export: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig { socket: None, tcp: None, default_export: None, enabled: true }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address serving Prometheus metrics at /metrics, besides the control socket.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads serving exports and the control API. One is fastest on a small host where the
    /// clients need the other cores: a second worker mostly adds cross-thread wake-ups
    /// (benches/RESULTS.md: 4k reads at depth 1 went from 0.80x to 0.99x of qemu-storage-daemon).
    #[serde(default = "default_workers")]
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: default_workers() }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

fn default_workers() -> usize {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// The defaults `vstor serve` runs on without a file: one 1 GiB disk, `vm0`, a guest FTL on
    /// an emulated open-channel SSD (a sparse file in the data directory), exported over NBD
    /// and vhost-user on Unix sockets in `./vstor-data`.
    pub fn embedded() -> Config {
        let mut config: Config = toml::from_str("").unwrap_or_else(|_| unreachable!("empty config parses"));
        config.disks.push(DiskSpec {
            name: "vm0".into(),
            size: 1 << 30,
            block_size: 512,
            read_only: false,
            backend: Backend::Ftl { over_provisioning: 11 },
            filters: Vec::new(),
        });
        config.nbd.default_export = Some("vm0".into());
        config.vhost_user.push(ExportSpec { disk: "vm0".into(), socket: None, num_queues: None });
        config
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for disk in &self.disks {
            catalog::validate(disk)
                .map_err(|e| ConfigError::Invalid(format!("disk {:?}: {}", disk.name, vdisk::error_chain(&e))))?;
            if !seen.insert(&disk.name) {
                return Err(ConfigError::Invalid(format!("disk {:?} is declared twice", disk.name)));
            }
            io_filters::config::ordered(&disk.filters)
                .map_err(|e| ConfigError::Invalid(format!("disk {:?}: {}", disk.name, vdisk::error_chain(&e))))?;
        }
        let views: Vec<_> = self.disks.iter().map(DiskSpec::filters_view).collect();
        if let Some(path) = io_filters::config::find_cycle(&views) {
            return Err(ConfigError::Invalid(format!("redirect cycle: {}", path.join(" -> "))));
        }
        let mut exported = std::collections::HashSet::new();
        for export in &self.vhost_user {
            if !exported.insert(&export.disk) {
                return Err(ConfigError::Invalid(format!("disk {:?} is exported over vhost-user twice", export.disk)));
            }
        }
        if !(1..=MAX_WORKER_THREADS).contains(&self.runtime.worker_threads) {
            return Err(ConfigError::Invalid(format!("runtime.worker_threads must be 1 to {MAX_WORKER_THREADS}")));
        }
        Ok(())
    }

    pub fn api_socket(&self) -> PathBuf {
        self.api.socket.clone().unwrap_or_else(|| self.data_dir.join(API_SOCKET_NAME))
    }

    /// Where vhost-user sockets go when an export names none.
    pub fn vhost_user_dir(&self) -> PathBuf {
        self.data_dir.join("vhost-user")
    }

    pub fn nbd_socket(&self) -> Option<PathBuf> {
        self.nbd.enabled.then(|| self.nbd.socket.clone().unwrap_or_else(|| self.data_dir.join("nbd.sock")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults() {
        let c = Config::embedded();
        assert_eq!(c.data_dir, PathBuf::from("vstor-data"));
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.nbd_socket(), Some(PathBuf::from("vstor-data/nbd.sock")));
        c.validate().unwrap();
    }

    #[test]
    fn a_file_with_disks_and_errors() {
        let c: Config = toml::from_str(
            r#"
            data_dir = "/tmp/x"
            [nbd]
            tcp = "127.0.0.1:10809"
            [[disk]]
            name = "a"
            size = "64M"
            [[disk]]
            name = "b"
            size = 1048576
            block_size = 4096
            backend = { type = "raw", direct = true }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.disks[0].size, 64 << 20);
        assert_eq!(c.disks[1].backend, Backend::Raw { direct: true });
        assert!(toml::from_str::<Config>("data_dri = 'x'").is_err());
        let bad: Config = toml::from_str("[[disk]]\nname = 'a'\nsize = 1000").unwrap();
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("not a multiple of the block size"), "{msg}");
    }
}
