//! Test-only pieces shared by several integration test binaries of this crate.

pub mod far;
