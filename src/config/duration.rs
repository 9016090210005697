//! Durations written in pipeline files: an integer and a unit (`500ms`, `10s`, `5m`, `1h`, `7d`).

/// The longest duration a pipeline takes: 36500 days (100 years). Longer windows are what
/// `lifetime` is for, and the bound keeps every sum of a time and a duration in range.
pub const MAX_DURATION_MS: i64 = 36_500 * 86_400_000;

/// Parses a duration into milliseconds; the error says what was expected.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let expected = "expected a duration like 500ms, 10s, 5m, 1h or 7d";
    if number.is_empty() {
        return Err(format!("`{text}` is not a duration: {expected}"));
    }
    let value: i64 = number
        .parse()
        .map_err(|_| format!("`{text}` is too large for a duration"))?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(format!("`{text}` has no unit: {expected}")),
        other => {
            return Err(format!(
                "`{other}` is not a duration unit in `{text}`: {expected}"
            ));
        }
    };
    match value.checked_mul(unit_ms) {
        Some(ms) if ms <= MAX_DURATION_MS => Ok(ms),
        _ => Err(format!(
            "`{text}` is longer than the longest duration a pipeline takes (36500d, 100 years)"
        )),
    }
}

/// Formats milliseconds with the largest unit that divides them exactly.
pub fn format_duration_ms(ms: i64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms != 0 && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        assert!(parse_duration_ms("10").unwrap_err().contains("no unit"));
        assert!(
            parse_duration_ms("10x")
                .unwrap_err()
                .contains("not a duration unit")
        );
        assert!(parse_duration_ms("-5s").is_err());
        assert!(parse_duration_ms("1.5h").is_err());
        assert!(parse_duration_ms("99999999999999999999d").is_err());
        assert_eq!(parse_duration_ms("36500d"), Ok(MAX_DURATION_MS));
        assert!(
            parse_duration_ms("36501d")
                .unwrap_err()
                .contains("longer than the longest duration")
        );
        assert!(parse_duration_ms("300000000d").is_err());
    }

    #[test]
    fn formats_with_the_largest_exact_unit() {
        assert_eq!(format_duration_ms(90_000), "90s");
        assert_eq!(format_duration_ms(3_600_000), "1h");
        assert_eq!(format_duration_ms(1), "1ms");
    }
}
