//! Example third-party transport plugin: same-process memcpy loopback.
