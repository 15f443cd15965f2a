//! Transports reach other engines' handshake sockets by segment name through
//! `TransportContext::peers`, in metadata mode (names that are not addresses, resolved through
//! `rpc_meta`) and in P2P mode. A test-only transport, `hs-echo`, keeps the context it was
//! started with and answers handshake frames addressed to it; it never carries data
//! (`can_reach` is false, so the engine routes transfers elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use mooncake::registry::{Availability, TransportFactory};
use mooncake::{
    BackendConfig, Capabilities, EngineConfig, Error, PeerHandshake, RemoteSegment, Result, SegmentDescriptor,
    TransferEngine, TransferTask, Transport, TransportContext,
};
use serde_json::{Value, json};

const NAME: &str = "hs-echo";

/// Segment name -> the handshake channel its engine gave the `hs-echo` transport.
static CHANNELS: LazyLock<Mutex<HashMap<String, Arc<dyn PeerHandshake>>>> = LazyLock::new(Default::default);

struct EchoTransport {
    caps: Capabilities,
    local_name: Mutex<String>,
}

#[async_trait]
impl Transport for EchoTransport {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        *self.local_name.lock().unwrap() = ctx.local_name.clone();
        CHANNELS.lock().unwrap().insert(ctx.local_name.clone(), ctx.peers.clone());
        Ok(())
    }

    fn describe(&self, _desc: &mut SegmentDescriptor) {}

    fn can_reach(&self, _target: &RemoteSegment) -> bool {
        false
    }

    fn submit(&self, _target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        TransferTask::fail_all(tasks, &Error::unsupported("transfer", NAME));
    }

    async fn handle_handshake(&self, request: &Value) -> Option<Result<Value>> {
        let hello = request.get("hs_echo")?;
        Some(Ok(json!({ "hs_echo": hello, "answered_by": *self.local_name.lock().unwrap(), "reply_msg": "" })))
    }

    async fn shutdown(&self) {}
}

mooncake::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "test fixture: answers handshake frames, carries no data",
        probe: || Availability::Available,
        create: |_: &BackendConfig| {
            Ok(Arc::new(EchoTransport { caps: Capabilities::default(), local_name: Mutex::new(String::new()) }))
        },
    }
}

fn channel_of(segment: &str) -> Arc<dyn PeerHandshake> {
    CHANNELS.lock().unwrap().get(segment).cloned().expect("the hs-echo transport was started")
}

fn check_pair(a: &TransferEngine, b: &TransferEngine) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (a_name, b_name) = (a.local_segment_name().to_string(), b.local_segment_name().to_string());
    let reply = rt.block_on(channel_of(&a_name).connect(&b_name, &json!({ "hs_echo": 42 }))).expect("handshake");
    assert_eq!(reply["answered_by"], json!(b_name), "{reply}");
    assert_eq!(reply["hs_echo"], json!(42));
    let reply = rt.block_on(channel_of(&b_name).connect(&a_name, &json!({ "hs_echo": "back" }))).expect("handshake");
    assert_eq!(reply["answered_by"], json!(a_name), "{reply}");
    let desc = rt.block_on(channel_of(&a_name).descriptor(&b_name)).expect("descriptor");
    assert_eq!(desc.name, b_name);
    // A frame no transport accepts is answered with a reason, not dropped.
    let reply = rt.block_on(channel_of(&a_name).connect(&b_name, &json!({ "other": 1 })));
    match reply {
        Ok(v) => assert!(v["reply_msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Metadata mode with names that are not addresses: the handshake socket is found through the
/// peer's `rpc_meta` key. An unknown segment is a typed NotFound.
#[test]
fn metadata_mode_resolves_names_through_rpc_meta() {
    mooncake::link_all();
    let server =
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0))
            .unwrap()
            .spawn()
            .unwrap();
    let engine = |name: &str| {
        TransferEngine::new(EngineConfig::new(name, server.url()).with_protocols(["tcp", NAME])).expect("engine")
    };
    // Two portless names on two loopback addresses: neither is the handshake socket's address.
    let (a, b) = (engine("127.0.0.1"), engine("localhost"));
    check_pair(&a, &b);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(channel_of("127.0.0.1").connect("no-such-node", &json!({ "hs_echo": 1 }))).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    a.shutdown();
    b.shutdown();
}

/// P2P mode: the segment name is the handshake address.
#[test]
fn p2p_mode_uses_the_name_as_address() {
    mooncake::link_all();
    let engine =
        || TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["tcp", NAME])).unwrap();
    let (a, b) = (engine(), engine());
    check_pair(&a, &b);
    a.shutdown();
    b.shutdown();
}
