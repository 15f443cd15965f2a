//! The RDMA connection handshake of docs/wire-formats.md section 3 (frame type 0 on the RPC socket), in the
//! JSON shape upstream Mooncake sends and accepts.
//!
//! ```json
//! {"protocol":"rdma","payload":"","local_nic_path":"10.0.0.1:15000@mlx5_0","local_lid":0,
//!  "local_gid":"00:00:...:0a:00:00:01","peer_nic_path":"10.0.0.2:15000@mlx5_1",
//!  "qp_num":[4711,4712],"reply_msg":""}
//! ```
//! The reply has the same shape seen from the other side; a non-empty `reply_msg` is a rejection.

use std::fmt;

use mooncake_core::{Error, Result};
use serde_json::{Map, Value};

/// Protocol name carried in the `protocol` field.
pub const PROTOCOL: &str = "rdma";

/// `<segment>@<nic>`: one NIC of one segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NicPath {
    /// Segment (server) name.
    pub server: String,
    /// NIC name.
    pub nic: String,
}

impl NicPath {
    /// Builds a path.
    pub fn new(server: impl Into<String>, nic: impl Into<String>) -> Self {
        NicPath { server: server.into(), nic: nic.into() }
    }

    /// Parses `<server>@<nic>`; both parts must be non-empty (NIC names never contain `@`).
    pub fn parse(s: &str) -> Result<NicPath> {
        match s.rsplit_once('@') {
            Some((server, nic)) if !server.is_empty() && !nic.is_empty() => Ok(NicPath::new(server, nic)),
            _ => Err(Error::Protocol(format!("NIC path {s:?} is not <segment>@<nic>"))),
        }
    }
}

impl fmt::Display for NicPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.server, self.nic)
    }
}

/// One handshake message (request or reply).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeDesc {
    /// Sender's NIC path.
    pub local_nic_path: String,
    /// Receiver's NIC path.
    pub peer_nic_path: String,
    /// Sender's queue pair numbers, one per QP of the endpoint.
    pub qp_num: Vec<u32>,
    /// Sender's LID.
    pub local_lid: u16,
    /// Sender's GID (upstream text form); empty from old peers.
    pub local_gid: String,
    /// Non-empty = the receiver rejects the connection, with the reason.
    pub reply_msg: String,
    /// Opaque payload (unused by RDMA; kept for compatibility).
    pub payload: String,
}

impl HandshakeDesc {
    /// The JSON object upstream sends.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "protocol": PROTOCOL,
            "payload": self.payload,
            "local_nic_path": self.local_nic_path,
            "local_lid": self.local_lid,
            "local_gid": self.local_gid,
            "peer_nic_path": self.peer_nic_path,
            "qp_num": self.qp_num,
            "reply_msg": self.reply_msg,
        })
    }

    /// A rejection reply.
    pub fn rejection(local_nic_path: &str, peer_nic_path: &str, reason: impl Into<String>) -> Self {
        HandshakeDesc {
            local_nic_path: local_nic_path.into(),
            peer_nic_path: peer_nic_path.into(),
            reply_msg: reason.into(),
            ..Default::default()
        }
    }

    /// Parses a handshake with upstream's type rules: the string fields must be strings when
    /// present, `local_lid` an unsigned 16-bit number, `qp_num` an array of unsigned 32-bit numbers.
    pub fn from_json(v: &Value) -> Result<HandshakeDesc> {
        let obj = v.as_object().ok_or_else(|| Error::Protocol("RDMA handshake is not a JSON object".into()))?;
        let string = |obj: &Map<String, Value>, key: &str| -> Result<String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(Error::Protocol(format!("RDMA handshake field {key:?} is not a string"))),
            }
        };
        for key in ["protocol", "payload", "local_nic_path", "local_gid", "peer_nic_path", "reply_msg"] {
            string(obj, key)?;
        }
        let local_lid = match obj.get("local_lid") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(|| {
                Error::Protocol("RDMA handshake field \"local_lid\" is not a 16-bit unsigned number".into())
            })?,
        };
        let qp_num = match obj.get("qp_num") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|q| {
                    q.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                        Error::Protocol("RDMA handshake field \"qp_num\" holds a non-u32 element".into())
                    })
                })
                .collect::<Result<Vec<u32>>>()?,
            Some(_) => return Err(Error::Protocol("RDMA handshake field \"qp_num\" is not an array".into())),
        };
        Ok(HandshakeDesc {
            local_nic_path: string(obj, "local_nic_path")?,
            peer_nic_path: string(obj, "peer_nic_path")?,
            qp_num,
            local_lid,
            local_gid: string(obj, "local_gid")?,
            reply_msg: string(obj, "reply_msg")?,
            payload: string(obj, "payload")?,
        })
    }

    /// True when `v` looks like an RDMA connection request (so this transport should answer it):
    /// an object with `local_nic_path` and `peer_nic_path`, and `protocol` absent, empty or `rdma`.
    pub fn is_rdma_request(v: &Value) -> bool {
        let Some(obj) = v.as_object() else { return false };
        let protocol_ok = match obj.get("protocol") {
            None | Some(Value::Null) => true,
            Some(Value::String(p)) => p.is_empty() || p == PROTOCOL,
            Some(_) => false,
        };
        protocol_ok && obj.contains_key("local_nic_path") && obj.contains_key("peer_nic_path")
    }

    /// Checks a reply against the request it answers: not a rejection, and the NIC paths mirrored.
    pub fn check_reply(&self, request: &HandshakeDesc) -> Result<()> {
        if !self.reply_msg.is_empty() {
            return Err(Error::Protocol(format!(
                "peer {} rejected the RDMA handshake: {}",
                request.peer_nic_path, self.reply_msg
            )));
        }
        if self.local_nic_path != request.peer_nic_path || self.peer_nic_path != request.local_nic_path {
            return Err(Error::Protocol(format!(
                "RDMA handshake reply mismatch: asked {} -> {}, answered {} -> {}",
                request.local_nic_path, request.peer_nic_path, self.local_nic_path, self.peer_nic_path
            )));
        }
        if self.qp_num.len() != request.qp_num.len() {
            return Err(Error::Protocol(format!(
                "peer {} has {} QPs per endpoint, we have {}; set the same MC_NUM_QP_PER_EP on both sides",
                request.peer_nic_path,
                self.qp_num.len(),
                request.qp_num.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM_REQUEST: &str = r#"{"local_gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:01","local_lid":0,
"local_nic_path":"10.0.0.1:15123@mlx5_0","payload":"","peer_nic_path":"10.0.0.2:15456@mlx5_1",
"protocol":"rdma","qp_num":[1234,1235],"reply_msg":""}
"#;

    #[test]
    fn parses_upstream_request_and_encodes_the_same_shape() {
        let v: Value = serde_json::from_str(UPSTREAM_REQUEST).unwrap();
        assert!(HandshakeDesc::is_rdma_request(&v));
        let d = HandshakeDesc::from_json(&v).unwrap();
        assert_eq!(d.local_nic_path, "10.0.0.1:15123@mlx5_0");
        assert_eq!(d.peer_nic_path, "10.0.0.2:15456@mlx5_1");
        assert_eq!(d.qp_num, vec![1234, 1235]);
        assert_eq!(d.local_lid, 0);
        assert!(d.local_gid.ends_with("0a:00:00:01"));
        assert_eq!(d.to_json(), v);
    }

    #[test]
    fn old_upstream_without_gid_lid_protocol_is_accepted() {
        let v: Value = serde_json::from_str(
            r#"{"local_nic_path":"a:1@mlx5_0","peer_nic_path":"b:2@mlx5_0","qp_num":[7],"reply_msg":""}"#,
        )
        .unwrap();
        assert!(HandshakeDesc::is_rdma_request(&v));
        let d = HandshakeDesc::from_json(&v).unwrap();
        assert_eq!((d.local_lid, d.local_gid.as_str(), d.qp_num.as_slice()), (0, "", &[7u32][..]));
    }

    #[test]
    fn wrong_types_are_protocol_errors() {
        for bad in [
            r#"[]"#,
            r#"{"local_nic_path":1}"#,
            r#"{"local_lid":-1}"#,
            r#"{"local_lid":65536}"#,
            r#"{"local_lid":"0"}"#,
            r#"{"qp_num":5}"#,
            r#"{"qp_num":[4294967296]}"#,
            r#"{"qp_num":["1"]}"#,
            r#"{"reply_msg":false}"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(matches!(HandshakeDesc::from_json(&v), Err(Error::Protocol(_))), "{bad}");
        }
    }

    #[test]
    fn other_protocols_are_not_mine() {
        for other in [
            r#"{"protocol":"efa","local_nic_path":"a@x","peer_nic_path":"b@y","efa_addr":"00"}"#,
            r#"{"local_nic_path":"a@x"}"#,
            r#"{"name":"x","notify_msg":"y"}"#,
            r#""rdma""#,
        ] {
            let v: Value = serde_json::from_str(other).unwrap();
            assert!(!HandshakeDesc::is_rdma_request(&v), "{other}");
        }
    }

    #[test]
    fn nic_paths() {
        let p = NicPath::parse("10.0.0.1:15123@mlx5_0").unwrap();
        assert_eq!((p.server.as_str(), p.nic.as_str()), ("10.0.0.1:15123", "mlx5_0"));
        assert_eq!(p.to_string(), "10.0.0.1:15123@mlx5_0");
        assert_eq!(NicPath::parse("[::1]:15000@mlx5_1").unwrap().server, "[::1]:15000");
        for bad in ["", "@mlx5_0", "host:1@", "nopath"] {
            assert!(NicPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reply_checks() {
        let req = HandshakeDesc {
            local_nic_path: "a:1@mlx5_0".into(),
            peer_nic_path: "b:2@mlx5_1".into(),
            qp_num: vec![1, 2],
            ..Default::default()
        };
        let good = HandshakeDesc {
            local_nic_path: "b:2@mlx5_1".into(),
            peer_nic_path: "a:1@mlx5_0".into(),
            qp_num: vec![9, 10],
            ..Default::default()
        };
        good.check_reply(&req).unwrap();
        let mut r = good.clone();
        r.reply_msg = "QP count mismatch".into();
        assert!(matches!(r.check_reply(&req), Err(Error::Protocol(m)) if m.contains("QP count mismatch")));
        let mut r = good.clone();
        r.local_nic_path = "b:2@mlx5_0".into();
        assert!(r.check_reply(&req).is_err());
        let mut r = good.clone();
        r.qp_num = vec![9];
        assert!(matches!(r.check_reply(&req), Err(Error::Protocol(m)) if m.contains("MC_NUM_QP_PER_EP")));
        let rej = HandshakeDesc::rejection("b:2@mlx5_1", "a:1@mlx5_0", "no such NIC");
        assert_eq!(rej.to_json()["reply_msg"], "no such NIC");
    }
}
