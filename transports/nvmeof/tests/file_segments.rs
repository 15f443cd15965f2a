//! File segments end to end (the cases are in `cases/file_segments.rs`), with synchronous calls run on the
//! caller's thread where they need no bounce buffer (the default).

const CALLER_THREAD: &str = "1";

include!("cases/file_segments.rs");
