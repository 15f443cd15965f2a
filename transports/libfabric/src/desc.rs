//! What a libfabric transport publishes in the segment descriptor, and how a peer's
//! publication is read back.
//!
//! Top-level fields, with `<p>` the protocol (`efa` or `libfabric`):
//! - `<p>_addr`: the endpoint address of every rail (`fi_getname`, lowercase hex), in rail order.
//!   For `efa` this is upstream's `efa_addr` (upstream sends one per NIC in its handshake).
//! - `<p>_provider`: the libfabric provider (`efa`, `tcp;ofi_rxm`, `shm`); peers must match.
//! - `<p>_devices`: the domain (NIC or interface) name of every rail.
//! - `<p>_node`: the host name (shared-memory providers only reach the same node).
//! - `<p>_pid`: `"<pid namespace>/<pid>"` of the process, so that a peer on the same host can
//!   tell at once that the process is gone instead of waiting for a timeout.
//!
//! Every buffer carries `<p>_rkey`: its memory key on every rail, in rail order.

use serde_json::Value;

use mooncake_core::{BufferDesc, SegmentDescriptor};

/// Largest accepted endpoint address (bytes); EFA's is 32, sockets' at most 128.
pub const MAX_ADDR_BYTES: usize = 1024;

/// Most rails a peer may publish.
pub const MAX_REMOTE_RAILS: usize = 64;

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Bytes of a hex string (either case); `Err` says what is wrong.
pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return Err(format!("hex address of odd length {}", s.len()));
    }
    if s.len() / 2 > MAX_ADDR_BYTES {
        return Err(format!("hex address of {} bytes exceeds {MAX_ADDR_BYTES}", s.len() / 2));
    }
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| match (nibble(p[0]), nibble(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!("{:?} is not a hex digit pair", String::from_utf8_lossy(p))),
        })
        .collect()
}

/// The descriptor field names of one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// `<p>_addr`.
    pub addr: String,
    /// `<p>_provider`.
    pub provider: String,
    /// `<p>_devices`.
    pub devices: String,
    /// `<p>_node`.
    pub node: String,
    /// `<p>_pid`.
    pub pid: String,
    /// `<p>_rkey` (per buffer).
    pub rkey: String,
}

impl Fields {
    /// Field names for `protocol`.
    pub fn new(protocol: &str) -> Self {
        Fields {
            addr: format!("{protocol}_addr"),
            provider: format!("{protocol}_provider"),
            devices: format!("{protocol}_devices"),
            node: format!("{protocol}_node"),
            pid: format!("{protocol}_pid"),
            rkey: format!("{protocol}_rkey"),
        }
    }
}

/// What this transport publishes at the top level of its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPublication {
    /// Provider name.
    pub provider: String,
    /// Endpoint address of every rail.
    pub addrs: Vec<Vec<u8>>,
    /// Domain name of every rail.
    pub devices: Vec<String>,
    /// Host name.
    pub node: String,
    /// Process identity ([`process_id`]).
    pub pid: String,
}

impl LocalPublication {
    /// Writes the top-level fields into `desc`.
    pub fn write(&self, fields: &Fields, desc: &mut SegmentDescriptor) {
        let e = &mut desc.fields;
        e.insert(fields.addr.clone(), Value::Array(self.addrs.iter().map(|a| Value::from(to_hex(a))).collect()));
        e.insert(fields.provider.clone(), Value::from(self.provider.clone()));
        e.insert(fields.devices.clone(), Value::Array(self.devices.iter().map(|d| Value::from(d.clone())).collect()));
        e.insert(fields.node.clone(), Value::from(self.node.clone()));
        e.insert(fields.pid.clone(), Value::from(self.pid.clone()));
    }
}

/// Adds a buffer's keys (one per rail) to its descriptor entry.
pub fn write_keys(fields: &Fields, keys: &[u64], desc: &mut BufferDesc) {
    desc.fields.insert(fields.rkey.clone(), Value::Array(keys.iter().map(|k| Value::from(*k)).collect()));
}

/// One buffer of a peer, with its key on every remote rail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBuffer {
    /// Absolute start address in the peer.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Memory key on every remote rail.
    pub keys: Vec<u64>,
}

/// A peer's publication, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    /// Provider the peer uses.
    pub provider: String,
    /// Endpoint address of every remote rail.
    pub addrs: Vec<Vec<u8>>,
    /// Host name.
    pub node: String,
    /// Process identity (`"<pid namespace>/<pid>"`), empty when not published.
    pub pid: String,
    /// Buffers that carry keys for every rail, sorted by address.
    pub buffers: Vec<RemoteBuffer>,
}

impl RemotePeer {
    /// Reads `desc`. `Err` says why the peer cannot be reached with this protocol.
    pub fn parse(fields: &Fields, desc: &SegmentDescriptor) -> Result<Self, String> {
        let provider = str_field(desc, &fields.provider)
            .ok_or_else(|| format!("segment {:?} publishes no {}", desc.name, fields.provider))?;
        // An array (ours), or a single string (one NIC, as upstream's handshake carries it).
        let list: Vec<&Value> = match desc.fields.get(&fields.addr) {
            Some(Value::Array(list)) => list.iter().collect(),
            Some(one @ Value::String(_)) => vec![one],
            _ => return Err(format!("segment {:?} publishes no {}", desc.name, fields.addr)),
        };
        if list.is_empty() || list.len() > MAX_REMOTE_RAILS {
            return Err(format!("segment {:?}: {} lists {} addresses", desc.name, fields.addr, list.len()));
        }
        let addrs = list
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{}: {v} is not a string", fields.addr))
                    .and_then(|s| from_hex(s).map_err(|e| format!("{}: {e}", fields.addr)))
                    .and_then(|a| if a.is_empty() { Err(format!("{}: empty address", fields.addr)) } else { Ok(a) })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let node = str_field(desc, &fields.node).unwrap_or_default();
        let pid = str_field(desc, &fields.pid).unwrap_or_default();
        let mut buffers: Vec<RemoteBuffer> = desc
            .buffers
            .iter()
            .filter_map(|b| {
                let keys: Vec<u64> = match b.fields.get(&fields.rkey) {
                    Some(Value::Array(k)) => k.iter().map(Value::as_u64).collect::<Option<_>>()?,
                    _ => return None,
                };
                (keys.len() == addrs.len() && b.length > 0 && b.addr.checked_add(b.length).is_some())
                    .then_some(RemoteBuffer { addr: b.addr, len: b.length, keys })
            })
            .collect();
        buffers.sort_by_key(|b| b.addr);
        Ok(RemotePeer { provider, addrs, node, pid, buffers })
    }

    /// The buffer containing `[addr, addr+len)` entirely (`len` > 0).
    pub fn find(&self, addr: u64, len: u64) -> Option<&RemoteBuffer> {
        let end = addr.checked_add(len)?;
        if len == 0 {
            return None;
        }
        let i = self.buffers.partition_point(|b| b.addr <= addr);
        let b = self.buffers.get(i.checked_sub(1)?)?;
        (end <= b.addr + b.len).then_some(b)
    }
}

fn str_field(desc: &SegmentDescriptor, key: &str) -> Option<String> {
    desc.fields.get(key).and_then(Value::as_str).map(str::to_string)
}

/// This process's identity: `"<pid namespace>/<pid>"` (the namespace from `/proc/self/ns/pid`,
/// empty where unknown).
pub fn process_id() -> String {
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{ns}/{}", std::process::id())
}

/// True when the peer publishes a process identity that is not this process's (another pid, or
/// the same pid string on another host). Such a peer never runs in this process, even when its
/// endpoint address equals one this process used: socket providers' addresses are `ip:port`,
/// and a port an endpoint of ours had before it closed is free for any process to take.
/// False when the peer publishes no identity (engines that predate it): then only the
/// addresses can tell.
pub fn is_other_process(remote: &RemotePeer, local_node: &str, local_pid: &str) -> bool {
    !remote.pid.is_empty() && (remote.pid != local_pid || remote.node != local_node)
}

/// The pid of a peer process that shares this process's host and pid namespace, if any: only
/// then does the pid name the same process here.
pub fn same_namespace_pid(remote: &RemotePeer, local_node: &str, local_pid: &str) -> Option<i32> {
    let (ns, pid) = remote.pid.rsplit_once('/')?;
    let (local_ns, _) = local_pid.rsplit_once('/')?;
    if ns.is_empty() || ns != local_ns || remote.node.is_empty() || remote.node != local_node {
        return None;
    }
    pid.parse::<i32>().ok().filter(|p| *p > 0)
}

/// This host's name (for same-node checks of shared-memory providers).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer.
    let ret = unsafe { libc::gethostname(buf.as_mut_ptr().cast::<libc::c_char>(), buf.len()) };
    if ret != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes = [0x00, 0x02, 0x9f, 0xad, 0x7f, 0xff];
        assert_eq!(to_hex(&bytes), "00029fad7fff");
        assert_eq!(from_hex("00029fad7fff").unwrap(), bytes);
        assert_eq!(from_hex("00029FAD7FFF").unwrap(), bytes);
        assert_eq!(from_hex("").unwrap(), Vec::<u8>::new());
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert!(from_hex("0g").is_err());
        assert!(from_hex(&"00".repeat(MAX_ADDR_BYTES + 1)).is_err());
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)).unwrap(), all);
    }

    fn published() -> SegmentDescriptor {
        let fields = Fields::new("libfabric");
        let mut d = SegmentDescriptor { name: "h:1".into(), protocol: "libfabric".into(), ..Default::default() };
        LocalPublication {
            provider: "tcp;ofi_rxm".into(),
            addrs: vec![vec![1, 2, 3], vec![4, 5]],
            devices: vec!["lo".into(), "eth0".into()],
            node: "host-a".into(),
            pid: "pid:[4026531836]/4242".into(),
        }
        .write(&fields, &mut d);
        for (addr, len, keys) in [(0x3000u64, 0x1000u64, [7u64, 8]), (0x1000, 0x1000, [5, 6])] {
            let mut b = BufferDesc { name: "cpu:0".into(), addr, length: len, ..Default::default() };
            write_keys(&fields, &keys, &mut b);
            d.buffers.push(b);
        }
        // A buffer another transport registered, without our keys.
        d.buffers.push(BufferDesc { name: "cpu:0".into(), addr: 0x9000, length: 16, ..Default::default() });
        d
    }

    #[test]
    fn descriptor_fields_round_trip() {
        let fields = Fields::new("libfabric");
        let d = published();
        let json = d.to_json();
        assert!(json.contains(r#""libfabric_addr":["010203","0405"]"#), "{json}");
        assert!(json.contains(r#""libfabric_rkey":[7,8]"#), "{json}");
        assert!(json.contains(r#""libfabric_provider":"tcp;ofi_rxm""#), "{json}");
        let back = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
        let p = RemotePeer::parse(&fields, &back).unwrap();
        assert_eq!(p.provider, "tcp;ofi_rxm");
        assert_eq!(p.addrs, vec![vec![1, 2, 3], vec![4, 5]]);
        assert_eq!(p.node, "host-a");
        assert_eq!(same_namespace_pid(&p, "host-a", "pid:[4026531836]/1"), Some(4242));
        assert_eq!(same_namespace_pid(&p, "host-b", "pid:[4026531836]/1"), None, "other host");
        assert_eq!(same_namespace_pid(&p, "host-a", "pid:[4026532000]/1"), None, "other pid namespace");
        assert_eq!(same_namespace_pid(&p, "host-a", "/1"), None, "unknown namespace");
        assert!(!is_other_process(&p, "host-a", "pid:[4026531836]/4242"), "this very process");
        assert!(is_other_process(&p, "host-a", "pid:[4026531836]/1"), "another pid");
        assert!(is_other_process(&p, "host-b", "pid:[4026531836]/4242"), "the same pid on another host");
        let anonymous = RemotePeer { pid: String::new(), ..p.clone() };
        assert!(!is_other_process(&anonymous, "host-a", "pid:[4026531836]/1"), "no identity: unknown");
        assert_eq!(p.buffers.len(), 2, "the keyless buffer is left out");
        assert_eq!(p.buffers[0].addr, 0x1000, "sorted");
        assert_eq!(p.find(0x1000, 0x1000).map(|b| b.keys.clone()), Some(vec![5, 6]));
        assert_eq!(p.find(0x3800, 0x800).map(|b| b.addr), Some(0x3000));
        assert!(p.find(0x1fff, 2).is_none(), "straddles the end");
        assert!(p.find(0x2000, 1).is_none(), "gap");
        assert!(p.find(0x9000, 1).is_none(), "no key published");
        assert!(p.find(0x1000, 0).is_none());
        assert!(p.find(u64::MAX, 2).is_none());
        assert!(p.find(0xfff, 1).is_none());
        // The efa protocol uses upstream's field name.
        assert_eq!(Fields::new("efa").addr, "efa_addr");
    }

    #[test]
    fn bad_publications_are_refused() {
        let fields = Fields::new("libfabric");
        let mut d = published();
        d.fields.insert("libfabric_addr", serde_json::json!(["xyz"]));
        assert!(RemotePeer::parse(&fields, &d).unwrap_err().contains("hex"));
        d.fields.insert("libfabric_addr", serde_json::json!([]));
        assert!(RemotePeer::parse(&fields, &d).is_err());
        d.fields.insert("libfabric_addr", serde_json::json!([""]));
        assert!(RemotePeer::parse(&fields, &d).is_err());
        d.fields.remove("libfabric_provider");
        assert!(RemotePeer::parse(&fields, &d).unwrap_err().contains("libfabric_provider"));
        let tcp_only = SegmentDescriptor { name: "x".into(), protocol: "tcp".into(), ..Default::default() };
        assert!(RemotePeer::parse(&fields, &tcp_only).is_err());
        // Keys for the wrong number of rails: the buffer is unusable.
        let mut d = published();
        write_keys(&fields, &[1], &mut d.buffers[0]);
        assert_eq!(RemotePeer::parse(&fields, &d).unwrap().buffers.len(), 1);
    }
}
