//! The endpoints opened by this process, live or closed.
//!
//! Some providers short-circuit peers in the same process: `shm` maps a same-process peer's
//! region by sharing the owner's pointer, so posting to an endpoint that was closed in this
//! process dereferences freed memory inside libfabric. Every rail registers its address here; a
//! post to an address of this process first checks, under the read lock, that the endpoint is
//! still open, and closing takes the write lock, so no post can slip between the check and the
//! close.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use mooncake_core::sync;

/// Provider -> endpoint address -> open.
type Registry = HashMap<String, HashMap<Vec<u8>, bool>>;

static ENDPOINTS: LazyLock<RwLock<Registry>> = LazyLock::new(|| RwLock::new(HashMap::new()));

/// Records an open endpoint of `provider` at `addr`.
pub(crate) fn opened(provider: &str, addr: &[u8]) {
    let mut map = sync::write(&ENDPOINTS);
    map.entry(provider.to_string()).or_default().insert(addr.to_vec(), true);
}

/// Marks endpoints closed (call before closing them).
pub(crate) fn closing(provider: &str, addrs: &[Vec<u8>]) {
    let mut map = sync::write(&ENDPOINTS);
    let eps = map.entry(provider.to_string()).or_default();
    for a in addrs {
        eps.insert(a.clone(), false);
    }
}

/// `Some(open)` when `addr` is (or was) an endpoint of this process.
fn state(map: &Registry, provider: &str, addr: &[u8]) -> Option<bool> {
    map.get(provider)?.get(addr).copied()
}

/// True when `addr` is (or was) an endpoint of this process.
pub(crate) fn is_local(provider: &str, addr: &[u8]) -> bool {
    state(&sync::read(&ENDPOINTS), provider, addr).is_some()
}

/// Runs `f` while holding the registry's read lock if `addr` is an open endpoint of this
/// process; `None` (without running `f`) when it was closed.
pub(crate) fn while_open<R>(provider: &str, addr: &[u8], f: impl FnOnce() -> R) -> Option<R> {
    let map = sync::read(&ENDPOINTS);
    if state(&map, provider, addr) == Some(true) { Some(f()) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_endpoints_refuse_posts() {
        let addr = b"unit-test-endpoint-addr".to_vec();
        assert!(!is_local("p", &addr));
        assert_eq!(while_open("p", &addr, || 1), None, "unknown addresses are not open local endpoints");
        opened("p", &addr);
        assert!(is_local("p", &addr));
        assert!(!is_local("other", &addr), "keyed by provider too");
        assert_eq!(while_open("p", &addr, || 2), Some(2));
        closing("p", std::slice::from_ref(&addr));
        assert!(is_local("p", &addr), "still known as ours");
        assert_eq!(while_open("p", &addr, || 3), None);
    }
}
