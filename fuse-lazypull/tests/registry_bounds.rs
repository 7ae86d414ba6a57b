//! The registry client against a registry that misbehaves on purpose, served by a small HTTP
//! server in the test: one that ignores `Range` and sends a large blob whole (the client must
//! never hold more than the range asked for), and one that trickles its answer (the client must
//! give up at its deadline, not wait for years).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod alloc_counter;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_lazypull::digest::Digest;
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{Registry, RegistryConfig, RegistryError};

/// How the test registry answers every blob GET.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 with the whole blob of this many bytes, whatever `Range` says; byte `i` is `i % 251`.
    Whole(u64),
    /// 206 of this many bytes, sent one byte at a time with a pause between.
    Trickle(u64, Duration),
}

/// An HTTP/1.1 server on a free loopback port answering every request with `answer`.
fn serve(answer: Answer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || answer_one(conn, answer));
        }
    });
    host
}

fn answer_one(conn: TcpStream, answer: Answer) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let mut out = conn;
    match answer {
        Answer::Whole(size) => {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n")?;
            let mut sent = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            while sent < size {
                let n = (size - sent).min(buf.len() as u64) as usize;
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = ((sent + i as u64) % 251) as u8;
                }
                out.write_all(&buf[..n])?;
                sent += n as u64;
            }
        }
        Answer::Trickle(size, pause) => {
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {size}\r\nContent-Range: bytes 0-{}/{size}\r\n\r\n",
                size - 1
            )?;
            for _ in 0..size {
                out.write_all(b"x")?;
                out.flush()?;
                std::thread::sleep(pause);
            }
        }
    }
    Ok(())
}

fn client(timeout_secs: u64) -> Arc<Registry> {
    Registry::new(RegistryConfig { timeout_secs, retries: 0, ..Default::default() }).unwrap()
}

fn image(host: &str) -> ImageRef {
    format!("{host}/test/blob:v1").parse().unwrap()
}

fn digest() -> Digest {
    Digest::of(b"the blob")
}

/// A registry that ignores `Range` sends a 256 MiB blob whole for a range 10 MiB in: the range
/// comes back, and the bytes before it were dropped as they came, never held (reading them into
/// memory held all 10 MiB). A range beyond 64 MiB into such a blob is refused before its prefix
/// is read.
#[test]
fn a_registry_ignoring_range_costs_only_the_range_in_memory() {
    let host = serve(Answer::Whole(256 << 20));
    let client = client(10);
    let start = 10u64 << 20;
    let (got, peak) = alloc_counter::peak_during(|| client.fetch_range(&image(&host), &digest(), start..start + 65536));
    let got = got.unwrap();
    assert!(got.iter().enumerate().all(|(i, b)| u64::from(*b) == (start + i as u64) % 251));
    assert_eq!(got.len(), 65536);
    assert!(peak < 8 << 20, "fetching a 64 KiB range held {peak} bytes at once");
    assert_eq!(client.bytes_fetched(), start + 65536);

    let start = 200u64 << 20;
    let (got, peak) = alloc_counter::peak_during(|| client.fetch_range(&image(&host), &digest(), start..start + 65536));
    match got {
        Err(RegistryError::IgnoresRange { start: at, .. }) => assert_eq!(at, start),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
    assert!(peak < 8 << 20, "refusing the range held {peak} bytes at once");
}

/// A registry that sends a byte every 200 ms (well within the 1 s read timeout) would hold a
/// 1000-byte GET for 200 s: the request ends at its deadline (twice the timeout plus a second
/// per MiB) instead.
#[test]
fn a_trickling_registry_fails_the_request_at_its_deadline() {
    let host = serve(Answer::Trickle(1000, Duration::from_millis(200)));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = client(1).fetch_range(&image(&host), &digest(), 0..1000);
        let _ = tx.send((result.map(|b| b.len()), started.elapsed()));
    });
    let (result, took) = rx.recv_timeout(Duration::from_secs(60)).expect("the request is still going after 60 s");
    let err = result.expect_err("a trickle is not an answer");
    assert!(matches!(err, RegistryError::Body { .. } | RegistryError::Transport { .. }), "{err:?}");
    assert!(took >= Duration::from_secs(2), "gave up after {took:?}, before the deadline");
}
