//! Durations in the forms Istio accepts (Go's `time.ParseDuration`): `500ms`, `10s`, `1.5s`,
//! `1h30m`, `0`.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; write a number and a unit, e.g. \"10s\"")]
    Empty,
    #[error("negative duration {0:?}; durations must be zero or positive")]
    Negative(String),
    #[error(
        "invalid duration {0:?}; expected a number and a unit (ns, us, ms, s, m, h), e.g. \"1h30m\""
    )]
    Malformed(String),
    #[error("missing unit in duration {0:?}; add one of ns, us, ms, s, m, h, e.g. \"{0}s\"")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?}; use ns, us, ms, s, m or h")]
    UnknownUnit { input: String, unit: String },
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a Go/Istio duration: one or more `<number><unit>` parts, the number possibly with
/// a fraction. A bare `0` is accepted, as Go does.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let input = s.trim();
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    if input.starts_with('-') {
        return Err(DurationError::Negative(input.to_string()));
    }
    let body = input.strip_prefix('+').unwrap_or(input);
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() {
        return Err(DurationError::Malformed(input.to_string()));
    }
    let malformed = || DurationError::Malformed(input.to_string());
    let overflow = || DurationError::Overflow(input.to_string());

    let bytes = body.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < bytes.len() {
        // Number: digits, optionally a fraction.
        let int_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int_part = &body[int_start..i];
        let mut frac_part = "";
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let frac_start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac_part = &body[frac_start..i];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(malformed());
        }
        // Unit: everything up to the next digit or dot.
        let unit_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() && bytes[i] != b'.' {
            i += 1;
        }
        let unit = &body[unit_start..i];
        if unit.is_empty() {
            return Err(if i < bytes.len() {
                malformed()
            } else {
                DurationError::MissingUnit(input.to_string())
            });
        }
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_string(),
                    unit: unit.to_string(),
                });
            }
        };
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut part = whole.checked_mul(nanos_per_unit).ok_or_else(overflow)?;
        // Fraction: only the digits that can still matter at nanosecond precision.
        let mut scale: u128 = 1;
        let mut frac: u128 = 0;
        for d in frac_part.bytes().take(20) {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        part = part
            .checked_add(frac * nanos_per_unit / scale)
            .ok_or_else(overflow)?;
        total = total.checked_add(part).ok_or_else(overflow)?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| overflow())?;
    // The remainder of a division by 1e9 always fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn istio_forms() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("90s", Duration::from_secs(90)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            (
                "2h45m30.5s",
                Duration::from_millis((2 * 3600 + 45 * 60 + 30) * 1000 + 500),
            ),
            ("+5s", Duration::from_secs(5)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn refusals_name_the_cause() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(
            parse_duration("-1s"),
            Err(DurationError::Negative("-1s".into()))
        );
        assert_eq!(
            parse_duration("10"),
            Err(DurationError::MissingUnit("10".into()))
        );
        assert_eq!(
            parse_duration("10d").unwrap_err().to_string(),
            "unknown unit \"d\" in duration \"10d\"; use ns, us, ms, s, m or h"
        );
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("1..5s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("1 s"),
            Err(DurationError::UnknownUnit { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn millis_round_trip(ms in 0u64..10_000_000_000) {
            prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
        }
    }
}
