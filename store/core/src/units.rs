//! Human-readable sizes, as upstream's flags and config files write them.

/// Parses bytes with an optional unit: `B`, `KB`/`K`/`KiB`, `MB`, `GB`, `TB` (all binary, as
/// upstream's `4 GB` means 4 GiB), spaces allowed, case-insensitive. Fractions allowed (`1.5GB`).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    if unit == "ib" {
        return None;
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    let bytes = f * mult as f64;
    (f.is_finite() && f >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_binary_and_case_insensitive() {
        assert_eq!(parse_size("512MB"), Some(512 << 20));
        assert_eq!(parse_size("4 GB"), Some(4 << 30));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1.5 KB"), Some(1536));
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("16m"), Some(16 << 20));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("GB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999 TB"), None);
        assert_eq!(parse_size("12 parsecs"), None);
    }
}
