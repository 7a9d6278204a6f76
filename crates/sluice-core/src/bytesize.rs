//! Sizes in flow files: a number of bytes, or a string such as `512KiB`, `10MiB`, `1MB`.

use std::fmt;

/// A parse failure, saying what forms are accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a size; write bytes as a number or with a unit, e.g. `512KiB`, `10MiB` (units: B, KB, KiB, MB, MiB, GB, GiB)"
)]
pub struct BadByteSize(pub String);

/// Parses `1048576`, `512KiB`, `10MiB`, `1GiB`, `64KB`, `1MB` into bytes.
pub fn parse(text: &str) -> Result<u64, BadByteSize> {
    let bad = || BadByteSize(text.to_owned());
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).ok_or_else(bad)
}

/// A size in bytes that deserializes from a number or the human form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size as `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => parse(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_numbers_and_units() {
        assert_eq!(parse("1048576").unwrap(), 1 << 20);
        assert_eq!(parse("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse("1MB").unwrap(), 1_000_000);
        assert_eq!(parse("2 GiB").unwrap(), 2 << 30);
        let v: ByteSize = serde_json::from_value(serde_json::json!(42)).unwrap();
        assert_eq!(v, ByteSize(42));
        let v: ByteSize = serde_json::from_value(serde_json::json!("1KiB")).unwrap();
        assert_eq!(v, ByteSize(1024));
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for bad in ["", "MiB", "1.5MiB", "-1", "10 parsecs", "99999999999GiB"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        assert!(serde_json::from_value::<ByteSize>(serde_json::json!(-3)).is_err());
    }
}
