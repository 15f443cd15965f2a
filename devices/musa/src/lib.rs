//! musa GPU memory device for mooncake-rs (in progress).
