//! The tcp transport's part of the segment descriptor (docs/wire-formats.md section 2).

use mooncake_core::{FieldError, Fields, Section};

/// Top-level field: the TCP data port.
pub const FIELD_DATA_PORT: &str = "tcp_data_port";
/// Top-level field: the framing version the server speaks (1 when absent).
pub const FIELD_PROTO_VERSION: &str = "tcp_proto_version";
/// Top-level field: the host upstream serves data on (the host given to its `initialize()`).
pub const FIELD_DATA_HOST: &str = "tcp_data_host";

/// The tcp fields of a segment descriptor.
///
/// We publish `tcp_data_port` and `tcp_proto_version` right after `name` and `protocol` (see
/// [`Fields::insert_leading`]); upstream also publishes `tcp_data_host`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpSection {
    /// The data port (section 4 of docs/wire-formats.md); `None` = the segment serves no tcp.
    pub data_port: Option<u16>,
    /// The framing version the server speaks.
    pub proto_version: Option<u32>,
    /// The host serving the data port, when the segment publishes one.
    pub data_host: Option<String>,
}

impl TcpSection {
    /// The framing version (1 when absent, as upstream).
    pub fn version(&self) -> u32 {
        self.proto_version.unwrap_or(1)
    }

    /// The published data host when it can be connected to (not empty, `0.0.0.0` or `::`).
    pub fn usable_data_host(&self) -> Option<&str> {
        self.data_host.as_deref().map(str::trim).filter(|h| !h.is_empty() && *h != "0.0.0.0" && *h != "::")
    }
}

impl Section for TcpSection {
    fn read(fields: &Fields) -> Result<Option<Self>, FieldError> {
        let s = TcpSection {
            data_port: fields.get_as(FIELD_DATA_PORT)?,
            proto_version: fields.get_as(FIELD_PROTO_VERSION)?,
            data_host: fields.get_as(FIELD_DATA_HOST)?,
        };
        Ok((s != TcpSection::default()).then_some(s))
    }

    fn write(&self, fields: &mut Fields) {
        if let Some(port) = self.data_port {
            fields.insert_leading(FIELD_DATA_PORT, port);
        }
        if let Some(version) = self.proto_version {
            fields.insert_leading(FIELD_PROTO_VERSION, version);
        }
        if let Some(host) = &self.data_host {
            fields.insert_leading(FIELD_DATA_HOST, host.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use mooncake_core::{Error, SegmentDescriptor};

    use super::*;

    /// Upstream's descriptor, byte-exact (tests/interop/UPSTREAM_FACTS.md section 1).
    const UPSTREAM: &str = r#"{"buffers":[{"addr":94019169706720,"length":4096,"name":"127.0.0.1:15589"}],"name":"127.0.0.1:15589","protocol":"tcp","rdma_server_name":"","tcp_data_host":"127.0.0.1","tcp_data_port":15824,"tcp_proto_version":2,"timestamp":"2026-11-21 10:50:11.849299"}"#;

    #[test]
    fn reads_upstream_fields() {
        let d = SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
        let s = d.section::<TcpSection>().unwrap().unwrap();
        assert_eq!(
            s,
            TcpSection { data_port: Some(15824), proto_version: Some(2), data_host: Some("127.0.0.1".into()) }
        );
        assert_eq!((s.version(), s.usable_data_host()), (2, Some("127.0.0.1")));
    }

    #[test]
    fn absent_wildcard_and_malformed() {
        let d = SegmentDescriptor::from_json(br#"{"name":"a:1","protocol":"rdma","buffers":[]}"#).unwrap();
        assert_eq!(d.section::<TcpSection>().unwrap(), None);
        let d = SegmentDescriptor::from_json(
            br#"{"name":"a:1","protocol":"tcp","tcp_data_port":9,"tcp_data_host":"0.0.0.0","buffers":[]}"#,
        )
        .unwrap();
        let s = d.section::<TcpSection>().unwrap().unwrap();
        assert_eq!((s.version(), s.usable_data_host()), (1, None));
        for bad in
            [r#""tcp_data_port":70000"#, r#""tcp_data_port":"x""#, r#""tcp_proto_version":-1"#, r#""tcp_data_host":1"#]
        {
            let json = format!(r#"{{"name":"a:1","protocol":"tcp",{bad},"buffers":[]}}"#);
            let d = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
            let e = d.section::<TcpSection>().unwrap_err();
            assert!(
                matches!(&e, Error::MalformedJson(m) if m.starts_with(r#"segment "a:1": descriptor field "tcp_"#)),
                "{e}"
            );
        }
    }

    #[test]
    fn writes_port_and_version_first() {
        let mut d =
            SegmentDescriptor { name: "n".into(), protocol: "tcp".into(), timestamp: "t".into(), ..Default::default() };
        d.fields.insert("protocols", vec!["tcp"]);
        d.set_section(&TcpSection { data_port: Some(15876), proto_version: Some(2), data_host: None });
        assert_eq!(
            d.to_json(),
            r#"{"name":"n","protocol":"tcp","tcp_data_port":15876,"tcp_proto_version":2,"timestamp":"t","buffers":[],"protocols":["tcp"]}"#
        );
        d.set_section(&TcpSection { data_port: None, proto_version: Some(1), data_host: None });
        assert_eq!(d.section::<TcpSection>().unwrap().unwrap().proto_version, Some(1));
    }
}
