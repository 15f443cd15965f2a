//! Finds the system libfabric with pkg-config, generates bindings with bindgen (wrapping the
//! `static inline` fi_* calls in real functions) and compiles those wrappers with cc.

use std::path::PathBuf;

/// Oldest libfabric whose API these bindings are checked against (Debian 12 ships 1.17).
const MIN_VERSION: &str = "1.11";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let lib = match pkg_config::Config::new().atleast_version(MIN_VERSION).probe("libfabric") {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "\nmooncake-libfabric-sys: libfabric >= {MIN_VERSION} (headers and pkg-config file) was not found.\n\
                 Install it: `apt-get install libfabric-dev` (Debian/Ubuntu), `dnf install libfabric-devel` \
                 (Fedora/RHEL), or point PKG_CONFIG_PATH at a libfabric installation (e.g. the AWS EFA \
                 installer's /opt/amazon/efa/lib/pkgconfig).\nTo build mooncake-rs without libfabric, leave \
                 out the `libfabric` / `efa` features.\npkg-config said: {e}\n"
            );
            std::process::exit(1);
        }
    };

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrappers = out.join("fabric_static_wrappers");
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("fi_.*")
        .allowlist_type("fi_.*")
        .allowlist_type("fid.*")
        .allowlist_var("FI_.*")
        .allowlist_var("FID_.*")
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .prepend_enum_name(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for inc in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", inc.display()));
    }
    let bindings = match builder.generate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "\nmooncake-libfabric-sys: bindgen failed on the libfabric headers: {e}\n(needs libclang: `apt-get install libclang-dev`)\n"
            );
            std::process::exit(1);
        }
    };
    if let Err(e) = bindings.write_to_file(out.join("bindings.rs")) {
        eprintln!("mooncake-libfabric-sys: writing bindings.rs: {e}");
        std::process::exit(1);
    }

    let mut cc = cc::Build::new();
    cc.file(wrappers.with_extension("c")).include(env!("CARGO_MANIFEST_DIR")).warnings(false);
    for inc in &lib.include_paths {
        cc.include(inc);
    }
    cc.compile("mooncake_fabric_wrappers");
    // The wrappers call into libfabric: link it after them.
    for path in &lib.link_paths {
        println!("cargo:rustc-link-search=native={}", path.display());
    }
    for l in &lib.libs {
        println!("cargo:rustc-link-lib={l}");
    }
}
