//! Byte sizes as vm-bhyve writes them (`256M`, `8G`, `20G`, `512K`, `1T`, or plain bytes).
//!
//! vm-bhyve hands these strings to `truncate -s` and bhyve's `-m`, which read a bare
//! number as bytes and a one-letter suffix as a power of 1024. flotilla keeps sizes as
//! bytes internally and renders them back in the largest exact unit, so a value read
//! from a `.conf` file and written again stays the same text.

use std::fmt;
use std::str::FromStr;

/// A size in bytes, parsed from and shown as vm-bhyve's notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The text was empty.
    #[error("empty size")]
    Empty,
    /// The text is not a number with an optional K/M/G/T suffix.
    #[error("`{0}` is not a size (expected a number with an optional K, M, G or T suffix, e.g. 256M or 20G)")]
    Invalid(String),
    /// The value does not fit in 64 bits of bytes.
    #[error("`{0}` is too large")]
    Overflow(String),
}

const UNITS: [(char, u32); 5] = [('P', 50), ('T', 40), ('G', 30), ('M', 20), ('K', 10)];

impl Size {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Size {
        Size(n << 20)
    }
    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Size {
        Size(n << 30)
    }
    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Size, SizeError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(SizeError::Empty);
        }
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let up = c.to_ascii_uppercase();
                let shift = match up {
                    'B' => 0,
                    _ => UNITS
                        .iter()
                        .find(|(u, _)| *u == up)
                        .map(|(_, sh)| *sh)
                        .ok_or_else(|| SizeError::Invalid(s.to_string()))?,
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SizeError::Invalid(s.to_string()));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| SizeError::Overflow(s.to_string()))?;
        n.checked_mul(1u64 << shift)
            .map(Size)
            .ok_or_else(|| SizeError::Overflow(s.to_string()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return write!(f, "0");
        }
        for (u, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 % unit == 0 {
                return write!(f, "{}{}", self.0 / unit, u);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl serde::Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 256M or 20G")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_bhyve_suffixes() {
        assert_eq!("256M".parse(), Ok(Size::mib(256)));
        assert_eq!("8G".parse(), Ok(Size::gib(8)));
        assert_eq!("8g".parse(), Ok(Size::gib(8)));
        assert_eq!("512K".parse(), Ok(Size(512 * 1024)));
        assert_eq!("1T".parse(), Ok(Size(1 << 40)));
        assert_eq!("4096".parse(), Ok(Size(4096)));
    }

    #[test]
    fn refuses_garbage_with_the_text() {
        assert_eq!("".parse::<Size>(), Err(SizeError::Empty));
        assert_eq!(
            "lots".parse::<Size>(),
            Err(SizeError::Invalid("lots".into()))
        );
        assert_eq!(
            "1.5G".parse::<Size>(),
            Err(SizeError::Invalid("1.5G".into()))
        );
        assert_eq!("-1G".parse::<Size>(), Err(SizeError::Invalid("-1G".into())));
        assert_eq!("G".parse::<Size>(), Err(SizeError::Invalid("G".into())));
        assert!(matches!(
            "99999999999P".parse::<Size>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(Size::mib(256).to_string(), "256M");
        assert_eq!(Size::gib(8).to_string(), "8G");
        assert_eq!(Size::mib(1536).to_string(), "1536M");
        assert_eq!(Size(1000).to_string(), "1000");
    }

    proptest::proptest! {
        #[test]
        fn display_round_trips(n in 0u64..(1u64 << 60)) {
            let s = Size(n).to_string();
            proptest::prop_assert_eq!(s.parse::<Size>(), Ok(Size(n)));
        }

        #[test]
        fn never_panics(s in "\\PC{0,12}") {
            let _ = s.parse::<Size>();
        }
    }
}
