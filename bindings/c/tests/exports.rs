//! The cdylib exports the C API and nothing else (exports.map): `nm -D --defined-only` lists exactly the
//! functions of the header.

use std::path::PathBuf;
use std::process::Command;

/// The cdylib `cargo test` built with this test: `target/<profile>/deps/libmooncake_c.so`, next to the test
/// binary (`cargo build` copies it one folder up; that copy may be older).
pub fn cdylib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let lib = exe.parent()?.join("libmooncake_c.so");
    lib.exists().then_some(lib)
}

#[test]
fn only_the_api_is_exported() {
    let Some(lib) = cdylib() else {
        eprintln!("SKIP: libmooncake_c.so not found next to the test binary");
        return;
    };
    let out = match Command::new("nm").args(["-D", "--defined-only"]).arg(&lib).output() {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("SKIP: `nm` is not available");
            return;
        }
    };
    let mut symbols: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    symbols.sort();
    let header = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/mooncake_c.h"))
        .expect("header");
    for s in &symbols {
        let upstream_name =
            s.starts_with("mooncake_") || header.contains(&format!(" {s}(")) || header.contains(&format!("*{s}("));
        assert!(upstream_name, "{s} is exported but is not a function of the header");
    }
    assert_eq!(symbols.len(), 58, "exported: {symbols:?}");
}
