//! Crash-safe persistence for the HTTP metadata server (`--persist PATH`): an append-only log.
//!
//! File layout: the 8-byte magic `MCMDLOG1`, then records
//! `[u32 payload length][u32 CRC-32 of payload][payload]` (little-endian), where the payload is
//! `[u8 op][u32 key length][key bytes][value bytes]` with op 1 = put, 2 = delete.
//!
//! A write is acknowledged (HTTP 200) only after the record is on disk (`fdatasync`); concurrent
//! writes share one sync (group commit). At start-up the log is replayed and rewritten compactly
//! (write to `PATH.tmp`, fsync, rename, fsync the directory); it is compacted again whenever it
//! grows past twice its live size plus 16 MiB.
//!
//! Recovery rules: a record cut short at the end of the file, or a tail of zero bytes, is what a
//! crash during an unacknowledged write leaves; it is dropped with a warning giving its size.
//! Anything else that does not decode (wrong magic, a checksum mismatch, a bad record in the
//! middle) stops start-up with [`LoadError::Corrupt`] naming the offset: no key is dropped
//! silently.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use bytes::Bytes;

/// First bytes of every persist file.
pub const MAGIC: &[u8; 8] = b"MCMDLOG1";
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const HEADER: usize = 8;
/// Compaction slack: the log may exceed twice its live size by this much.
const COMPACT_SLACK: u64 = 16 << 20;

/// One change to the key space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Key set to value.
    Put(String, Bytes),
    /// Key removed.
    Delete(String),
}

impl Record {
    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (op, key, value): (u8, &str, &[u8]) = match self {
            Record::Put(k, v) => (OP_PUT, k, v),
            Record::Delete(k) => (OP_DELETE, k, &[]),
        };
        let payload_len = 1 + 4 + key.len() + value.len();
        let start = out.len();
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push(op);
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value);
        let crc = crc32fast::hash(&out[start + HEADER..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode_payload(p: &[u8]) -> Result<Record, &'static str> {
        let (&op, rest) = p.split_first().ok_or("empty record")?;
        let key_len = rest.get(..4).ok_or("record shorter than its key length")?;
        let key_len = u32::from_le_bytes(key_len.try_into().unwrap_or_default()) as usize;
        let key = rest.get(4..4 + key_len).ok_or("key runs past the end of its record")?;
        let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8")?.to_string();
        let value = &rest[4 + key_len..];
        match op {
            OP_PUT => Ok(Record::Put(key, Bytes::copy_from_slice(value))),
            OP_DELETE if value.is_empty() => Ok(Record::Delete(key)),
            OP_DELETE => Err("delete record carries a value"),
            _ => Err("unknown record type"),
        }
    }

    fn key(&self) -> &str {
        match self {
            Record::Put(k, _) | Record::Delete(k) => k,
        }
    }
}

/// Why a persist file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading or rewriting the file failed.
    #[error("persist file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The file holds something this server did not write.
    #[error(
        "persist file {path} is corrupt at byte {offset}: {reason}. Refusing to start so that no key is dropped \
         silently; move the file aside (the server then starts empty) or restore it from a backup"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where decoding stopped.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
}

/// What replaying a log produced.
#[derive(Debug, Default)]
pub struct Replay {
    /// The key space.
    pub entries: HashMap<String, Bytes>,
    /// Records replayed.
    pub records: u64,
    /// Bytes of a torn final record that were dropped (never acknowledged).
    pub torn_tail_bytes: u64,
}

/// Replays an encoded log (magic included); pure, for tests and start-up.
pub fn replay(data: &[u8], path: &Path) -> Result<Replay, LoadError> {
    let corrupt =
        |offset: usize, reason: String| LoadError::Corrupt { path: path.to_path_buf(), offset: offset as u64, reason };
    let mut out = Replay::default();
    if data.is_empty() {
        return Ok(out);
    }
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(corrupt(0, "it does not start with the MCMDLOG1 header (not a metadata persist file?)".into()));
    }
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let rest = &data[pos..];
        if rest.iter().all(|&b| b == 0) || rest.len() < HEADER {
            out.torn_tail_bytes = rest.len() as u64;
            break;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        if rest.len() - HEADER < len {
            out.torn_tail_bytes = rest.len() as u64;
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32fast::hash(payload) != crc {
            return Err(corrupt(pos, format!("checksum mismatch in a {len}-byte record")));
        }
        match Record::decode_payload(payload).map_err(|e| corrupt(pos, e.to_string()))? {
            Record::Put(k, v) => {
                out.entries.insert(k, v);
            }
            Record::Delete(k) => {
                out.entries.remove(&k);
            }
        }
        out.records += 1;
        pos += HEADER + len;
    }
    Ok(out)
}

fn encoded_size(entries: &HashMap<String, Bytes>) -> u64 {
    MAGIC.len() as u64 + entries.iter().map(|(k, v)| (HEADER + 5 + k.len() + v.len()) as u64).sum::<u64>()
}

/// Writes `entries` as a fresh log at `path`, crash-safely (temp file, fsync, rename, fsync dir).
fn write_snapshot(path: &Path, entries: &HashMap<String, Bytes>) -> io::Result<File> {
    let tmp = path.with_extension(match path.extension() {
        Some(e) => format!("{}.tmp", e.to_string_lossy()),
        None => "tmp".to_string(),
    });
    {
        let mut f = io::BufWriter::new(File::create(&tmp)?);
        f.write_all(MAGIC)?;
        let mut buf = Vec::new();
        for (k, v) in entries {
            buf.clear();
            Record::Put(k.clone(), v.clone()).encode(&mut buf);
            f.write_all(&buf)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

/// Loads `path` (creating it when absent) and rewrites it compactly. Returns the key space and
/// the file opened for appending.
pub fn open(path: &Path) -> Result<(Replay, File), LoadError> {
    let io_err = |source| LoadError::Io { path: path.to_path_buf(), source };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(e)),
    };
    let replay = replay(&data, path)?;
    if replay.torn_tail_bytes > 0 {
        tracing::warn!(
            path = %path.display(),
            bytes = replay.torn_tail_bytes,
            "dropping an incomplete final record (a write cut short by a crash; it was never acknowledged)"
        );
    }
    let file = write_snapshot(path, &replay.entries).map_err(io_err)?;
    Ok((replay, file))
}

/// A batch of records for the writer, answered once they are on disk.
pub struct WriteRequest {
    /// Records in order.
    pub records: Vec<Record>,
    /// Receives the outcome.
    pub done: tokio::sync::oneshot::Sender<io::Result<()>>,
}

/// The writer thread's state: the open log and a mirror of what it holds (for compaction).
pub struct LogWriter {
    path: PathBuf,
    file: File,
    mirror: HashMap<String, Bytes>,
    log_bytes: u64,
}

impl LogWriter {
    /// A writer appending to `file` (as returned by [`open`]) whose contents are `entries`.
    pub fn new(path: PathBuf, file: File, entries: HashMap<String, Bytes>) -> Self {
        let log_bytes = encoded_size(&entries);
        LogWriter { path, file, mirror: entries, log_bytes }
    }

    /// Runs until every sender is gone: takes all queued requests, appends them, syncs once,
    /// answers them all.
    pub fn run(mut self, rx: mpsc::Receiver<WriteRequest>) {
        let mut buf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            buf.clear();
            for req in &batch {
                for r in &req.records {
                    r.encode(&mut buf);
                }
            }
            let result = self.file.write_all(&buf).and_then(|()| self.file.sync_data());
            match &result {
                Ok(()) => {
                    self.log_bytes += buf.len() as u64;
                    for r in batch.iter().flat_map(|req| &req.records) {
                        match r {
                            Record::Put(k, v) => self.mirror.insert(k.clone(), v.clone()),
                            Record::Delete(_) => self.mirror.remove(r.key()),
                        };
                    }
                }
                Err(e) => tracing::error!(path = %self.path.display(), error = %e, "persisting metadata failed"),
            }
            for req in batch {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                let _ = req.done.send(r);
            }
            if result.is_ok() && self.log_bytes > 2 * encoded_size(&self.mirror) + COMPACT_SLACK {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        match write_snapshot(&self.path, &self.mirror) {
            Ok(f) => {
                self.file = f;
                self.log_bytes = encoded_size(&self.mirror);
                tracing::info!(path = %self.path.display(), bytes = self.log_bytes, "metadata log compacted");
            }
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "compacting the metadata log failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(records: &[Record]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for r in records {
            r.encode(&mut out);
        }
        out
    }

    fn p() -> &'static Path {
        Path::new("test.log")
    }

    #[test]
    fn replays_puts_and_deletes_in_order() {
        let data = log(&[
            Record::Put("a".into(), Bytes::from_static(b"1")),
            Record::Put("ключ/é".into(), Bytes::from_static(b"")),
            Record::Put("a".into(), Bytes::from_static(b"2")),
            Record::Delete("gone".into()),
            Record::Put("gone".into(), Bytes::from_static(b"x")),
            Record::Delete("gone".into()),
        ]);
        let r = replay(&data, p()).unwrap();
        assert_eq!(r.records, 6);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries["a"], Bytes::from_static(b"2"));
        assert_eq!(r.entries["ключ/é"], Bytes::new());
        assert_eq!(r.torn_tail_bytes, 0);
        assert!(replay(&[], p()).unwrap().entries.is_empty());
    }

    #[test]
    fn torn_tail_is_dropped_but_counted() {
        let full =
            log(&[Record::Put("a".into(), Bytes::from_static(b"1")), Record::Put("b".into(), vec![7; 100].into())]);
        for cut in [full.len() - 1, full.len() - 50, full.len() - 105] {
            let r = replay(&full[..cut], p()).unwrap();
            assert_eq!(r.entries.len(), 1, "cut at {cut}");
            assert!(r.torn_tail_bytes > 0);
        }
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0; 4096]);
        let r = replay(&zeros, p()).unwrap();
        assert_eq!((r.entries.len(), r.torn_tail_bytes), (2, 4096));
    }

    #[test]
    fn corruption_is_an_error_with_the_offset() {
        let mut data = log(&[
            Record::Put("a".into(), Bytes::from_static(b"1")),
            Record::Put("b".into(), Bytes::from_static(b"2")),
        ]);
        data[MAGIC.len() + HEADER + 6] ^= 0xff; // inside the first record's key
        match replay(&data, p()) {
            Err(LoadError::Corrupt { offset, reason, .. }) => {
                assert_eq!(offset, MAGIC.len() as u64);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let err = replay(b"{\"not\":\"a log\"}", p()).unwrap_err();
        assert!(err.to_string().contains("MCMDLOG1"), "{err}");
        assert!(err.to_string().contains("Refusing to start"), "{err}");
        // A record whose checksum is right but whose content is not ours.
        let mut bad = MAGIC.to_vec();
        let payload = [9u8, 0, 0, 0, 0];
        bad.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bad.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bad.extend_from_slice(&payload);
        assert!(matches!(replay(&bad, p()), Err(LoadError::Corrupt { .. })));
    }

    #[test]
    fn open_compacts_and_the_writer_appends_durably() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.log");
        std::fs::write(&path, log(&[Record::Put("a".into(), Bytes::from_static(b"1")), Record::Delete("a".into())]))
            .unwrap();
        let (r, file) = open(&path).unwrap();
        assert!(r.entries.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), MAGIC.to_vec(), "compacted to the header only");
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::spawn(move || LogWriter::new(path.clone(), file, r.entries).run(rx));
        let (done, wait) = tokio::sync::oneshot::channel();
        tx.send(WriteRequest { records: vec![Record::Put("k".into(), Bytes::from_static(b"v"))], done }).unwrap();
        wait.blocking_recv().unwrap().unwrap();
        drop(tx);
        writer.join().unwrap();
        let again = replay(&std::fs::read(dir.path().join("meta.log")).unwrap(), p()).unwrap();
        assert_eq!(again.entries["k"], Bytes::from_static(b"v"));
    }
}
