//! The GPU IPC transports' part of the segment descriptor (docs/wire-formats.md section 2).
//!
//! Per buffer, upstream publishes `shm_name`: the exported handle as upper-case hex. A legacy IPC handle
//! (`cudaIpcMemHandle_t`, `hipIpcMemHandle_t`, `musaIpcMemHandle_t`) and a CUDA fabric handle are 64 bytes; a
//! shareable file descriptor (upstream's HIP "fabric" mode) is 8 bytes, `int fd` then `int pid` of the exporting
//! process, which the importer fetches with `pidfd_getfd`. We add three fields upstream ignores: `ipc_kind` (the
//! handle kind, so 64-byte legacy and fabric handles cannot be confused), `ipc_offset` (where the buffer starts
//! inside the exported allocation: a handle always names a whole allocation, and a registered buffer may start
//! inside one) and `ipc_alloc_length` (the exported allocation's length, which a fd import maps). At the top
//! level we add `ipc_host_id` (the kernel's boot id), so that peers of ours on other hosts are not tried.

use mooncake_core::{FieldError, Fields, Section};

/// Per-buffer field: the exported handle, upper-case hex (upstream's name).
pub const FIELD_HANDLE: &str = "shm_name";
/// Per-buffer field: the handle kind (ours).
pub const FIELD_KIND: &str = "ipc_kind";
/// Per-buffer field: offset of the buffer inside the exported allocation (ours; 0 when absent).
pub const FIELD_OFFSET: &str = "ipc_offset";
/// Per-buffer field: length of the exported allocation (ours).
pub const FIELD_ALLOC_LENGTH: &str = "ipc_alloc_length";
/// Top-level field: the exporting host's boot id (ours).
pub const FIELD_HOST_ID: &str = "ipc_host_id";
/// Top-level field: the exporting process's pid (ours): a peer in the same process copies directly, as a process
/// cannot open its own legacy IPC handles.
pub const FIELD_PID: &str = "ipc_pid";

/// Bytes of a legacy IPC handle or a CUDA fabric handle.
pub const IPC_HANDLE_BYTES: usize = 64;
/// Bytes of a shareable-fd handle: `i32 fd`, `i32 pid`, little-endian.
pub const FD_HANDLE_BYTES: usize = 8;

/// What a peer needs to map one published buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcBuffer {
    /// The handle bytes (decoded from `shm_name`).
    pub handle: Vec<u8>,
    /// The handle kind, when the exporter said (our peers do; upstream's do not).
    pub kind: Option<String>,
    /// Where the buffer starts inside the exported allocation.
    pub offset: u64,
    /// The exported allocation's length, when published.
    pub alloc_length: Option<u64>,
}

impl Section for IpcBuffer {
    fn read(fields: &Fields) -> Result<Option<Self>, FieldError> {
        let Some(hex) = fields.get_as::<String>(FIELD_HANDLE)? else { return Ok(None) };
        if hex.is_empty() {
            return Ok(None);
        }
        let handle = decode_hex(&hex).map_err(|why| FieldError::new(FIELD_HANDLE, why))?;
        Ok(Some(IpcBuffer {
            handle,
            kind: fields.get_as(FIELD_KIND)?,
            offset: fields.get_as(FIELD_OFFSET)?.unwrap_or(0),
            alloc_length: fields.get_as(FIELD_ALLOC_LENGTH)?,
        }))
    }

    fn write(&self, fields: &mut Fields) {
        fields.insert(FIELD_HANDLE, encode_hex(&self.handle));
        if let Some(kind) = &self.kind {
            fields.insert(FIELD_KIND, kind.as_str());
        }
        if self.offset != 0 {
            fields.insert(FIELD_OFFSET, self.offset);
        }
        if let Some(len) = self.alloc_length {
            fields.insert(FIELD_ALLOC_LENGTH, len);
        }
    }
}

/// The top-level fields: which host and process the segment's handles belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcHost {
    /// The kernel boot id of the exporting host.
    pub host_id: String,
    /// The exporting process, when published.
    pub pid: Option<u32>,
}

impl Section for IpcHost {
    fn read(fields: &Fields) -> Result<Option<Self>, FieldError> {
        let Some(host_id) = fields.get_as::<String>(FIELD_HOST_ID)? else { return Ok(None) };
        Ok(Some(IpcHost { host_id, pid: fields.get_as(FIELD_PID)? }))
    }

    fn write(&self, fields: &mut Fields) {
        fields.insert(FIELD_HOST_ID, self.host_id.as_str());
        if let Some(pid) = self.pid {
            fields.insert(FIELD_PID, pid);
        }
    }
}

/// The 8 bytes of a shareable-fd handle: the exporter's descriptor number and pid.
pub fn encode_fd_handle(fd: i32, pid: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(FD_HANDLE_BYTES);
    out.extend_from_slice(&fd.to_le_bytes());
    out.extend_from_slice(&pid.to_le_bytes());
    out
}

/// `(fd, pid)` of an 8-byte shareable-fd handle.
pub fn decode_fd_handle(bytes: &[u8]) -> Option<(i32, i32)> {
    let (fd, pid) = (bytes.get(..4)?, bytes.get(4..FD_HANDLE_BYTES)?);
    (bytes.len() == FD_HANDLE_BYTES).then(|| {
        (i32::from_le_bytes(fd.try_into().unwrap_or_default()), i32::from_le_bytes(pid.try_into().unwrap_or_default()))
    })
}

/// Upper-case hex, two digits per byte (upstream's serialization).
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Decodes hex of either case; an odd length or a non-hex digit is an error naming it.
pub fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err(format!("hex of odd length {}", s.len()));
    }
    s.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                _ => Err(format!("not a hex digit at position {}", 2 * i)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use mooncake_core::SegmentDescriptor;

    use super::*;

    /// A buffer as upstream's nvlink transport publishes it: location, absolute address, length and the
    /// 64-byte `cudaIpcMemHandle_t` in upper-case hex, nothing else.
    const UPSTREAM: &str = concat!(
        r#"{"name":"node-a","protocol":"nvlink","timestamp":"2026-12-07 10:00:00.000000","buffers":[{"name":"cuda:0","#,
        r#""addr":140190529470464,"length":1048576,"shm_name":""#,
        "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF",
        "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF",
        r#""}]}"#
    );

    #[test]
    fn reads_upstream_buffers() {
        let d = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        let b = d.buffers[0].section::<IpcBuffer>().unwrap().unwrap();
        assert_eq!(b.handle.len(), IPC_HANDLE_BYTES);
        assert_eq!(&b.handle[..4], &[0x00, 0x11, 0x22, 0x33]);
        assert_eq!((b.kind, b.offset, b.alloc_length), (None, 0, None));
        assert_eq!(d.section::<IpcHost>().unwrap(), None);
    }

    #[test]
    fn round_trips_through_json() {
        let mut d = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        let ours = IpcBuffer {
            handle: encode_fd_handle(17, 4242),
            kind: Some("hip_posix_fd".into()),
            offset: 4096,
            alloc_length: Some(2 << 20),
        };
        d.buffers[0].set_section(&ours);
        d.set_section(&IpcHost { host_id: "0f3c-boot".into(), pid: Some(77) });
        let json = d.to_json();
        assert!(json.contains(r#""shm_name":"1100000092100000""#), "{json}");
        let back = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
        assert_eq!(back.buffers[0].section::<IpcBuffer>().unwrap().unwrap(), ours);
        assert_eq!(back.section::<IpcHost>().unwrap().unwrap(), IpcHost { host_id: "0f3c-boot".into(), pid: Some(77) });
        assert_eq!(decode_fd_handle(&ours.handle), Some((17, 4242)));
    }

    #[test]
    fn bad_handles_are_field_errors() {
        for bad in ["ABC", "ZZ", "0g"] {
            let json = UPSTREAM.replace(
                "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF",
                bad,
            );
            let d = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
            let e = d.buffers[0].section::<IpcBuffer>().unwrap_err();
            assert_eq!(e.field(), FIELD_HANDLE, "{bad}: {e}");
        }
        assert_eq!(decode_fd_handle(&[1, 2, 3]), None);
        assert_eq!(decode_fd_handle(&[0; 9]), None);
    }

    #[test]
    fn hex_matches_upstream_case() {
        assert_eq!(encode_hex(&[0x00, 0xab, 0x7f, 0xff]), "00AB7FFF");
        assert_eq!(decode_hex("00ab7FfF").unwrap(), vec![0x00, 0xab, 0x7f, 0xff]);
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
    }
}
