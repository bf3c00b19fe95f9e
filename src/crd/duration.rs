//! `Duration`: a span of time written the way Kubernetes users write them (`720h`, `10m`, `1h30m`).
//!
//! Go's `time.ParseDuration` units (`ms`, `s`, `m`, `h`) plus `d` (24h), which IAM key policies are
//! usually stated in ("90 days"). Fractions are refused to keep the pattern simple and exact.
//!
//! Every duration is bounded, in the schema and in the parser alike: at most
//! [`MAX_DURATION_LEN`] characters, at most [`MAX_DIGITS`] digits per number, and at most
//! [`Duration::MAX`] (3650d, ten years) in total. The API server refuses what the parser would
//! refuse, so no stored object is unreadable for its durations.

use std::{borrow::Cow, fmt, str::FromStr};

use kube::core::{Message, Rule};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The OpenAPI pattern the API server enforces; `FromStr` accepts exactly the same language
/// (with the length and total bounds below).
pub const DURATION_PATTERN: &str = "^([0-9]{1,10}(ms|s|m|h|d))+$";

/// Longest duration string accepted (`maxLength` in the schema).
pub const MAX_DURATION_LEN: usize = 32;

/// Most digits in one number of a duration; with [`MAX_DURATION_LEN`] this keeps the schema's
/// CEL sum of milliseconds far from 64-bit overflow.
pub const MAX_DIGITS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// The longest duration any field or flag accepts: 3650 days (ten years).
    pub const MAX: Duration = Duration::from_secs(3650 * 86_400);

    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub fn as_std(self) -> std::time::Duration {
        self.0
    }

    /// As a jiff span for timestamp arithmetic (saturating at jiff's range).
    pub fn as_signed(self) -> jiff::SignedDuration {
        jiff::SignedDuration::try_from(self.0).unwrap_or(jiff::SignedDuration::MAX)
    }

    fn as_millis_i64(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A CEL expression (for `x-kubernetes-validations`) that evaluates to the milliseconds in the
/// duration string `expr` (say `self` or `self.interval`). Only meaningful for a string that
/// matches [`DURATION_PATTERN`]: guard it with `expr.matches(DURATION_PATTERN)`.
pub fn cel_millis(expr: &str) -> String {
    format!(
        "{expr}.findAll('[0-9]+(ms|s|m|h|d)').map(c, c.endsWith('ms') ? int(c.substring(0, c.size() - 2)) : \
         int(c.substring(0, c.size() - 1)) * (c.endsWith('s') ? 1000 : c.endsWith('m') ? 60000 : \
         c.endsWith('h') ? 3600000 : 86400000)).sum()"
    )
}

/// CEL: `expr` is a well-formed duration string (the other rules only judge those; the pattern
/// reports the rest).
pub fn cel_well_formed(expr: &str) -> String {
    format!("{expr}.matches('{DURATION_PATTERN}')")
}

/// A field-level rule: the duration is at least `min`. `field` is the field's path for the
/// message (`spec.rotation.interval`).
pub fn at_least(field: &str, min: Duration, why: &str) -> Rule {
    Rule::new(format!("!{} || {} >= {}", cel_well_formed("self"), cel_millis("self"), min.as_millis_i64()))
        .message(Message::Message(format!("{field} must be at least {min}{why}")))
}

/// An object-level rule: its duration field `longer`, when set, is longer than its duration field
/// `shorter`, when set. The failure is reported on `longer`.
pub fn longer_than(shorter: &str, longer: &str, message: &str) -> Rule {
    ordered(shorter, ">", longer, message)
}

/// As [`longer_than`], but equal is fine.
pub fn not_shorter_than(shorter: &str, longer: &str, message: &str) -> Rule {
    ordered(shorter, ">=", longer, message)
}

fn ordered(shorter: &str, op: &str, longer: &str, message: &str) -> Rule {
    let (s, l) = (format!("self.{shorter}"), format!("self.{longer}"));
    Rule::new(format!(
        "!has(self.{shorter}) || !has(self.{longer}) || !{} || !{} || {} {op} {}",
        cel_well_formed(&s),
        cel_well_formed(&l),
        cel_millis(&l),
        cel_millis(&s)
    ))
    .message(message)
    .field_path(format!(".{longer}"))
}

/// Durations at and around the bounds, and whether they are valid: the parser's unit tests and
/// the API server's (tests/e2e/crd.rs) both check them, so the two agree where it matters.
#[doc(hidden)]
pub const BOUNDARY_CASES: &[(&str, bool)] = &[
    ("3650d", true),
    ("87600h", true),
    ("1825d1825d", true),
    ("3649d23h59m59s999ms", true),
    ("9999999999ms", true),
    ("0000000001d", true),
    ("1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d", true),
    ("3650d1ms", false),
    ("87600h1s", false),
    ("3651d", false),
    ("2000d2000d", false),
    ("99999999999ms", false),
    ("99999999999999999999d", false),
    ("1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s", false),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDurationError {
    #[error("invalid duration {0:?}: use a number and a unit (ms, s, m, h, d), e.g. 720h, 10m, 1h30m")]
    Syntax(String),
    #[error("invalid duration {0:?}: at most {MAX_DURATION_LEN} characters and {MAX_DIGITS} digits per number")]
    TooLong(String),
    #[error("invalid duration {0:?}: at most 3650d (ten years)")]
    TooLarge(String),
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError::Syntax(s.to_string());
        if s.is_empty() {
            return Err(err());
        }
        if s.len() > MAX_DURATION_LEN {
            return Err(ParseDurationError::TooLong(s.to_string()));
        }
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
            if digits == 0 {
                return Err(err());
            }
            if digits > MAX_DIGITS {
                return Err(ParseDurationError::TooLong(s.to_string()));
            }
            // At most ten digits: fits in a u64, and so does its product with a day in ms.
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let (unit_ms, unit_len) = if rest.starts_with("ms") {
                (1, 2)
            } else {
                match rest.as_bytes()[0] {
                    b's' => (1_000, 1),
                    b'm' => (60_000, 1),
                    b'h' => (3_600_000, 1),
                    b'd' => (86_400_000, 1),
                    _ => return Err(err()),
                }
            };
            rest = &rest[unit_len..];
            let ms = n.checked_mul(unit_ms).ok_or_else(err)?;
            total = total.checked_add(std::time::Duration::from_millis(ms)).ok_or_else(err)?;
        }
        if total > Duration::MAX.0 {
            return Err(ParseDurationError::TooLarge(s.to_string()));
        }
        Ok(Duration(total))
    }
}

impl fmt::Display for Duration {
    /// Shortest exact form, e.g. `1h30m`, `10m`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let max = Rule::new(format!(
            "!{} || {} <= {}",
            cel_well_formed("self"),
            cel_millis("self"),
            Duration::MAX.as_millis_i64()
        ))
        .message("must be at most 3650d (ten years, 87600h): use a shorter duration");
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": MAX_DURATION_LEN,
            "x-kubernetes-validations": [max],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Result<u128, ParseDurationError> {
        s.parse::<Duration>().map(|d| d.0.as_millis())
    }

    #[test]
    fn parses_go_style_units_and_days() {
        assert_eq!(d("720h"), Ok(720 * 3_600_000));
        assert_eq!(d("1h30m"), Ok(90 * 60_000));
        assert_eq!(d("90d"), Ok(90 * 86_400_000));
        assert_eq!(d("1500ms"), Ok(1500));
        assert_eq!(d("10m5s"), Ok(605_000));
    }

    #[test]
    fn refuses_what_the_schema_pattern_refuses() {
        for bad in ["", "10", "h", "1.5h", "10 m", "-1h", "1y", "10mm"] {
            assert!(d(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bounded_like_the_schema() {
        for (s, valid) in BOUNDARY_CASES {
            assert_eq!(d(s).is_ok(), *valid, "{s:?}: {:?}", d(s));
        }
        assert_eq!(d("3650d"), Ok(Duration::MAX.0.as_millis()));
        assert!(matches!(d("3651d"), Err(ParseDurationError::TooLarge(_))));
        assert!(matches!(d("99999999999999999999d"), Err(ParseDurationError::TooLong(_))));
        assert!(matches!(d(&"1s".repeat(17)), Err(ParseDurationError::TooLong(_))));
    }

    #[test]
    fn the_longest_duration_displays_in_a_form_that_parses_back() {
        let max = Duration::MAX.to_string();
        assert_eq!(max, "87600h");
        assert_eq!(max.parse(), Ok(Duration::MAX));
        let almost: Duration = "3649d23h59m59s999ms".parse().unwrap();
        assert!(almost.to_string().len() <= MAX_DURATION_LEN);
        assert_eq!(almost.to_string().parse(), Ok(almost));
    }

    #[test]
    fn displays_shortest_exact_form_that_parses_back() {
        for s in ["1h30m", "10m", "0s", "1s500ms", "48h"] {
            let parsed: Duration = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert_eq!("2d".parse::<Duration>().unwrap().to_string(), "48h");
    }
}
