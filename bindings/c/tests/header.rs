//! The checked-in header is what cbindgen makes of the code now (`MOONCAKE_BLESS=1` rewrites it), and every
//! prototype of upstream's headers (tests/upstream_prototypes.txt) appears in it with the same argument and
//! return types.

use std::collections::BTreeMap;
use std::path::PathBuf;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_current() {
    let path = crate_dir().join("include/mooncake_c.h");
    let fresh = generate();
    if std::env::var_os("MOONCAKE_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "bindings/c/include/mooncake_c.h is out of date: run `MOONCAKE_BLESS=1 cargo test -p mooncake-c --test header`"
    );
}

/// One prototype: return type and argument types, normalized.
#[derive(Debug, PartialEq, Eq)]
struct Proto {
    ret: String,
    args: Vec<String>,
}

/// Spelling differences that are the same C type: upstream's `#define` aliases and struct tags versus typedefs.
fn normalize_type(t: &str) -> String {
    let t = t.replace('*', " * ");
    // Top-level `const` on a by-value parameter is no part of the function's type.
    let t = if t.contains('*') { t } else { t.trim().trim_start_matches("const ").to_string() };
    let words: Vec<&str> = t.split_whitespace().filter(|w| *w != "struct").collect();
    let words: Vec<String> = words
        .into_iter()
        .map(|w| {
            match w {
                "segment_id_t" | "segment_handle_t" => "int32_t",
                "batch_id_t" => "uint64_t",
                "file_id_t" => "uint32_t",
                "transfer_request_t" => "transfer_request",
                "transfer_status_t" => "transfer_status",
                "notify_msg_t" => "notify_msg",
                "buffer_entry_t" => "buffer_entry",
                "mooncake_replicate_config" => "mooncake_replicate_config_t",
                w => w,
            }
            .to_string()
        })
        .collect();
    words.join(" ")
}

/// Splits `type name` into the type (the parameter name dropped when there is one).
fn param_type(p: &str) -> String {
    let p = p.trim();
    let (ty, last) = match p.rfind(|c: char| c == '*' || c.is_whitespace()) {
        Some(i) => (&p[..=i], &p[i + 1..]),
        None => (p, ""),
    };
    let ty = if last.is_empty() || ty.trim().is_empty() { p } else { ty };
    normalize_type(ty)
}

/// Prototypes of a C header: `ret name(args);` declarations, comments and preprocessor lines skipped.
fn parse_header(text: &str) -> BTreeMap<String, Proto> {
    let mut code = String::new();
    let mut in_comment = false;
    for line in text.lines() {
        let mut l = line.to_string();
        if in_comment {
            match l.find("*/") {
                Some(i) => {
                    l = l[i + 2..].to_string();
                    in_comment = false;
                }
                None => continue,
            }
        }
        while let Some(i) = l.find("/*") {
            match l[i..].find("*/") {
                Some(j) => l.replace_range(i..i + j + 2, ""),
                None => {
                    l.truncate(i);
                    in_comment = true;
                }
            }
        }
        if let Some(i) = l.find("//") {
            l.truncate(i);
        }
        if l.trim_start().starts_with('#') {
            continue;
        }
        code.push_str(&l);
        code.push(' ');
    }
    let mut out = BTreeMap::new();
    for decl in code.split(';') {
        let decl = decl.trim();
        let (Some(open), true) = (decl.find('('), decl.ends_with(')')) else { continue };
        let head = decl[..open].trim();
        if head.contains('{') || head.contains('}') || head.starts_with("typedef") {
            let head = head.rsplit(['{', '}']).next().unwrap_or("").trim();
            if head.is_empty() || head.starts_with("typedef") {
                continue;
            }
        }
        let head = head.rsplit(['{', '}']).next().unwrap_or("").trim();
        let Some(split) = head.rfind(|c: char| c == '*' || c.is_whitespace()) else { continue };
        let name = head[split + 1..].trim().to_string();
        let ret = normalize_type(&head[..=split]);
        if name.is_empty() || ret.is_empty() || ret.starts_with("typedef") {
            continue;
        }
        let inner = decl[open + 1..decl.len() - 1].trim();
        let args =
            if inner.is_empty() || inner == "void" { Vec::new() } else { inner.split(',').map(param_type).collect() };
        out.insert(name, Proto { ret, args });
    }
    out
}

/// tests/upstream_prototypes.txt: `name | ret | arg, arg, ...` per line.
fn upstream() -> BTreeMap<String, Proto> {
    let text = std::fs::read_to_string(crate_dir().join("tests/upstream_prototypes.txt")).expect("prototype list");
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(f.len(), 3, "bad line in upstream_prototypes.txt: {line}");
        let args = if f[2].is_empty() { Vec::new() } else { f[2].split(',').map(normalize_type).collect() };
        out.insert(f[0].to_string(), Proto { ret: normalize_type(f[1]), args });
    }
    out
}

#[test]
fn every_upstream_prototype_matches() {
    let ours = parse_header(&std::fs::read_to_string(crate_dir().join("include/mooncake_c.h")).unwrap_or_default());
    let theirs = upstream();
    let batch = &ours["mooncake_store_batch_put_from"];
    assert_eq!(batch.args.len(), 7, "the parser reads whole prototypes: {batch:?}");
    assert_eq!(batch.args[1], "const char * *");
    assert!(theirs.len() >= 40, "the list holds both headers ({} entries)", theirs.len());
    let mut problems = Vec::new();
    for (name, proto) in &theirs {
        match ours.get(name) {
            None => problems.push(format!("{name}: missing from mooncake_c.h")),
            Some(p) if p != proto => problems.push(format!("{name}: upstream {proto:?}, ours {p:?}")),
            Some(_) => {}
        }
    }
    for name in ours.keys() {
        if !theirs.contains_key(name) {
            problems.push(format!("{name}: ours only (not in upstream's headers)"));
        }
    }
    assert!(problems.is_empty(), "prototype differences:\n{}", problems.join("\n"));
}
