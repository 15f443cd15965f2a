// File segments end to end: an HTTP metadata server on 127.0.0.1, files on /tmp (ext4: O_DIRECT) and
// /dev/shm (tmpfs: buffered), an engine with the nvmeof transport reading and writing them. Included by
// `file_segments.rs` (synchronous calls on the caller's thread where they can) and `file_segments_queued.rs`
// (every call through the I/O threads), which set `CALLER_THREAD`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mooncake::metadata_http::{BackgroundServer, HttpMetadataServer, ServerConfig};
use mooncake::transport_nvmeof::{
    FileErrorKind, FileSpec, IoMode, file_error, io_mode, register_file_segment, testing, unregister_file_segment,
};
use mooncake::{EngineConfig, Error, HostBuffer, Opcode, TransferEngine};

fn server() -> &'static str {
    static S: OnceLock<(BackgroundServer, String)> = OnceLock::new();
    &S.get_or_init(|| {
        mooncake::link_all();
        let s = HttpMetadataServer::new(ServerConfig::new("127.0.0.1", 0)).unwrap().spawn().unwrap();
        let url = s.url();
        (s, url)
    })
    .1
}

fn engine() -> TransferEngine {
    engine_with(&[])
}

fn engine_with(options: &[(&str, &str)]) -> TransferEngine {
    let mut c = EngineConfig::new("127.0.0.1", server()).with_protocols(["nvmeof"]);
    c.name_with_rpc_port = true;
    c.backend.options.insert("caller_thread".into(), CALLER_THREAD.into());
    for (k, v) in options {
        c.backend.options.insert(k.to_string(), v.to_string());
    }
    TransferEngine::new(c).unwrap()
}

/// A registered local buffer of `len` bytes, its address 4 KiB aligned plus `skew`.
struct Local {
    buf: HostBuffer,
    base: u64,
}

impl Local {
    fn new(e: &TransferEngine, len: u64, skew: u64) -> Local {
        let buf = HostBuffer::zeroed((len + 8192) as usize);
        e.register_owned(buf.owned(), "cpu:0").unwrap();
        let base = buf.addr().div_ceil(4096) * 4096 + skew;
        Local { buf, base }
    }
    fn write(&self, off: u64, data: &[u8]) {
        self.buf.write(self.base - self.buf.addr() + off, data).unwrap();
    }
    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.buf.read(self.base - self.buf.addr() + off, &mut v).unwrap();
        v
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32 * 77).to_le_bytes()[2]).collect()
}

fn tmpdir_in(base: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mc-nvmeof-").tempdir_in(base).unwrap()
}

fn make_file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    p
}

fn publish(name: &str, files: &[(&Path, u64)]) -> String {
    let specs: Vec<FileSpec> = files.iter().map(|(p, l)| FileSpec::new(p.to_string_lossy(), *l)).collect();
    register_file_segment(server(), name, &specs).unwrap()
}

fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn one(e: &TransferEngine, seg: &str, op: Opcode, local: u64, remote: u64, len: u64) -> mooncake::Result<()> {
    e.batch_transfer_sync_each(seg, op, &[local], &[remote], &[len]).and_then(|mut v| v.remove(0))
}

fn kind(r: mooncake::Result<()>) -> FileErrorKind {
    let e = r.expect_err("must fail");
    file_error(&e).unwrap_or_else(|| panic!("not a file error: {e:?}")).kind
}

/// Writes and reads spanning three files at unaligned offsets, checked against the files' bytes.
fn round_trip_across_files(base: &str, options: &[(&str, &str)]) -> IoMode {
    let dir = tmpdir_in(base);
    let lens = [10_000u64, 5_000, 70_000];
    let paths: Vec<PathBuf> =
        lens.iter().enumerate().map(|(i, l)| make_file(dir.path(), &format!("f{i}"), *l)).collect();
    let seg = publish(&unique("span"), &[(&paths[0], lens[0]), (&paths[1], lens[1]), (&paths[2], lens[2])]);
    let e = engine_with(options);
    let total: u64 = lens.iter().sum();
    for skew in [0u64, 3] {
        let local = Local::new(&e, 2 * total, skew);
        let data = pattern(skew as u8 + 1, total as usize);
        local.write(0, &data);
        // One write over everything, then ranges that start, end and span inside files, unaligned.
        one(&e, &seg, Opcode::Write, local.base, 0, total).unwrap();
        let mut file_bytes = Vec::new();
        for p in &paths {
            file_bytes.extend(std::fs::read(p).unwrap());
        }
        assert!(file_bytes == data, "files after a write across them");
        for (off, len) in [(0u64, total), (9_999, 2), (9_000, 7_000), (4_097, 80_903), (15_000, 1), (84_999, 1)] {
            one(&e, &seg, Opcode::Read, local.base + total, off, len).unwrap();
            assert!(local.read(total, len) == data[off as usize..(off + len) as usize], "read {off}+{len}");
        }
        let patch = pattern(9, 13_001);
        local.write(0, &patch);
        one(&e, &seg, Opcode::Write, local.base, 9_990, 13_001).unwrap();
        let mut want_bytes = data.clone();
        want_bytes[9_990..9_990 + 13_001].copy_from_slice(&patch);
        let mut file_bytes = Vec::new();
        for p in &paths {
            file_bytes.extend(std::fs::read(p).unwrap());
        }
        assert!(file_bytes == want_bytes, "only the written range changed");
        e.unregister_memory(local.buf.addr()).unwrap();
    }
    let modes: Vec<Option<IoMode>> = paths.iter().map(|p| io_mode(p)).collect();
    for (p, l) in paths.iter().zip(lens) {
        assert_eq!(std::fs::metadata(p).unwrap().len(), l, "{} keeps its length", p.display());
    }
    assert!(modes.iter().all(|m| *m == modes[0] && m.is_some()), "{modes:?}");
    e.shutdown();
    modes[0].unwrap_or(IoMode::Buffered)
}

#[test]
fn ext4_files_use_o_direct() {
    assert_eq!(round_trip_across_files("/tmp", &[]), IoMode::Direct);
}

#[test]
fn fixed_buffers_move_the_same_bytes() {
    assert_eq!(round_trip_across_files("/tmp", &[("fixed_buffers", "1")]), IoMode::Direct);
}

#[test]
fn buffered_io_when_o_direct_is_off() {
    assert_eq!(round_trip_across_files("/tmp", &[("direct", "0")]), IoMode::Buffered);
}

/// tmpfs refused O_DIRECT before Linux 6.6 (buffered I/O then); newer kernels accept it. Either way it works.
#[test]
fn tmpfs_files_work_either_way() {
    if Path::new("/dev/shm").is_dir() {
        let mode = round_trip_across_files("/dev/shm", &[]);
        println!("tmpfs (/dev/shm) files were opened {mode:?}");
    }
}

#[test]
fn aligned_transfers_go_straight_to_memory_and_batches_keep_order() {
    let dir = tmpdir_in("/tmp");
    let len = 4u64 << 20;
    let p = make_file(dir.path(), "big", len);
    let seg = publish(&unique("big"), &[(&p, len)]);
    let e = engine();
    let local = Local::new(&e, 2 * len, 0);
    let data = pattern(5, len as usize);
    local.write(0, &data);
    // 1024 requests of 4 KiB in one batch, then one 4 MiB read.
    let n = 1024u64;
    let chunk = len / n;
    let locals: Vec<u64> = (0..n).map(|i| local.base + i * chunk).collect();
    let remotes: Vec<u64> = (0..n).map(|i| (n - 1 - i) * chunk).collect();
    e.batch_transfer_sync(&seg, Opcode::Write, &locals, &remotes, &vec![chunk; n as usize]).unwrap();
    one(&e, &seg, Opcode::Read, local.base + len, 0, len).unwrap();
    let back = local.read(len, len);
    for i in 0..n as usize {
        let r = (n as usize - 1 - i) * chunk as usize;
        assert!(back[r..r + chunk as usize] == data[i * chunk as usize..(i + 1) * chunk as usize], "chunk {i}");
    }
    e.shutdown();
}

#[test]
fn local_path_map_is_used_and_file_path_is_the_fallback() {
    let dir = tmpdir_in("/tmp");
    let p = make_file(dir.path(), "mapped", 8192);
    std::fs::write(&p, pattern(7, 8192)).unwrap();
    let e = engine();
    let me = e.local_segment_name().to_string();
    // file_path does not exist here; the map names this engine.
    let mapped = FileSpec::new("/nonexistent/elsewhere.bin", 8192).with_local_path(&me, p.to_string_lossy());
    let seg = register_file_segment(server(), &unique("mapped"), &[mapped]).unwrap();
    let local = Local::new(&e, 8192, 0);
    one(&e, &seg, Opcode::Read, local.base, 0, 8192).unwrap();
    assert!(local.read(0, 8192) == pattern(7, 8192));
    // The map names other hosts only: file_path is used.
    let fallback = FileSpec::new(p.to_string_lossy(), 8192).with_local_path("some-other-host", "/nope");
    let seg2 = register_file_segment(server(), &unique("fallback"), &[fallback]).unwrap();
    one(&e, &seg2, Opcode::Read, local.base, 100, 100).unwrap();
    assert!(local.read(0, 100) == pattern(7, 8192)[100..200]);
    assert!(unregister_file_segment(server(), &seg2).unwrap());
    e.shutdown();
}

#[test]
fn missing_file_is_a_typed_error_and_other_segments_keep_working() {
    let dir = tmpdir_in("/tmp");
    let good = make_file(dir.path(), "good", 4096);
    let gone = dir.path().join("never-created");
    let bad_seg = publish(&unique("missing"), &[(&good, 4096), (&gone, 4096)]);
    let good_seg = publish(&unique("good"), &[(&good, 4096)]);
    let e = engine();
    let local = Local::new(&e, 8192, 0);
    let err = one(&e, &bad_seg, Opcode::Read, local.base, 0, 8192).unwrap_err();
    let fe = file_error(&err).expect("file error");
    assert_eq!(fe.kind, FileErrorKind::NotFound);
    assert_eq!(fe.path, gone);
    assert!(err.to_string().contains("never-created"), "{err}");
    // The first file of the same segment and another segment still work.
    one(&e, &bad_seg, Opcode::Write, local.base, 0, 4096).unwrap();
    one(&e, &good_seg, Opcode::Read, local.base, 0, 4096).unwrap();
    e.shutdown();
}

#[test]
fn request_past_the_end_is_rejected_before_any_io() {
    let dir = tmpdir_in("/tmp");
    let p = make_file(dir.path(), "f", 4096);
    std::fs::write(&p, vec![1u8; 4096]).unwrap();
    let seg = publish(&unique("end"), &[(&p, 4096)]);
    let e = engine();
    let local = Local::new(&e, 8192, 0);
    for (off, len) in [(4000u64, 200u64), (4096, 1), (u64::MAX - 2, 8)] {
        let r = one(&e, &seg, Opcode::Write, local.base, off, len);
        assert!(
            matches!(r, Err(Error::AddressNotRegistered { .. }) | Err(Error::InvalidArgument(_))),
            "{off}+{len}: {r:?}"
        );
    }
    assert_eq!(std::fs::read(&p).unwrap(), vec![1u8; 4096], "nothing written");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
    e.shutdown();
}

#[test]
fn short_file_and_truncation_underneath_are_short_reads() {
    let dir = tmpdir_in("/tmp");
    let p = make_file(dir.path(), "short", 6000);
    let seg = publish(&unique("short"), &[(&p, 16384)]);
    let e = engine();
    let local = Local::new(&e, 16384, 0);
    one(&e, &seg, Opcode::Read, local.base, 0, 4096).unwrap();
    one(&e, &seg, Opcode::Read, local.base, 5000, 1000).unwrap();
    assert_eq!(kind(one(&e, &seg, Opcode::Read, local.base, 0, 16384)), FileErrorKind::ShortFile);
    assert_eq!(kind(one(&e, &seg, Opcode::Read, local.base, 5000, 1001)), FileErrorKind::ShortFile);
    assert_eq!(kind(one(&e, &seg, Opcode::Read, local.base, 8192, 4096)), FileErrorKind::ShortFile);
    // Truncated while open.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100).unwrap();
    assert_eq!(kind(one(&e, &seg, Opcode::Read, local.base, 0, 4096)), FileErrorKind::ShortFile);
    one(&e, &seg, Opcode::Read, local.base, 0, 100).unwrap();
    e.shutdown();
}

#[test]
fn file_removed_underneath_is_not_found() {
    let dir = tmpdir_in("/tmp");
    let p = make_file(dir.path(), "victim", 8192);
    let seg = publish(&unique("removed"), &[(&p, 8192)]);
    let e = engine();
    let local = Local::new(&e, 8192, 0);
    one(&e, &seg, Opcode::Write, local.base, 0, 8192).unwrap();
    std::fs::remove_file(&p).unwrap();
    assert_eq!(kind(one(&e, &seg, Opcode::Write, local.base, 0, 4096)), FileErrorKind::NotFound);
    assert_eq!(kind(one(&e, &seg, Opcode::Read, local.base, 0, 4096)), FileErrorKind::NotFound);
    // A new file at the path is found again.
    make_file(dir.path(), "victim", 8192);
    one(&e, &seg, Opcode::Read, local.base, 0, 8192).unwrap();
    e.shutdown();
}

#[test]
fn device_errors_fail_only_their_file() {
    let dir = tmpdir_in("/tmp");
    let a = make_file(dir.path(), "a", 8192);
    let b = make_file(dir.path(), "b", 8192);
    let seg = publish(&unique("eio"), &[(&a, 8192), (&b, 8192)]);
    let e = engine();
    let local = Local::new(&e, 16384, 0);
    testing::inject_errno(&b, libc::EIO);
    let err = one(&e, &seg, Opcode::Read, local.base, 4096, 8192).unwrap_err();
    let fe = file_error(&err).unwrap();
    assert_eq!((fe.kind, fe.errno, fe.path.clone()), (FileErrorKind::Device, Some(libc::EIO), b.clone()));
    one(&e, &seg, Opcode::Read, local.base, 0, 8192).unwrap();
    testing::clear_errno(&b);
    one(&e, &seg, Opcode::Read, local.base, 0, 16384).unwrap();
    e.shutdown();
}

/// Runs `f` on a thread whose file-system identity is `nobody` (root's permission overrides dropped), so that
/// the engine it starts (and the engine's threads, which inherit it) meets file permissions as a user would.
fn as_nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // SAFETY: setfsuid/setfsgid change only the calling thread's file-system ids; no memory is passed.
            unsafe {
                libc::syscall(libc::SYS_setfsgid, 65534);
                libc::syscall(libc::SYS_setfsuid, 65534);
            }
        }
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn permission_denied_and_read_only_files() {
    let dir = tmpdir_in("/tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = make_file(dir.path(), "secret", 4096);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ro = make_file(dir.path(), "readonly", 4096);
    std::fs::write(&ro, pattern(3, 4096)).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let (s1, s2) = (publish(&unique("secret"), &[(&secret, 4096)]), publish(&unique("ro"), &[(&ro, 4096)]));
    server();
    let (secret2, ro2) = (secret.clone(), ro.clone());
    as_nobody(move || {
        let e = engine();
        let local = Local::new(&e, 4096, 0);
        let err = one(&e, &s1, Opcode::Read, local.base, 0, 4096).unwrap_err();
        let fe = file_error(&err).unwrap();
        assert_eq!((fe.kind, &fe.path), (FileErrorKind::PermissionDenied, &secret2), "{err}");
        one(&e, &s2, Opcode::Read, local.base, 0, 4096).unwrap();
        assert!(local.read(0, 4096) == pattern(3, 4096));
        let err = one(&e, &s2, Opcode::Write, local.base, 0, 4096).unwrap_err();
        let fe = file_error(&err).unwrap();
        assert_eq!((fe.kind, &fe.path), (FileErrorKind::ReadOnly, &ro2), "{err}");
        e.shutdown();
    });
    assert!(std::fs::read(&ro).unwrap() == pattern(3, 4096), "read-only file unchanged");
}

#[test]
fn unaligned_everything_matches_a_model() {
    let dir = tmpdir_in("/tmp");
    let lens = [12_289u64, 4_096, 1, 65_537];
    let paths: Vec<PathBuf> =
        lens.iter().enumerate().map(|(i, l)| make_file(dir.path(), &format!("u{i}"), *l)).collect();
    let files: Vec<(&Path, u64)> = paths.iter().map(PathBuf::as_path).zip(lens).collect();
    let seg = publish(&unique("model"), &files);
    let total: u64 = lens.iter().sum();
    let e = engine();
    let local = Local::new(&e, 2 * total + 64, 1);
    let mut model = vec![0u8; total as usize];
    let mut x = 0x1234_5678u64;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for round in 0..200 {
        let off = next(total);
        let len = 1 + next(total - off);
        let loc = next(32);
        if round % 2 == 0 {
            let data = pattern(round as u8, len as usize);
            local.write(loc, &data);
            one(&e, &seg, Opcode::Write, local.base + loc, off, len).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        } else {
            one(&e, &seg, Opcode::Read, local.base + loc, off, len).unwrap();
            assert!(local.read(loc, len) == model[off as usize..(off + len) as usize], "round {round}: {off}+{len}");
        }
    }
    let mut file_bytes = Vec::new();
    for p in &paths {
        file_bytes.extend(std::fs::read(p).unwrap());
    }
    assert!(file_bytes == model);
    e.shutdown();
}

/// Small unaligned writes into disjoint bytes of the same blocks, all in one batch: none is lost (partial
/// blocks are written through the page cache, never read-modify-written with O_DIRECT).
#[test]
fn unaligned_writes_sharing_blocks_in_one_batch() {
    let dir = tmpdir_in("/tmp");
    let p = make_file(dir.path(), "shared", 16384);
    let seg = publish(&unique("shared"), &[(&p, 16384)]);
    let e = engine();
    let local = Local::new(&e, 16384, 0);
    let data = pattern(11, 16384);
    local.write(0, &data);
    let n = 512u64;
    let (mut locals, mut remotes, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        // 7 bytes every 32: 128 writes per 4 KiB block.
        locals.push(local.base + i * 32);
        remotes.push(i * 32);
        lens.push(7);
    }
    e.batch_transfer_sync(&seg, Opcode::Write, &locals, &remotes, &lens).unwrap();
    let file = std::fs::read(&p).unwrap();
    for i in 0..n as usize {
        assert!(file[i * 32..i * 32 + 7] == data[i * 32..i * 32 + 7], "write {i} lost");
        assert!(file[i * 32 + 7..i * 32 + 32].iter().all(|b| *b == 0), "bytes around write {i} changed");
    }
    e.shutdown();
}
