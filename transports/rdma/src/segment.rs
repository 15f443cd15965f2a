//! The RDMA fields of a segment descriptor (docs/wire-formats.md section 2): top-level `devices`,
//! `priority_matrix` (and upstream's `rdma_server_name`), per-buffer `rkey`/`lkey` (one per
//! device, in `devices` order). This module owns them: [`describe`] and [`RdmaBufferKeys`] write
//! them, [`RemoteRdma::decode`] reads them.

use mooncake_core::{Error, FieldError, Fields, Result, Section, SegmentDescriptor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::gid::Gid;
use std::sync::Arc;

use crate::topology::{PriorityMatrix, Rails, ResolvedMatrix};

/// Top-level field: the NICs, `[{"name":"mlx5_0","lid":0,"gid":"fe:80:..."}]`.
pub const FIELD_DEVICES: &str = "devices";
/// Top-level field: NIC preference per location.
pub const FIELD_PRIORITY_MATRIX: &str = "priority_matrix";
/// Top-level field (upstream): the server name of the NIC paths, when not the segment name.
pub const FIELD_SERVER_NAME: &str = "rdma_server_name";
/// Per-buffer field: remote keys, one per device.
pub const FIELD_RKEY: &str = "rkey";
/// Per-buffer field: local keys, one per device.
pub const FIELD_LKEY: &str = "lkey";

/// One published NIC: `{"name":"mlx5_0","lid":0,"gid":"fe:80:..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    /// Device name.
    pub name: String,
    /// LID (InfiniBand; 0 on RoCE).
    #[serde(default)]
    pub lid: u16,
    /// GID in upstream's text form.
    pub gid: String,
}

/// Adds `devices` and `priority_matrix` to a local descriptor. `devices` must be in
/// [`PriorityMatrix::device_order`] order: that is how upstream indexes the per-buffer keys.
pub fn describe(desc: &mut SegmentDescriptor, devices: &[DeviceDesc], matrix: &PriorityMatrix) {
    if !devices.is_empty() {
        let list: Vec<Value> =
            devices.iter().map(|d| serde_json::json!({"name": d.name, "lid": d.lid, "gid": d.gid})).collect();
        desc.fields.insert(FIELD_DEVICES, list);
    }
    desc.fields.insert(FIELD_PRIORITY_MATRIX, matrix.to_json());
}

/// Whether `desc` publishes RDMA devices (a non-empty `devices` list).
pub fn publishes_devices(desc: &SegmentDescriptor) -> bool {
    matches!(desc.fields.get(FIELD_DEVICES), Some(Value::Array(list)) if !list.is_empty())
}

/// The RDMA section of one buffer: its memory keys on each published device, in `devices` order.
/// Written right after the buffer's `length` (where our descriptors have always had them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaBufferKeys {
    /// Remote keys (published as `rkey`).
    pub rkey: Vec<u32>,
    /// Local keys (published as `lkey`; upstream publishes them, peers do not need them).
    pub lkey: Vec<u32>,
}

impl Section for RdmaBufferKeys {
    fn read(fields: &Fields) -> std::result::Result<Option<Self>, FieldError> {
        let rkey: Option<Vec<u32>> = fields.get_as(FIELD_RKEY)?;
        let lkey: Option<Vec<u32>> = fields.get_as(FIELD_LKEY)?;
        if rkey.is_none() && lkey.is_none() {
            return Ok(None);
        }
        Ok(Some(RdmaBufferKeys { rkey: rkey.unwrap_or_default(), lkey: lkey.unwrap_or_default() }))
    }

    fn write(&self, fields: &mut Fields) {
        if !self.rkey.is_empty() {
            fields.insert_leading(FIELD_RKEY, self.rkey.clone());
        }
        if !self.lkey.is_empty() {
            fields.insert_leading(FIELD_LKEY, self.lkey.clone());
        }
    }
}

/// One remote buffer with its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBuffer {
    /// Location name (`cpu:0`, `cuda:1`).
    pub location: String,
    /// Absolute address in the owner's process.
    pub addr: u64,
    /// Length in bytes.
    pub length: u64,
    /// Remote key per device, in the descriptor's `devices` order.
    pub rkey: Vec<u32>,
    /// The peer's NICs for this buffer's location (indices into `devices`).
    pub rails: Arc<Rails>,
}

/// A peer's RDMA view: what this transport needs to reach it.
#[derive(Debug, Clone)]
pub struct RemoteRdma {
    /// Server name of the peer's NIC paths: `rdma_server_name` when published, else the segment
    /// name (empty when the descriptor has neither).
    pub name: String,
    /// Its NICs, in descriptor order.
    pub devices: Vec<DeviceDesc>,
    /// Their GIDs, parsed.
    pub gids: Vec<Gid>,
    /// Its priority matrix resolved against `devices`.
    pub matrix: ResolvedMatrix,
    /// Its buffers, sorted by address.
    pub buffers: Vec<RemoteBuffer>,
}

impl RemoteRdma {
    /// Decodes and validates the RDMA fields of a peer's descriptor. A device without name or
    /// GID, a buffer whose key count differs from the device count, or a malformed matrix makes
    /// the descriptor unusable for RDMA (as upstream).
    pub fn decode(desc: &SegmentDescriptor) -> Result<RemoteRdma> {
        let listed = match desc.fields.get(FIELD_DEVICES) {
            Some(Value::Array(list)) if !list.is_empty() => list,
            None | Some(Value::Null) | Some(Value::Array(_)) => {
                return Err(Error::unavailable(format!(
                    "segment {:?} publishes no RDMA devices; it does not serve rdma",
                    desc.name
                )));
            }
            Some(_) => return Err(FieldError::new(FIELD_DEVICES, "is not a list").in_segment(&desc.name)),
        };
        let mut devices = Vec::with_capacity(listed.len());
        let mut gids = Vec::with_capacity(listed.len());
        for (i, d) in listed.iter().enumerate() {
            let dev = DeviceDesc::deserialize(d)
                .map_err(|e| Error::MalformedJson(format!("segment {:?}: devices[{i}]: {e}", desc.name)))?;
            if dev.name.is_empty() || dev.gid.is_empty() {
                return Err(Error::MalformedJson(format!(
                    "segment {:?}: devices[{i}] has an empty name or gid",
                    desc.name
                )));
            }
            gids.push(Gid::parse(&dev.gid).map_err(|e| {
                Error::MalformedJson(format!("segment {:?}: devices[{i}] ({}): {e}", desc.name, dev.name))
            })?);
            devices.push(dev);
        }
        let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
        let matrix = match desc.fields.get(FIELD_PRIORITY_MATRIX) {
            None | Some(Value::Null) => PriorityMatrix::default(),
            Some(v) => PriorityMatrix::from_json(v)
                .map_err(|e| Error::MalformedJson(format!("segment {:?}: {e}", desc.name)))?,
        }
        .resolve(&names);
        let mut buffers = Vec::with_capacity(desc.buffers.len());
        for (i, b) in desc.buffers.iter().enumerate() {
            let keys = b
                .section::<RdmaBufferKeys>()
                .map_err(|e| Error::MalformedJson(format!("segment {:?}: buffer {i}: {e}", desc.name)))?
                .unwrap_or_default();
            if keys.rkey.len() != devices.len() || (!keys.lkey.is_empty() && keys.lkey.len() != keys.rkey.len()) {
                return Err(Error::MalformedJson(format!(
                    "segment {:?}: buffer {i} has {} rkeys and {} lkeys for {} devices",
                    desc.name,
                    keys.rkey.len(),
                    keys.lkey.len(),
                    devices.len()
                )));
            }
            buffers.push(RemoteBuffer {
                location: b.name.clone(),
                addr: b.addr,
                length: b.length,
                rkey: keys.rkey,
                rails: matrix.rails(&b.name).clone(),
            });
        }
        buffers.sort_by_key(|b| b.addr);
        let name = match desc.fields.get(FIELD_SERVER_NAME).and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => desc.name.clone(),
        };
        Ok(RemoteRdma { name, devices, gids, matrix, buffers })
    }

    /// The buffer holding `[addr, addr+len)` entirely.
    pub fn buffer(&self, addr: u64, len: u64) -> Option<&RemoteBuffer> {
        self.buffer_index(addr, len).map(|i| &self.buffers[i])
    }

    /// Index (in [`RemoteRdma::buffers`]) of the buffer holding `[addr, addr+len)` entirely.
    pub fn buffer_index(&self, addr: u64, len: u64) -> Option<usize> {
        let end = addr.checked_add(len)?;
        let i = self.buffers.partition_point(|b| b.addr <= addr).checked_sub(1)?;
        let b = &self.buffers[i];
        (end <= b.addr.saturating_add(b.length)).then_some(i)
    }

    /// Index of device `name`.
    pub fn device_index(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = r#"{"name":"10.0.0.2:15123","protocol":"rdma","tcp_data_port":0,
      "timestamp":"2026-11-21 10:00:00.000000",
      "devices":[{"name":"mlx5_0","lid":0,"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:02"},
                 {"name":"mlx5_1","lid":7,"gid":"fe:80:00:00:00:00:00:00:02:02:c9:ff:fe:00:00:01"}],
      "buffers":[{"name":"cuda:0","addr":140000000000000,"length":1048576,"rkey":[1001,1002],"lkey":[2001,2002]},
                 {"name":"cpu:0","addr":94000000000000,"length":4096,"rkey":[11,12],"lkey":[21,22]}],
      "priority_matrix":{"cpu:0":[["mlx5_0"],["mlx5_1"]],"cuda:0":[["mlx5_1"],["mlx5_0"]]}}"#;

    #[test]
    fn decodes_upstream_descriptor() {
        let desc = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        let r = RemoteRdma::decode(&desc).unwrap();
        assert_eq!(r.devices[1], DeviceDesc { name: "mlx5_1".into(), lid: 7, gid: r.devices[1].gid.clone() });
        assert!(r.gids[0].is_ipv4_mapped());
        assert_eq!(r.buffers[0].addr, 94000000000000, "sorted by address");
        let b = r.buffer(140000000000000 + 4096, 4096).unwrap();
        assert_eq!((b.location.as_str(), b.rkey.as_slice()), ("cuda:0", &[1001u32, 1002][..]));
        assert!(r.buffer(140000000000000 + 1048576 - 1, 2).is_none());
        assert!(r.buffer(94000000000000 - 1, 1).is_none());
        assert!(r.buffer(u64::MAX, 2).is_none());
        assert_eq!(r.matrix.rails("cuda:0").preferred, vec![1]);
        assert_eq!(r.matrix.rails("cpu:0").preferred, vec![0]);
        assert_eq!(r.device_index("mlx5_1"), Some(1));
        assert_eq!(b.rails.preferred, vec![1], "cuda:0 buffer served by mlx5_1 first");
        assert_eq!(r.name, "10.0.0.2:15123");
        let mut v: Value = serde_json::from_str(UPSTREAM).unwrap();
        v["rdma_server_name"] = "10.0.0.2:16000".into();
        let r = RemoteRdma::decode(&SegmentDescriptor::from_json(v.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(r.name, "10.0.0.2:16000");
    }

    #[test]
    fn describe_writes_upstream_fields() {
        let mut desc =
            SegmentDescriptor { name: "10.0.0.1:15000".into(), protocol: "rdma".into(), ..Default::default() };
        let matrix = PriorityMatrix::from_json(&serde_json::json!({"cpu:0": [["mlx5_0"], ["mlx5_1"]]})).unwrap();
        let devices = vec![
            DeviceDesc { name: "mlx5_0".into(), lid: 0, gid: "00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:01".into() },
            DeviceDesc { name: "mlx5_1".into(), lid: 3, gid: "fe:80:00:00:00:00:00:00:00:00:00:00:00:00:00:01".into() },
        ];
        describe(&mut desc, &devices, &matrix);
        let mut b = mooncake_core::BufferDesc { name: "cpu:0".into(), addr: 4096, length: 8192, ..Default::default() };
        b.set_section(&RdmaBufferKeys { rkey: vec![5, 6], lkey: vec![7, 8] });
        desc.buffers.push(b);
        let json: Value = serde_json::from_str(&desc.to_json()).unwrap();
        let expected: Value = serde_json::from_str(
            r#"{"name":"10.0.0.1:15000","protocol":"rdma",
                "devices":[{"name":"mlx5_0","lid":0,"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:01"},
                           {"name":"mlx5_1","lid":3,"gid":"fe:80:00:00:00:00:00:00:00:00:00:00:00:00:00:01"}],
                "buffers":[{"name":"cpu:0","addr":4096,"length":8192,"rkey":[5,6],"lkey":[7,8]}],
                "priority_matrix":{"cpu:0":[["mlx5_0"],["mlx5_1"]]}}"#,
        )
        .unwrap();
        assert_eq!(json, expected);
        let back = RemoteRdma::decode(&SegmentDescriptor::from_json(desc.to_json().as_bytes()).unwrap()).unwrap();
        assert_eq!(back.devices, devices);
        assert_eq!(back.buffers[0].rkey, vec![5, 6]);
    }

    #[test]
    fn rejects_unusable_rdma_fields() {
        let base: Value = serde_json::from_str(UPSTREAM).unwrap();
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("no devices", Box::new(|v| v["devices"] = serde_json::json!([]))),
            ("empty gid", Box::new(|v| v["devices"][0]["gid"] = "".into())),
            ("empty name", Box::new(|v| v["devices"][1]["name"] = "".into())),
            ("bad gid", Box::new(|v| v["devices"][1]["gid"] = "zz".into())),
            ("lid not a number", Box::new(|v| v["devices"][0]["lid"] = "x".into())),
            ("key count", Box::new(|v| v["buffers"][0]["rkey"] = serde_json::json!([1]))),
            ("lkey count", Box::new(|v| v["buffers"][1]["lkey"] = serde_json::json!([1, 2, 3]))),
            ("matrix", Box::new(|v| v["priority_matrix"] = serde_json::json!({"cpu:0": [["mlx5_0"]]}))),
            ("devices not a list", Box::new(|v| v["devices"] = serde_json::json!({"name": "mlx5_0"}))),
            ("rkey not a list", Box::new(|v| v["buffers"][0]["rkey"] = "1001".into())),
            ("rkey too large", Box::new(|v| v["buffers"][0]["rkey"] = serde_json::json!([1u64 << 32, 1]))),
            ("no keys", Box::new(|v| drop(v["buffers"][1].as_object_mut().unwrap().remove("rkey")))),
        ];
        for (what, edit) in cases {
            let mut v = base.clone();
            edit(&mut v);
            let desc = SegmentDescriptor::from_json(v.to_string().as_bytes()).unwrap();
            let err = RemoteRdma::decode(&desc).unwrap_err();
            assert!(matches!(err, Error::MalformedJson(_) | Error::Unavailable { .. }), "{what}: {err}");
        }
        // A descriptor without a matrix still works: every device serves every location.
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove("priority_matrix");
        let r = RemoteRdma::decode(&SegmentDescriptor::from_json(v.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(r.matrix.rails("cpu:0").preferred, vec![0, 1]);
    }
}
