//! File segments end to end (the cases are in `cases/file_segments.rs`), with every call handed to the I/O
//! threads (`caller_thread=0`), as asynchronous calls always are.

const CALLER_THREAD: &str = "0";

include!("cases/file_segments.rs");
