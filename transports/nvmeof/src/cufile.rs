//! GPUDirect Storage through NVIDIA's cuFile library, loaded at run time (`libcufile.so.0`): CUDA memory is
//! read from and written to the file by DMA, without a host copy. Every call is guarded: a missing library, a
//! driver that does not open, or a failing call make the operation fall back to staging through host memory.
//!
//! cuFile calls block, so they run on a thread of their own, never on the ring's.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use mooncake_core::{Opcode, sync};

use crate::io::{IoPool, Op, OpenFile};

/// `CUfileError_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CuFileError {
    err: i32,
    cu_err: i32,
}

/// `CUfileDescr_t` with an fd handle (`CU_FILE_HANDLE_TYPE_OPAQUE_FD`).
#[repr(C)]
struct CuFileDescr {
    kind: i32,
    fd: i64,
    fs_ops: *const c_void,
}

const HANDLE_TYPE_OPAQUE_FD: i32 = 1;

type DriverOpen = unsafe extern "C" fn() -> CuFileError;
type HandleRegister = unsafe extern "C" fn(*mut *mut c_void, *mut CuFileDescr) -> CuFileError;
type HandleDeregister = unsafe extern "C" fn(*mut c_void);
type Read = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, i64, i64) -> isize;
type Write = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i64, i64) -> isize;

/// The loaded library and its driver.
pub struct CuFile {
    _lib: libloading::Library,
    handle_register: HandleRegister,
    handle_deregister: HandleDeregister,
    read: Read,
    write: Write,
    /// Registered handles by open-file id (kept while the file is open).
    handles: Mutex<HashMap<usize, (usize, Arc<OpenFile>)>>,
}

impl std::fmt::Debug for CuFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CuFile")
    }
}

/// cuFile, when `libcufile.so.0` loads and `cuFileDriverOpen` succeeds (and `MC_NVMEOF_CUFILE` is not `0`);
/// the reason otherwise. Checked once.
pub fn get() -> std::result::Result<&'static CuFile, &'static str> {
    static CELL: OnceLock<std::result::Result<CuFile, String>> = OnceLock::new();
    CELL.get_or_init(load).as_ref().map_err(String::as_str)
}

fn load() -> std::result::Result<CuFile, String> {
    if std::env::var("MC_NVMEOF_CUFILE").is_ok_and(|v| v.trim() == "0") {
        return Err("disabled by MC_NVMEOF_CUFILE=0".into());
    }
    // SAFETY: loading NVIDIA's cuFile library runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new("libcufile.so.0") }
        .map_err(|e| format!("libcufile.so.0 not loadable ({e}); CUDA memory is staged through host memory"))?;
    // SAFETY: the symbol types match cufile.h (cuFileDriverOpen, cuFileHandleRegister, cuFileHandleDeregister,
    // cuFileRead, cuFileWrite); the library stays loaded while the pointers are used (kept in the struct).
    let cf = unsafe {
        let sym = |name: &[u8]| lib.get::<*const c_void>(name).map(|s| *s).map_err(|e| e.to_string());
        let open: DriverOpen = std::mem::transmute(sym(b"cuFileDriverOpen\0")?);
        let r = open();
        if r.err != 0 {
            return Err(format!("cuFileDriverOpen failed (error {}, CUDA error {})", r.err, r.cu_err));
        }
        CuFile {
            handle_register: std::mem::transmute::<*const c_void, HandleRegister>(sym(b"cuFileHandleRegister\0")?),
            handle_deregister: std::mem::transmute::<*const c_void, HandleDeregister>(sym(
                b"cuFileHandleDeregister\0",
            )?),
            read: std::mem::transmute::<*const c_void, Read>(sym(b"cuFileRead\0")?),
            write: std::mem::transmute::<*const c_void, Write>(sym(b"cuFileWrite\0")?),
            handles: Mutex::new(HashMap::new()),
            _lib: lib,
        }
    };
    Ok(cf)
}

impl CuFile {
    fn handle(&self, file: &Arc<OpenFile>) -> std::result::Result<*mut c_void, String> {
        let key = Arc::as_ptr(file) as usize;
        let mut h = sync::lock(&self.handles);
        if let Some((handle, _)) = h.get(&key) {
            return Ok(*handle as *mut c_void);
        }
        let mut descr =
            CuFileDescr { kind: HANDLE_TYPE_OPAQUE_FD, fd: i64::from(file.raw_fd(true)), fs_ops: std::ptr::null() };
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: both pointers point at live locals; the fd stays open while the handle is registered (the map
        // keeps the OpenFile).
        let r = unsafe { (self.handle_register)(&mut handle, &mut descr) };
        if r.err != 0 || handle.is_null() {
            return Err(format!("cuFileHandleRegister failed (error {}, CUDA error {})", r.err, r.cu_err));
        }
        h.insert(key, (handle as usize, file.clone()));
        Ok(handle)
    }

    /// Moves `len` bytes between CUDA memory at `dev_ptr` and the file at `file_off`.
    fn transfer(
        &self,
        file: &Arc<OpenFile>,
        opcode: Opcode,
        dev_ptr: u64,
        len: u64,
        file_off: u64,
    ) -> std::result::Result<(), String> {
        let handle = self.handle(file)?;
        let mut done = 0u64;
        while done < len {
            let (p, n, off) = (dev_ptr + done, (len - done) as usize, (file_off + done) as i64);
            // SAFETY: `dev_ptr..+len` is CUDA memory of the operation's local range (held by the op until it is
            // finished); the handle is registered for this file.
            let r = unsafe {
                match opcode {
                    Opcode::Read => (self.read)(handle, p as *mut c_void, n, off, 0),
                    Opcode::Write => (self.write)(handle, p as *const c_void, n, off, 0),
                }
            };
            if r <= 0 {
                return Err(format!("cuFile {opcode:?} returned {r}"));
            }
            done += r as u64;
        }
        Ok(())
    }

    /// Drops the handles of files nobody else holds.
    fn purge(&self) {
        let mut h = sync::lock(&self.handles);
        h.retain(|_, (handle, f)| {
            let keep = Arc::strong_count(f) > 1;
            if !keep {
                // SAFETY: a handle registered by `handle` and not used any more.
                unsafe { (self.handle_deregister)(*handle as *mut c_void) };
            }
            keep
        });
    }
}

/// The thread that runs cuFile operations; failures go to the I/O threads, which stage through host memory.
pub struct CuWorker {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
}

impl std::fmt::Debug for CuWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CuWorker")
    }
}

impl CuWorker {
    /// Starts the thread.
    pub fn start(cufile: &'static CuFile, fallback: Arc<IoPool>) -> std::io::Result<CuWorker> {
        let (tx, rx) = mpsc::channel::<Op>();
        std::thread::Builder::new().name("mooncake-nvmeof-cufile".into()).spawn(move || {
            let mut count = 0u64;
            while let Ok(mut op) = rx.recv() {
                count += 1;
                let file = match op.file.get() {
                    Ok(f) => f,
                    Err(e) => {
                        if let Some(d) = op.done.take() {
                            d.finish(Err(e.into_error()));
                        }
                        continue;
                    }
                };
                let len = op.local.len();
                match cufile.transfer(&file, op.opcode, op.local.addr(), len, op.file_off) {
                    Ok(()) => {
                        if let Some(d) = op.done.take() {
                            d.finish(Ok(len));
                        }
                    }
                    Err(why) => {
                        tracing::debug!(%why, "nvmeof: cuFile failed; staging through host memory");
                        fallback.push(vec![op]);
                    }
                }
                if count % 256 == 0 {
                    cufile.purge();
                }
            }
        })?;
        Ok(CuWorker { tx: Mutex::new(Some(tx)) })
    }

    /// Queues an operation; gives it back after [`CuWorker::stop`].
    pub fn push(&self, op: Op) -> Option<Op> {
        match sync::lock(&self.tx).as_ref() {
            Some(tx) => tx.send(op).err().map(|e| e.0),
            None => Some(op),
        }
    }

    /// Stops the thread after the queued operations.
    pub fn stop(&self) {
        sync::lock(&self.tx).take();
    }
}

/// Why cuFile is not used here, or `None` when it is loaded.
pub fn unavailable_reason() -> Option<String> {
    get().err().map(str::to_string)
}
