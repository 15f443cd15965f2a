//! Pipelined staging of device memory (GPU buffers): large requests move in chunks, the device copying one chunk
//! on a blocking thread while the socket carries the previous one, so copy and network overlap instead of adding
//! up. Requests of at most [`CHUNK`] bytes are staged in one piece, as before.

use std::sync::Arc;

use mooncake_core::{Error, Result};
use tokio::task::JoinHandle;

/// Bytes staged per step. Large enough that a device copy runs near its bandwidth, small enough that the first
/// bytes reach the wire early.
pub(crate) const CHUNK: u64 = 4 << 20;

/// Whether a device-memory request of `len` bytes is moved in pipelined chunks.
pub(crate) fn pipelined(len: u64) -> bool {
    len > CHUNK
}

/// The chunks of `total` bytes: `(offset, len)` pairs, each at most [`CHUNK`].
pub(crate) fn chunks(total: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..total.div_ceil(CHUNK)).map(move |i| (i * CHUNK, CHUNK.min(total - i * CHUNK)))
}

/// Copies one chunk out of device memory: `(offset, buffer)`, the buffer sized to the chunk.
pub(crate) type StageOut = Arc<dyn Fn(u64, &mut [u8]) -> Result<()> + Send + Sync>;
/// Copies one chunk into device memory: `(offset, bytes)`.
pub(crate) type StageIn = Arc<dyn Fn(u64, &[u8]) -> Result<()> + Send + Sync>;

fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    r.unwrap_or_else(|e| Err(Error::Protocol(format!("staging task failed: {e}"))))
}

/// Reads device memory chunk by chunk, one chunk ahead of the consumer.
pub(crate) struct StagedSource {
    copy_out: StageOut,
    chunks: std::vec::IntoIter<(u64, u64)>,
    ahead: Option<JoinHandle<Result<Vec<u8>>>>,
    spare: Option<Vec<u8>>,
}

impl StagedSource {
    /// Starts copying the first chunk of `total` bytes.
    pub(crate) fn start(copy_out: StageOut, total: u64) -> Self {
        let mut s =
            StagedSource { copy_out, chunks: chunks(total).collect::<Vec<_>>().into_iter(), ahead: None, spare: None };
        s.ahead = s.spawn_next();
        s
    }

    fn spawn_next(&mut self) -> Option<JoinHandle<Result<Vec<u8>>>> {
        let (off, len) = self.chunks.next()?;
        let copy_out = self.copy_out.clone();
        let mut buf = self.spare.take().unwrap_or_default();
        Some(tokio::task::spawn_blocking(move || {
            buf.resize(len as usize, 0);
            copy_out(off, &mut buf).map(|()| buf)
        }))
    }

    /// The next chunk's bytes (`None` after the last); the copy of the one after it starts now. Give the
    /// buffer back with [`StagedSource::recycle`] once written.
    pub(crate) async fn next(&mut self) -> Option<Result<Vec<u8>>> {
        let current = self.ahead.take()?;
        let got = joined(current.await);
        if got.is_ok() {
            self.ahead = self.spawn_next();
        }
        Some(got)
    }

    /// Hands a written chunk's buffer back for the next copy.
    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        self.spare = Some(buf);
    }
}

/// Writes received bytes into device memory chunk by chunk, the device copying one chunk while the next one is
/// received. Every chunk is still received after a copy failed (the stream stays in step); the first failure is
/// the result.
pub(crate) struct StagedSink {
    copy_in: StageIn,
    behind: Option<JoinHandle<Result<Vec<u8>>>>,
    spare: Vec<Vec<u8>>,
    failed: Option<Error>,
}

impl StagedSink {
    /// A sink over `copy_in`.
    pub(crate) fn new(copy_in: StageIn) -> Self {
        StagedSink { copy_in, behind: None, spare: Vec::new(), failed: None }
    }

    /// A buffer of `len` bytes to receive the next chunk into (a recycled one when there is one).
    pub(crate) fn buffer(&mut self, len: u64) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(len as usize, 0);
        buf
    }

    /// Commits the received chunk at `off` behind the next receive (after the previous commit finished).
    pub(crate) async fn push(&mut self, off: u64, buf: Vec<u8>) {
        self.settle().await;
        let copy_in = self.copy_in.clone();
        let skip = self.failed.is_some();
        self.behind = Some(tokio::task::spawn_blocking(move || {
            if !skip {
                copy_in(off, &buf)?;
            }
            Ok(buf)
        }));
    }

    /// Waits for the last commit: `Ok` when every chunk reached device memory, else the first failure.
    pub(crate) async fn finish(mut self) -> Result<()> {
        self.settle().await;
        self.failed.map_or(Ok(()), Err)
    }

    /// Waits for the copy in flight, keeping its buffer or its error.
    async fn settle(&mut self) {
        if let Some(h) = self.behind.take() {
            match joined(h.await) {
                Ok(buf) => self.spare.push(buf),
                Err(e) => {
                    self.failed.get_or_insert(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn chunks_cover_the_range_once() {
        let total = 3 * CHUNK + 17;
        let parts: Vec<_> = chunks(total).collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), total);
        assert!(parts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        assert!(chunks(0).next().is_none());
        assert!(!pipelined(CHUNK) && pipelined(CHUNK + 1));
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    #[test]
    fn source_yields_every_chunk_in_order_and_stops_at_an_error() {
        let total = 2 * CHUNK + 5;
        let data: Arc<Vec<u8>> = Arc::new((0..total).map(|i| (i % 251) as u8).collect());
        let d = data.clone();
        let copy_out: StageOut = Arc::new(move |off, buf: &mut [u8]| {
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        });
        let got = runtime().block_on(async {
            let mut src = StagedSource::start(copy_out, total);
            let mut out = Vec::new();
            while let Some(chunk) = src.next().await {
                let chunk = chunk.unwrap();
                out.extend_from_slice(&chunk);
                src.recycle(chunk);
            }
            out
        });
        assert!(got == *data);

        let failing: StageOut =
            Arc::new(|off, _buf: &mut [u8]| if off >= CHUNK { Err(Error::NotFound("freed".into())) } else { Ok(()) });
        let results = runtime().block_on(async {
            let mut src = StagedSource::start(failing, total);
            let mut results = Vec::new();
            while let Some(r) = src.next().await {
                results.push(r.is_ok());
            }
            results
        });
        assert_eq!(results, vec![true, false], "nothing after the failed chunk");
    }

    #[test]
    fn sink_commits_every_chunk_and_reports_the_first_failure_after_receiving_all() {
        let total = 3 * CHUNK - 9;
        let store = Arc::new(Mutex::new(vec![0u8; total as usize]));
        let s = store.clone();
        let copy_in: StageIn = Arc::new(move |off, bytes: &[u8]| {
            s.lock().unwrap()[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            Ok(())
        });
        let source: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        let r = runtime().block_on(async {
            let mut sink = StagedSink::new(copy_in);
            for (off, len) in chunks(total) {
                let mut buf = sink.buffer(len);
                buf.copy_from_slice(&source[off as usize..(off + len) as usize]);
                sink.push(off, buf).await;
            }
            sink.finish().await
        });
        assert!(r.is_ok());
        assert!(*store.lock().unwrap() == source);

        let failing: StageIn =
            Arc::new(|off, _: &[u8]| if off == 0 { Err(Error::NotFound("freed".into())) } else { Ok(()) });
        let (r, pushed) = runtime().block_on(async {
            let mut sink = StagedSink::new(failing);
            let mut pushed = 0;
            for (off, len) in chunks(total) {
                let buf = sink.buffer(len);
                sink.push(off, buf).await;
                pushed += len;
            }
            (sink.finish().await, pushed)
        });
        assert!(matches!(r, Err(Error::NotFound(_))));
        assert_eq!(pushed, total, "every chunk is still taken (the stream stays in step)");
    }
}
