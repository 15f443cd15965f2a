//! Conformance suites for Transport, MemoryDevice and MetadataStore backends, and the runner.
