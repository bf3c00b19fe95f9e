//! `Duration`: a span of time written the way Kubernetes users write them (`720h`, `10m`, `1h30m`).
//!
//! Go's `time.ParseDuration` units (`ms`, `s`, `m`, `h`) plus `d` (24h), which IAM key policies are
//! usually stated in ("90 days"). Fractions are refused to keep the pattern simple and exact.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The OpenAPI pattern the API server enforces; `FromStr` accepts exactly the same language.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
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
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: use a number and a unit (ms, s, m, h, d), e.g. 720h, 10m, 1h30m")]
pub struct ParseDurationError(String);

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError(s.to_string());
        if s.is_empty() {
            return Err(err());
        }
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
            if digits == 0 {
                return Err(err());
            }
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
        json_schema!({ "type": "string", "pattern": DURATION_PATTERN })
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
    fn displays_shortest_exact_form_that_parses_back() {
        for s in ["1h30m", "10m", "0s", "1s500ms", "48h"] {
            let parsed: Duration = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert_eq!("2d".parse::<Duration>().unwrap().to_string(), "48h");
    }
}
