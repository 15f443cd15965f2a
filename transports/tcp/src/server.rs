//! The data server: serves reads and writes of registered memory to peers.
//!
//! Every request is checked against the region table before memory is touched, and the region
//! guard is held while bytes move. A bad request closes only its own connection. Memory of a device the
//! CPU cannot read is staged through the device (`mooncake-raw`), never dereferenced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{Error, Opcode, RegionGuard, RegionTable, Result};
use mooncake_raw::Span;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::staging::{self, StageIn, StageOut, StagedSink, StagedSource};
use crate::wire::{self, HEADER_LEN, Header};

/// Buffer size of each connection's reader and writer.
const IO_BUFFER: usize = 64 << 10;
/// A rejected write v2 payload up to this size is drained so the connection survives.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Time allowed for moving `size` bytes of one request (a stalled peer cannot pin a region).
fn payload_deadline(size: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_nanos(size.saturating_mul(10))
}

/// Binds `host` exactly (port 0 = any free port). A wildcard IPv6 host is dual-stack.
pub(crate) async fn bind(host: &str) -> Result<TcpListener> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot resolve bind host {host:?}: {e}")))?
        .collect();
    let addr = *addrs.first().ok_or_else(|| Error::InvalidArgument(format!("bind host {host:?} has no address")))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// Accepts connections until the task is aborted; connection tasks die with it.
pub(crate) async fn serve(listener: TcpListener, regions: Arc<RegionTable>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let regions = regions.clone();
                    conns.spawn(async move {
                        if let Err(e) = serve_connection(stream, &regions).await {
                            tracing::warn!(%peer, error = %e, "tcp data connection dropped");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Polls a socket for the next request for up to `spin` before the task parks: a caller doing
/// blocking round trips sends its next request within one round trip, and waking a parked thread
/// costs tens of microseconds on virtual machines.
async fn linger(stream: &TcpStream, spin: Duration) {
    if spin.is_zero() {
        return;
    }
    let until = std::time::Instant::now() + spin;
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    while std::time::Instant::now() < until {
        match socket2::SockRef::from(stream).peek(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tokio::task::yield_now().await,
            _ => return, // data, EOF or an error: let the read see it
        }
    }
}

/// Server-side polling budget (`MC_TCP_SERVER_SPIN_US`, default 200 us; 0 disables).
pub(crate) fn server_spin() -> Duration {
    let us = std::env::var("MC_TCP_SERVER_SPIN_US").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(200);
    Duration::from_micros(us)
}

async fn serve_connection(stream: TcpStream, regions: &RegionTable) -> Result<()> {
    let spin = server_spin();
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut reader = BufReader::with_capacity(IO_BUFFER, r);
    let mut writer = BufWriter::with_capacity(IO_BUFFER, w);
    let mut raw = [0u8; HEADER_LEN];
    loop {
        if reader.buffer().is_empty() {
            // Nothing pipelined behind: push out pending status words and data before blocking.
            writer.flush().await?;
            linger(reader.get_ref().as_ref(), spin).await;
        }
        match reader.read_exact(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let h = Header::decode(&raw)?;
        let guard = regions.lookup(h.addr, h.size);
        let deadline = payload_deadline(h.size);
        // The guard proves [addr, addr+size) lies in one registered region and, held, keeps it registered
        // (unregister waits for guards) while the bytes move. Device memory no device can copy is refused.
        let span = match &guard {
            Some(g) => Span::region(g, h.addr, h.size),
            None => Err(Error::AddressNotRegistered {
                addr: h.addr,
                len: h.size,
                context: format!("{} request from peer", h.opcode.as_str()),
            }),
        };
        match (h.opcode, span) {
            (Opcode::Write, Ok(span)) if !span.is_host() && staging::pipelined(h.size) => {
                // Device memory: each chunk is copied in by the device while the next one is received.
                let region = guard.clone().ok_or_else(|| Error::Protocol("staged write without a region".into()))?;
                let mut sink = StagedSink::new(stage_in(region, h.addr));
                let received = timed(deadline, async {
                    for (off, len) in staging::chunks(h.size) {
                        let mut buf = sink.buffer(len);
                        reader.read_exact(&mut buf).await?;
                        sink.push(off, buf).await;
                    }
                    std::io::Result::Ok(())
                })
                .await;
                let stored = sink.finish().await;
                received?;
                drop(guard);
                reply_stored(&mut writer, h.v2, stored).await?;
            }
            (Opcode::Read, Ok(span)) if !span.is_host() && staging::pipelined(h.size) => {
                // Device memory: the first chunk is copied out before the status word (a refusal can still be
                // reported), the rest while the previous chunk is on the wire.
                let region = guard.clone().ok_or_else(|| Error::Protocol("staged read without a region".into()))?;
                let mut source = StagedSource::start(stage_out(region, h.addr), h.size);
                let first = match source.next().await {
                    Some(Ok(first)) => first,
                    Some(Err(e)) if h.v2 => {
                        tracing::warn!(error = %e, "tcp read of device memory failed");
                        writer.write_all(&wire::encode_status(wire::STATUS_REJECTED)).await?;
                        continue;
                    }
                    Some(Err(e)) => return Err(e),
                    None => Vec::new(),
                };
                if h.v2 {
                    writer.write_all(&wire::encode_status(wire::STATUS_OK)).await?;
                }
                timed(deadline, async {
                    writer.write_all(&first).await?;
                    source.recycle(first);
                    while let Some(chunk) = source.next().await {
                        // The status word promised the bytes: a copy failing midway can only end the connection.
                        let chunk = chunk.map_err(std::io::Error::other)?;
                        writer.write_all(&chunk).await?;
                        source.recycle(chunk);
                    }
                    std::io::Result::Ok(())
                })
                .await?;
                drop(guard);
            }
            (Opcode::Write, Ok(mut span)) => {
                let mut sink = span.sink();
                timed(deadline, reader.read_exact(sink.bytes())).await?;
                // Device memory: the device copies the staged bytes in.
                let stored = sink.commit();
                drop(guard);
                reply_stored(&mut writer, h.v2, stored).await?;
            }
            (Opcode::Read, Ok(span)) => {
                // Device memory is staged (copied out by the device) before the status word goes out, so that a
                // failed copy can still be reported.
                let src = match span.bytes() {
                    Ok(src) => src,
                    Err(e) if h.v2 => {
                        tracing::warn!(error = %e, "tcp read of device memory failed");
                        writer.write_all(&wire::encode_status(wire::STATUS_REJECTED)).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if h.v2 {
                    writer.write_all(&wire::encode_status(wire::STATUS_OK)).await?;
                }
                timed(deadline, writer.write_all(&src)).await?;
                drop(src);
                drop(guard);
            }
            (op, Err(rejected)) => {
                if !h.v2 {
                    // v1 has no way to report a rejection: close the connection.
                    return Err(rejected);
                }
                if op == Opcode::Write {
                    if h.size > DRAIN_LIMIT {
                        writer.write_all(&wire::encode_status(wire::STATUS_REJECTED)).await?;
                        writer.flush().await?;
                        return Err(rejected);
                    }
                    timed(deadline, drain(&mut reader, h.size)).await?;
                }
                tracing::warn!(error = %rejected, "rejected tcp request");
                writer.write_all(&wire::encode_status(wire::STATUS_REJECTED)).await?;
            }
        }
    }
}

/// Answers a write: the status word (v2), or, when the bytes could not be stored and v1 has no way to say so,
/// the error that closes the connection.
async fn reply_stored<W: tokio::io::AsyncWrite + Unpin>(writer: &mut W, v2: bool, stored: Result<()>) -> Result<()> {
    match stored {
        Ok(()) if v2 => writer.write_all(&wire::encode_status(wire::STATUS_OK)).await?,
        Ok(()) => {}
        Err(e) if v2 => {
            tracing::warn!(error = %e, "tcp write into device memory failed");
            writer.write_all(&wire::encode_status(wire::STATUS_REJECTED)).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Copies chunks of the registered region out through its device, from `base` on.
fn stage_out(region: RegionGuard, base: u64) -> StageOut {
    Arc::new(move |off, buf: &mut [u8]| Span::region(&region, base + off, buf.len() as u64)?.read_into(0, buf))
}

/// Copies chunks into the registered region through its device, from `base` on.
fn stage_in(region: RegionGuard, base: u64) -> StageIn {
    Arc::new(move |off, bytes: &[u8]| Span::region(&region, base + off, bytes.len() as u64)?.write_from(0, bytes))
}

async fn drain<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R, mut left: u64) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    while left > 0 {
        let n = {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.len().min(left as usize)
        };
        reader.consume(n);
        left -= n as u64;
    }
    Ok(())
}

async fn timed<T>(limit: Duration, fut: impl Future<Output = std::io::Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Timeout(limit)),
    }
}
