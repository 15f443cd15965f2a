//! [`CxlConfig`]: where the region is and how large, from the environment (upstream's variables too) or set
//! by hand; and finding the size of a DAX device from sysfs.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::CxlError;

/// Path of the device or file (ours first, then upstream's name).
pub const ENV_PATH: [&str; 2] = ["MC_CXL_DEV_PATH", "CXL_DEV_PATH"];
/// Size of the region in bytes (ours first, then upstream's name).
pub const ENV_SIZE: [&str; 2] = ["MC_CXL_DEV_SIZE", "CXL_DEV_SIZE"];
/// Allocation granularity in bytes (a power of two, at least the page size).
pub const ENV_GRANULARITY: &str = "MC_CXL_GRANULARITY";
/// `1`: initialize a region whose first bytes are not a mooncake-rs header (garbage or another program's data).
pub const ENV_FORMAT: &str = "MC_CXL_FORMAT";
/// `1`: write CPU cache lines back after writing region memory and invalidate them before reading it
/// (non-coherent CXL 2.0 memory pooling).
pub const ENV_FLUSH: &str = "MC_CXL_FLUSH";
/// Slots of the owner, publication and allocation tables (used when the region is initialized, and checked
/// against its header otherwise).
pub const ENV_TABLES: [&str; 3] = ["MC_CXL_MAX_OWNERS", "MC_CXL_MAX_BUFFERS", "MC_CXL_MAX_ALLOCATIONS"];
/// How long taking the region lock may wait, in milliseconds.
pub const ENV_LOCK_TIMEOUT_MS: &str = "MC_CXL_LOCK_TIMEOUT_MS";
/// After how many milliseconds without a heartbeat a process of another host counts as dead (its entries are
/// reclaimed and its hold on the lock is taken over). 0 turns reclaiming other hosts' entries off.
pub const ENV_OWNER_TIMEOUT_MS: &str = "MC_CXL_OWNER_TIMEOUT_MS";

/// Default slots of the owner table (engines and processes using the region at once).
pub const DEFAULT_MAX_OWNERS: u32 = 256;
/// Default slots of the publication table (buffers registered for the `cxl` transport at once, all processes).
pub const DEFAULT_MAX_BUFFERS: u32 = 4096;
/// Default slots of the allocation table (live allocations, all processes).
pub const DEFAULT_MAX_ALLOCATIONS: u32 = 4096;

/// How to open the region. Fields left `None` are taken from the region's header when it exists (so a
/// process only states what it insists on), and from the defaults when it formats a fresh region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CxlConfig {
    /// The DAX device (`/dev/dax0.0`) or file.
    pub path: PathBuf,
    /// Region size in bytes: for a DAX device its sysfs size, for a file its length, when `None`. A stated size
    /// must equal the header's; a derived one must be at least the header's.
    pub size: Option<u64>,
    /// Allocation granularity (default: 2 MiB on a DAX device, 4 KiB on a file).
    pub granularity: Option<u64>,
    /// Owner table slots (default [`DEFAULT_MAX_OWNERS`]).
    pub max_owners: Option<u32>,
    /// Publication table slots (default [`DEFAULT_MAX_BUFFERS`]).
    pub max_buffers: Option<u32>,
    /// Allocation table slots (default [`DEFAULT_MAX_ALLOCATIONS`]).
    pub max_allocations: Option<u32>,
    /// Initialize a region that does not start with our header instead of refusing it.
    pub format_foreign: bool,
    /// Flush CPU caches around region accesses (non-coherent memory).
    pub flush: bool,
    /// How long taking the region lock may wait.
    pub lock_timeout: Duration,
    /// Silence after which a process of another host counts as dead (`None`: never).
    pub owner_timeout: Option<Duration>,
}

impl CxlConfig {
    /// A config for `path` with every other setting derived or defaulted.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CxlConfig {
            path: path.into(),
            size: None,
            granularity: None,
            max_owners: None,
            max_buffers: None,
            max_allocations: None,
            format_foreign: false,
            flush: false,
            lock_timeout: Duration::from_secs(10),
            owner_timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Sets the size in bytes.
    pub fn with_size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }

    /// Reads `MC_CXL_DEV_PATH` / `CXL_DEV_PATH`, `MC_CXL_DEV_SIZE` / `CXL_DEV_SIZE`, `MC_CXL_GRANULARITY`,
    /// `MC_CXL_MAX_OWNERS`, `MC_CXL_MAX_BUFFERS`, `MC_CXL_MAX_ALLOCATIONS`, `MC_CXL_FORMAT`, `MC_CXL_FLUSH`,
    /// `MC_CXL_LOCK_TIMEOUT_MS` and `MC_CXL_OWNER_TIMEOUT_MS`.
    pub fn from_env() -> Result<Self, CxlError> {
        let path =
            first_env(&ENV_PATH).map(|(_, v)| v).filter(|v| !v.trim().is_empty()).ok_or(CxlError::NotConfigured)?;
        let mut config = CxlConfig::new(path.trim());
        if let Some((name, value)) = first_env(&ENV_SIZE).filter(|(_, v)| !v.trim().is_empty()) {
            config.size = Some(parse_bytes(name, &value)?);
        }
        if let Ok(value) = std::env::var(ENV_GRANULARITY) {
            if !value.trim().is_empty() {
                config.granularity = Some(parse_bytes(ENV_GRANULARITY, &value)?);
            }
        }
        let mut tables = [None; 3];
        for (slot, name) in tables.iter_mut().zip(ENV_TABLES) {
            if let Ok(value) = std::env::var(name) {
                let n = value.trim().parse::<u32>().ok().filter(|n| *n > 0);
                *slot = Some(n.ok_or_else(|| bad(name, &value, "expected a number of slots, at least 1".into()))?);
            }
        }
        [config.max_owners, config.max_buffers, config.max_allocations] = tables;
        config.format_foreign = env_flag(ENV_FORMAT)?;
        config.flush = env_flag(ENV_FLUSH)?;
        if let Ok(value) = std::env::var(ENV_LOCK_TIMEOUT_MS) {
            let ms = value.trim().parse::<u64>().map_err(|e| bad(ENV_LOCK_TIMEOUT_MS, &value, e.to_string()))?;
            config.lock_timeout = Duration::from_millis(ms);
        }
        if let Ok(value) = std::env::var(ENV_OWNER_TIMEOUT_MS) {
            let ms = value.trim().parse::<u64>().map_err(|e| bad(ENV_OWNER_TIMEOUT_MS, &value, e.to_string()))?;
            config.owner_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        Ok(config)
    }
}

fn first_env(names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|n| std::env::var(n).ok().map(|v| (*n, v)))
}

fn env_flag(name: &str) -> Result<bool, CxlError> {
    match std::env::var(name).as_deref().map(str::trim) {
        Err(_) | Ok("") | Ok("0") | Ok("false") => Ok(false),
        Ok("1") | Ok("true") => Ok(true),
        Ok(other) => Err(bad(name, other, "expected 0 or 1".into())),
    }
}

fn bad(name: &str, value: &str, reason: String) -> CxlError {
    CxlError::BadValue { name: name.to_string(), value: value.to_string(), reason }
}

/// Parses a byte count: decimal (as upstream's `CXL_DEV_SIZE`), optionally with a binary suffix `K`, `M`, `G`,
/// `T` (`KiB`... and `KB`... are read the same way).
pub fn parse_bytes(name: &str, value: &str) -> Result<u64, CxlError> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad(name, value, "not a number of bytes".into()))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad(name, value, "unknown unit (use K, M, G or T)".into())),
    };
    n.checked_mul(1u64 << shift).filter(|b| *b > 0).ok_or_else(|| bad(name, value, "zero or too large".into()))
}

/// What the configured path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backing {
    /// A regular file of this length.
    File { len: u64 },
    /// A DAX character device (`daxX.Y`): its size and alignment from sysfs, when readable.
    Dax { size: Option<u64>, align: Option<u64>, sysfs: PathBuf },
}

/// Looks at `path` without opening it: a regular file or a DAX character device; anything else is not
/// mappable. A character device that is not DAX can still be used when a size is configured (mmap decides).
pub(crate) fn inspect(path: &Path, size_given: bool) -> Result<Backing, CxlError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CxlError::PathMissing { path: path.to_path_buf() });
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(CxlError::PermissionDenied { path: path.to_path_buf(), reason: e.to_string() });
        }
        Err(e) => return Err(CxlError::io(path, "stat", e)),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(CxlError::NotMappable { path: path.to_path_buf(), reason: "it is a directory".into() });
    }
    if ft.is_file() {
        return Ok(Backing::File { len: meta.len() });
    }
    if ft.is_char_device() {
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let sysfs = PathBuf::from(format!("/sys/dev/char/{major}:{minor}"));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let size = read_u64(&sysfs.join("size")).or_else(|| {
            name.starts_with("dax").then(|| read_u64(&Path::new("/sys/bus/dax/devices").join(name).join("size")))?
        });
        let align = read_u64(&sysfs.join("align"))
            .or_else(|| read_u64(&Path::new("/sys/bus/dax/devices").join(name).join("align")));
        if size.is_some() || size_given {
            return Ok(Backing::Dax { size, align, sysfs });
        }
        return Err(CxlError::NotMappable {
            path: path.to_path_buf(),
            reason: format!(
                "character device {major}:{minor} is not a DAX device ({} has no size); set MC_CXL_DEV_SIZE if it \
                 can be mapped anyway",
                sysfs.display()
            ),
        });
    }
    let what = if ft.is_block_device() {
        "a block device (use its DAX character device, or a file on a DAX file system)"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file or DAX device"
    };
    Err(CxlError::NotMappable { path: path.to_path_buf(), reason: format!("it is {what}") })
}

fn read_u64(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("X", "4096").unwrap(), 4096);
        assert_eq!(parse_bytes("X", " 2G ").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("X", "64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("X", "1k").unwrap(), 1024);
        for bad in ["", "abc", "0", "12Q", "-1", "99999999999999999999", "20000000T"] {
            assert!(matches!(parse_bytes("X", bad), Err(CxlError::BadValue { .. })), "{bad:?}");
        }
    }

    #[test]
    fn inspect_sorts_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(inspect(dir.path(), true), Err(CxlError::NotMappable { .. })));
        assert!(matches!(inspect(&dir.path().join("nope"), true), Err(CxlError::PathMissing { .. })));
        let f = dir.path().join("f");
        std::fs::write(&f, [0u8; 10]).unwrap();
        assert_eq!(inspect(&f, false).unwrap(), Backing::File { len: 10 });
        // /dev/null is a character device without a DAX size.
        assert!(matches!(inspect(Path::new("/dev/null"), false), Err(CxlError::NotMappable { .. })));
        assert!(matches!(inspect(Path::new("/dev/null"), true), Ok(Backing::Dax { size: None, .. })));
    }
}
