//! A disk exported on a vhost-user socket: one frontend at a time, reconnects accepted, and
//! removable while the daemon runs.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use crate::disk::{Disk, DiskUser};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot listen on vhost-user socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("number of queues must be between 1 and 64, not {0}")]
    BadQueueCount(usize),
    #[error("cannot start the export thread")]
    Thread(#[source] std::io::Error),
}

/// A running vhost-user-blk export of one disk.
pub struct VhostUserExport {
    socket: PathBuf,
    num_queues: usize,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

/// What the export thread and its owner share.
struct Control {
    stopping: AtomicBool,
    wake: EventFd,
    /// The connected frontend, to drop it on stop.
    connection: Mutex<Option<ShutdownHandle>>,
    connected: AtomicBool,
}

impl VhostUserExport {
    /// Listens on `socket` (replacing a stale socket file) and serves `disk` to one frontend at a
    /// time on a thread of its own; requests run on `runtime`.
    pub fn start(
        disk: &Arc<Disk>,
        socket: &Path,
        num_queues: usize,
        runtime: tokio::runtime::Handle,
    ) -> Result<VhostUserExport, ExportError> {
        if !(1..=64).contains(&num_queues) {
            return Err(ExportError::BadQueueCount(num_queues));
        }
        let listener =
            Listener::new(socket, true).map_err(|source| ExportError::Listen { path: socket.to_path_buf(), source })?;
        let control = Arc::new(Control {
            stopping: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(ExportError::Thread)?,
            connection: Mutex::new(None),
            connected: AtomicBool::new(false),
        });
        let user = disk.acquire();
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{}", disk.name()))
            .spawn(move || serve(listener, user, num_queues, runtime, thread_control))
            .map_err(ExportError::Thread)?;
        Ok(VhostUserExport { socket: socket.to_path_buf(), num_queues, control, thread: Some(thread) })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// Whether a frontend is attached now.
    pub fn connected(&self) -> bool {
        self.control.connected.load(SeqCst)
    }

    /// Disconnects the frontend, stops listening and removes the socket.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.control.stopping.store(true, SeqCst);
        let _ = self.control.wake.write(1);
        if let Ok(conn) = self.control.connection.lock() {
            if let Some(handle) = conn.as_ref() {
                handle.shutdown();
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for VhostUserExport {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Accepts frontends one after another until told to stop.
fn serve(
    mut listener: Listener,
    disk: DiskUser,
    num_queues: usize,
    runtime: tokio::runtime::Handle,
    control: Arc<Control>,
) {
    let name = disk.name().to_owned();
    while wait_for_client(&listener, &control) {
        let backend = match BlkBackend::new(Arc::clone(&disk), num_queues, runtime.clone()) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                tracing::error!(disk = %name, error = %e, "cannot set up vhost-user backend");
                return;
            }
        };
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(format!("vhost-{name}"), backend.clone(), memory) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(disk = %name, error = %e, "cannot set up vhost-user daemon");
                return;
            }
        };
        let handlers = daemon.get_epoll_handlers();
        for (q, fd, event) in backend.queue_events() {
            let registered = match handlers.get(q) {
                Some(handler) => handler.register_listener(fd, EventSet::IN, event),
                None => Err(io::Error::other("no worker thread for a queue")),
            };
            if let Err(e) = registered {
                tracing::error!(disk = %name, error = %e, "cannot watch completions");
                return;
            }
        }
        if let Err(e) = daemon.start(&mut listener) {
            tracing::warn!(disk = %name, error = %e, "vhost-user connection failed");
            continue;
        }
        if let Ok(mut conn) = control.connection.lock() {
            *conn = daemon.shutdown_handle();
        }
        control.connected.store(true, SeqCst);
        tracing::info!(disk = %name, "vhost-user frontend connected");
        let result = daemon.wait();
        control.connected.store(false, SeqCst);
        if let Ok(mut conn) = control.connection.lock() {
            *conn = None;
        }
        match result {
            // A frontend closing its socket (a VM powering off) is the normal end.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(disk = %name, "vhost-user frontend disconnected"),
            Err(e) => tracing::warn!(disk = %name, error = %e, "vhost-user frontend dropped"),
        }
    }
}

/// Blocks until a frontend is waiting to be accepted (true) or the export is stopping (false).
fn wait_for_client(listener: &Listener, control: &Control) -> bool {
    loop {
        if control.stopping.load(SeqCst) {
            return false;
        }
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: control.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: fds is a live array of two pollfd structs, and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "poll on vhost-user socket failed");
            return false;
        }
        if fds[1].revents != 0 {
            let _ = control.wake.read();
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return true;
        }
    }
}
