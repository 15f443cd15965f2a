//! The `MC_*` environment variables upstream's HIP transport reads, parsed by pure functions.

/// Number of HIP streams per device the transport uses when `MC_HIP_NUM_STREAMS` is unset or invalid.
pub const DEFAULT_NUM_STREAMS: usize = 64;

/// Environment variable: number of HIP streams per device for the transport.
pub const NUM_STREAMS_ENV: &str = "MC_HIP_NUM_STREAMS";

/// Environment variable: `0` shares memory through shareable file descriptors (VMM) where the GPUs support
/// it; anything else (and unset) through legacy HIP IPC handles.
pub const USE_HIP_IPC_ENV: &str = "MC_USE_HIP_IPC";

/// How memory allocated with [`AllocOptions::shareable`](mooncake_core::AllocOptions) is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharingMode {
    /// `hipMalloc` memory exported as [`HIP_IPC_HANDLE_KIND`](crate::HIP_IPC_HANDLE_KIND) (upstream's
    /// default).
    #[default]
    Ipc,
    /// `hipMemCreate` memory exported as [`HIP_POSIX_FD_HANDLE_KIND`](crate::HIP_POSIX_FD_HANDLE_KIND) where
    /// the GPU supports virtual memory management (`MC_USE_HIP_IPC=0`); `hipMalloc` and IPC elsewhere.
    PosixFd,
}

impl SharingMode {
    /// The mode `MC_USE_HIP_IPC` selects (warning about a value it cannot read).
    pub fn from_env() -> SharingMode {
        let (mode, warning) = parse_use_hip_ipc(std::env::var(USE_HIP_IPC_ENV).ok().as_deref());
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        mode
    }
}

/// `MC_HIP_NUM_STREAMS`: how many HIP streams per device the transport uses (default
/// [`DEFAULT_NUM_STREAMS`]; a value that is not a positive integer is replaced by the default with a
/// warning).
pub fn num_streams() -> usize {
    let (n, warning) = parse_num_streams(std::env::var(NUM_STREAMS_ENV).ok().as_deref());
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    n
}

/// The value of `MC_HIP_NUM_STREAMS` (`None`: unset), and a warning when it had to be replaced.
pub fn parse_num_streams(value: Option<&str>) -> (usize, Option<String>) {
    let Some(raw) = value else { return (DEFAULT_NUM_STREAMS, None) };
    match raw.trim().parse::<i64>() {
        Ok(n) if n > 0 => (usize::try_from(n).unwrap_or(DEFAULT_NUM_STREAMS), None),
        _ => (
            DEFAULT_NUM_STREAMS,
            Some(format!(
                "{NUM_STREAMS_ENV}={raw:?} is not a positive integer; using the default {DEFAULT_NUM_STREAMS}"
            )),
        ),
    }
}

/// The mode `MC_USE_HIP_IPC` selects (`None`: unset), and a warning for a value it cannot read.
pub fn parse_use_hip_ipc(value: Option<&str>) -> (SharingMode, Option<String>) {
    let Some(raw) = value else { return (SharingMode::Ipc, None) };
    match raw.trim().to_ascii_lowercase().as_str() {
        "0" | "false" | "off" | "no" => (SharingMode::PosixFd, None),
        "" | "1" | "true" | "on" | "yes" => (SharingMode::Ipc, None),
        _ => (SharingMode::Ipc, Some(format!("{USE_HIP_IPC_ENV}={raw:?} is not 0 or 1; using HIP IPC handles"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_streams_defaults_and_warns() {
        assert_eq!(parse_num_streams(None), (64, None));
        assert_eq!(parse_num_streams(Some("8")), (8, None));
        assert_eq!(parse_num_streams(Some(" 128 ")), (128, None));
        for bad in ["0", "-3", "many", "", "1.5", "99999999999999999999"] {
            let (n, w) = parse_num_streams(Some(bad));
            assert_eq!(n, DEFAULT_NUM_STREAMS, "{bad:?}");
            assert!(w.unwrap().contains(NUM_STREAMS_ENV), "{bad:?}");
        }
    }

    #[test]
    fn use_hip_ipc_is_on_unless_zero() {
        assert_eq!(parse_use_hip_ipc(None), (SharingMode::Ipc, None));
        assert_eq!(parse_use_hip_ipc(Some("1")), (SharingMode::Ipc, None));
        assert_eq!(parse_use_hip_ipc(Some("0")), (SharingMode::PosixFd, None));
        assert_eq!(parse_use_hip_ipc(Some("False")), (SharingMode::PosixFd, None));
        let (mode, w) = parse_use_hip_ipc(Some("maybe"));
        assert_eq!(mode, SharingMode::Ipc);
        assert!(w.unwrap().contains(USE_HIP_IPC_ENV));
        assert_eq!(SharingMode::default(), SharingMode::Ipc);
    }

    #[test]
    fn reading_the_environment_never_fails() {
        // Whatever this process's environment holds, the readers return a usable value.
        assert!(num_streams() > 0);
        let _ = SharingMode::from_env();
    }
}
