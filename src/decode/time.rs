//! Timestamps: RFC 3339 parsing and formatting, in milliseconds since the Unix epoch (UTC).
//!
//! Hand-written because it sits on the per-event decode path: it handles the full RFC 3339
//! grammar (any offset, `T`/`t`/space separator, any number of fractional digits, which are
//! truncated to milliseconds) without allocating.

/// Days since 1970-01-01 for a proleptic Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

fn digits(bytes: &[u8], at: usize, count: usize) -> Option<u32> {
    let slice = bytes.get(at..at + count)?;
    let mut value = 0u32;
    for &b in slice {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(b - b'0');
    }
    Some(value)
}

/// The earliest event time accepted: 0000-01-01T00:00:00.000Z, the first instant RFC 3339
/// can write.
pub const MIN_EVENT_TIME_MS: i64 = -62_167_219_200_000;
/// The latest event time accepted: 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can
/// write.
pub const MAX_EVENT_TIME_MS: i64 = 253_402_300_799_999;

/// Parses an RFC 3339 date-time into epoch milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let year = i64::from(digits(b, 0, 4)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return None;
    }
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // A leap second (`23:59:60`, which RFC 3339 allows) is read as the second before it, as
    // epoch time has no instant of its own for it.
    let second = second.min(59);
    let mut at = 19;
    let mut millis = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            if at - start < 3 {
                millis = millis * 10 + u32::from(b[at] - b'0');
            }
            at += 1;
        }
        let count = at - start;
        if count == 0 {
            return None;
        }
        for _ in count..3 {
            millis *= 10;
        }
    }
    let offset_minutes: i64 = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if at + 6 == b.len() && b[at + 3] == b':' => {
            let oh = i64::from(digits(b, at + 1, 2)?);
            let om = i64::from(digits(b, at + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let total = oh * 60 + om;
            if sign == b'+' { total } else { -total }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds =
        days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
            - offset_minutes * 60;
    Some(seconds * 1000 + i64::from(millis))
}

/// Formats epoch milliseconds as RFC 3339 UTC with exactly three fractional digits.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339_ms(&mut out, ms);
    out
}

/// Appends the RFC 3339 form of `ms` to `out` (no allocation beyond growing `out`). Written
/// digit by digit: every output record carries one or more of these.
pub fn write_rfc3339_ms(out: &mut String, ms: i64) {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (h, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    if !(0..=9999).contains(&year) {
        // RFC 3339 has no such years (only a window bound can reach them: a window that
        // starts before year 0000 or ends after 9999). ISO 8601's expanded form, a sign and
        // six digits, is what JavaScript's `toISOString` writes and parsers of it read.
        use std::fmt::Write;
        let sign = if year < 0 { '-' } else { '+' };
        let year = year.unsigned_abs();
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "{sign}{year:06}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z"
        );
        return;
    }
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, i64::from(month));
    put(8, 2, i64::from(day));
    put(11, 2, h);
    put(14, 2, m);
    put(17, 2, s);
    put(20, 3, milli);
    // Only ASCII digits and separators were written.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

/// The UTC date (`YYYY-MM-DD`) and hour of an instant, for Hive-style partition folders.
pub fn date_and_hour(ms: i64) -> (String, u32) {
    let days = ms.div_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let hour = (ms.rem_euclid(86_400_000) / 3_600_000) as u32;
    (format!("{year:04}-{month:02}-{day:02}"), hour)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_and_offsets() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-03-01T12:00:00.123Z"),
            Some(1_772_366_400_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-03-01T13:00:00.123+01:00"),
            parse_rfc3339_ms("2026-03-01T12:00:00.123Z")
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(
            parse_rfc3339_ms("2024-02-29T00:00:00.5Z"),
            Some(1_709_164_800_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-02-29 00:00:00.123456789z"),
            Some(1_709_164_800_123)
        );
        // The leap second at the end of 2016 reads as the second before it.
        assert_eq!(
            parse_rfc3339_ms("2016-12-31T23:59:60.250Z"),
            parse_rfc3339_ms("2016-12-31T23:59:59.250Z")
        );
    }

    #[test]
    fn rejects_invalid_dates() {
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:61Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01",
            "yesterday",
            "2026-01-01T00:00:00+0100",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_and_round_trips() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        for ms in [0i64, 1_772_366_400_123, -86_400_001, 253_402_300_799_999] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Some(ms));
        }
        // Window bounds outside RFC 3339's years: ISO 8601 expanded years, as JavaScript's
        // `toISOString` writes them.
        let year_zero = -62_167_219_200_000; // 0000-01-01T00:00:00.000Z
        assert_eq!(format_rfc3339_ms(year_zero), "0000-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(year_zero - 1_800_000),
            "-000001-12-31T23:30:00.000Z"
        );
        assert_eq!(
            format_rfc3339_ms(253_402_300_800_000),
            "+010000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            date_and_hour(1_772_366_400_123),
            ("2026-03-01".to_string(), 12)
        );
    }
}
