//! `mooncake_client`'s flags (upstream's names and defaults) and how they become a store
//! [`ClientConfig`].

use std::time::Duration;

use mooncake_store::client::ClientConfig;

use crate::flags::{Flags, Kind, Spec};

/// Every flag `mooncake_client` accepts.
pub const FLAGS: &[Spec] = &[
    Spec {
        name: "host",
        kind: Kind::Text,
        default: "0.0.0.0",
        help: "this node's address for peers (0.0.0.0 = the address of the default route)",
    },
    Spec {
        name: "port",
        kind: Kind::Int,
        default: "50052",
        help: "port (on 127.0.0.1) where dummy clients of this node attach (setup_dummy); 0 = do not serve them",
    },
    Spec {
        name: "transfer_port",
        kind: Kind::Int,
        default: "0",
        help: "transfer engine handshake port (0 = any free port; beyond upstream)",
    },
    Spec {
        name: "metadata_server",
        kind: Kind::Text,
        default: "P2PHANDSHAKE",
        help: "transfer engine metadata: P2PHANDSHAKE, http://host:8080/metadata, etcd://..., redis://...",
    },
    Spec {
        name: "master_server_address",
        kind: Kind::Text,
        default: "127.0.0.1:50051",
        help: "mooncake_master RPC address",
    },
    Spec { name: "protocol", kind: Kind::Text, default: "tcp", help: "transport (tcp, rdma, efa, libfabric, ...)" },
    Spec { name: "device_names", kind: Kind::Text, default: "", help: "NICs for rdma (comma-separated; empty = all)" },
    Spec { name: "global_segment_size", kind: Kind::Size, default: "4 GB", help: "memory this node contributes" },
    Spec { name: "local_buffer_size", kind: Kind::Size, default: "16 MB", help: "staging buffer for its own requests" },
    Spec {
        name: "setup_timeout",
        kind: Kind::Millis,
        default: "10s",
        help: "give up when the master does not answer within this time",
    },
];

/// The address of the interface holding the default route (no packet is sent), else loopback.
pub fn default_route_address() -> String {
    let probe = || -> std::io::Result<std::net::IpAddr> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect("192.0.2.1:9")?;
        Ok(socket.local_addr()?.ip())
    };
    match probe() {
        Ok(ip) if !ip.is_unspecified() => ip.to_string(),
        _ => "127.0.0.1".to_string(),
    }
}

/// The port dummy clients attach to (`--port`; 0 for none).
pub fn dummy_port(flags: &Flags) -> Result<u16, String> {
    u16::try_from(flags.int("port")).map_err(|_| format!("--port={} is not a port", flags.int("port")))
}

/// Turns parsed flags into a client configuration.
pub fn client_config(flags: &Flags) -> Result<ClientConfig, String> {
    let host = match flags.text("host") {
        "0.0.0.0" | "::" | "" => default_route_address(),
        h => h.to_string(),
    };
    let port = u16::try_from(flags.int("transfer_port"))
        .map_err(|_| format!("--transfer_port={} is not a port", flags.int("transfer_port")))?;
    let local_hostname = match port {
        0 => host,
        p if host.contains(':') => format!("[{host}]:{p}"),
        p => format!("{host}:{p}"),
    };
    let global_segment_size = flags.size("global_segment_size");
    if global_segment_size == 0 {
        return Err("--global_segment_size must be more than 0: a store node contributes memory".into());
    }
    let config = ClientConfig {
        local_hostname,
        metadata_server: flags.text("metadata_server").to_string(),
        protocol: flags.text("protocol").to_string(),
        device_name: flags.text("device_names").to_string(),
        master_server_addr: flags.text("master_server_address").to_string(),
        global_segment_size,
        local_buffer_size: flags.size("local_buffer_size"),
        setup_timeout: Duration::from_millis(flags.millis("setup_timeout").max(1)),
        ..ClientConfig::default()
    };
    config.validate().map_err(|e| format!("invalid settings: {e}"))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ClientConfig, String> {
        let flags = Flags::parse("mooncake_client", "", FLAGS, args.iter().copied()).map_err(|e| e.to_string())?;
        client_config(&flags)
    }

    #[test]
    fn flags_map_to_the_client_config() {
        let c = parse(&[
            "--host=10.1.2.3",
            "--transfer_port=6000",
            "--global_segment_size=512MB",
            "--master_server_address",
            "m:1",
            "--protocol=rdma",
        ])
        .unwrap();
        assert_eq!(c.local_hostname, "10.1.2.3:6000");
        assert_eq!(c.global_segment_size, 512 << 20);
        assert_eq!(c.local_buffer_size, 16 << 20);
        assert_eq!(c.master_server_addr, "m:1");
        assert_eq!(c.protocol, "rdma");
        assert_eq!(parse(&["--host=::1", "--transfer_port=7"]).unwrap().local_hostname, "[::1]:7");
        assert_eq!(parse(&["--host=127.0.0.1", "--port=0"]).unwrap().local_hostname, "127.0.0.1");
        let wildcard = parse(&["--transfer_port=0"]).unwrap().local_hostname;
        assert!(wildcard.parse::<std::net::IpAddr>().is_ok() && wildcard != "0.0.0.0", "{wildcard}");
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        assert!(parse(&["--global_segment_size=0"]).unwrap_err().contains("global_segment_size"));
        assert!(parse(&["--transfer_port=99999"]).unwrap_err().contains("not a port"));
        let flags = Flags::parse("mooncake_client", "", FLAGS, ["--port=99999"]).unwrap();
        assert!(dummy_port(&flags).unwrap_err().contains("not a port"));
    }
}
