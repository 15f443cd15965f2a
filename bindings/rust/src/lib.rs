//! mooncake-rs facade: links backends chosen by cargo features.
