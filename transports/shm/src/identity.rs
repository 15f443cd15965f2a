//! Who and where a process is: the host identity that decides reachability, and the process start
//! time that tells a live target from a process that merely reuses its pid.

use std::sync::OnceLock;

use mooncake_core::{Error, Result};

/// This process as peers see it in its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalIdentity {
    /// `<boot_id>:<pid namespace inode>`: equal only for processes of one kernel boot that see
    /// the same pids.
    pub host_id: String,
    /// Our pid in our pid namespace.
    pub pid: i32,
    /// Our start time (clock ticks after boot, `/proc/self/stat` field 22).
    pub start_time: u64,
}

/// The identity of this process, read once.
pub(crate) fn local() -> Result<&'static LocalIdentity> {
    static ID: OnceLock<std::result::Result<LocalIdentity, String>> = OnceLock::new();
    ID.get_or_init(|| read_local().map_err(|e| e.to_string())).as_ref().map_err(|e| Error::unavailable(e.clone()))
}

fn read_local() -> Result<LocalIdentity> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| Error::unavailable(format!("shm: cannot read /proc/sys/kernel/random/boot_id: {e}")))?;
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map_err(|e| Error::unavailable(format!("shm: cannot read /proc/self/ns/pid: {e}")))?;
    let ns_inode = parse_ns_inode(&ns.to_string_lossy()).ok_or_else(|| {
        Error::unavailable(format!("shm: unexpected pid namespace link {:?} (expected pid:[INODE])", ns.display()))
    })?;
    let host_id = host_id(&boot, ns_inode)
        .ok_or_else(|| Error::unavailable(format!("shm: unexpected boot_id {:?}", boot.trim())))?;
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| Error::unavailable(format!("shm: cannot read /proc/self/stat: {e}")))?;
    let start_time = parse_start_time(&stat)
        .ok_or_else(|| Error::unavailable("shm: cannot parse the start time in /proc/self/stat"))?;
    Ok(LocalIdentity { host_id, pid: std::process::id() as i32, start_time })
}

/// `<boot_id>:<pid namespace inode>`; `None` for a boot id that is not one token of hex and dashes.
pub(crate) fn host_id(boot_id: &str, pid_ns_inode: u64) -> Option<String> {
    let boot = boot_id.trim();
    let valid = !boot.is_empty() && boot.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    valid.then(|| format!("{boot}:{pid_ns_inode}"))
}

/// The inode of a namespace link target such as `pid:[4026531836]`.
pub(crate) fn parse_ns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are counted from the last
/// `)`.
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so field 22 is index 19.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_hostile_command_names() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        assert_eq!(parse_start_time(&format!("42 (cat) {tail}")), Some(987654));
        assert_eq!(parse_start_time(&format!("42 (a) (b) c) {tail}")), Some(987654));
        assert_eq!(parse_start_time(&format!("42 (x y z) {tail}")), Some(987654));
        assert_eq!(parse_start_time("42 (cat) S 1 2"), None);
        assert_eq!(parse_start_time("no parenthesis"), None);
        assert_eq!(parse_start_time(""), None);
    }

    #[test]
    fn host_ids_combine_boot_and_namespace() {
        assert_eq!(parse_ns_inode("pid:[4026531836]"), Some(4026531836));
        assert_eq!(parse_ns_inode("net:[4026531836]"), None);
        assert_eq!(parse_ns_inode("pid:[x]"), None);
        let a = host_id("3df42c14-689a-42bf-9f70-c5f4ca89362c\n", 1).unwrap();
        assert_eq!(a, "3df42c14-689a-42bf-9f70-c5f4ca89362c:1");
        assert_ne!(a, host_id("3df42c14-689a-42bf-9f70-c5f4ca89362c", 2).unwrap(), "other pid namespace");
        assert_eq!(host_id("", 1), None);
        assert_eq!(host_id("a b", 1), None);
    }

    #[test]
    fn local_identity_is_this_process() {
        let id = local().unwrap();
        assert_eq!(id.pid, std::process::id() as i32);
        assert!(id.start_time > 0);
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert!(id.host_id.starts_with(boot.trim()));
        // Our start time as another process would read it.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", id.pid)).unwrap();
        assert_eq!(parse_start_time(&stat), Some(id.start_time));
    }
}
