//! Queue-pair connection state machine: RESET -> INIT -> RTR -> RTS for RC queue pairs.
//!
//! The attributes are computed by pure functions, and the transitions go through the small
//! [`QpOps`] trait: `verbs.rs` implements it with `ibv_modify_qp`, the tests with a fake that
//! enforces the legal order of the verbs specification.

use std::io;

use mooncake_core::{Error, Result};

use crate::config::RdmaConfig;
use crate::discovery::path_mtu;
use crate::gid::Gid;

/// Queue-pair state (`ibv_qp_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// Reset: no traffic, attributes cleared.
    Reset,
    /// Initialized: port and access flags set.
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Send queue drained.
    Sqd,
    /// Send queue error.
    Sqe,
    /// Error: every outstanding work request is flushed.
    Error,
    /// Any other value.
    Unknown(u32),
}

impl QpState {
    /// From the `ibv_qp_state` number.
    pub fn from_ibv(v: u32) -> Self {
        match v {
            0 => QpState::Reset,
            1 => QpState::Init,
            2 => QpState::Rtr,
            3 => QpState::Rts,
            4 => QpState::Sqd,
            5 => QpState::Sqe,
            6 => QpState::Error,
            o => QpState::Unknown(o),
        }
    }
}

/// RESET -> INIT attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitAttrs {
    /// Physical port.
    pub port: u8,
    /// Partition key index.
    pub pkey_index: u16,
}

/// INIT -> RTR attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtrAttrs {
    /// Path MTU in bytes.
    pub path_mtu: u32,
    /// Peer's queue pair number.
    pub dest_qpn: u32,
    /// Expected first receive PSN.
    pub rq_psn: u32,
    /// Peer's GID (global route header).
    pub dgid: Gid,
    /// Peer's LID.
    pub dlid: u16,
    /// Our GID index.
    pub sgid_index: u8,
    /// GRH hop limit.
    pub hop_limit: u8,
    /// GRH traffic class.
    pub traffic_class: u8,
    /// Service level.
    pub service_level: u8,
    /// Our port.
    pub port: u8,
    /// Incoming RDMA reads/atomics in flight.
    pub max_dest_rd_atomic: u8,
    /// Minimum RNR NAK timer code.
    pub min_rnr_timer: u8,
}

/// RTR -> RTS attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtsAttrs {
    /// Local ACK timeout exponent.
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// First send PSN.
    pub sq_psn: u32,
    /// Outgoing RDMA reads/atomics in flight.
    pub max_rd_atomic: u8,
}

/// The verbs operations the state machine needs. Errors are the `errno` of `ibv_modify_qp`.
pub trait QpOps {
    /// The queue pair number (published in the handshake).
    fn qp_num(&self) -> u32;
    /// Current state (`ibv_query_qp`).
    fn query_state(&self) -> io::Result<QpState>;
    /// Any state -> RESET.
    fn modify_reset(&mut self) -> io::Result<()>;
    /// RESET -> INIT.
    fn modify_init(&mut self, attrs: &InitAttrs) -> io::Result<()>;
    /// INIT -> RTR.
    fn modify_rtr(&mut self, attrs: &RtrAttrs) -> io::Result<()>;
    /// RTR -> RTS.
    fn modify_rts(&mut self, attrs: &RtsAttrs) -> io::Result<()>;
}

/// Our side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPort {
    /// Port number.
    pub port: u8,
    /// Chosen GID index.
    pub sgid_index: u8,
    /// Active MTU in bytes.
    pub active_mtu: u32,
}

/// The peer NIC's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemotePort {
    /// Its GID.
    pub gid: Gid,
    /// Its LID.
    pub lid: u16,
}

/// The three attribute sets for connecting one QP to `dest_qpn`.
pub fn plan(
    local: &LocalPort,
    remote: &RemotePort,
    dest_qpn: u32,
    config: &RdmaConfig,
) -> (InitAttrs, RtrAttrs, RtsAttrs) {
    let init = InitAttrs { port: local.port, pkey_index: 0 };
    let rtr = RtrAttrs {
        path_mtu: path_mtu(local.active_mtu, config.mtu),
        dest_qpn,
        rq_psn: 0,
        dgid: remote.gid,
        dlid: remote.lid,
        sgid_index: local.sgid_index,
        hop_limit: 16,
        traffic_class: config.traffic_class,
        service_level: config.service_level,
        port: local.port,
        max_dest_rd_atomic: 16,
        min_rnr_timer: 12,
    };
    let rts = RtsAttrs {
        timeout: config.ib_timeout,
        retry_cnt: config.ib_retry_cnt,
        rnr_retry: config.rnr_retry,
        sq_psn: 0,
        max_rd_atomic: 16,
    };
    (init, rtr, rts)
}

/// Brings one QP to RTS: any state -> RESET (skipped when already there; attempted when the
/// state cannot be queried) -> INIT -> RTR -> RTS. `peer` names the remote NIC in errors.
pub fn bring_up<Q: QpOps + ?Sized>(
    qp: &mut Q,
    init: &InitAttrs,
    rtr: &RtrAttrs,
    rts: &RtsAttrs,
    peer: &str,
) -> Result<()> {
    let current = qp.query_state();
    if !matches!(current, Ok(QpState::Reset)) {
        qp.modify_reset().map_err(|e| Error::unavailable(format!("QP {}: cannot move to RESET: {e}", qp.qp_num())))?;
    }
    qp.modify_init(init).map_err(|e| {
        Error::unavailable(format!("QP {}: cannot move to INIT (check MC_IB_PORT={}): {e}", qp.qp_num(), init.port))
    })?;
    qp.modify_rtr(rtr).map_err(|e| {
        Error::disconnected(
            peer,
            format!(
                "QP {} -> {}: cannot move to RTR (check MTU {}, GID index {}, peer GID {}, LID {}): {e}",
                qp.qp_num(),
                rtr.dest_qpn,
                rtr.path_mtu,
                rtr.sgid_index,
                rtr.dgid,
                rtr.dlid
            ),
        )
    })?;
    qp.modify_rts(rts)
        .map_err(|e| Error::disconnected(peer, format!("QP {}: cannot move to RTS: {e}", qp.qp_num())))?;
    Ok(())
}

/// Connects every QP of an endpoint to the peer's QPs, pairwise. The counts must match
/// (`MC_NUM_QP_PER_EP` on both sides).
pub fn connect_endpoint<Q, G>(
    qps: &mut [G],
    remote_qpns: &[u32],
    local: &LocalPort,
    remote: &RemotePort,
    config: &RdmaConfig,
    peer: &str,
) -> Result<()>
where
    Q: QpOps + ?Sized,
    G: std::ops::DerefMut<Target = Q>,
{
    if qps.len() != remote_qpns.len() {
        return Err(Error::Protocol(format!(
            "QP count mismatch with {peer}: we have {}, the peer has {}; set the same MC_NUM_QP_PER_EP on both sides",
            qps.len(),
            remote_qpns.len()
        )));
    }
    for (qp, &qpn) in qps.iter_mut().zip(remote_qpns) {
        let (init, rtr, rts) = plan(local, remote, qpn, config);
        bring_up(&mut **qp, &init, &rtr, &rts, peer)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// A queue pair that follows the verbs state diagram and rejects illegal transitions with
    /// EINVAL, optionally failing one transition with a given errno.
    #[derive(Debug)]
    pub struct FakeQp {
        pub qpn: u32,
        pub state: QpState,
        pub fail: Option<(QpState, i32)>,
        pub query_fails: bool,
        pub transitions: Vec<QpState>,
        pub rejected: Vec<(QpState, QpState)>,
        pub rtr: Option<RtrAttrs>,
        pub rts: Option<RtsAttrs>,
    }

    impl FakeQp {
        pub fn new(qpn: u32) -> Self {
            FakeQp {
                qpn,
                state: QpState::Reset,
                fail: None,
                query_fails: false,
                transitions: Vec::new(),
                rejected: Vec::new(),
                rtr: None,
                rts: None,
            }
        }

        fn go(&mut self, to: QpState, legal_from: &[QpState]) -> io::Result<()> {
            if !legal_from.is_empty() && !legal_from.contains(&self.state) {
                self.rejected.push((self.state, to));
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            if let Some((at, errno)) = self.fail {
                if at == to {
                    self.fail = None;
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            self.state = to;
            self.transitions.push(to);
            Ok(())
        }
    }

    impl QpOps for FakeQp {
        fn qp_num(&self) -> u32 {
            self.qpn
        }
        fn query_state(&self) -> io::Result<QpState> {
            if self.query_fails { Err(io::Error::from_raw_os_error(libc::EIO)) } else { Ok(self.state) }
        }
        fn modify_reset(&mut self) -> io::Result<()> {
            self.go(QpState::Reset, &[])
        }
        fn modify_init(&mut self, a: &InitAttrs) -> io::Result<()> {
            if a.port == 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.go(QpState::Init, &[QpState::Reset])
        }
        fn modify_rtr(&mut self, a: &RtrAttrs) -> io::Result<()> {
            if crate::discovery::mtu_ibv(a.path_mtu).is_none() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.go(QpState::Rtr, &[QpState::Init])?;
            self.rtr = Some(*a);
            Ok(())
        }
        fn modify_rts(&mut self, a: &RtsAttrs) -> io::Result<()> {
            self.go(QpState::Rts, &[QpState::Rtr])?;
            self.rts = Some(*a);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeQp;
    use super::*;

    fn local() -> LocalPort {
        LocalPort { port: 1, sgid_index: 3, active_mtu: 1024 }
    }

    fn remote() -> RemotePort {
        RemotePort { gid: Gid::parse("::ffff:10.0.0.2").unwrap(), lid: 0 }
    }

    fn config() -> RdmaConfig {
        RdmaConfig { ib_timeout: 18, ib_retry_cnt: 5, traffic_class: 106, ..RdmaConfig::default() }
    }

    #[test]
    fn fresh_qps_reach_rts_with_the_planned_attributes() {
        let mut qps = [FakeQp::new(100), FakeQp::new(101)];
        let mut refs: Vec<&mut FakeQp> = qps.iter_mut().collect();
        connect_endpoint(&mut refs, &[900, 901], &local(), &remote(), &config(), "b@mlx5_1").unwrap();
        for (qp, dest) in qps.iter().zip([900, 901]) {
            assert_eq!(qp.state, QpState::Rts);
            assert_eq!(qp.transitions, vec![QpState::Init, QpState::Rtr, QpState::Rts], "no reset from RESET");
            assert!(qp.rejected.is_empty());
            let rtr = qp.rtr.unwrap();
            assert_eq!(rtr.dest_qpn, dest);
            assert_eq!(rtr.path_mtu, 1024, "min(active 1024, configured 4096)");
            assert_eq!((rtr.sgid_index, rtr.traffic_class, rtr.dgid), (3, 106, remote().gid));
            let rts = qp.rts.unwrap();
            assert_eq!((rts.timeout, rts.retry_cnt, rts.rnr_retry), (18, 5, 7));
        }
    }

    #[test]
    fn connected_or_failed_qps_are_reset_first() {
        for start in [QpState::Rts, QpState::Error, QpState::Init] {
            let mut qp = FakeQp::new(1);
            qp.state = start;
            let (i, r, s) = plan(&local(), &remote(), 7, &config());
            bring_up(&mut qp, &i, &r, &s, "peer").unwrap();
            assert_eq!(qp.transitions, vec![QpState::Reset, QpState::Init, QpState::Rtr, QpState::Rts], "{start:?}");
            assert!(qp.rejected.is_empty());
        }
        let mut qp = FakeQp::new(1);
        qp.state = QpState::Rtr;
        qp.query_fails = true;
        let (i, r, s) = plan(&local(), &remote(), 7, &config());
        bring_up(&mut qp, &i, &r, &s, "peer").unwrap();
        assert_eq!(qp.transitions[0], QpState::Reset, "reset attempted when the state is unknown");
    }

    #[test]
    fn failures_are_typed_and_a_retry_recovers() {
        let (i, r, s) = plan(&local(), &remote(), 7, &config());
        let mut qp = FakeQp::new(1);
        qp.fail = Some((QpState::Rtr, libc::ETIMEDOUT));
        let err = bring_up(&mut qp, &i, &r, &s, "b:2@mlx5_0").unwrap_err();
        assert!(err.is_disconnect(), "{err}");
        assert!(err.to_string().contains("RTR") && err.to_string().contains("b:2@mlx5_0"), "{err}");
        assert_eq!(qp.state, QpState::Init);
        bring_up(&mut qp, &i, &r, &s, "b:2@mlx5_0").unwrap();
        assert_eq!(qp.state, QpState::Rts);

        let mut qp = FakeQp::new(1);
        qp.fail = Some((QpState::Init, libc::EINVAL));
        assert!(matches!(bring_up(&mut qp, &i, &r, &s, "p"), Err(Error::Unavailable { .. })));
        let mut qp = FakeQp::new(1);
        qp.state = QpState::Rts;
        qp.fail = Some((QpState::Reset, libc::EIO));
        assert!(matches!(bring_up(&mut qp, &i, &r, &s, "p"), Err(Error::Unavailable { .. })));
        let mut qp = FakeQp::new(1);
        qp.fail = Some((QpState::Rts, libc::EINVAL));
        assert!(bring_up(&mut qp, &i, &r, &s, "p").unwrap_err().is_disconnect());
    }

    #[test]
    fn the_fake_rejects_illegal_transitions() {
        let mut qp = FakeQp::new(1);
        let (i, r, s) = plan(&local(), &remote(), 7, &config());
        assert!(qp.modify_rtr(&r).is_err());
        assert!(qp.modify_rts(&s).is_err());
        qp.modify_init(&i).unwrap();
        assert!(qp.modify_init(&i).is_err());
        assert_eq!(qp.rejected.len(), 3);
        let mut bad_port = i;
        bad_port.port = 0;
        assert!(FakeQp::new(2).modify_init(&bad_port).is_err());
    }

    #[test]
    fn qp_count_mismatch_is_rejected_before_touching_qps() {
        let mut qps = [FakeQp::new(1), FakeQp::new(2)];
        let mut refs: Vec<&mut FakeQp> = qps.iter_mut().collect();
        let err = connect_endpoint(&mut refs, &[5], &local(), &remote(), &config(), "peer").unwrap_err();
        assert!(matches!(&err, Error::Protocol(m) if m.contains("MC_NUM_QP_PER_EP")), "{err}");
        assert!(qps.iter().all(|q| q.transitions.is_empty()));
    }

    #[test]
    fn unknown_mtu_is_refused_by_rtr() {
        let mut qp = FakeQp::new(1);
        let l = LocalPort { active_mtu: 1500, ..local() };
        let (i, r, s) = plan(&l, &remote(), 7, &config());
        assert!(bring_up(&mut qp, &i, &r, &s, "p").unwrap_err().is_disconnect());
        assert_eq!(QpState::from_ibv(3), QpState::Rts);
        assert_eq!(QpState::from_ibv(42), QpState::Unknown(42));
    }
}
