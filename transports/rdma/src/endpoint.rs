//! One connection between a local NIC and a peer NIC: `MC_NUM_QP_PER_EP` RC queue pairs, their
//! send-queue depths, and the connection state.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use mooncake_core::{Result, sync};

use crate::config::RdmaConfig;
use crate::endpoint_cache::Idle;
use crate::qp::{LocalPort, QpOps, RemotePort, connect_endpoint};

/// A set of queue pairs from NIC `nic` to the peer NIC `peer` (`<segment>@<nic>`).
#[derive(Debug)]
pub struct Endpoint<Q> {
    /// Local NIC index.
    pub nic: usize,
    /// Peer NIC path.
    pub peer: String,
    qps: Vec<Mutex<Q>>,
    qpns: Vec<u32>,
    depth: Vec<AtomicU32>,
    next: AtomicUsize,
    connected: AtomicBool,
    broken: AtomicBool,
    inflight: AtomicU32,
    remote_qpns: Mutex<Vec<u32>>,
    epoch: AtomicU64,
    /// Serializes active handshakes of this endpoint.
    pub handshake: tokio::sync::Mutex<()>,
}

impl<Q: QpOps> Endpoint<Q> {
    /// An unconnected endpoint over `qps` (in RESET).
    pub fn new(nic: usize, peer: String, qps: Vec<Q>) -> Self {
        let qpns = qps.iter().map(QpOps::qp_num).collect();
        let depth = qps.iter().map(|_| AtomicU32::new(0)).collect();
        Endpoint {
            nic,
            peer,
            qps: qps.into_iter().map(Mutex::new).collect(),
            qpns,
            depth,
            next: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            inflight: AtomicU32::new(0),
            remote_qpns: Mutex::new(Vec::new()),
            epoch: AtomicU64::new(0),
            handshake: tokio::sync::Mutex::new(()),
        }
    }

    /// Our QP numbers, published in the handshake.
    pub fn qp_nums(&self) -> &[u32] {
        &self.qpns
    }

    /// True once every QP is in RTS.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) && !self.is_broken()
    }

    /// True after a work request failed on it: its QPs are in the error state.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks it unusable (a work request failed; the QPs went to the error state).
    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// Number of completed (re)connections; a work request remembers the epoch it was posted in.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Marks it unusable when a work request posted in `epoch` failed and no reconnect happened
    /// since (a reconnect flushes older work requests; their errors say nothing about the new
    /// connection). Returns whether it was marked.
    pub fn mark_broken_since(&self, epoch: u64) -> bool {
        if self.epoch() == epoch {
            self.mark_broken();
            true
        } else {
            false
        }
    }

    /// Connects every QP pairwise to `remote_qpns` (RESET -> INIT -> RTR -> RTS, resetting
    /// connected QPs first). Work requests still queued on them are flushed by the reset.
    /// Already connected to exactly these QPs = nothing to do (both sides of a simultaneous
    /// connect end up here).
    pub fn connect(
        &self,
        remote_qpns: &[u32],
        local: &LocalPort,
        remote: &RemotePort,
        config: &RdmaConfig,
    ) -> Result<()> {
        let mut guards: Vec<MutexGuard<'_, Q>> = self.qps.iter().map(|m| sync::lock(m)).collect();
        let mut current = sync::lock(&self.remote_qpns);
        if self.is_connected() && current.as_slice() == remote_qpns {
            return Ok(());
        }
        self.connected.store(false, Ordering::Release);
        current.clear();
        connect_endpoint(&mut guards, remote_qpns, local, remote, config, &self.peer)?;
        current.extend_from_slice(remote_qpns);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.broken.store(false, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        Ok(())
    }

    /// Reserves a send-queue slot on the least recently picked QP with room (`max_wr` per QP);
    /// returns the QP index, or `None` when every QP is full.
    pub fn reserve(&self, max_wr: u32) -> Option<usize> {
        let n = self.qps.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            let d = &self.depth[i];
            let mut cur = d.load(Ordering::Acquire);
            while cur < max_wr {
                match d.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        self.inflight.fetch_add(1, Ordering::AcqRel);
                        return Some(i);
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// Gives back a slot taken by [`Endpoint::reserve`] (completion or failed post).
    pub fn release(&self, qp: usize) {
        if let Some(d) = self.depth.get(qp) {
            let _ = d.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
            let _ = self.inflight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        }
    }

    /// Runs `f` with QP `qp` locked (posting).
    pub fn with_qp<R>(&self, qp: usize, f: impl FnOnce(&mut Q) -> R) -> Option<R> {
        let m = self.qps.get(qp)?;
        let mut g = sync::lock(m);
        Some(f(&mut g))
    }

    /// Work requests in flight.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Acquire)
    }
}

impl<Q> Idle for Endpoint<Q> {
    fn is_idle(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gid::Gid;
    use crate::qp::QpState;
    use crate::qp::fake::FakeQp;

    fn ep(n: usize) -> Endpoint<FakeQp> {
        Endpoint::new(0, "b:1@mlx5_0".into(), (0..n).map(|i| FakeQp::new(10 + i as u32)).collect())
    }

    #[test]
    fn reserve_respects_depth_and_spreads_over_qps() {
        let e = ep(2);
        let picks: Vec<usize> = (0..4).map(|_| e.reserve(2).unwrap()).collect();
        let mut sorted = picks.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 0, 1, 1]);
        assert_eq!(e.reserve(2), None, "both QPs full");
        assert_eq!(e.inflight(), 4);
        assert!(!e.is_idle());
        e.release(1);
        assert_eq!(e.reserve(2), Some(1));
        for q in [0, 0, 1, 1] {
            e.release(q);
        }
        assert!(e.is_idle());
        e.release(0);
        e.release(7);
        assert_eq!(e.inflight(), 0, "never underflows");
    }

    #[test]
    fn connect_moves_every_qp_and_tracks_state() {
        let e = ep(2);
        assert_eq!(e.qp_nums(), &[10, 11]);
        assert!(!e.is_connected());
        let local = LocalPort { port: 1, sgid_index: 0, active_mtu: 4096 };
        let remote = RemotePort { gid: Gid::parse("fe80::1").unwrap(), lid: 3 };
        let config = RdmaConfig::default();
        assert!(e.connect(&[1], &local, &remote, &config).is_err());
        assert!(!e.is_connected());
        e.connect(&[20, 21], &local, &remote, &config).unwrap();
        assert!(e.is_connected());
        e.connect(&[20, 21], &local, &remote, &config).unwrap();
        assert_eq!(e.with_qp(0, |q| q.transitions.len()), Some(3), "same peer QPs: no reconnect");
        let dests: Vec<u32> = (0..2).map(|i| e.with_qp(i, |q| q.rtr.unwrap().dest_qpn).unwrap()).collect();
        assert_eq!(dests, vec![20, 21]);
        let epoch = e.epoch();
        assert_eq!(epoch, 1);
        e.connect(&[30, 31], &local, &remote, &config).unwrap();
        assert_eq!(e.epoch(), 2, "reconnected to other QPs");
        assert!(!e.mark_broken_since(epoch), "a flush from the old connection does not break the new one");
        assert!(e.is_connected());
        assert!(e.mark_broken_since(2));
        assert!(!e.is_connected());
        e.connect(&[30, 31], &local, &remote, &config).unwrap();
        assert!(e.is_connected(), "reconnect clears broken");
        assert_eq!(e.with_qp(0, |q| q.state), Some(QpState::Rts));
        assert!(e.with_qp(5, |_| ()).is_none());
    }
}
