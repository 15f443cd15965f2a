//! The segment descriptor JSON of docs/wire-formats.md section 2, shared with upstream Mooncake.
//!
//! Core knows only the fields every segment has: `name`, `protocol`, `timestamp`, and `buffers`
//! with `name`, `addr` and `length`, plus the engine's own `protocols` list. Every other field
//! belongs to a transport: it reads and writes its part as a typed [`Section`] over the
//! descriptor's [`Fields`] (e.g. `TcpSection` in the tcp crate, `RdmaBufferKeys` in the rdma
//! crate). Fields no linked transport knows are kept as read. Adding a transport adds no field here.

use std::fmt;

use serde::de::{DeserializeOwned, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A process's exported memory as published in metadata (`ram/<name>`) or sent in a handshake.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SegmentDescriptor {
    /// Segment name (`host:port` in P2P mode).
    pub name: String,
    /// Protocol peers must use to reach this segment (`tcp`, `rdma`, ...).
    pub protocol: String,
    /// Publication time, `YYYY-mm-dd HH:MM:SS.ffffff` in upstream; informational.
    pub timestamp: String,
    /// Registered buffers.
    pub buffers: Vec<BufferDesc>,
    /// Every other top-level field: the transports' sections (`tcp_data_port`, `devices`,
    /// `priority_matrix`, `shm_pid`, ...), our `protocols`, and whatever else a peer published.
    pub fields: Fields,
}

/// One registered buffer of a segment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BufferDesc {
    /// Location name, e.g. `cpu:0`, `cuda:1`.
    pub name: String,
    /// Absolute virtual address in the owner's process.
    pub addr: u64,
    /// Length in bytes.
    pub length: u64,
    /// Every other field of the buffer: the transports' sections (`rkey`/`lkey`, `shm_slot`,
    /// cxl `offset`, nvmeof `file_path`, ...).
    pub fields: Fields,
}

/// The fields of one descriptor object (the segment's top level, or one buffer) that core does
/// not interpret, keyed by JSON name.
///
/// Wire order: fields inserted with [`Fields::insert_leading`] come right after the object's
/// common fields (a segment's `name` and `protocol`, a buffer's `name`, `addr` and `length`), in
/// insertion order; all others come last, sorted by name. Upstream ignores key order; this keeps
/// the bytes we publish stable. Equality ignores order.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    leading: Vec<(String, Value)>,
    sorted: Map<String, Value>,
}

/// The value returned by indexing a missing field.
static NULL: Value = Value::Null;

impl Fields {
    /// The field's value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self.leading.iter().find(|(k, _)| k == key) {
            Some((_, v)) => Some(v),
            None => self.sorted.get(key),
        }
    }

    /// The field deserialized as `T`: `Ok(None)` when absent or `null`, a [`FieldError`] when it
    /// has another shape.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> std::result::Result<Option<T>, FieldError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v).map(Some).map_err(|e| FieldError::new(key, format!("is malformed: {e}"))),
        }
    }

    /// Whether the field is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets a field; it keeps its place when present, else it goes with the sorted fields.
    /// Returns the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let value = value.into();
        match self.leading.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(std::mem::replace(v, value)),
            None => self.sorted.insert(key, value),
        }
    }

    /// Sets a field placed right after the object's common fields, after the leading fields
    /// inserted before it (or in its place when it is leading already). Returns the previous value.
    pub fn insert_leading(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let value = value.into();
        if let Some((_, v)) = self.leading.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(v, value));
        }
        let old = self.sorted.remove(&key);
        self.leading.push((key, value));
        old
    }

    /// Removes a field, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        match self.leading.iter().position(|(k, _)| k == key) {
            Some(i) => Some(self.leading.remove(i).1),
            None => self.sorted.remove(key),
        }
    }

    /// Removes every field.
    pub fn clear(&mut self) {
        self.leading.clear();
        self.sorted.clear();
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.leading.len() + self.sorted.len()
    }

    /// Whether there is no field.
    pub fn is_empty(&self) -> bool {
        self.leading.is_empty() && self.sorted.is_empty()
    }

    /// The fields in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.leading.iter().map(|(k, v)| (k.as_str(), v)).chain(self.sorted.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// Writes every field into `map` (after the caller's common fields).
    fn serialize_into<M: SerializeMap>(&self, map: &mut M) -> std::result::Result<(), M::Error> {
        self.iter().try_for_each(|(k, v)| map.serialize_entry(k, v))
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

/// `fields["key"]`: the value, or `null` when absent (as indexing a [`Value`]).
impl std::ops::Index<&str> for Fields {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&NULL)
    }
}

impl From<Map<String, Value>> for Fields {
    fn from(sorted: Map<String, Value>) -> Self {
        Fields { leading: Vec::new(), sorted }
    }
}

/// A descriptor field with a value of the wrong shape (e.g. a `tcp_data_port` that is no u16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    field: String,
    reason: String,
}

impl FieldError {
    /// `field` is wrong; `reason` completes `descriptor field "<field>" ...` (e.g. "is missing").
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { field: field.into(), reason: reason.into() }
    }

    /// The JSON name of the field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The [`Error::MalformedJson`] for this field of segment `segment`'s descriptor.
    pub fn in_segment(&self, segment: &str) -> Error {
        Error::MalformedJson(format!("segment {segment:?}: {self}"))
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "descriptor field {:?} {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

impl From<FieldError> for Error {
    fn from(e: FieldError) -> Self {
        Error::MalformedJson(e.to_string())
    }
}

/// A transport's typed part of a descriptor object: a segment's top level (e.g. the tcp data
/// port) or a buffer (e.g. the RDMA keys). The transport crate defines it; core only stores the
/// fields.
pub trait Section: Sized {
    /// Reads the section: `Ok(None)` when the object carries none of its fields (the peer does
    /// not serve this transport), a [`FieldError`] when one of them is malformed.
    fn read(fields: &Fields) -> std::result::Result<Option<Self>, FieldError>;

    /// Writes the section's fields (replacing their previous values).
    fn write(&self, fields: &mut Fields);
}

impl SegmentDescriptor {
    /// Reads a transport's top-level [`Section`]; errors name this segment.
    pub fn section<S: Section>(&self) -> Result<Option<S>> {
        S::read(&self.fields).map_err(|e| e.in_segment(&self.name))
    }

    /// Writes a transport's top-level [`Section`].
    pub fn set_section<S: Section>(&mut self, section: &S) {
        section.write(&mut self.fields);
    }
}

impl BufferDesc {
    /// Reads a transport's per-buffer [`Section`].
    pub fn section<S: Section>(&self) -> std::result::Result<Option<S>, FieldError> {
        S::read(&self.fields)
    }

    /// Writes a transport's per-buffer [`Section`].
    pub fn set_section<S: Section>(&mut self, section: &S) {
        section.write(&mut self.fields);
    }
}

/// Wire order: `name`, `protocol`, leading fields, `timestamp` (when set), `buffers`, other fields.
impl Serialize for SegmentDescriptor {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("protocol", &self.protocol)?;
        for (k, v) in &self.fields.leading {
            map.serialize_entry(k, v)?;
        }
        if !self.timestamp.is_empty() {
            map.serialize_entry("timestamp", &self.timestamp)?;
        }
        map.serialize_entry("buffers", &self.buffers)?;
        for (k, v) in &self.fields.sorted {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Wire order: `name`, `addr`, `length`, then the fields (leading first).
impl Serialize for BufferDesc {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("addr", &self.addr)?;
        map.serialize_entry("length", &self.length)?;
        self.fields.serialize_into(&mut map)?;
        map.end()
    }
}

/// The JSON shape read: common fields typed, the rest kept.
#[derive(Deserialize)]
struct WireSegment {
    name: String,
    protocol: String,
    #[serde(default)]
    timestamp: String,
    #[serde(default)]
    buffers: Vec<BufferDesc>,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireBuffer {
    #[serde(default)]
    name: String,
    #[serde(default)]
    addr: u64,
    #[serde(default)]
    length: u64,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

impl<'de> Deserialize<'de> for SegmentDescriptor {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let w = WireSegment::deserialize(deserializer)?;
        let mut buffers = w.buffers;
        match Addressing::of(&w.protocol) {
            Addressing::Virtual => {}
            Addressing::RegionOffset => {
                for b in &mut buffers {
                    if let Some(offset) = b.fields.get(FIELD_OFFSET).and_then(Value::as_u64) {
                        b.addr = offset;
                    }
                }
            }
            Addressing::Concatenated => {
                let mut start = 0u64;
                for b in &mut buffers {
                    b.addr = start;
                    start = start.saturating_add(b.length);
                }
            }
        }
        Ok(SegmentDescriptor {
            name: w.name,
            protocol: w.protocol,
            timestamp: w.timestamp,
            buffers,
            fields: w.fields.into(),
        })
    }
}

impl<'de> Deserialize<'de> for BufferDesc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let w = WireBuffer::deserialize(deserializer)?;
        Ok(BufferDesc { name: w.name, addr: w.addr, length: w.length, fields: w.fields.into() })
    }
}

/// Largest accepted descriptor JSON (a segment with a few thousand buffers fits comfortably).
pub const MAX_DESCRIPTOR_BYTES: usize = 16 << 20;

/// The engine's own top-level field: every protocol the segment serves, primary first.
pub const FIELD_PROTOCOLS: &str = "protocols";

/// How requests name the bytes of a segment's buffers (docs/wire-formats.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// By absolute virtual address in the owner's process (`addr`): every protocol but the two below.
    Virtual,
    /// By offset into a shared region that every peer maps itself (`cxl`): buffers carry `offset`, which the
    /// decoder puts into [`BufferDesc::addr`].
    RegionOffset,
    /// By offset into the concatenation of the segment's buffers in order (`nvmeof` file segments): the decoder
    /// puts each buffer's start in that concatenation into [`BufferDesc::addr`], and a request may span buffers.
    Concatenated,
}

impl Addressing {
    /// The addressing of segments of `protocol`.
    pub fn of(protocol: &str) -> Addressing {
        match protocol {
            "cxl" => Addressing::RegionOffset,
            "nvmeof" => Addressing::Concatenated,
            _ => Addressing::Virtual,
        }
    }
}

/// Per-buffer field of region-offset segments: the buffer's offset in the shared region.
pub const FIELD_OFFSET: &str = "offset";

fn uses_addresses(protocol: &str) -> bool {
    Addressing::of(protocol) == Addressing::Virtual
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

    /// Whether `other` describes the segment differently at its top level: any field but
    /// `timestamp` and `buffers` differs (name, protocol, any transport's section).
    ///
    /// Registering memory changes only `buffers`, which transports read from each new descriptor,
    /// so it does not count; a changed port, device list or process identity does.
    pub fn segment_fields_differ(&self, other: &SegmentDescriptor) -> bool {
        self.name != other.name || self.protocol != other.protocol || self.fields != other.fields
    }

    /// Every protocol this segment can be reached with, primary first.
    ///
    /// Upstream publishes one `protocol`; we may add `"protocols": [...]` (ignored by upstream).
    pub fn protocols(&self) -> Vec<String> {
        let mut out = vec![self.protocol.clone()];
        if let Some(Value::Array(list)) = self.fields.get(FIELD_PROTOCOLS) {
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
        match self.fields.get(FIELD_PROTOCOLS) {
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

    /// How requests address this segment's buffers.
    pub fn addressing(&self) -> Addressing {
        Addressing::of(&self.protocol)
    }

    /// The buffer holding the first byte of `[addr, addr+len)` when the whole range is addressable in this
    /// segment: inside that one buffer, or, for [`Addressing::Concatenated`] segments, inside the concatenation
    /// of all buffers (a request may span several files). `None` otherwise (zero length and overflow included).
    pub fn locate(&self, addr: u64, len: u64) -> Option<&BufferDesc> {
        if len == 0 {
            return None;
        }
        match self.addressing() {
            Addressing::Virtual | Addressing::RegionOffset => self.find_buffer(addr, len),
            Addressing::Concatenated => {
                let end = addr.checked_add(len)?;
                let total = self.buffers.iter().fold(0u64, |acc, b| acc.saturating_add(b.length));
                if end > total {
                    return None;
                }
                self.buffers.iter().find(|b| addr >= b.addr && addr < b.addr.saturating_add(b.length))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = r#"{"name":"10.0.0.1:15123","protocol":"tcp","tcp_data_port":15876,"tcp_proto_version":2,
 "timestamp":"2026-11-21 10:00:00.000000",
 "buffers":[{"name":"cpu:0","addr":140234567680000,"length":1073741824}]}"#;

    #[test]
    fn cxl_buffers_are_addressed_by_region_offset() {
        let json = r#"{"name":"a","protocol":"cxl","cxl_name":"/dev/dax0.0","cxl_base_addr":139637976727552,
            "buffers":[{"name":"a","offset":0,"length":4096},{"name":"a","offset":1048576,"length":65536}]}"#;
        let d = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
        assert_eq!(d.addressing(), Addressing::RegionOffset);
        assert_eq!((d.buffers[0].addr, d.buffers[1].addr), (0, 1 << 20));
        assert_eq!(d.locate(1 << 20, 4096).map(|b| b.length), Some(65536));
        assert!(d.locate(4000, 200).is_none(), "past the first buffer");
        assert!(d.locate(0, 0).is_none());
    }

    #[test]
    fn nvmeof_buffers_are_addressed_by_their_concatenation() {
        let json = r#"{"name":"nvmeof/ckpt","protocol":"nvmeof","buffers":[
            {"file_path":"/mnt/a","length":1000,"local_path_map":{"h1":"/mnt/a"}},
            {"file_path":"/mnt/b","length":500,"local_path_map":{"h1":"/data/b"}}]}"#;
        let d = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
        assert_eq!(d.addressing(), Addressing::Concatenated);
        assert_eq!((d.buffers[0].addr, d.buffers[1].addr), (0, 1000));
        assert_eq!(d.locate(900, 200).map(|b| b.addr), Some(0), "a request may span files");
        assert_eq!(d.locate(1000, 500).map(|b| b.addr), Some(1000));
        assert!(d.locate(1400, 101).is_none(), "past the end");
        assert!(d.locate(u64::MAX, 2).is_none());
    }

    #[test]
    fn parses_upstream_descriptor() {
        let d = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        assert_eq!(d.fields["tcp_data_port"], 15876);
        assert_eq!(d.fields.get_as::<u32>("tcp_proto_version"), Ok(Some(2)));
        assert_eq!(d.buffers[0].addr, 140234567680000);
        assert!(d.find_buffer(140234567680000, 1 << 30).is_some());
        assert!(d.find_buffer(140234567680000, (1 << 30) + 1).is_none());
        assert!(d.find_buffer(u64::MAX, 2).is_none());
        let again = SegmentDescriptor::from_json(d.to_json().as_bytes()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn unknown_fields_survive() {
        let d = SegmentDescriptor::from_json(
            br#"{"name":"a","protocol":"rdma","buffers":[{"name":"cpu:0","addr":1,"length":1,"rkey":[5],"x":null}],"priority_matrix":{"cpu:0":[["mlx5_0"],[]]},"devices":[{"name":"mlx5_0","lid":0,"gid":"fe80::"}]}"#,
        )
        .unwrap();
        assert!(d.fields.contains_key("priority_matrix"));
        assert_eq!(d.fields["devices"].as_array().map(Vec::len), Some(1));
        assert_eq!(d.fields["absent"], Value::Null);
        assert_eq!(d.buffers[0].fields["rkey"], serde_json::json!([5]));
        assert_eq!(
            d.to_json(),
            r#"{"name":"a","protocol":"rdma","buffers":[{"name":"cpu:0","addr":1,"length":1,"rkey":[5],"x":null}],"devices":[{"gid":"fe80::","lid":0,"name":"mlx5_0"}],"priority_matrix":{"cpu:0":[["mlx5_0"],[]]}}"#
        );
    }

    #[test]
    fn wire_order_is_common_leading_then_sorted() {
        let mut b = BufferDesc { name: "cpu:0".into(), addr: 4096, length: 8, ..Default::default() };
        b.fields.insert("z_extra", 1);
        b.fields.insert("a_extra", 2);
        b.fields.insert_leading("rkey", vec![3u32]);
        b.fields.insert_leading("lkey", vec![4u32]);
        let mut d = SegmentDescriptor {
            name: "n".into(),
            protocol: "tcp".into(),
            timestamp: "t".into(),
            buffers: vec![b],
            ..Default::default()
        };
        d.fields.insert("protocols", serde_json::json!(["tcp", "shm"]));
        d.fields.insert("devices", serde_json::json!([]));
        d.fields.insert_leading("port", 7u16);
        d.fields.insert_leading("version", 2u32);
        assert_eq!(
            d.to_json(),
            concat!(
                r#"{"name":"n","protocol":"tcp","port":7,"version":2,"timestamp":"t","#,
                r#""buffers":[{"name":"cpu:0","addr":4096,"length":8,"rkey":[3],"lkey":[4],"a_extra":2,"z_extra":1}],"#,
                r#""devices":[],"protocols":["tcp","shm"]}"#
            )
        );
        // Re-inserting keeps the place; moving a sorted field to the front works; equality ignores order.
        d.fields.insert("port", 8u16);
        assert_eq!(d.fields.insert_leading("devices", 1), Some(serde_json::json!([])));
        assert!(
            d.to_json().starts_with(r#"{"name":"n","protocol":"tcp","port":8,"version":2,"devices":1,"timestamp""#)
        );
        let back = SegmentDescriptor::from_json(d.to_json().as_bytes()).unwrap();
        assert_eq!(back, d, "order differs (all sorted after parsing), content does not");
        assert_eq!(d.fields.remove("version"), Some(Value::from(2)));
        assert_eq!(d.fields.len(), 3);
        assert_ne!(back, d);
    }

    #[test]
    fn malformed_fields_are_typed_errors() {
        let d = SegmentDescriptor::from_json(
            br#"{"name":"s","protocol":"tcp","tcp_data_port":"x","n":null,"big":70000,"buffers":[]}"#,
        )
        .unwrap();
        let e = d.fields.get_as::<u16>("tcp_data_port").unwrap_err();
        assert_eq!(e.field(), "tcp_data_port");
        assert!(
            matches!(e.in_segment("s"), Error::MalformedJson(m) if m.starts_with(r#"segment "s": descriptor field "tcp_data_port" is malformed"#))
        );
        assert!(d.fields.get_as::<u16>("big").is_err());
        assert_eq!(d.fields.get_as::<u16>("n"), Ok(None), "null reads as absent");
        assert_eq!(d.fields.get_as::<u16>("absent"), Ok(None));
    }

    /// A section as a transport crate defines one.
    #[derive(Debug, PartialEq)]
    struct Port(u16);

    impl Section for Port {
        fn read(fields: &Fields) -> std::result::Result<Option<Self>, FieldError> {
            Ok(fields.get_as("my_port")?.map(Port))
        }

        fn write(&self, fields: &mut Fields) {
            fields.insert("my_port", self.0);
        }
    }

    #[test]
    fn sections_read_and_write_their_fields() {
        let mut d = SegmentDescriptor { name: "s".into(), protocol: "mine".into(), ..Default::default() };
        assert_eq!(d.section::<Port>().unwrap(), None);
        d.set_section(&Port(9));
        assert_eq!(d.section::<Port>().unwrap(), Some(Port(9)));
        d.fields.insert("my_port", "nine");
        assert!(matches!(d.section::<Port>(), Err(Error::MalformedJson(m)) if m.contains(r#"segment "s""#)));
        let mut b = BufferDesc::default();
        b.set_section(&Port(1));
        assert_eq!(b.section::<Port>(), Ok(Some(Port(1))));
    }

    #[test]
    fn segment_fields_differ_apart_from_timestamp_and_buffers() {
        let a = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        let mut b = a.clone();
        b.timestamp = "later".into();
        b.buffers.push(BufferDesc { name: "cpu:0".into(), addr: 1, length: 1, ..Default::default() });
        assert!(!a.segment_fields_differ(&b));
        b.fields.insert("tcp_data_port", 1);
        assert!(a.segment_fields_differ(&b));
        let mut c = a.clone();
        c.fields.insert("anything_new", true);
        assert!(a.segment_fields_differ(&c));
        let mut p = a.clone();
        p.protocol = "rdma".into();
        assert!(a.segment_fields_differ(&p));
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
            r#"{"protocol":"tcp","buffers":[]}"#,
            r#"{"name":"a","buffers":[]}"#,
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
        assert_eq!(d.buffers[0].fields["offset"], 4096);
    }

    #[test]
    fn protocols_lists_primary_first() {
        let mut d = SegmentDescriptor { protocol: "tcp".into(), ..Default::default() };
        d.fields.insert(FIELD_PROTOCOLS, serde_json::json!(["shm", "tcp"]));
        assert_eq!(d.protocols(), vec!["tcp".to_string(), "shm".to_string()]);
        assert_eq!(d.protocol_rank("tcp"), Some(0));
        assert_eq!(d.protocol_rank("shm"), Some(1));
        assert_eq!(d.protocol_rank("rdma"), None);
    }
}
