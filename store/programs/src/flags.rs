//! gflags-style command lines, as upstream's C++ programs accept them: `--name=value`,
//! `--name value`, a single leading dash (`-name=value`), booleans as `--name`, `--noname` or
//! `--name=false`, plus values from a JSON config file for every flag not given on the command line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// What a flag's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
    /// A signed integer.
    Int,
    /// A floating-point number.
    Float,
    /// Free text.
    Text,
    /// Bytes: a number with an optional unit (`4 GB`, `512MB`, `1GiB`, `65536`).
    Size,
    /// Milliseconds: a number with an optional unit (`10000`, `10s`, `30m`, `24h`, `500ms`).
    Millis,
}

/// One flag a program accepts.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Name without dashes (`rpc_port`).
    pub name: &'static str,
    /// Value type.
    pub kind: Kind,
    /// Default, in the flag's own syntax.
    pub default: &'static str,
    /// One line of help.
    pub help: &'static str,
}

/// A command line or config file that could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum FlagError {
    /// A flag nobody declared.
    #[error("unknown flag --{0} (run with --help for the list)")]
    Unknown(String),
    /// A flag without its value at the end of the line.
    #[error("flag --{0} needs a value")]
    MissingValue(String),
    /// A value of the wrong shape.
    #[error("flag --{name}: {value:?} is not a valid {kind}")]
    BadValue {
        /// Flag name.
        name: String,
        /// What was given.
        value: String,
        /// What was expected.
        kind: &'static str,
    },
    /// A positional argument (these programs take none).
    #[error("unexpected argument {0:?}: flags look like --name=value")]
    Positional(String),
    /// The config file could not be read or is not a JSON object.
    #[error("config file {path}: {reason}")]
    Config {
        /// File path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// `--help` was given: the usage text.
    #[error("{0}")]
    Help(String),
}

/// Parsed flag values (every declared flag has one: given, from the config file, or default).
#[derive(Debug, Clone)]
pub struct Flags {
    specs: Vec<Spec>,
    values: BTreeMap<&'static str, String>,
    given: BTreeSet<&'static str>,
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Bool => "boolean (true/false)",
        Kind::Int => "integer",
        Kind::Float => "number",
        Kind::Text => "string",
        Kind::Size => "size (e.g. 4GB, 512MB, 65536)",
        Kind::Millis => "duration (milliseconds, or with ms/s/m/h)",
    }
}

/// Parses a boolean the way gflags does.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "t" => Some(true),
        "false" | "0" | "no" | "n" | "f" => Some(false),
        _ => None,
    }
}

pub use mooncake_store::units::parse_size;

/// Parses milliseconds: a bare number, or a number with `ms`, `s`, `m` or `h`.
pub fn parse_millis(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn check(spec: &Spec, value: &str) -> Result<(), FlagError> {
    let ok = match spec.kind {
        Kind::Bool => parse_bool(value).is_some(),
        Kind::Int => value.trim().parse::<i64>().is_ok(),
        Kind::Float => value.trim().parse::<f64>().is_ok_and(f64::is_finite),
        Kind::Text => true,
        Kind::Size => parse_size(value).is_some(),
        Kind::Millis => parse_millis(value).is_some(),
    };
    if ok {
        Ok(())
    } else {
        Err(FlagError::BadValue { name: spec.name.into(), value: value.into(), kind: kind_name(spec.kind) })
    }
}

impl Flags {
    /// Parses `args` (without the program name) against `specs`.
    pub fn parse<I, S>(program: &str, about: &str, specs: &[Spec], args: I) -> Result<Flags, FlagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut flags = Flags {
            specs: specs.to_vec(),
            values: specs.iter().map(|s| (s.name, s.default.to_string())).collect(),
            given: BTreeSet::new(),
        };
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')).filter(|b| !b.is_empty()) else {
                return Err(FlagError::Positional(arg));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            if matches!(name, "help" | "h" | "helpfull" | "helpshort") {
                return Err(FlagError::Help(flags.usage(program, about)));
            }
            let (spec, value) = match (flags.spec(name), inline) {
                (Some(spec), Some(v)) => (spec, v),
                (Some(spec), None) if spec.kind == Kind::Bool => (spec, "true".into()),
                (Some(spec), None) => (spec, args.next().ok_or_else(|| FlagError::MissingValue(name.into()))?),
                (None, None) => match name.strip_prefix("no").and_then(|n| flags.spec(n)) {
                    Some(spec) if spec.kind == Kind::Bool => (spec, "false".into()),
                    _ => return Err(FlagError::Unknown(name.into())),
                },
                (None, Some(_)) => return Err(FlagError::Unknown(name.into())),
            };
            check(&spec, &value)?;
            flags.values.insert(spec.name, value);
            flags.given.insert(spec.name);
        }
        Ok(flags)
    }

    fn spec(&self, name: &str) -> Option<Spec> {
        self.specs.iter().find(|s| s.name == name).copied()
    }

    /// Takes values from a JSON object file for every flag not given on the command line.
    /// Keys are flag names; values may be strings, numbers or booleans. Unknown keys are errors.
    pub fn merge_config_file(&mut self, path: &str) -> Result<(), FlagError> {
        let err = |reason: String| FlagError::Config { path: path.into(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| err("not a JSON object".into()))?;
        for (key, value) in obj {
            let spec = self.spec(key).ok_or_else(|| err(format!("unknown key {key:?}")))?;
            if self.given.contains(spec.name) {
                continue;
            }
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => return Err(err(format!("key {key:?}: unsupported value {other}"))),
            };
            check(&spec, &text)?;
            self.values.insert(spec.name, text);
        }
        Ok(())
    }

    /// Whether `name` was given on the command line.
    pub fn given(&self, name: &str) -> bool {
        self.given.contains(name)
    }

    /// The raw text of a declared flag.
    ///
    /// # Panics
    /// When `name` was not declared (a programming error, not user input).
    pub fn text(&self, name: &str) -> &str {
        self.values.get(name).map(String::as_str).unwrap_or_else(|| panic!("flag --{name} was not declared"))
    }

    /// A boolean flag.
    pub fn bool(&self, name: &str) -> bool {
        parse_bool(self.text(name)).unwrap_or(false)
    }

    /// An integer flag.
    pub fn int(&self, name: &str) -> i64 {
        self.text(name).trim().parse().unwrap_or(0)
    }

    /// A floating-point flag.
    pub fn float(&self, name: &str) -> f64 {
        self.text(name).trim().parse().unwrap_or(0.0)
    }

    /// A size flag, in bytes.
    pub fn size(&self, name: &str) -> u64 {
        parse_size(self.text(name)).unwrap_or(0)
    }

    /// A duration flag, in milliseconds.
    pub fn millis(&self, name: &str) -> u64 {
        parse_millis(self.text(name)).unwrap_or(0)
    }

    /// The `--help` text.
    pub fn usage(&self, program: &str, about: &str) -> String {
        let mut out = format!("{program}: {about}\n\nFlags (--name=value or --name value):\n");
        for s in &self.specs {
            let _ = writeln!(out, "  --{:<34} {} (default: {:?})", s.name, s.help, s.default);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        Spec { name: "rpc_port", kind: Kind::Int, default: "50051", help: "port" },
        Spec { name: "enable_http_metadata_server", kind: Kind::Bool, default: "false", help: "http" },
        Spec { name: "eviction_ratio", kind: Kind::Float, default: "0.05", help: "ratio" },
        Spec { name: "global_segment_size", kind: Kind::Size, default: "4 GB", help: "size" },
        Spec { name: "default_kv_lease_ttl", kind: Kind::Millis, default: "10000", help: "ttl" },
        Spec { name: "rpc_address", kind: Kind::Text, default: "0.0.0.0", help: "addr" },
    ];

    fn parse(args: &[&str]) -> Result<Flags, FlagError> {
        Flags::parse("t", "test", SPECS, args.iter().copied())
    }

    #[test]
    fn every_gflags_spelling_is_accepted() {
        let f = parse(&["--rpc_port=1", "-eviction_ratio", "0.5", "--enable_http_metadata_server", "-rpc_address=::"])
            .unwrap();
        assert_eq!(f.int("rpc_port"), 1);
        assert_eq!(f.float("eviction_ratio"), 0.5);
        assert!(f.bool("enable_http_metadata_server"));
        assert_eq!(f.text("rpc_address"), "::");
        assert!(f.given("rpc_port") && !f.given("global_segment_size"));
        assert_eq!(f.size("global_segment_size"), 4 << 30);
        let f = parse(&["--noenable_http_metadata_server"]).unwrap();
        assert!(!f.bool("enable_http_metadata_server"));
        let f = parse(&["--enable_http_metadata_server=false", "--default_kv_lease_ttl", "30s"]).unwrap();
        assert!(!f.bool("enable_http_metadata_server"));
        assert_eq!(f.millis("default_kv_lease_ttl"), 30_000);
    }

    #[test]
    fn bad_command_lines_are_typed_errors() {
        assert_eq!(parse(&["--nope=1"]).unwrap_err(), FlagError::Unknown("nope".into()));
        assert_eq!(parse(&["--norpc_port"]).unwrap_err(), FlagError::Unknown("norpc_port".into()));
        assert_eq!(parse(&["--rpc_port"]).unwrap_err(), FlagError::MissingValue("rpc_port".into()));
        assert!(matches!(parse(&["--rpc_port=x"]).unwrap_err(), FlagError::BadValue { .. }));
        assert!(matches!(parse(&["--eviction_ratio=nan"]).unwrap_err(), FlagError::BadValue { .. }));
        assert!(matches!(parse(&["--global_segment_size=4 XB"]).unwrap_err(), FlagError::BadValue { .. }));
        assert!(matches!(parse(&["--enable_http_metadata_server=maybe"]).unwrap_err(), FlagError::BadValue { .. }));
        assert_eq!(parse(&["stray"]).unwrap_err(), FlagError::Positional("stray".into()));
        assert!(matches!(parse(&["--help"]).unwrap_err(), FlagError::Help(h) if h.contains("--rpc_port")));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_millis("1800000"), Some(1_800_000));
        assert_eq!(parse_millis("24h"), Some(86_400_000));
        assert_eq!(parse_millis("500ms"), Some(500));
        assert_eq!(parse_millis("10 s"), Some(10_000));
        assert_eq!(parse_millis("1d"), None);
    }

    #[test]
    fn config_file_fills_what_the_command_line_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.json");
        std::fs::write(&path, r#"{"rpc_port": 6000, "eviction_ratio": "0.2", "enable_http_metadata_server": true}"#)
            .unwrap();
        let mut f = parse(&["--rpc_port=7000"]).unwrap();
        f.merge_config_file(path.to_str().unwrap()).unwrap();
        assert_eq!(f.int("rpc_port"), 7000, "the command line wins");
        assert_eq!(f.float("eviction_ratio"), 0.2);
        assert!(f.bool("enable_http_metadata_server"));
        std::fs::write(&path, r#"{"bogus": 1}"#).unwrap();
        assert!(matches!(f.merge_config_file(path.to_str().unwrap()), Err(FlagError::Config { .. })));
        std::fs::write(&path, "[1]").unwrap();
        assert!(matches!(f.merge_config_file(path.to_str().unwrap()), Err(FlagError::Config { .. })));
        assert!(matches!(f.merge_config_file("/nonexistent/x.json"), Err(FlagError::Config { .. })));
    }
}
