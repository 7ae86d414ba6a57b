//! Blocking work (synced state-store commits) off the async request path.

use vdisk::{BlockError, IoResult};

/// Runs `f` on tokio's blocking pool when there is a runtime, else right here (a thread with
/// no runtime is not an async worker, so blocking it stalls no one else).
pub async fn offload<T, F>(f: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> IoResult<T> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.spawn_blocking(f).await.map_err(|e| BlockError::Io(std::io::Error::other(e)))?,
        Err(_) => f(),
    }
}

/// A state-store failure as the error of the request that needed it.
pub fn store_error(e: state_store::StoreError) -> BlockError {
    BlockError::Io(std::io::Error::other(e))
}
