//! Unit newtypes: a byte count can never be passed where sectors or extents are
//! meant. All arithmetic is checked; overflow is an error, never a wrap.

use std::fmt;
use thiserror::Error;

pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnitError {
    #[error("size arithmetic overflowed: {0}")]
    Overflow(String),
    #[error("invalid size '{input}': {reason}")]
    Parse { input: String, reason: String },
}

macro_rules! unit {
    ($name:ident, $what:literal) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            pub const ZERO: $name = $name(0);
            pub fn get(self) -> u64 {
                self.0
            }
            pub fn checked_add(self, o: $name) -> Result<$name, UnitError> {
                self.0
                    .checked_add(o.0)
                    .map($name)
                    .ok_or_else(|| UnitError::Overflow(format!("{} {} + {}", $what, self.0, o.0)))
            }
            pub fn checked_sub(self, o: $name) -> Result<$name, UnitError> {
                self.0
                    .checked_sub(o.0)
                    .map($name)
                    .ok_or_else(|| UnitError::Overflow(format!("{} {} - {}", $what, self.0, o.0)))
            }
            pub fn checked_mul(self, k: u64) -> Result<$name, UnitError> {
                self.0
                    .checked_mul(k)
                    .map($name)
                    .ok_or_else(|| UnitError::Overflow(format!("{} {} * {}", $what, self.0, k)))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} {}", self.0, $what)
            }
        }
    };
}

unit!(Bytes, "bytes");
unit!(Sectors, "sectors");
unit!(Extents, "extents");

impl Bytes {
    /// Whole sectors, refusing a byte count that is not sector aligned.
    pub fn to_sectors_exact(self) -> Result<Sectors, UnitError> {
        if !self.0.is_multiple_of(SECTOR_SIZE) {
            return Err(UnitError::Parse {
                input: self.0.to_string(),
                reason: "not a multiple of 512 bytes".into(),
            });
        }
        Ok(Sectors(self.0 / SECTOR_SIZE))
    }
    pub fn to_sectors_floor(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE)
    }
}

impl Sectors {
    pub fn to_bytes(self) -> Result<Bytes, UnitError> {
        self.checked_mul(SECTOR_SIZE).map(|s| Bytes(s.0))
    }
}

/// Extent size in sectors; a power of two of at least 1 KiB when created by
/// devpool (LVM2 metadata may carry any non-zero value and is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtentSize(Sectors);

impl ExtentSize {
    pub const DEFAULT: ExtentSize = ExtentSize(Sectors(8192)); // 4 MiB

    /// Any non-zero extent size, as found in existing metadata.
    pub fn from_metadata(s: Sectors) -> Result<ExtentSize, UnitError> {
        if s.0 == 0 {
            return Err(UnitError::Parse {
                input: "0".into(),
                reason: "extent size is zero".into(),
            });
        }
        Ok(ExtentSize(s))
    }
    /// An extent size for a new VG: power of two, 1 KiB ..= 16 GiB.
    pub fn new_for_vg(b: Bytes) -> Result<ExtentSize, UnitError> {
        let err = |r: &str| UnitError::Parse {
            input: format_bytes(b),
            reason: r.into(),
        };
        if !b.0.is_power_of_two() || b.0 < 1024 {
            return Err(err("extent size must be a power of two of at least 1K"));
        }
        if b.0 > 16 << 30 {
            return Err(err("extent size must be at most 16G"));
        }
        Ok(ExtentSize(Sectors(b.0 / SECTOR_SIZE)))
    }
    pub fn sectors(self) -> Sectors {
        self.0
    }
    pub fn bytes(self) -> Bytes {
        Bytes(self.0.0 * SECTOR_SIZE) // at most 16 GiB: cannot overflow
    }
    pub fn extents_to_sectors(self, e: Extents) -> Result<Sectors, UnitError> {
        e.0.checked_mul(self.0.0)
            .map(Sectors)
            .ok_or_else(|| UnitError::Overflow(format!("{} extents of {} sectors", e.0, self.0.0)))
    }
    pub fn extents_to_bytes(self, e: Extents) -> Result<Bytes, UnitError> {
        self.extents_to_sectors(e)?.to_bytes()
    }
    /// Extents needed to hold `b` bytes (rounded up).
    pub fn bytes_to_extents_ceil(self, b: Bytes) -> Extents {
        let eb = self.bytes().0;
        Extents(b.0.div_ceil(eb))
    }
    /// Whole extents that fit in `s` sectors (rounded down).
    pub fn sectors_to_extents_floor(self, s: Sectors) -> Extents {
        Extents(s.0 / self.0.0)
    }
}

/// What a size argument is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PercentOf {
    /// Free extents of the VG.
    Free,
    /// All extents of the VG.
    Vg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Bytes(Bytes),
    Extents(Extents),
    Percent(u32, PercentOf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    Plus,
    Minus,
}

/// A size as a user writes it: `10G`, `512KiB`, `4096B`, `100e` (extents),
/// `50%FREE`, `100%VG`, optionally with a leading `+` or `-` (for resize).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeArg {
    pub sign: Option<Sign>,
    pub amount: Amount,
}

impl SizeArg {
    pub fn parse(input: &str) -> Result<SizeArg, UnitError> {
        let err = |r: &str| UnitError::Parse {
            input: input.to_string(),
            reason: r.to_string(),
        };
        let s = input.trim();
        let (sign, rest) = match s.as_bytes().first() {
            Some(b'+') => (Some(Sign::Plus), &s[1..]),
            Some(b'-') => (Some(Sign::Minus), &s[1..]),
            _ => (None, s),
        };
        if let Some((num, of)) = rest.split_once('%') {
            let pct: u32 = num
                .parse()
                .map_err(|_| err("percentage must be a whole number"))?;
            if pct == 0 || pct > 100 {
                return Err(err("percentage must be 1..100"));
            }
            let of = match of.to_ascii_uppercase().as_str() {
                "FREE" => PercentOf::Free,
                "VG" => PercentOf::Vg,
                _ => return Err(err("percentage must be of FREE or VG (e.g. 50%FREE)")),
            };
            return Ok(SizeArg {
                sign,
                amount: Amount::Percent(pct, of),
            });
        }
        let amount = parse_amount(rest).map_err(|r| err(&r))?;
        Ok(SizeArg { sign, amount })
    }
}

/// Parse `10G`, `1.5GiB`, `4096B`, `8s` (sectors) or `100e` (extents).
fn parse_amount(s: &str) -> Result<Amount, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err("expected a number followed by a unit (K, M, G, T, B, s or e)".into());
    }
    let unit_l = unit.to_ascii_lowercase();
    let mult: u128 = match unit_l.as_str() {
        "" => return Err("no unit: write e.g. 100M, 4096B or 25e (extents)".into()),
        "b" => 1,
        "s" => 512,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        "e" => {
            let n: u64 = num
                .parse()
                .map_err(|_| "extent count must be a whole number".to_string())?;
            return Ok(Amount::Extents(Extents(n)));
        }
        _ => {
            return Err(format!(
                "unknown unit '{unit}' (use K, M, G, T, P, B, s or e)"
            ));
        }
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err("malformed number".into());
    }
    if int.len() > 20 || frac.len() > 18 {
        return Err("number too long".into());
    }
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| "malformed number".to_string())?
    };
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| "malformed number".to_string())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let total = int_v
        .checked_mul(mult)
        .and_then(|a| a.checked_add((frac_v * mult).div_ceil(scale)))
        .ok_or("size too large")?;
    let total: u64 = total
        .try_into()
        .map_err(|_| "size too large (over 16 EiB)".to_string())?;
    Ok(Amount::Bytes(Bytes(total)))
}

/// Human form with binary units, exact to two decimals: `10.00 GiB`.
pub fn format_bytes(b: Bytes) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut i = 0;
    let mut v = b.0 as f64;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{} B", b.0)
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_binary_units_and_fractions() {
        let b = |s: &str| match SizeArg::parse(s).unwrap().amount {
            Amount::Bytes(b) => b.0,
            other => panic!("{other:?}"),
        };
        assert_eq!(b("10G"), 10 << 30);
        assert_eq!(b("512KiB"), 512 << 10);
        assert_eq!(b("4096B"), 4096);
        assert_eq!(b("8s"), 4096);
        assert_eq!(b("1.5G"), 3 << 29);
        assert_eq!(b("2t"), 2 << 40);
    }

    #[test]
    fn parses_percent_extents_and_signs() {
        let a = SizeArg::parse("50%FREE").unwrap();
        assert_eq!(a.amount, Amount::Percent(50, PercentOf::Free));
        let a = SizeArg::parse("+100e").unwrap();
        assert_eq!(
            a,
            SizeArg {
                sign: Some(Sign::Plus),
                amount: Amount::Extents(Extents(100))
            }
        );
        let a = SizeArg::parse("-5G").unwrap();
        assert_eq!(a.sign, Some(Sign::Minus));
    }

    #[test]
    fn rejects_bad_sizes_with_the_input_named() {
        for bad in [
            "",
            "10",
            "G",
            "10X",
            "1.2.3G",
            "0%FREE",
            "101%VG",
            "50%PV",
            "99999999999999999999T",
            "1..G",
        ] {
            let e = SizeArg::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn extent_size_rules() {
        assert!(ExtentSize::new_for_vg(Bytes(4 << 20)).is_ok());
        assert!(ExtentSize::new_for_vg(Bytes(3 << 20)).is_err());
        assert!(ExtentSize::new_for_vg(Bytes(512)).is_err());
        assert!(ExtentSize::new_for_vg(Bytes(32 << 30)).is_err());
    }

    proptest! {
        #[test]
        fn checked_arithmetic_never_wraps(a: u64, b: u64) {
            let r = Bytes(a).checked_add(Bytes(b));
            prop_assert_eq!(r.is_ok(), a.checked_add(b).is_some());
            if let Ok(v) = r { prop_assert_eq!(v.0, a + b); }
            let r = Sectors(a).checked_sub(Sectors(b));
            prop_assert_eq!(r.is_ok(), a >= b);
            let r = Sectors(a).to_bytes();
            prop_assert_eq!(r.is_ok(), a.checked_mul(512).is_some());
        }

        #[test]
        fn extent_rounding_covers_request(bytes in 0u64..(1u64 << 60), shift in 10u32..34) {
            let es = ExtentSize::new_for_vg(Bytes(1u64 << shift)).unwrap();
            let e = es.bytes_to_extents_ceil(Bytes(bytes));
            let back = es.extents_to_bytes(e).unwrap();
            prop_assert!(back.0 >= bytes);
            prop_assert!(back.0 - bytes < es.bytes().0);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = SizeArg::parse(&s);
        }

        #[test]
        fn parse_round_trips_whole_units(n in 0u64..(1u64<<20), u in 0usize..5) {
            let (suffix, mult) = [("B",1u64),("K",1<<10),("M",1<<20),("G",1<<30),("T",1<<40)][u];
            let a = SizeArg::parse(&format!("{n}{suffix}")).unwrap();
            prop_assert_eq!(a.amount, Amount::Bytes(Bytes(n * mult)));
        }
    }
}
