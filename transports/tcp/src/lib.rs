//! TCP transport, wire-compatible with upstream Mooncake (WIRE.md section 4).
