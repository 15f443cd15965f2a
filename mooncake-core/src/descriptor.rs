//! The segment descriptor JSON of docs/wire-formats.md section 2, shared with upstream Mooncake.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A process's exported memory as published in metadata (`ram/<name>`) or sent in a handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SegmentDescriptor {
    /// Segment name (`host:port` in P2P mode).
    pub name: String,
    /// Protocol peers must use to reach this segment (`tcp`, `rdma`, ...).
    pub protocol: String,
    /// TCP data port, when the tcp transport is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_data_port: Option<u16>,
    /// TCP framing version the server speaks (1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_proto_version: Option<u32>,
    /// Publication time, `YYYY-mm-dd HH:MM:SS.ffffff` in upstream; informational.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timestamp: String,
    /// Registered buffers.
    #[serde(default)]
    pub buffers: Vec<BufferDesc>,
    /// RDMA-like devices (`name`, `lid`, `gid`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Value>,
    /// Every other protocol-specific field (priority_matrix, cxl_name, efa_addr, our `protocols`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One registered buffer of a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BufferDesc {
    /// Location name, e.g. `cpu:0`, `cuda:1`.
    #[serde(default)]
    pub name: String,
    /// Absolute virtual address in the owner's process.
    #[serde(default)]
    pub addr: u64,
    /// Length in bytes.
    #[serde(default)]
    pub length: u64,
    /// RDMA remote keys, one per device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rkey: Vec<u32>,
    /// RDMA local keys, one per device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lkey: Vec<u32>,
    /// Serialized IPC handle for GPU-IPC protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_name: Option<String>,
    /// Protocol-specific extras (cxl `offset`, nvmeof `file_path`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Largest accepted descriptor JSON (a segment with a few thousand buffers fits comfortably).
pub const MAX_DESCRIPTOR_BYTES: usize = 16 << 20;

/// Protocols whose buffers are addressed by absolute virtual address.
fn uses_addresses(protocol: &str) -> bool {
    !matches!(protocol, "cxl" | "nvmeof")
}

impl SegmentDescriptor {
    /// Parses and validates a descriptor (docs/wire-formats.md section 2 rules).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(Error::MalformedJson(format!(
                "segment descriptor of {} bytes exceeds the {} byte limit",
                bytes.len(),
                MAX_DESCRIPTOR_BYTES
            )));
        }
        let desc: SegmentDescriptor =
            serde_json::from_slice(bytes).map_err(|e| Error::MalformedJson(format!("segment descriptor: {e}")))?;
        desc.validate()?;
        Ok(desc)
    }

    /// Serializes to the JSON upstream expects.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the rules of docs/wire-formats.md section 2.
    pub fn validate(&self) -> Result<()> {
        if self.protocol.is_empty() {
            return Err(Error::MalformedJson("segment descriptor has an empty protocol".into()));
        }
        if uses_addresses(&self.protocol) {
            for (i, b) in self.buffers.iter().enumerate() {
                if b.name.is_empty() || b.addr == 0 || b.length == 0 {
                    return Err(Error::MalformedJson(format!(
                        "segment {:?}: buffer {i} has an empty name, zero address or zero length",
                        self.name
                    )));
                }
                if b.addr.checked_add(b.length).is_none() {
                    return Err(Error::MalformedJson(format!(
                        "segment {:?}: buffer {i} wraps around the address space",
                        self.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// TCP framing version (1 when absent, as upstream).
    pub fn tcp_version(&self) -> u32 {
        self.tcp_proto_version.unwrap_or(1)
    }

    /// Every protocol this segment can be reached with, primary first.
    ///
    /// Upstream publishes one `protocol`; we may add `"protocols": [...]` (ignored by upstream).
    pub fn protocols(&self) -> Vec<String> {
        let mut out = vec![self.protocol.clone()];
        if let Some(Value::Array(list)) = self.extra.get("protocols") {
            for p in list.iter().filter_map(Value::as_str) {
                if !out.iter().any(|o| o == p) {
                    out.push(p.to_string());
                }
            }
        }
        out
    }

    /// Position of `protocol` in [`SegmentDescriptor::protocols`] (0 = primary), without allocating.
    pub fn protocol_rank(&self, protocol: &str) -> Option<usize> {
        if self.protocol == protocol {
            return Some(0);
        }
        match self.extra.get("protocols") {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .filter(|p| *p != self.protocol)
                .position(|p| p == protocol)
                .map(|i| i + 1),
            _ => None,
        }
    }

    /// The buffer that contains `[addr, addr+len)` entirely, if any.
    pub fn find_buffer(&self, addr: u64, len: u64) -> Option<&BufferDesc> {
        let end = addr.checked_add(len)?;
        self.buffers.iter().find(|b| addr >= b.addr && end <= b.addr.saturating_add(b.length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = r#"{"name":"10.0.0.1:15123","protocol":"tcp","tcp_data_port":15876,"tcp_proto_version":2,
 "timestamp":"2026-11-21 10:00:00.000000",
 "buffers":[{"name":"cpu:0","addr":140234567680000,"length":1073741824}]}"#;

    #[test]
    fn parses_upstream_descriptor() {
        let d = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        assert_eq!(d.tcp_data_port, Some(15876));
        assert_eq!(d.tcp_version(), 2);
        assert_eq!(d.buffers[0].addr, 140234567680000);
        assert!(d.find_buffer(140234567680000, 1 << 30).is_some());
        assert!(d.find_buffer(140234567680000, (1 << 30) + 1).is_none());
        assert!(d.find_buffer(u64::MAX, 2).is_none());
        let again = SegmentDescriptor::from_json(d.to_json().as_bytes()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn version_defaults_to_one_and_unknown_fields_survive() {
        let d = SegmentDescriptor::from_json(
            br#"{"name":"a","protocol":"rdma","buffers":[],"priority_matrix":{"cpu:0":[["mlx5_0"],[]]},"devices":[{"name":"mlx5_0","lid":0,"gid":"fe80::"}]}"#,
        )
        .unwrap();
        assert_eq!(d.tcp_version(), 1);
        assert!(d.extra.contains_key("priority_matrix"));
        assert_eq!(d.devices.len(), 1);
        assert!(d.to_json().contains("priority_matrix"));
    }

    #[test]
    fn rejects_invalid_buffers_and_garbage() {
        for bad in [
            r#"{"name":"a","protocol":"tcp","buffers":[{"name":"","addr":1,"length":1}]}"#,
            r#"{"name":"a","protocol":"tcp","buffers":[{"name":"cpu:0","addr":0,"length":1}]}"#,
            r#"{"name":"a","protocol":"tcp","buffers":[{"name":"cpu:0","addr":1,"length":0}]}"#,
            r#"{"name":"a","protocol":"tcp","buffers":[{"name":"cpu:0","addr":18446744073709551615,"length":2}]}"#,
            r#"{"name":"a","protocol":"","buffers":[]}"#,
            r#"{"name":"a","protocol":"tcp","buffers":[{"name":"cpu:0","addr":-1,"length":1}]}"#,
            "not json",
            "[]",
            "",
        ] {
            assert!(matches!(SegmentDescriptor::from_json(bad.as_bytes()), Err(Error::MalformedJson(_))), "{bad}");
        }
    }

    #[test]
    fn cxl_buffers_need_no_address() {
        let d = SegmentDescriptor::from_json(
            br#"{"name":"a","protocol":"cxl","cxl_name":"dax0.0","cxl_base_addr":0,"buffers":[{"name":"cxl:0","offset":4096,"length":10}]}"#,
        )
        .unwrap();
        assert_eq!(d.buffers[0].extra["offset"], 4096);
    }

    #[test]
    fn protocols_lists_primary_first() {
        let mut d = SegmentDescriptor { protocol: "tcp".into(), ..Default::default() };
        d.extra.insert("protocols".into(), serde_json::json!(["shm", "tcp"]));
        assert_eq!(d.protocols(), vec!["tcp".to_string(), "shm".to_string()]);
        assert_eq!(d.protocol_rank("tcp"), Some(0));
        assert_eq!(d.protocol_rank("shm"), Some(1));
        assert_eq!(d.protocol_rank("rdma"), None);
    }
}
