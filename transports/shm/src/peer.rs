//! What a target publishes (descriptor fields), and the initiator's connection to one target:
//! the verified process, its exit notification and its mapped registration table.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use mooncake_core::{BufferDesc, Error, FieldError, Fields, Result, Section, SegmentDescriptor};
use serde_json::Value;

use crate::identity::{self, LocalIdentity};
use crate::sys;
use crate::table::{BufRef, Refusal, RemoteTable};

/// Top-level descriptor field: host identity (`<boot_id>:<pid namespace inode>`).
pub const FIELD_HOST_ID: &str = "shm_host_id";
/// Top-level descriptor field: the target's pid.
pub const FIELD_PID: &str = "shm_pid";
/// Top-level descriptor field: the target's start time (`/proc/<pid>/stat` field 22).
pub const FIELD_START_TIME: &str = "shm_start_time";
/// Top-level descriptor field: descriptor number of the registration table in the target.
pub const FIELD_TABLE_FD: &str = "shm_table_fd";
/// Top-level descriptor field: slot count of the registration table.
pub const FIELD_TABLE_SLOTS: &str = "shm_table_slots";
/// Top-level descriptor field: random identity of the registration table (32 hex digits).
pub const FIELD_TOKEN: &str = "shm_token";
/// Per-buffer descriptor field: the buffer's table slot.
pub const FIELD_SLOT: &str = "shm_slot";
/// Per-buffer descriptor field: the registration's sequence number in that slot.
pub const FIELD_SEQ: &str = "shm_seq";

/// A target as its descriptor announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerInfo {
    pub host_id: String,
    pub pid: i32,
    pub start_time: u64,
    pub table_fd: i32,
    pub slots: u32,
    pub token: [u64; 2],
}

impl PeerInfo {
    /// What this process publishes.
    pub(crate) fn local(me: &LocalIdentity, table_fd: i32, slots: u32, token: [u64; 2]) -> Self {
        PeerInfo { host_id: me.host_id.clone(), pid: me.pid, start_time: me.start_time, table_fd, slots, token }
    }

    /// Reads the fields of segment `name`'s descriptor. A descriptor without them is
    /// `Unavailable` (the segment does not serve shm); malformed ones are `MalformedJson`.
    pub(crate) fn from_descriptor(name: &str, d: &SegmentDescriptor) -> Result<Self> {
        PeerInfo::read(&d.fields).map_err(|e| e.in_segment(name))?.ok_or_else(|| {
            Error::unavailable(format!(
                "segment {name:?} publishes no {FIELD_HOST_ID}; it does not serve shm (use tcp)"
            ))
        })
    }
}

/// The shm section of a segment's top level: absent when `shm_host_id` is.
impl Section for PeerInfo {
    fn read(f: &Fields) -> std::result::Result<Option<Self>, FieldError> {
        let Some(host_id) = f.get(FIELD_HOST_ID) else {
            return Ok(None);
        };
        let bad = |field: &str, why: &str| FieldError::new(field, why);
        let host_id =
            host_id.as_str().filter(|s| !s.is_empty()).ok_or_else(|| bad(FIELD_HOST_ID, "is not a string"))?;
        let int = |field: &str| f.get(field).and_then(Value::as_u64).ok_or_else(|| bad(field, "is missing"));
        let pid = i32::try_from(int(FIELD_PID)?).ok().filter(|p| *p > 0).ok_or_else(|| bad(FIELD_PID, "is no pid"))?;
        let start_time = int(FIELD_START_TIME)?;
        let table_fd = i32::try_from(int(FIELD_TABLE_FD)?).map_err(|_| bad(FIELD_TABLE_FD, "is out of range"))?;
        let slots = u32::try_from(int(FIELD_TABLE_SLOTS)?)
            .ok()
            .filter(|s| *s > 0 && *s <= crate::table::MAX_SLOTS)
            .ok_or_else(|| bad(FIELD_TABLE_SLOTS, "is out of range"))?;
        let token = f
            .get(FIELD_TOKEN)
            .and_then(Value::as_str)
            .and_then(parse_token)
            .ok_or_else(|| bad(FIELD_TOKEN, "is not 32 hex digits"))?;
        Ok(Some(PeerInfo { host_id: host_id.to_string(), pid, start_time, table_fd, slots, token }))
    }

    fn write(&self, f: &mut Fields) {
        f.insert(FIELD_HOST_ID, self.host_id.as_str());
        f.insert(FIELD_PID, self.pid);
        f.insert(FIELD_START_TIME, self.start_time);
        f.insert(FIELD_TABLE_FD, self.table_fd);
        f.insert(FIELD_TABLE_SLOTS, self.slots);
        f.insert(FIELD_TOKEN, format!("{:016x}{:016x}", self.token[0], self.token[1]));
    }
}

fn parse_token(s: &str) -> Option<[u64; 2]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    Some([u64::from_str_radix(&s[..16], 16).ok()?, u64::from_str_radix(&s[16..], 16).ok()?])
}

/// True when `d` was published by a process on this host (same boot, same pid namespace).
pub(crate) fn same_host(d: &SegmentDescriptor, me: &LocalIdentity) -> bool {
    d.fields.get(FIELD_HOST_ID).and_then(Value::as_str) == Some(me.host_id.as_str())
}

/// The shm section of one buffer: its entry in the target's registration table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableEntry {
    pub slot: u32,
    pub seq: u64,
}

impl Section for TableEntry {
    fn read(f: &Fields) -> std::result::Result<Option<Self>, FieldError> {
        match (f.get_as(FIELD_SLOT)?, f.get_as(FIELD_SEQ)?) {
            (Some(slot), Some(seq)) => Ok(Some(TableEntry { slot, seq })),
            (None, None) => Ok(None),
            (None, _) => Err(FieldError::new(FIELD_SLOT, "is missing")),
            (_, None) => Err(FieldError::new(FIELD_SEQ, "is missing")),
        }
    }

    fn write(&self, f: &mut Fields) {
        f.insert(FIELD_SLOT, self.slot);
        f.insert(FIELD_SEQ, self.seq);
    }
}

/// Adds a registration's table entry to its descriptor entry.
pub(crate) fn write_buffer(b: &BufRef, desc: &mut BufferDesc) {
    desc.set_section(&TableEntry { slot: b.slot, seq: b.seq });
}

/// The published buffers of one descriptor, sorted by address, for range lookups.
#[derive(Debug, Clone, Default)]
pub(crate) struct BufIndex {
    bufs: Vec<BufRef>,
}

impl BufIndex {
    /// The buffers of `d` that carry shm table entries (others cannot be reached through shm).
    pub(crate) fn from_descriptor(d: &SegmentDescriptor) -> Self {
        let mut bufs: Vec<BufRef> = d
            .buffers
            .iter()
            .filter_map(|b| {
                let TableEntry { slot, seq } = b.section::<TableEntry>().ok()??;
                (b.length > 0 && b.addr.checked_add(b.length).is_some()).then_some(BufRef {
                    addr: b.addr,
                    len: b.length,
                    slot,
                    seq,
                })
            })
            .collect();
        bufs.sort_by_key(|b| b.addr);
        BufIndex { bufs }
    }

    /// The buffer containing `[addr, addr+len)` entirely (never for zero length or overflow).
    pub(crate) fn find(&self, addr: u64, len: u64) -> Option<&BufRef> {
        let i = self.bufs.partition_point(|b| b.addr <= addr);
        // Buffers of one segment do not overlap, so only the last one starting at or before
        // `addr` can contain the range.
        self.bufs[..i].last().filter(|b| b.contains(addr, len))
    }

    /// Number of buffers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.bufs.len()
    }
}

/// A verified target process with its table mapped.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Segment name (for errors and peer events).
    pub name: String,
    /// Target pid.
    pub pid: i32,
    pidfd: Option<OwnedFd>,
    start_time: u64,
    /// The target's registration table.
    pub table: RemoteTable,
    dead: AtomicBool,
}

impl Conn {
    /// Connects to the target described by `info`: checks that the process with that pid is the
    /// one that published the descriptor (start time), watches it for exit (pidfd) and maps its
    /// registration table from `/proc/<pid>/fd/<n>`.
    pub(crate) fn open(name: &str, info: &PeerInfo) -> Result<Conn> {
        let me = identity::local()?;
        if info.host_id != me.host_id {
            return Err(Error::unavailable(format!(
                "segment {name:?} runs on another host or pid namespace ({}; here {}); shm reaches \
                 only processes of this host",
                info.host_id, me.host_id
            )));
        }
        let pid = info.pid;
        let dir = sys::open_proc_dir(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ESRCH) => Error::disconnected(name, format!("process {pid} no longer exists")),
            _ => Error::disconnected(name, format!("cannot open /proc/{pid}: {e}")),
        })?;
        let check_start = || -> Result<()> {
            let stat = sys::read_at(&dir, "stat")
                .map_err(|e| Error::disconnected(name, format!("process {pid} is gone ({e})")))?;
            match identity::parse_start_time(&stat) {
                Some(t) if t == info.start_time => Ok(()),
                Some(t) => Err(Error::disconnected(
                    name,
                    format!(
                        "process {pid} was replaced: it started at tick {t}, the segment's process at tick {} \
                         (the peer exited and its pid was reused)",
                        info.start_time
                    ),
                )),
                None => Err(Error::Protocol(format!("cannot parse /proc/{pid}/stat"))),
            }
        };
        check_start()?;
        let pidfd = sys::pidfd_open(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => Error::disconnected(name, format!("process {pid} exited")),
            _ => Error::disconnected(name, format!("pidfd_open({pid}): {e}")),
        })?;
        // The pidfd names whichever process had the pid when it was opened: checking the start
        // time again proves that it is still the segment's process.
        check_start()?;
        let fd =
            sys::open_at(&dir, &format!("fd/{}", info.table_fd), libc::O_RDWR).map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => permission_error(name, pid, "opening its registration table"),
                Some(libc::ESRCH) => Error::disconnected(name, format!("process {pid} exited")),
                _ => Error::disconnected(
                    name,
                    format!("cannot open its registration table /proc/{pid}/fd/{}: {e}", info.table_fd),
                ),
            })?;
        let table = RemoteTable::open(&fd, info.slots, info.token)
            .map_err(|why| Error::disconnected(name, format!("registration table of process {pid}: {why}")))?;
        Ok(Conn {
            name: name.to_string(),
            pid,
            pidfd,
            start_time: info.start_time,
            table,
            dead: AtomicBool::new(false),
        })
    }

    /// `Ok` while the target process lives and serves; a `RemoteDisconnected` error once it
    /// exited or shut its transport down.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self.gone("exited"));
        }
        if self.table.is_closed() {
            return Err(Error::disconnected(&self.name, "the peer shut its shm transport down"));
        }
        let exited = match &self.pidfd {
            Some(fd) => sys::pidfd_exited(fd),
            // No pidfd (old kernel): the pid must still name a process with the same start time.
            None => {
                std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                    .ok()
                    .and_then(|s| identity::parse_start_time(&s))
                    != Some(self.start_time)
            }
        };
        if exited {
            self.mark_dead();
            return Err(self.gone("exited"));
        }
        Ok(())
    }

    /// Records that the target is gone (all later requests fail at once).
    pub(crate) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    /// True after [`Conn::mark_dead`].
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// A `RemoteDisconnected` error naming the process.
    pub(crate) fn gone(&self, what: &str) -> Error {
        Error::disconnected(&self.name, format!("process {} {what}", self.pid))
    }

    /// The typed error for a refused lease.
    pub(crate) fn refusal(&self, r: Refusal, addr: u64, len: u64) -> Error {
        match r {
            Refusal::Closed => Error::disconnected(&self.name, "the peer shut its shm transport down"),
            Refusal::Stale => Error::AddressNotRegistered {
                addr,
                len,
                context: format!(
                    "segment {} unregistered this buffer after publishing the descriptor used (stale descriptor)",
                    self.name
                ),
            },
        }
    }

    /// Maps an error of `process_vm_*` on `[remote, +len)` to a typed error.
    pub(crate) fn os_error(&self, e: &std::io::Error, op: mooncake_core::Opcode, remote: u64, len: u64) -> Error {
        match e.raw_os_error() {
            Some(libc::ESRCH) => {
                self.mark_dead();
                self.gone("exited")
            }
            Some(libc::EPERM | libc::EACCES) => permission_error(&self.name, self.pid, op_name(op)),
            Some(libc::EFAULT) => Error::AddressNotRegistered {
                addr: remote,
                len,
                context: format!(
                    "{}: the range is not mapped in process {} of segment {} or locally (memory freed \
                     without unregistering it?)",
                    op_name(op),
                    self.pid,
                    self.name
                ),
            },
            Some(libc::ENOMEM) => Error::NoSpace(format!("{}: the kernel could not pin the pages: {e}", op_name(op))),
            Some(libc::ENOSYS) => Error::unavailable(
                "process_vm_readv/writev are not available (kernel without CONFIG_CROSS_MEMORY_ATTACH, or \
                 blocked by seccomp); use protocol tcp",
            ),
            _ => Error::Io(std::sync::Arc::new(std::io::Error::new(e.kind(), format!("{}: {e}", op_name(op))))),
        }
    }
}

fn op_name(op: mooncake_core::Opcode) -> &'static str {
    match op {
        mooncake_core::Opcode::Read => "process_vm_readv",
        mooncake_core::Opcode::Write => "process_vm_writev",
    }
}

/// The error for a target we may not attach to, saying exactly what is missing.
pub(crate) fn permission_error(name: &str, pid: i32, doing: &str) -> Error {
    Error::unavailable(permission_message(name, pid, doing, sys::ptrace_scope()))
}

pub(crate) fn permission_message(name: &str, pid: i32, doing: &str, scope: Option<u32>) -> String {
    let yama = match scope {
        None => "Yama is not active, so the kernel's plain ptrace rules apply".to_string(),
        Some(0) => "Yama ptrace_scope is 0 (classic ptrace permissions)".to_string(),
        Some(1) => "Yama ptrace_scope is 1; the target allows any tracer of its user (PR_SET_PTRACER) once its shm \
                    transport started"
            .to_string(),
        Some(2) => "Yama ptrace_scope is 2: only processes with CAP_SYS_PTRACE may attach; grant it to the \
                    initiator or lower /proc/sys/kernel/yama/ptrace_scope"
            .to_string(),
        Some(s) => {
            format!("Yama ptrace_scope is {s}: attaching is disabled on this host until reboot; use protocol tcp")
        }
    };
    format!(
        "shm: permission denied {doing} for process {pid} of segment {name:?}. Cross-memory attach needs \
         ptrace access to the target: run both processes as the same user (and keep the target dumpable, \
         no setuid), or give the initiator CAP_SYS_PTRACE. {yama}."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(info: &PeerInfo) -> SegmentDescriptor {
        let mut d = SegmentDescriptor { name: "n".into(), protocol: "shm".into(), ..Default::default() };
        d.set_section(info);
        d
    }

    fn sample() -> PeerInfo {
        PeerInfo {
            host_id: "abcd-ef:42".into(),
            pid: 1234,
            start_time: 99,
            table_fd: 7,
            slots: 16,
            token: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
        }
    }

    #[test]
    fn descriptor_fields_round_trip_through_json() {
        let info = sample();
        let d = descriptor(&info);
        let json = d.to_json();
        assert!(json.contains("\"shm_pid\":1234"), "{json}");
        assert!(json.contains("\"shm_token\":\"0123456789abcdeffedcba9876543210\""), "{json}");
        let back = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
        assert_eq!(PeerInfo::from_descriptor("n", &back).unwrap(), info);
    }

    #[test]
    fn missing_and_malformed_fields_are_typed() {
        let plain = SegmentDescriptor { protocol: "tcp".into(), ..Default::default() };
        assert!(matches!(PeerInfo::from_descriptor("n", &plain), Err(Error::Unavailable { .. })));
        for (field, value) in [
            (FIELD_PID, Value::from(-1)),
            (FIELD_PID, Value::from(0)),
            (FIELD_PID, Value::from(u64::MAX)),
            (FIELD_PID, Value::from("12")),
            (FIELD_TABLE_FD, Value::from(1u64 << 40)),
            (FIELD_TABLE_SLOTS, Value::from(0)),
            (FIELD_TABLE_SLOTS, Value::from(u64::from(u32::MAX))),
            (FIELD_TOKEN, Value::from("xyz")),
            (FIELD_TOKEN, Value::from("0123456789abcdeffedcba987654321g")),
            (FIELD_HOST_ID, Value::from(5)),
            (FIELD_START_TIME, Value::Null),
        ] {
            let mut d = descriptor(&sample());
            d.fields.insert(field, value.clone());
            assert!(matches!(PeerInfo::from_descriptor("n", &d), Err(Error::MalformedJson(_))), "{field} = {value}");
        }
    }

    #[test]
    fn reachability_needs_the_same_host_id() {
        let me = identity::local().unwrap();
        let mut info = sample();
        assert!(!same_host(&descriptor(&info), me));
        info.host_id = me.host_id.clone();
        assert!(same_host(&descriptor(&info), me));
        assert!(!same_host(&SegmentDescriptor::default(), me));
    }

    #[test]
    fn buffer_index_finds_containing_buffer() {
        let mut d = SegmentDescriptor { protocol: "shm".into(), ..Default::default() };
        for (i, (addr, len)) in [(0x9000u64, 0x1000u64), (0x1000, 0x1000), (0x3000, 0x10)].into_iter().enumerate() {
            let mut b = BufferDesc { name: "cpu:0".into(), addr, length: len, ..Default::default() };
            write_buffer(&BufRef { addr, len, slot: i as u32, seq: 1 }, &mut b);
            d.buffers.push(b);
        }
        // A buffer without table entry (registered by another transport only) is not indexed.
        d.buffers.push(BufferDesc { name: "cpu:0".into(), addr: 0x5000, length: 0x100, ..Default::default() });
        let idx = BufIndex::from_descriptor(&d);
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.find(0x1000, 0x1000).map(|b| b.slot), Some(1));
        assert_eq!(idx.find(0x9fff, 1).map(|b| b.slot), Some(0));
        assert_eq!(idx.find(0x300f, 1).map(|b| b.slot), Some(2));
        assert!(idx.find(0x3000, 0x11).is_none(), "past the end");
        assert!(idx.find(0x1fff, 2).is_none(), "straddles");
        assert!(idx.find(0xfff, 2).is_none(), "starts before");
        assert!(idx.find(0x5000, 1).is_none(), "not an shm buffer");
        assert!(idx.find(0x1000, 0).is_none(), "zero length");
        assert!(idx.find(u64::MAX - 1, 4).is_none(), "overflow");
        assert!(idx.find(0, 1).is_none());
    }

    #[test]
    fn permission_messages_say_what_is_missing() {
        let m = permission_message("h:1", 7, "reading", Some(2));
        assert!(m.contains("CAP_SYS_PTRACE") && m.contains("ptrace_scope is 2") && m.contains("same user"), "{m}");
        assert!(permission_message("h:1", 7, "x", Some(3)).contains("use protocol tcp"));
        assert!(permission_message("h:1", 7, "x", None).contains("Yama is not active"));
        assert!(permission_message("h:1", 7, "x", Some(1)).contains("PR_SET_PTRACER"));
    }

    #[test]
    fn connecting_checks_host_and_process() {
        let me = identity::local().unwrap();
        let info = PeerInfo { host_id: me.host_id.clone(), ..sample() };
        // Wrong host.
        let other = PeerInfo { host_id: "x:1".into(), ..info.clone() };
        assert!(matches!(Conn::open("n", &other), Err(Error::Unavailable { .. })));
        // A process that does not exist.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as i32;
        child.wait().unwrap();
        let e = Conn::open("n", &PeerInfo { pid: dead, ..info.clone() }).unwrap_err();
        assert!(e.is_disconnect(), "{e:?}");
        // Our pid with a wrong start time: pid reuse.
        let e = Conn::open("n", &PeerInfo { pid: me.pid, start_time: me.start_time + 1, ..info.clone() }).unwrap_err();
        assert!(e.is_disconnect() && e.to_string().contains("replaced"), "{e}");
        // Right process, but no such table descriptor.
        let e = Conn::open("n", &PeerInfo { pid: me.pid, start_time: me.start_time, table_fd: 1 << 20, ..info })
            .unwrap_err();
        assert!(e.is_disconnect() && e.to_string().contains("registration table"), "{e}");
    }
}
