//! The NBD server: fixed newstyle handshake, then many requests in flight per connection with
//! replies sent as they complete.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::proto::*;
use crate::buffer::IoBuf;
use crate::device::{BlockDevice, BlockError, RequestKind, MAX_IO_BYTES};
use crate::disk::{Disk, DiskUser};
use crate::error_chain;
use crate::lookup::{DiskLookup, LookupError};

/// How long a client may take over the handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests one connection may have in flight; the server stops reading beyond that.
const MAX_IN_FLIGHT: usize = 256;
/// Data bytes (read and write buffers) one connection may hold in flight. A client that sends
/// many large requests and never reads the replies holds at most this much: the server stops
/// reading its requests until replies drain. Two requests of the largest size fit.
pub(super) const CONNECTION_BYTES: usize = 2 * MAX_IO_BYTES as usize;
/// Data bytes all connections together may hold in flight.
const SERVER_BYTES: usize = 1 << 30;
/// Connections served at once; more are closed as they arrive. With CONNECTION_BYTES each,
/// they cannot take more than SERVER_BYTES between them anyway; this bounds their other costs
/// (buffers, tasks, descriptors).
const MAX_CONNECTIONS: usize = 256;
/// Socket buffer sizes of a connection.
const READ_BUFFER: usize = 64 << 10;
const WRITE_BUFFER: usize = 64 << 10;
/// The preferred block size advertised: the page size, below which writes cost a read.
const PREFERRED_BLOCK: u32 = 4096;

/// Counters of the NBD frontend, for the metrics endpoint.
#[derive(Default)]
pub struct NbdStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub protocol_errors: AtomicU64,
}

/// Serves disks as NBD exports, each under its own name.
pub struct NbdServer {
    disks: Arc<dyn DiskLookup>,
    /// The export a client gets when it asks for the empty name.
    default_export: Option<String>,
    stats: NbdStats,
    /// SERVER_BYTES, shared by every connection's requests.
    bytes: Arc<Semaphore>,
    /// MAX_CONNECTIONS.
    connections: Arc<Semaphore>,
}

/// What a handshake ended in.
enum Negotiated {
    Transmit { disk: DiskUser, structured: bool },
    Aborted,
}

/// A completed request, ready to be sent back.
struct Completion {
    req: Request,
    result: Result<Option<IoBuf>, BlockError>,
    _permits: Permits,
}

/// What a request in flight holds until its reply is sent: its slot, and its data bytes from the
/// connection's and the server's budgets.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

type Pending = futures_util::future::BoxFuture<'static, Completion>;

impl NbdServer {
    pub fn new(disks: Arc<dyn DiskLookup>, default_export: Option<String>) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            disks,
            default_export,
            stats: NbdStats::default(),
            bytes: Arc::new(Semaphore::new(SERVER_BYTES)),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    pub fn stats(&self) -> &NbdStats {
        &self.stats
    }

    /// Data bytes the requests of every connection hold now (at most SERVER_BYTES).
    pub fn bytes_in_flight(&self) -> usize {
        SERVER_BYTES - self.bytes.available_permits()
    }

    /// Accepts clients on a Unix socket until the task is dropped.
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (rd, wr) = stream.into_split();
                    tokio::spawn(self.clone().handle(rd, wr));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    }

    /// Accepts clients on TCP until the task is dropped.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // Replies are small and latency-bound: don't let Nagle hold them back.
                    let _ = stream.set_nodelay(true);
                    let (rd, wr) = stream.into_split();
                    tokio::spawn(self.clone().handle(rd, wr));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    }

    /// Runs one client connection to its end. Errors end only this connection.
    pub async fn handle<R, W>(self: Arc<Self>, rd: R, wr: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.stats.connections.fetch_add(1, Relaxed);
        let Ok(_connection) = self.connections.clone().try_acquire_owned() else {
            self.stats.protocol_errors.fetch_add(1, Relaxed);
            tracing::warn!("nbd connection refused: {MAX_CONNECTIONS} connections are open");
            return;
        };
        self.stats.active.fetch_add(1, Relaxed);
        // Headers and small payloads come through the buffers; a payload larger than them is read
        // straight into its request's buffer (and a read's data written straight out), saving a copy.
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
        let mut wr = BufWriter::with_capacity(WRITE_BUFFER, wr);
        let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.negotiate(&mut rd, &mut wr)).await;
        let outcome = match negotiated {
            Ok(Ok(Negotiated::Transmit { disk, structured })) => {
                tracing::debug!(disk = %disk.name(), structured, "nbd client connected");
                transmit(rd, wr, disk, structured, self.bytes.clone()).await
            }
            Ok(Ok(Negotiated::Aborted)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "handshake took too long")),
        };
        if let Err(e) = outcome {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                self.stats.protocol_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "nbd connection closed");
            }
        }
        self.stats.active.fetch_sub(1, Relaxed);
    }

    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> io::Result<Negotiated>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&hello).await?;
        wr.flush().await?;
        let client_flags = rd.read_u32().await?;
        if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(protocol(ProtocolError::UnknownClientFlags(client_flags)));
        }
        let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        let mut structured = false;
        loop {
            let mut header = [0u8; 16];
            rd.read_exact(&mut header).await?;
            let (option, len) = parse_option_header(&header).map_err(protocol)?;
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            let mut out = Vec::new();
            match option {
                OPT_EXPORT_NAME => {
                    // No way to report an error here: an unknown export ends the session.
                    let name = String::from_utf8_lossy(&data);
                    let disk = self.lookup(&name).map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
                    out.extend_from_slice(&disk.info().capacity.to_be_bytes());
                    out.extend_from_slice(&transmission_flags(&disk).to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    return Ok(Negotiated::Transmit { disk: disk.acquire(), structured });
                }
                OPT_ABORT => {
                    // The client may close without reading the ACK (libnbd does): not an error.
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                    if wr.write_all(&out).await.is_ok() {
                        let _ = wr.flush().await;
                    }
                    return Ok(Negotiated::Aborted);
                }
                OPT_LIST if !data.is_empty() => {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"LIST takes no data")
                }
                OPT_LIST => {
                    for name in self.disks.names() {
                        let name = name.as_bytes();
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name);
                        put_option_reply(&mut out, option, REP_SERVER, &d);
                    }
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                }
                OPT_INFO | OPT_GO => match parse_info_request(&data) {
                    Err(e) => put_option_reply(&mut out, option, REP_ERR_INVALID, e.to_string().as_bytes()),
                    Ok((name, infos)) => match self.lookup(&name) {
                        Err(e) => put_option_reply(&mut out, option, REP_ERR_UNKNOWN, error_chain(&e).as_bytes()),
                        Ok(disk) => {
                            let info = disk.info();
                            put_option_reply(
                                &mut out,
                                option,
                                REP_INFO,
                                &info_export(info.capacity, transmission_flags(&disk)),
                            );
                            if infos.contains(&INFO_NAME) {
                                put_option_reply(&mut out, option, REP_INFO, &info_name(disk.name()));
                            }
                            let preferred = PREFERRED_BLOCK.max(info.block_size);
                            let block_size = info_block_size(info.block_size, preferred, MAX_IO_BYTES as u32);
                            put_option_reply(&mut out, option, REP_INFO, &block_size);
                            put_option_reply(&mut out, option, REP_ACK, &[]);
                            if option == OPT_GO {
                                wr.write_all(&out).await?;
                                wr.flush().await?;
                                return Ok(Negotiated::Transmit { disk: disk.acquire(), structured });
                            }
                        }
                    },
                },
                OPT_STRUCTURED_REPLY if !data.is_empty() => {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
                }
                OPT_STRUCTURED_REPLY => {
                    structured = true;
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT if !structured => {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"structured replies first")
                }
                // No metadata contexts are offered: the answer is the empty list.
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => put_option_reply(&mut out, option, REP_ACK, &[]),
                OPT_STARTTLS => put_option_reply(&mut out, option, REP_ERR_POLICY, b"TLS is not offered"),
                _ => put_option_reply(&mut out, option, REP_ERR_UNSUP, b"option not supported"),
            }
            wr.write_all(&out).await?;
            wr.flush().await?;
        }
    }

    fn lookup(&self, name: &str) -> Result<Arc<Disk>, LookupError> {
        match (name, &self.default_export) {
            ("", Some(default)) => self.disks.open(default),
            _ => self.disks.open(name),
        }
    }
}

async fn accept_failed(e: io::Error) {
    // Usually EMFILE: wait for descriptors to free up rather than spin.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn protocol(e: ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn transmission_flags(disk: &Disk) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    // A flush makes every completed write of every connection durable (one fdatasync of one
    // file), which is what multi-conn asks.
    flags |= TFLAG_CAN_MULTI_CONN;
    if disk.info().read_only {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

/// The transmission phase: a reader that turns requests into in-flight futures, and a writer
/// that sends each reply as soon as its request completes, in whatever order that is.
async fn transmit<R, W>(
    rd: BufReader<R>,
    wr: BufWriter<W>,
    disk: DiskUser,
    structured: bool,
    server_bytes: Arc<Semaphore>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let disk: Arc<Disk> = Arc::clone(&disk);
    let budget = Budget {
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        connection: Arc::new(Semaphore::new(CONNECTION_BYTES)),
        server: server_bytes,
    };
    let (read, write) = tokio::join!(read_requests(rd, disk, tx, budget), write_replies(wr, rx, structured));
    read.and(write)
}

/// What a connection's requests in flight may hold.
struct Budget {
    /// MAX_IN_FLIGHT requests.
    slots: Arc<Semaphore>,
    /// CONNECTION_BYTES of data.
    connection: Arc<Semaphore>,
    /// The server's SERVER_BYTES, shared with every connection.
    server: Arc<Semaphore>,
}

impl Budget {
    /// Waits for a slot, and for `bytes` of data from both budgets when the request carries data
    /// (at most MAX_IO_BYTES, checked before). `None` once the budgets are closed.
    async fn take(&self, bytes: u64) -> Option<Permits> {
        let slot = self.slots.clone().acquire_owned().await.ok()?;
        let bytes = match u32::try_from(bytes) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                let connection = self.connection.clone().acquire_many_owned(n).await.ok()?;
                Some((connection, self.server.clone().acquire_many_owned(n).await.ok()?))
            }
        };
        Some(Permits { _slot: slot, _bytes: bytes })
    }
}

async fn read_requests<R: AsyncRead + Unpin>(
    mut rd: BufReader<R>,
    disk: Arc<Disk>,
    tx: mpsc::UnboundedSender<Pending>,
    budget: Budget,
) -> io::Result<()> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            // A client that simply goes away between requests.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = parse_request(&header).map_err(protocol)?;
        if req.command == CMD_DISC {
            return Ok(());
        }
        let (offset, len, fua) = (req.offset, u64::from(req.length), req.flags & CMD_FLAG_FUA != 0);
        if req.command == CMD_WRITE && len > MAX_IO_BYTES {
            // Its payload cannot be skipped safely: the stream is lost.
            return Err(protocol(ProtocolError::PayloadTooLarge(req.length)));
        }
        // Only reads and writes hold buffers; an oversized read is refused below without one.
        let data = match req.command {
            CMD_READ | CMD_WRITE if len <= MAX_IO_BYTES => len,
            _ => 0,
        };
        let Some(permit) = budget.take(data).await else { return Ok(()) };
        let payload = if req.command == CMD_WRITE {
            let mut buf = IoBuf::scratch(len as usize);
            rd.read_exact(buf.as_mut_slice()).await?;
            Some(buf)
        } else {
            None
        };
        let d = disk.clone();
        let pending = match (req.command, payload) {
            _ if req.flags & !CMD_FLAGS_KNOWN != 0 => respond(req, permit, async { Err(BlockError::Unsupported) }),
            (CMD_WRITE, Some(buf)) => {
                respond(req, permit, async move { d.write(offset, buf, fua).await.map(|_| None) })
            }
            (CMD_READ, _) if len > MAX_IO_BYTES => {
                respond(req, permit, async move { Err(BlockError::TooLarge { len, max: MAX_IO_BYTES }) })
            }
            (CMD_READ, _) => {
                respond(req, permit, async move { d.read(offset, IoBuf::scratch(len as usize)).await.map(Some) })
            }
            (CMD_FLUSH, _) => respond(req, permit, async move { d.flush().await.map(|()| None) }),
            (CMD_TRIM, _) => respond(req, permit, async move {
                d.discard(offset, len).await?;
                if fua {
                    d.flush().await?;
                }
                Ok(None)
            }),
            (CMD_WRITE_ZEROES, _) => {
                respond(req, permit, async move { d.write_zeroes(offset, len, fua).await.map(|()| None) })
            }
            // CACHE, BLOCK_STATUS (neither advertised) and unknown commands carry no payload.
            _ => respond(req, permit, async { Err(BlockError::Unsupported) }),
        };
        if tx.send(pending).is_err() {
            // The writer is gone, and with it the connection.
            return Ok(());
        }
    }
}

fn respond<F>(req: Request, permits: Permits, work: F) -> Pending
where
    F: std::future::Future<Output = Result<Option<IoBuf>, BlockError>> + Send + 'static,
{
    Box::pin(work.map(move |result| Completion { req, result, _permits: permits }))
}

/// The request kind a command stands for, to choose its error value.
fn kind_of(command: u16) -> RequestKind {
    match command {
        CMD_WRITE => RequestKind::Write,
        CMD_FLUSH => RequestKind::Flush,
        CMD_TRIM => RequestKind::Discard,
        CMD_WRITE_ZEROES => RequestKind::WriteZeroes,
        _ => RequestKind::Read,
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    structured: bool,
) -> io::Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut reading = true;
    let mut header = Vec::with_capacity(64);
    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                send_reply(&mut wr, &mut header, done, structured).await?;
                // Send every other reply that is ready too, then push them out in one write.
                while let Some(Some(done)) = in_flight.next().now_or_never() {
                    send_reply(&mut wr, &mut header, done, structured).await?;
                }
                wr.flush().await?;
            }
            next = rx.recv(), if reading => match next {
                Some(pending) => in_flight.push(pending),
                None => reading = false,
            },
            else => break,
        }
    }
    wr.flush().await?;
    wr.shutdown().await
}

async fn send_reply<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    header: &mut Vec<u8>,
    done: Completion,
    structured: bool,
) -> io::Result<()> {
    header.clear();
    let (cookie, read) = (done.req.cookie, done.req.command == CMD_READ);
    match done.result {
        Ok(data) => {
            let data = data.as_ref().map(IoBuf::as_slice).unwrap_or_default();
            if structured && read {
                put_structured_header(header, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len() as u32);
                header.extend_from_slice(&done.req.offset.to_be_bytes());
            } else {
                put_simple_reply(header, 0, cookie);
            }
            wr.write_all(header).await?;
            wr.write_all(data).await
        }
        Err(e) => {
            let errno = nbd_errno(&e, kind_of(done.req.command));
            if !e.is_invalid_request() {
                tracing::warn!(error = %error_chain(&e), "nbd request failed");
            }
            if structured {
                put_structured_error(header, cookie, errno, &e.to_string());
            } else {
                put_simple_reply(header, errno, cookie);
            }
            wr.write_all(header).await
        }
    }
}
