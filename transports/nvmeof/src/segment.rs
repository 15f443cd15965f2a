//! File segments as upstream publishes them: the descriptor JSON, its metadata key, the per-buffer
//! section, and which path a file has on this host.
//!
//! Upstream's descriptor (its `register.py` writes it under `mooncake/nvmeof/<name>`):
//!
//! ```json
//! {"name":"node1","protocol":"nvmeof","buffers":[
//!   {"file_path":"/mnt/nvme0/kv.bin","length":1073741824,"local_path_map":{"node1":"/mnt/nvme0/kv.bin","node2":"/mnt/remote/kv.bin"}}]}
//! ```
//!
//! Requests address the concatenation of the buffers in order (core's `Addressing::Concatenated`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use mooncake_core::{
    BufferDesc, Error, FieldError, Fields, MetadataKeys, MetadataStore, Result, Section, SegmentDescriptor,
};
use serde_json::{Map, Value};

/// Protocol of file segments.
pub const PROTOCOL: &str = "nvmeof";
/// Per-buffer field: the file's path where it was published.
pub const FIELD_FILE_PATH: &str = "file_path";
/// Per-buffer field: `{host: path}`, where each host finds the file.
pub const FIELD_LOCAL_PATH_MAP: &str = "local_path_map";
/// Segment names of file segments start with this (their metadata key is `<prefix>nvmeof/<name>`).
pub const NAME_PREFIX: &str = "nvmeof/";

/// One file of a file segment, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Path of the file on the host that published it; the fallback for hosts `local_path_map` does not name.
    pub file_path: String,
    /// Bytes of the file that belong to the segment (from offset 0).
    pub length: u64,
    /// Where each host (by its local server name) finds the file, e.g. an NVMe-oF namespace it mounted elsewhere.
    pub local_path_map: BTreeMap<String, String>,
}

impl FileSpec {
    /// A file of `length` bytes at `file_path`, with an empty path map.
    pub fn new(file_path: impl Into<String>, length: u64) -> Self {
        FileSpec { file_path: file_path.into(), length, local_path_map: BTreeMap::new() }
    }

    /// The file at `path` with its current size (a block device's size for a block device: an NVMe or NVMe-oF
    /// namespace), mapped for `host` to the same path (as upstream's `register.py` does for its host name).
    pub fn from_file(path: impl Into<PathBuf>, host: &str) -> Result<Self> {
        let path = path.into();
        let length = crate::io::file_size(&path)?;
        let p = path.to_string_lossy().into_owned();
        Ok(FileSpec::new(p.clone(), length).with_local_path(host, p))
    }

    /// Adds (or replaces) where `host` finds the file.
    pub fn with_local_path(mut self, host: impl Into<String>, path: impl Into<String>) -> Self {
        self.local_path_map.insert(host.into(), path.into());
        self
    }

    /// The path to use on a host known by `names` (its local server name first): the first name the map has,
    /// else `file_path` (the publisher's own path; a host that mounts the file elsewhere must be in the map).
    pub fn resolve(&self, names: &[String]) -> &str {
        names.iter().find_map(|n| self.local_path_map.get(n)).map_or(self.file_path.as_str(), String::as_str)
    }

    /// The buffer's upstream JSON object.
    fn to_json(&self) -> Value {
        let map: Map<String, Value> =
            self.local_path_map.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        serde_json::json!({
            FIELD_FILE_PATH: self.file_path,
            "length": self.length,
            FIELD_LOCAL_PATH_MAP: map,
        })
    }
}

/// The per-buffer [`Section`] of a file segment: `file_path` and `local_path_map` (the length is the buffer's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSection {
    /// See [`FileSpec::file_path`].
    pub file_path: String,
    /// See [`FileSpec::local_path_map`].
    pub local_path_map: BTreeMap<String, String>,
}

impl Section for FileSection {
    fn read(fields: &Fields) -> std::result::Result<Option<Self>, FieldError> {
        let path: Option<String> = fields.get_as(FIELD_FILE_PATH)?;
        let map: Option<BTreeMap<String, String>> = fields.get_as(FIELD_LOCAL_PATH_MAP)?;
        match (path, map) {
            (None, None) => Ok(None),
            (path, map) => {
                Ok(Some(FileSection { file_path: path.unwrap_or_default(), local_path_map: map.unwrap_or_default() }))
            }
        }
    }

    fn write(&self, fields: &mut Fields) {
        fields.insert(FIELD_FILE_PATH, self.file_path.clone());
        let map: Map<String, Value> =
            self.local_path_map.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        fields.insert(FIELD_LOCAL_PATH_MAP, Value::Object(map));
    }
}

impl FileSpec {
    /// The file a decoded buffer describes (`None`: not a file buffer, e.g. an engine's memory).
    pub fn from_buffer(b: &BufferDesc) -> std::result::Result<Option<FileSpec>, FieldError> {
        Ok(b.section::<FileSection>()?.map(|s| FileSpec {
            file_path: s.file_path,
            length: b.length,
            local_path_map: s.local_path_map,
        }))
    }
}

/// The files of a decoded file-segment descriptor, in order; a typed error for a buffer that is no file.
pub fn files_of(desc: &SegmentDescriptor) -> Result<Vec<FileSpec>> {
    desc.buffers
        .iter()
        .enumerate()
        .map(|(i, b)| match FileSpec::from_buffer(b) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(Error::MalformedJson(format!(
                "segment {:?}: buffer {i} has no {FIELD_FILE_PATH:?}: not a file segment",
                desc.name
            ))),
            Err(e) => Err(e.in_segment(&desc.name)),
        })
        .collect()
}

/// The segment name engines open for file segment `name` (`nvmeof/<name>`; a name that already starts with
/// `nvmeof/` is kept).
pub fn segment_name(name: &str) -> String {
    if name.starts_with(NAME_PREFIX) { name.to_string() } else { format!("{NAME_PREFIX}{name}") }
}

/// Upstream's descriptor JSON of a file segment of `files` (no field of ours is added).
pub fn descriptor_json(name: &str, files: &[FileSpec]) -> Result<String> {
    if files.is_empty() {
        return Err(Error::InvalidArgument(format!("file segment {name:?} needs at least one file")));
    }
    let mut total = 0u64;
    for (i, f) in files.iter().enumerate() {
        if f.file_path.is_empty() || f.length == 0 {
            return Err(Error::InvalidArgument(format!(
                "file segment {name:?}: file {i} has an empty path or zero length"
            )));
        }
        total = total
            .checked_add(f.length)
            .ok_or_else(|| Error::InvalidArgument(format!("file segment {name:?}: total length overflows")))?;
    }
    let v = serde_json::json!({
        "name": segment_name(name),
        "protocol": PROTOCOL,
        "buffers": files.iter().map(FileSpec::to_json).collect::<Vec<_>>(),
    });
    Ok(v.to_string())
}

/// Publishes file segment `name` (key `<prefix>nvmeof/<name>`) with upstream's descriptor, replacing an
/// earlier one. Returns the segment name engines open (`nvmeof/<name>`).
pub async fn publish_file_segment(
    store: &dyn MetadataStore,
    keys: &MetadataKeys,
    name: &str,
    files: &[FileSpec],
) -> Result<String> {
    let json = descriptor_json(name, files)?;
    let seg = segment_name(name);
    store.put(&keys.segment(&seg), json.as_bytes()).await?;
    Ok(seg)
}

/// Removes file segment `name`; `false` when it was not published. Engines that opened it keep their
/// descriptor until they re-read it.
pub async fn unpublish_file_segment(store: &dyn MetadataStore, keys: &MetadataKeys, name: &str) -> Result<bool> {
    store.delete(&keys.segment(&segment_name(name))).await
}

fn blocking<T: Send + 'static>(
    metadata_conn: &str,
    f: impl FnOnce(std::sync::Arc<dyn MetadataStore>) -> std::pin::Pin<Box<dyn Future<Output = Result<T>> + Send>>
    + Send
    + 'static,
) -> Result<T> {
    let store = mooncake_core::registry::create_metadata(metadata_conn)?;
    if !store.capabilities().shared {
        return Err(Error::InvalidArgument(format!(
            "file segments are published through a shared metadata service (http, etcd, redis); {:?} is not one \
             (P2PHANDSHAKE keeps keys in one process)",
            metadata_conn
        )));
    }
    // Off any runtime the caller may be in: a thread with its own small runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let r = f(store.clone()).await;
            store.close().await;
            r
        })
    })
    .join()
    .map_err(|_| Error::Protocol("metadata publishing thread panicked".into()))?
}

/// Blocking [`publish_file_segment`] through the metadata service at `metadata_conn` (`http://...`, `etcd://...`,
/// `redis://...`; its client must be linked), with the key prefix of `MC_METADATA_CLUSTER_ID`.
pub fn register_file_segment(metadata_conn: &str, name: &str, files: &[FileSpec]) -> Result<String> {
    let (name, files) = (name.to_string(), files.to_vec());
    blocking(metadata_conn, move |store| {
        Box::pin(async move { publish_file_segment(store.as_ref(), &MetadataKeys::from_env(), &name, &files).await })
    })
}

/// Blocking [`unpublish_file_segment`] (see [`register_file_segment`]).
pub fn unregister_file_segment(metadata_conn: &str, name: &str) -> Result<bool> {
    let name = name.to_string();
    blocking(metadata_conn, move |store| {
        Box::pin(async move { unpublish_file_segment(store.as_ref(), &MetadataKeys::from_env(), &name).await })
    })
}

/// The names this host goes by in `local_path_map`, in order: the engine's local server name, its host part,
/// and the machine's host name.
pub fn local_names(local_server_name: &str) -> Vec<String> {
    let mut v = vec![local_server_name.to_string()];
    if let Ok((host, _)) = mooncake_core::split_host_port(local_server_name) {
        v.push(host);
    }
    if let Some(h) = hostname() {
        v.push(h);
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    v
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream's `register.py` output for two files, and a buffer with a host added by its `mount.py`.
    const UPSTREAM: &str = r#"{"name": "node1", "protocol": "nvmeof", "buffers": [{"length": 1073741824, "file_path": "/mnt/nvme0/kv.bin", "local_path_map": {"node1": "/mnt/nvme0/kv.bin"}}, {"length": 4096, "file_path": "/mnt/nvme1/tail.bin", "local_path_map": {"node1": "/mnt/nvme1/tail.bin", "node2": "/mnt/nvmeof-node1/tail.bin"}}]}"#;

    #[test]
    fn upstream_fields_round_trip_exactly() {
        let d = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        assert_eq!(d.protocol, PROTOCOL);
        assert_eq!((d.buffers[0].addr, d.buffers[1].addr), (0, 1 << 30), "concatenated addressing");
        let files = files_of(&d).unwrap();
        assert_eq!(files[1].local_path_map["node2"], "/mnt/nvmeof-node1/tail.bin");
        assert_eq!(files[0].length, 1 << 30);
        let ours: Value = serde_json::from_str(&descriptor_json("node1", &files).unwrap()).unwrap();
        let mut theirs: Value = serde_json::from_str(UPSTREAM).unwrap();
        theirs["name"] = Value::String("nvmeof/node1".into());
        assert_eq!(ours, theirs, "every upstream field, nothing added");
        // And our own descriptor model writes the same buffer fields back.
        let mut b = BufferDesc::default();
        b.set_section(&b.section::<FileSection>().unwrap().unwrap_or(FileSection {
            file_path: files[1].file_path.clone(),
            local_path_map: files[1].local_path_map.clone(),
        }));
        assert_eq!(b.fields[FIELD_LOCAL_PATH_MAP], theirs["buffers"][1][FIELD_LOCAL_PATH_MAP]);
    }

    #[test]
    fn paths_resolve_by_host_then_fall_back() {
        let f = FileSpec::new("/a", 1).with_local_path("h2:1", "/b").with_local_path("h3", "/c");
        assert_eq!(f.resolve(&["h2:1".into()]), "/b");
        assert_eq!(f.resolve(&["h3:9".into(), "h3".into()]), "/c");
        assert_eq!(f.resolve(&["h4".into()]), "/a", "falls back to file_path");
        let names = local_names("10.1.2.3:15000");
        assert_eq!(&names[..2], &["10.1.2.3:15000".to_string(), "10.1.2.3".to_string()]);
    }

    #[test]
    fn names_and_invalid_specs() {
        assert_eq!(segment_name("ckpt"), "nvmeof/ckpt");
        assert_eq!(segment_name("nvmeof/ckpt"), "nvmeof/ckpt");
        assert!(matches!(descriptor_json("x", &[]), Err(Error::InvalidArgument(_))));
        assert!(matches!(descriptor_json("x", &[FileSpec::new("/a", 0)]), Err(Error::InvalidArgument(_))));
        assert!(matches!(descriptor_json("x", &[FileSpec::new("", 1)]), Err(Error::InvalidArgument(_))));
        let d = SegmentDescriptor::from_json(
            br#"{"name":"m","protocol":"nvmeof","buffers":[{"name":"cpu:0","addr":5,"length":9}]}"#,
        )
        .unwrap();
        assert!(matches!(files_of(&d), Err(Error::MalformedJson(_))));
        let d =
            SegmentDescriptor::from_json(br#"{"name":"m","protocol":"nvmeof","buffers":[{"file_path":7,"length":9}]}"#)
                .unwrap();
        assert!(matches!(files_of(&d), Err(Error::MalformedJson(m)) if m.contains("file_path")));
    }
}
