//! Every enabled feature must show up in the registry (the linker must not drop a backend).

#[test]
fn every_enabled_backend_is_registered() {
    let reports = mooncake::backends();
    for (feature, name) in mooncake::ENABLED_BACKENDS {
        assert!(
            reports.iter().any(|r| r.name == *name),
            "feature {feature:?} is enabled but backend {name:?} is not in the registry: {reports:?}"
        );
    }
    for must in ["p2p", "host"] {
        assert!(reports.iter().any(|r| r.name == must), "{must} missing: {reports:?}");
    }
}

#[test]
fn unknown_protocol_names_what_is_linked() {
    mooncake::link_all();
    let err = mooncake::registry::transport("warp-drive").err().expect("no such transport");
    let msg = err.to_string();
    assert!(msg.contains("warp-drive") && msg.contains("linked"), "{msg}");
}
