//! The `cuda` registry entry on any machine: without `libcuda.so.1` every entry point returns a
//! typed "unavailable" naming the library (never a panic); with a driver, the probe passes.

use mooncake_core::registry::{self, Availability};
use mooncake_core::{Error, MemoryDevice};
use mooncake_device_cuda::{CudaDevice, CudaError, LIBCUDA, driver_info, probe};

#[test]
fn cuda_is_registered_and_its_probe_tells_why_not() {
    mooncake_device_cuda::link();
    let factory = registry::devices().into_iter().find(|f| f.name == "cuda").expect("cuda is in the registry");
    let availability = (factory.probe)();
    assert_eq!(availability, probe());
    match driver_info() {
        Err(CudaError::LibraryMissing) => {
            assert_eq!(
                availability,
                Availability::Unavailable(format!("{LIBCUDA} not found (no NVIDIA driver on this machine)"))
            );
            let e = CudaDevice::new().unwrap_err();
            assert!(matches!(&e, Error::Unavailable { reason } if reason.contains("libcuda.so.1")), "{e}");
            let e = (factory.create)().err().expect("create fails without the driver");
            assert!(e.to_string().contains("libcuda.so.1"), "{e}");
            assert!(registry::available_devices().iter().all(|d| d.name() != "cuda"));
            let listed = registry::probe_all().into_iter().find(|r| r.kind == "device" && r.name == "cuda").unwrap();
            assert!(!listed.availability.is_available());
        }
        Err(other) => {
            println!("CUDA unusable here: {other}");
            assert_eq!(availability, Availability::Unavailable(other.to_string()));
            assert!(CudaDevice::new().is_err());
        }
        Ok(info) => {
            assert_eq!(availability, Availability::Available);
            assert!(!info.devices.is_empty());
            let dev = CudaDevice::new().unwrap();
            assert_eq!(dev.name(), "cuda");
            let caps = dev.capabilities();
            assert!(!caps.host_accessible && caps.export_handles);
            assert_eq!(caps.device_count as usize, info.devices.len());
        }
    }
}

#[test]
fn the_driver_error_is_the_same_every_time() {
    // The outcome of loading is cached for the process: asking again neither panics nor changes.
    let first = driver_info().map(|i| i.version);
    for _ in 0..3 {
        assert_eq!(driver_info().map(|i| i.version), first);
    }
}
