//! The three GPU IPC transports differ only in names: protocol, memory kind, handle kinds and settings.

use mooncake_core::{BackendConfig, MemoryKind};

/// What makes one GPU IPC transport (nvlink, hip, musa) itself.
#[derive(Debug)]
pub struct Flavor {
    /// Protocol string in descriptors (upstream's).
    pub protocol: &'static str,
    /// The memory kind it moves, and the device (by kind) whose handles it publishes.
    pub kind: MemoryKind,
    /// Kind of a 64-byte legacy IPC handle (`cudaIpcMemHandle_t` and its kin).
    pub legacy_handle: &'static str,
    /// Kind of a 64-byte fabric handle, when the vendor has one.
    pub fabric_handle: Option<&'static str>,
    /// Kind of a shareable-fd handle, when the vendor has one.
    pub fd_handle: Option<&'static str>,
    /// Environment variable that, when set to a true value, makes 64-byte handles without a published
    /// kind fabric handles (upstream's `MC_USE_FABRIC` for nvlink).
    pub fabric_env: Option<&'static str>,
    /// Environment variable giving the number of copy workers (streams), and its default.
    pub workers_env: &'static str,
    /// Default number of copy workers.
    pub default_workers: usize,
    /// The driver's name in messages.
    pub vendor: &'static str,
}

/// GPU to GPU within a node (CUDA IPC over NVLink or PCIe), upstream's `nvlink` protocol.
pub static NVLINK: Flavor = Flavor {
    protocol: "nvlink",
    kind: MemoryKind::Cuda,
    legacy_handle: "cuda_ipc",
    fabric_handle: Some("cuda_fabric"),
    fd_handle: Some("cuda_posix_fd"),
    fabric_env: Some("MC_USE_FABRIC"),
    workers_env: "MC_NVLINK_NUM_WORKERS",
    default_workers: 4,
    vendor: "CUDA",
};

/// AMD GPUs within a node (HIP IPC handles or shareable fds), upstream's `hip` protocol.
pub static HIP: Flavor = Flavor {
    protocol: "hip",
    kind: MemoryKind::Rocm,
    legacy_handle: "hip_ipc",
    fabric_handle: None,
    fd_handle: Some("hip_posix_fd"),
    fabric_env: None,
    workers_env: "MC_HIP_NUM_STREAMS",
    default_workers: 64,
    vendor: "ROCm",
};

/// Moore Threads GPUs within a node (MUSA IPC handles), upstream's `musa` protocol.
pub static MUSA: Flavor = Flavor {
    protocol: "musa",
    kind: MemoryKind::Musa,
    legacy_handle: "musa_ipc",
    fabric_handle: None,
    fd_handle: None,
    fabric_env: None,
    workers_env: "MC_MUSA_NUM_WORKERS",
    default_workers: 4,
    vendor: "MUSA",
};

/// Most copy workers one transport starts, whatever the settings ask (each is a thread blocked in a copy).
pub const MAX_WORKERS: usize = 16;

impl Flavor {
    /// Whether `kind` is one of this flavor's handle kinds.
    pub fn knows(&self, kind: &str) -> bool {
        kind == self.legacy_handle || Some(kind) == self.fabric_handle || Some(kind) == self.fd_handle
    }

    /// The kind of a published handle: the published kind when there is one, else guessed from the size as
    /// upstream does (64 bytes: legacy, or fabric when the fabric variable is set; 8 bytes: shareable fd).
    pub fn handle_kind(&self, published: Option<&str>, len: usize) -> Result<&'static str, String> {
        if let Some(kind) = published {
            return [Some(self.legacy_handle), self.fabric_handle, self.fd_handle]
                .into_iter()
                .flatten()
                .find(|k| *k == kind)
                .ok_or_else(|| format!("handle kind {kind:?} is not one the {} transport knows", self.protocol));
        }
        match len {
            crate::section::IPC_HANDLE_BYTES => Ok(match (self.fabric_handle, self.fabric_env.map(env_flag)) {
                (Some(fabric), Some(true)) => fabric,
                _ => self.legacy_handle,
            }),
            crate::section::FD_HANDLE_BYTES if self.fd_handle.is_some() => Ok(self.fd_handle.unwrap_or_default()),
            n => Err(format!("a {n}-byte handle is not one the {} transport knows", self.protocol)),
        }
    }

    /// Copy workers: the `workers` option, else the flavor's variable, else its default; at least 1 and at
    /// most [`MAX_WORKERS`].
    pub fn workers(&self, config: &BackendConfig) -> usize {
        let asked: Option<i64> = config.get("workers", self.workers_env);
        match asked {
            Some(n) if n > 0 => (n as usize).min(MAX_WORKERS),
            Some(n) => {
                tracing::warn!(value = n, variable = self.workers_env, "must be positive; using the default");
                self.default_workers.min(MAX_WORKERS)
            }
            None => self.default_workers.min(MAX_WORKERS),
        }
    }
}

/// A boolean environment variable: set and not `0`/`false`/`no`/`off`/empty.
fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_size_and_by_name() {
        assert_eq!(NVLINK.handle_kind(None, 64), Ok("cuda_ipc"));
        assert_eq!(NVLINK.handle_kind(Some("cuda_fabric"), 64), Ok("cuda_fabric"));
        assert_eq!(HIP.handle_kind(None, 8), Ok("hip_posix_fd"));
        assert!(MUSA.handle_kind(None, 8).unwrap_err().contains("8-byte"));
        assert!(NVLINK.handle_kind(Some("hip_ipc"), 64).unwrap_err().contains("hip_ipc"));
        assert!(HIP.knows("hip_ipc") && !HIP.knows("cuda_ipc"));
    }

    #[test]
    fn worker_counts_are_bounded() {
        let with = |v: &str| BackendConfig { options: [("workers".to_string(), v.to_string())].into() };
        assert_eq!(HIP.workers(&with("8")), 8);
        assert_eq!(HIP.workers(&with("1000")), MAX_WORKERS);
        assert_eq!(NVLINK.workers(&with("0")), 4);
        assert_eq!(NVLINK.workers(&with("-3")), 4);
    }
}
