//! The MemoryDevice suite: allocate, classify, copy to and from host, free, and the error cases; for devices
//! the CPU cannot reach that export handles (GPUs), device-to-device copies through imported handles, as the
//! GPU IPC transports make them.
//!
//! It runs on every device driver whose probe passes in the process (the runner runs it for each one linked).

use std::sync::Arc;

use mooncake_core::registry::{self, Availability};
use mooncake_core::{AllocOptions, DeviceCapabilities, Error, MemoryDevice};

use crate::util::{OrFail, check_equal, ensure, pattern};
use crate::{Outcome, SuiteOptions, TestResult, Trial};

const KIND: &str = "device";

type Body = fn(&dyn MemoryDevice, &DeviceCapabilities) -> TestResult;

/// Every MemoryDevice test for the linked device driver `name`.
///
/// A driver whose probe fails yields one skipped trial; one that is not linked yields one failed
/// trial.
pub fn device_suite(name: &str, opts: &SuiteOptions) -> Vec<Trial> {
    let Some(factory) = registry::devices().into_iter().find(|f| f.name == name) else {
        return vec![Trial::fixed(KIND, name, "linked", Outcome::Failed(format!("device {name:?} is not linked")))];
    };
    if let Availability::Unavailable(why) = (factory.probe)() {
        return vec![Trial::fixed(KIND, name, "probe", Outcome::Skipped(format!("probe: {why}")))];
    }
    let cases: [(&str, Body); 11] = [
        ("declaration", declaration),
        ("allocate_free", allocate_free),
        ("classify_own_memory", classify),
        ("copy_round_trip", copy_round_trip),
        ("allocation_alignment", alignment),
        ("zero_length_allocation_rejected", zero_length),
        ("out_of_bounds_copy_rejected", out_of_bounds),
        ("double_free_rejected", double_free),
        ("concurrent_allocations", concurrent),
        ("sharing_handles", sharing),
        ("copy_between_and_imported_handles", copy_between),
    ];
    cases
        .into_iter()
        .map(|(test, body)| {
            if let Some(reason) = opts.disabled_reason(test) {
                return Trial::fixed(KIND, name, test, Outcome::Disabled(reason.to_string()));
            }
            let create = factory.create;
            let expected = factory.name;
            Trial::new(KIND, name, test, opts.timeout, move || {
                let dev: Arc<dyn MemoryDevice> = create().or_fail("creating the device")?;
                ensure!(dev.name() == expected, "device names itself {:?}, registered as {expected:?}", dev.name());
                let caps = dev.capabilities();
                body(dev.as_ref(), &caps)
            })
        })
        .collect()
}

fn declaration(dev: &dyn MemoryDevice, caps: &DeviceCapabilities) -> TestResult {
    ensure!(caps.device_count >= 1, "probe passed but device_count is 0");
    ensure!(!dev.name().is_empty(), "empty device name");
    Ok(Outcome::Passed)
}

fn allocate_free(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    for len in [1u64, 4096, 1 << 20, (4 << 20) + 3] {
        let a = dev.allocate(len, &AllocOptions::default()).or_fail(&format!("allocating {len} bytes"))?;
        ensure!(a.addr != 0, "allocation of {len} bytes at address 0");
        ensure!(a.len >= len, "asked for {len} bytes, got {}", a.len);
        dev.free(&a).or_fail(&format!("freeing {len} bytes"))?;
    }
    Ok(Outcome::Passed)
}

fn classify(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    let a = dev.allocate(8192, &AllocOptions::default()).or_fail("allocating")?;
    let whole = dev.classify(a.addr, a.len);
    let inner = dev.classify(a.addr + 100, 100);
    dev.free(&a).or_fail("freeing")?;
    let loc = whole.or_fail("classify of the device's own allocation")?;
    ensure!(
        loc.kind() == Some(dev.kind()),
        "classified as {loc} (kind {:?}), device kind is {:?}",
        loc.kind(),
        dev.kind()
    );
    ensure!(inner.is_some(), "classify of a range inside the allocation returned None");
    Ok(Outcome::Passed)
}

fn copy_round_trip(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    let len = (1u64 << 20) + 4096;
    let a = dev.allocate(len, &AllocOptions::default()).or_fail("allocating")?;
    let r = (|| {
        for (off, n) in [(0u64, 1usize), (0, 4096 + 7), (4095, 65536), (len - (1 << 20), 1 << 20), (len - 1, 1)] {
            let src = pattern(off ^ n as u64, n);
            dev.copy_from_host(&src, &a, off).or_fail(&format!("copy_from_host {n} bytes at {off}"))?;
            let mut back = vec![0u8; n];
            dev.copy_to_host(&a, off, &mut back).or_fail(&format!("copy_to_host {n} bytes at {off}"))?;
            check_equal(&back, &src, &format!("{n} bytes at offset {off} after a round trip"))?;
        }
        // Zero-length copies are no-ops, not errors.
        dev.copy_from_host(&[], &a, 0).or_fail("zero-length copy_from_host")?;
        dev.copy_to_host(&a, len, &mut []).or_fail("zero-length copy_to_host at the end")?;
        Ok(Outcome::Passed)
    })();
    dev.free(&a).or_fail("freeing")?;
    r
}

fn alignment(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    for align in [64u64, 4096, 2 << 20] {
        let opts = AllocOptions { alignment: align, ..AllocOptions::default() };
        let a = dev.allocate(100, &opts).or_fail(&format!("allocating with alignment {align}"))?;
        let ok = a.addr % align == 0;
        dev.free(&a).or_fail("freeing")?;
        ensure!(ok, "alignment {align} requested, got address {:#x}", a.addr);
    }
    let bad = AllocOptions { alignment: 3, ..AllocOptions::default() };
    match dev.allocate(100, &bad) {
        Err(Error::InvalidArgument(_)) => Ok(Outcome::Passed),
        Ok(a) => {
            let _ = dev.free(&a);
            Err("alignment 3 (not a power of two) was accepted".into())
        }
        Err(e) => Err(format!("alignment 3: {e:?}, expected InvalidArgument")),
    }
}

fn zero_length(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    match dev.allocate(0, &AllocOptions::default()) {
        Err(Error::InvalidArgument(_)) => Ok(Outcome::Passed),
        Ok(a) => {
            let _ = dev.free(&a);
            Err("a zero-length allocation was accepted".into())
        }
        Err(e) => Err(format!("zero-length allocation: {e:?}, expected InvalidArgument")),
    }
}

fn out_of_bounds(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    let a = dev.allocate(4096, &AllocOptions::default()).or_fail("allocating")?;
    let len = a.len;
    let typed = |r: mooncake_core::Result<()>, what: &str| -> Result<(), String> {
        match r {
            Err(Error::AddressNotRegistered { .. } | Error::InvalidArgument(_)) => Ok(()),
            Err(e) => Err(format!("{what}: {e:?}, expected AddressNotRegistered or InvalidArgument")),
            Ok(()) => Err(format!("{what}: accepted")),
        }
    };
    let mut buf = vec![0u8; 100];
    let r = (|| {
        typed(dev.copy_to_host(&a, len - 10, &mut buf), "copy_to_host past the end")?;
        typed(dev.copy_from_host(&buf, &a, len - 10), "copy_from_host past the end")?;
        typed(dev.copy_to_host(&a, u64::MAX - 10, &mut buf), "copy_to_host with an overflowing offset")?;
        typed(dev.copy_from_host(&buf, &a, u64::MAX), "copy_from_host at offset u64::MAX")?;
        typed(dev.copy_to_host(&a, len + 1, &mut []), "zero-length copy_to_host beyond the end")?;
        Ok(Outcome::Passed)
    })();
    dev.free(&a).or_fail("freeing")?;
    r
}

fn double_free(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    let a = dev.allocate(4096, &AllocOptions::default()).or_fail("allocating")?;
    dev.free(&a).or_fail("first free")?;
    match dev.free(&a) {
        Err(_) => {}
        Ok(()) => return Err("a second free of the same allocation succeeded".into()),
    }
    Ok(Outcome::Passed)
}

fn concurrent(dev: &dyn MemoryDevice, _: &DeviceCapabilities) -> TestResult {
    let errors: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8u64)
            .map(|k| {
                s.spawn(move || -> Result<(), String> {
                    for round in 0..16u64 {
                        let n = 4096 + (k * 16 + round) as usize;
                        let a = dev.allocate(n as u64, &AllocOptions::default()).or_fail("allocating")?;
                        let src = pattern(k * 100 + round, n);
                        dev.copy_from_host(&src, &a, 0).or_fail("copy_from_host")?;
                        let mut back = vec![0u8; n];
                        dev.copy_to_host(&a, 0, &mut back).or_fail("copy_to_host")?;
                        dev.free(&a).or_fail("free")?;
                        check_equal(&back, &src, &format!("thread {k} round {round}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a thread panicked".into()),
            })
            .collect()
    });
    ensure!(errors.is_empty(), "{}", errors.join("; "));
    Ok(Outcome::Passed)
}

fn sharing(dev: &dyn MemoryDevice, caps: &DeviceCapabilities) -> TestResult {
    let options = AllocOptions { shareable: caps.export_handles, ..AllocOptions::default() };
    let a = dev.allocate(4096, &options).or_fail("allocating")?;
    let r = (|| {
        if !caps.export_handles {
            return match dev.export_handle(&a) {
                Err(Error::Unsupported { .. }) => Ok(Outcome::Passed),
                Err(e) => Err(format!("export_handle without export_handles: {e:?}, expected Unsupported")),
                Ok(_) => Err("export_handle succeeded although export_handles = false".into()),
            };
        }
        let src = pattern(31, 4096);
        dev.copy_from_host(&src, &a, 0).or_fail("copy_from_host")?;
        let h = dev.export_handle(&a).or_fail("export_handle")?;
        ensure!(h.len >= 4096, "handle covers {} bytes, allocation has 4096", h.len);
        let b = dev.import_handle(&h).or_fail("import_handle")?;
        let mut back = vec![0u8; 4096];
        let r = dev.copy_to_host(&b, 0, &mut back).or_fail("copy_to_host through the imported mapping");
        let _ = dev.free(&b);
        r?;
        check_equal(&back, &src, "bytes seen through the imported handle")?;
        Ok(Outcome::Passed)
    })();
    dev.free(&a).or_fail("freeing")?;
    r
}

/// What a GPU IPC transport does with a device: copies device to device ([`MemoryDevice::copy_between`])
/// between its own allocations, and from and into memory imported from an exported handle, checked with
/// host copies; out-of-bounds copies are refused with a typed error. Devices the CPU reads directly, or that
/// export no handles, skip it.
fn copy_between(dev: &dyn MemoryDevice, caps: &DeviceCapabilities) -> TestResult {
    if caps.host_accessible || !caps.export_handles {
        return Ok(Outcome::Skipped(format!(
            "for devices the CPU cannot read that export handles (GPUs); this one has host_accessible = {}, \
             export_handles = {}",
            caps.host_accessible, caps.export_handles
        )));
    }
    const LEN: u64 = (1 << 20) + 4096;
    let options = AllocOptions { shareable: true, ..AllocOptions::default() };
    let a = dev.allocate(LEN, &options).or_fail("allocating the source")?;
    let b = match dev.allocate(LEN, &AllocOptions::default()).or_fail("allocating the destination") {
        Ok(b) => b,
        Err(e) => {
            let _ = dev.free(&a);
            return Err(e);
        }
    };
    let mut imported = None;
    let r = (|| {
        let src = pattern(51, LEN as usize);
        dev.copy_from_host(&src, &a, 0).or_fail("copy_from_host")?;
        dev.copy_from_host(&vec![0u8; LEN as usize], &b, 0).or_fail("zeroing the destination")?;
        // Own allocations, at offsets.
        dev.copy_between(&a, 4096, &b, 100, 1 << 20).or_fail("copy_between 1 MiB")?;
        let mut back = vec![0u8; LEN as usize];
        dev.copy_to_host(&b, 0, &mut back).or_fail("copy_to_host")?;
        check_equal(&back[100..100 + (1 << 20)], &src[4096..4096 + (1 << 20)], "bytes copied device to device")?;
        ensure!(back[..100].iter().all(|x| *x == 0), "copy_between wrote before its destination range");
        ensure!(back[100 + (1 << 20)..].iter().all(|x| *x == 0), "copy_between wrote past its destination range");
        dev.copy_between(&a, 0, &b, 0, 0).or_fail("zero-length copy_between")?;
        // Memory imported from a handle, as a peer process maps it: read from it, write into it.
        let h = dev.export_handle(&a).or_fail("export_handle")?;
        let m = imported.insert(dev.import_handle(&h).or_fail("import_handle")?);
        dev.copy_between(m, 0, &b, 0, 8192).or_fail("copy_between from the imported mapping")?;
        let mut got = vec![0u8; 8192];
        dev.copy_to_host(&b, 0, &mut got).or_fail("copy_to_host")?;
        check_equal(&got, &src[..8192], "bytes copied from the imported mapping")?;
        let fresh = pattern(52, 8192);
        dev.copy_from_host(&fresh, &b, 0).or_fail("copy_from_host")?;
        dev.copy_between(&b, 0, m, 65536, 8192).or_fail("copy_between into the imported mapping")?;
        dev.copy_to_host(&a, 65536, &mut got).or_fail("copy_to_host of the exporter's allocation")?;
        check_equal(&got, &fresh, "exporter's bytes after a copy into its imported mapping")?;
        // Out of bounds on either side: typed errors, nothing copied.
        for (what, r) in [
            ("source range past its end", dev.copy_between(&a, LEN - 10, &b, 0, 100)),
            ("destination range past its end", dev.copy_between(&a, 0, &b, LEN - 10, 100)),
            ("overflowing offset", dev.copy_between(&a, u64::MAX - 10, &b, 0, 100)),
        ] {
            match r {
                Err(Error::AddressNotRegistered { .. } | Error::InvalidArgument(_)) => {}
                Err(e) => return Err(format!("copy_between with a {what}: {e:?}, expected a typed bounds error")),
                Ok(()) => return Err(format!("copy_between with a {what} was accepted")),
            }
        }
        Ok(Outcome::Passed)
    })();
    if let Some(m) = imported {
        let _ = dev.free(&m);
    }
    let freed = dev.free(&b).and(dev.free(&a));
    let out = r?;
    freed.or_fail("freeing")?;
    Ok(out)
}
