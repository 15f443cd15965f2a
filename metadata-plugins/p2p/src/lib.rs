//! P2P handshake socket (WIRE.md section 3) and the P2PHANDSHAKE metadata store.
