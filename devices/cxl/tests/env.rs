//! Configuration from the environment (one test: the environment is process-wide) and the registry entry.

mod common;

use mooncake_core::registry::{self, Availability};
use mooncake_device_cxl::{CxlConfig, CxlDevice, CxlError};

fn set(name: &str, value: Option<&str>) {
    // SAFETY: this test binary has a single test, so no other thread reads the environment meanwhile.
    unsafe {
        match value {
            Some(v) => std::env::set_var(name, v),
            None => std::env::remove_var(name),
        }
    }
}

#[test]
fn environment_names_the_region() {
    mooncake_device_cxl::link();
    for v in ["MC_CXL_DEV_PATH", "CXL_DEV_PATH", "MC_CXL_DEV_SIZE", "CXL_DEV_SIZE", "MC_CXL_GRANULARITY"] {
        set(v, None);
    }
    assert!(matches!(CxlConfig::from_env(), Err(CxlError::NotConfigured)));
    assert!(CxlConfig::from_env().unwrap_err().to_string().contains("MC_CXL_DEV_PATH"));
    let probe = registry::devices().into_iter().find(|f| f.name == "cxl").expect("cxl device registered");
    assert!(matches!((probe.probe)(), Availability::Unavailable(why) if why.contains("MC_CXL_DEV_PATH")));

    // Upstream's variable names work; ours win when both are set.
    let (_d, path) = common::region_file(8 << 20);
    set("CXL_DEV_PATH", Some(path.to_str().unwrap()));
    set("CXL_DEV_SIZE", Some("8388608"));
    let c = CxlConfig::from_env().unwrap();
    assert_eq!((c.path.as_path(), c.size), (path.as_path(), Some(8 << 20)));
    set("MC_CXL_DEV_PATH", Some("/nonexistent/cxl"));
    assert_eq!(CxlConfig::from_env().unwrap().path.to_str(), Some("/nonexistent/cxl"));
    assert!(matches!((probe.probe)(), Availability::Unavailable(why) if why.contains("/nonexistent/cxl")));
    set("MC_CXL_DEV_PATH", None);
    set("MC_CXL_DEV_SIZE", Some("8M"));
    assert_eq!(CxlConfig::from_env().unwrap().size, Some(8 << 20));
    set("MC_CXL_DEV_SIZE", Some("lots"));
    assert!(matches!(CxlConfig::from_env(), Err(CxlError::BadValue { name, .. }) if name == "MC_CXL_DEV_SIZE"));
    set("MC_CXL_DEV_SIZE", None);
    set("MC_CXL_FLUSH", Some("yes"));
    assert!(matches!(CxlConfig::from_env(), Err(CxlError::BadValue { .. })));
    set("MC_CXL_FLUSH", Some("1"));
    assert!(CxlConfig::from_env().unwrap().flush);
    set("MC_CXL_FLUSH", None);

    // The shared device is mapped once and handed to everyone.
    assert!((probe.probe)().is_available());
    let a = CxlDevice::shared().unwrap();
    let b = (probe.create)().unwrap();
    assert_eq!(a.region().base(), b.classify(a.region().base(), 1).map(|_| a.region().base()).unwrap());
    assert!(std::sync::Arc::ptr_eq(&a, &CxlDevice::shared().unwrap()));
}
