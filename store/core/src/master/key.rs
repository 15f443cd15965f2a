//! Object keys stored compactly: keys up to 22 bytes live inline (no heap block), longer ones in a `Box<str>`.

const INLINE_CAPACITY: usize = 22;

/// A key in 24 bytes plus, for long keys only, one heap block of exactly the key's length.
#[derive(Clone)]
pub(crate) enum CompactKey {
    Inline { len: u8, bytes: [u8; INLINE_CAPACITY] },
    Heap(Box<str>),
}

impl CompactKey {
    pub(crate) fn new(key: &str) -> Self {
        if key.len() <= INLINE_CAPACITY {
            let mut bytes = [0; INLINE_CAPACITY];
            bytes[..key.len()].copy_from_slice(key.as_bytes());
            CompactKey::Inline { len: key.len() as u8, bytes }
        } else {
            CompactKey::Heap(key.into())
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            CompactKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            CompactKey::Heap(s) => s.as_bytes(),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Inline bytes are always a whole `&str` copied in, so this never fails.
            CompactKey::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            CompactKey::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for CompactKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_keys_round_trip() {
        for k in
            ["", "a", "key-0000123456", "exactly-22-bytes-long!", "a much longer key that needs the heap", "ключ-ü"]
        {
            let c = CompactKey::new(k);
            assert_eq!(c.as_str(), k);
            assert_eq!(c.as_bytes(), k.as_bytes());
        }
        assert!(matches!(CompactKey::new("exactly-22-bytes-long!"), CompactKey::Inline { .. }));
        assert!(matches!(CompactKey::new("exactly-23-bytes-long!!"), CompactKey::Heap(_)));
        assert_eq!(std::mem::size_of::<CompactKey>(), 24);
    }
}
