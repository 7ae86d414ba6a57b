//! The command line's side of the control API: one HTTP request over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::api::ErrorBody;

/// The largest answer read from the daemon: far more than the metrics of thousands of disks.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the vstor daemon at {socket} (is `vstor serve` running? use --api to point elsewhere)")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control API request failed")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the daemon")]
    BadAnswer(#[from] serde_json::Error),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client { socket: socket.to_path_buf() }
    }

    /// Sends one request and decodes its JSON answer; a non-2xx answer becomes `Refused` with the
    /// daemon's message, and 204 gives `None`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Option<T>, ClientError> {
        let (status, bytes) = self.send(method, path, body.unwrap_or_default()).await?;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&bytes)?))
    }

    /// Fetches a plain-text document, such as /metrics.
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        let (_, bytes) = self.send(Method::GET, path, Vec::new()).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vstor")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Refused(e.to_string()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        // The daemon's answers are small; a larger one is not read whole.
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::Refused(format!("cannot read the daemon's answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused(message));
        }
        Ok((status, bytes))
    }
}
