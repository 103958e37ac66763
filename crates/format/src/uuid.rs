//! LVM2 identifiers: 32 characters from a 64-character alphabet, shown with
//! dashes in groups 6-4-4-4-4-4-6 in text metadata and without on disk.

use thiserror::Error;

const ALPHABET: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#";
const GROUPS: [usize; 7] = [6, 4, 4, 4, 4, 4, 6];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid LVM2 UUID '{0}'")]
pub struct UuidError(pub String);

fn in_alphabet(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'!' || b == b'#'
}

/// A 32-character LVM2 UUID, stored without dashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LvmUuid([u8; 32]);

impl LvmUuid {
    /// Build from 32 random bytes (the caller supplies randomness: this crate
    /// does no I/O). Like LVM2, only the 62 alphanumerics are generated.
    pub fn from_random(bytes: [u8; 32]) -> LvmUuid {
        LvmUuid(bytes.map(|b| ALPHABET[(b % 62) as usize]))
    }

    /// Accept the dashed (text metadata) or raw (PV header) form.
    pub fn parse(s: &str) -> Result<LvmUuid, UuidError> {
        let bad = || UuidError(s.chars().take(64).collect());
        let mut out = [0u8; 32];
        let mut n = 0;
        for b in s.bytes().filter(|&b| b != b'-') {
            if n == 32 || !in_alphabet(b) {
                return Err(bad());
            }
            out[n] = b;
            n += 1;
        }
        if n != 32 {
            return Err(bad());
        }
        Ok(LvmUuid(out))
    }

    pub fn from_raw_bytes(b: &[u8; 32]) -> Result<LvmUuid, UuidError> {
        if b.iter().any(|&c| !in_alphabet(c)) {
            return Err(UuidError(String::from_utf8_lossy(b).into_owned()));
        }
        Ok(LvmUuid(*b))
    }

    pub fn raw(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn raw_str(&self) -> &str {
        // Only ALPHABET bytes are ever stored: always ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn dashed(&self) -> String {
        let mut s = String::with_capacity(38);
        let mut i = 0;
        for (g, n) in GROUPS.iter().enumerate() {
            if g > 0 {
                s.push('-');
            }
            s.push_str(&self.raw_str()[i..i + n]);
            i += n;
        }
        s
    }
}

impl std::fmt::Display for LvmUuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dashed())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn alphabet_check_matches_the_alphabet() {
        for b in 0..=255u8 {
            assert_eq!(in_alphabet(b), ALPHABET.contains(&b), "byte {b}");
        }
    }

    use super::*;

    #[test]
    fn dashed_and_raw_forms_round_trip() {
        let u = LvmUuid::parse("0t4yae-o2yW-yq2K-chYn-u9I7-Ej8o-jsi0Ml").unwrap();
        assert_eq!(u.raw_str(), "0t4yaeo2yWyq2KchYnu9I7Ej8ojsi0Ml");
        assert_eq!(
            LvmUuid::parse(u.raw_str()).unwrap().dashed(),
            "0t4yae-o2yW-yq2K-chYn-u9I7-Ej8o-jsi0Ml"
        );
        assert!(LvmUuid::parse("short").is_err());
        assert!(LvmUuid::parse("0t4yae-o2yW-yq2K-chYn-u9I7-Ej8o-jsi0M?").is_err());
        let r = LvmUuid::from_random([200; 32]);
        assert_eq!(LvmUuid::parse(&r.dashed()).unwrap(), r);
    }
}
