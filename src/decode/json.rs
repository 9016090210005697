//! JSON events: one object per event, declared fields typed on the way in, the rest skipped.
//!
//! A small hand-written parser, driven by the schema: the input is checked as UTF-8 once, keys
//! are matched against the declared fields without allocating, declared values are converted
//! to their declared type where they are parsed, and everything else is validated and skipped.
//! It accepts exactly RFC 8259 JSON (nesting up to 128 levels); a value of the wrong type in a
//! document that is otherwise valid is a `schema` rejection, anything else invalid `malformed`.

use std::borrow::Cow;

use super::time::parse_rfc3339_ms;
use super::{DecodedEvent, RejectReason, Rejection, Value, check_size, expected, finish_event};
use crate::config::{FieldType, Source};

const MAX_DEPTH: usize = 128;

/// Decodes JSON events for one pipeline source.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    source: Source,
    /// Each declared field's key as it appears in the text, quotes included (`"amount"`), when
    /// it can only be written that one way (no character that JSON would need to escape): the
    /// expected key is then recognised by comparing bytes, without scanning it as a string.
    quoted_keys: Vec<Option<Box<[u8]>>>,
}

/// A JSON syntax error: where, and what was expected.
struct Syntax {
    at: usize,
    what: &'static str,
}

/// One scalar as found in the text, before it meets the declared type.
enum Found<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    /// An integer outside the i64 range, with its text (for messages).
    BigInt(f64, &'a str),
    Float(f64, &'a str),
    Bool(bool),
    Null,
    Object,
    Array,
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn fail<T>(&self, what: &'static str) -> Result<T, Syntax> {
        Err(Syntax { at: self.at, what })
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), Syntax> {
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            Ok(())
        } else {
            self.fail(what)
        }
    }

    /// For a string whose opening quote is at the position: where its content starts, and
    /// where its leading run without escapes ends (the closing quote, for a plain string).
    #[inline]
    fn plain_prefix(&self) -> Option<(usize, usize)> {
        if self.bytes.get(self.at) != Some(&b'"') {
            return None;
        }
        let start = self.at + 1;
        Some((start, start + plain_run(&self.bytes[start..])))
    }

    /// A string without escapes at the position (its opening quote), found in one scan; `None`,
    /// with the position unchanged, for anything else.
    #[inline]
    fn plain_string(&mut self) -> Option<&'a str> {
        let (start, end) = self.plain_prefix()?;
        if self.bytes.get(end) != Some(&b'"') {
            return None;
        }
        self.at = end + 1;
        Some(&self.text[start..end])
    }

    /// A string starting at the opening quote; borrowed unless it has escapes. The plain
    /// prefix is scanned once, whether or not an escape follows it.
    fn string(&mut self) -> Result<Cow<'a, str>, Syntax> {
        let Some((start, end)) = self.plain_prefix() else {
            return self.fail("expected a string");
        };
        self.at = end;
        if self.bytes.get(end) == Some(&b'"') {
            self.at += 1;
            return Ok(Cow::Borrowed(&self.text[start..end]));
        }
        self.string_with_escapes(start)
    }

    /// The rest of a string whose content starts at `start`, from its first escape (or the
    /// character or end of input that makes it invalid) at the position.
    fn string_with_escapes(&mut self, start: usize) -> Result<Cow<'a, str>, Syntax> {
        match self.bytes.get(self.at) {
            None => return self.fail("unterminated string"),
            Some(b'\\') => {}
            Some(_) => return self.fail("control character in a string"),
        }
        let mut owned = String::from(&self.text[start..self.at]);
        loop {
            match self.bytes.get(self.at) {
                None => return self.fail("unterminated string"),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Cow::Owned(owned));
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = match self.bytes.get(self.at) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.at += 1;
                            let high = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&high) {
                                if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                                    return self.fail("lone surrogate in a \\u escape");
                                }
                                self.at += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return self.fail("invalid surrogate pair in a \\u escape");
                                }
                                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                high
                            };
                            match char::from_u32(code) {
                                Some(c) => {
                                    owned.push(c);
                                    continue;
                                }
                                None => return self.fail("invalid \\u escape"),
                            }
                        }
                        _ => return self.fail("invalid escape in a string"),
                    };
                    owned.push(escaped);
                    self.at += 1;
                }
                Some(&b) if b < 0x20 => return self.fail("control character in a string"),
                Some(_) => {
                    let run_start = self.at;
                    self.at += plain_run(&self.bytes[run_start..]);
                    owned.push_str(&self.text[run_start..self.at]);
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, Syntax> {
        let digits = self.bytes.get(self.at..self.at + 4).ok_or(Syntax {
            at: self.at,
            what: "short \\u escape",
        })?;
        let mut value = 0u32;
        for &d in digits {
            let v = (d as char).to_digit(16).ok_or(Syntax {
                at: self.at,
                what: "invalid \\u escape",
            })?;
            value = value * 16 + v;
        }
        self.at += 4;
        Ok(value)
    }

    /// Reads a run of digits, appending them to `value` (which wraps past 19 digits: callers
    /// use it only below that); returns how many there were.
    fn digits(&mut self, value: &mut u64) -> usize {
        let start = self.at;
        while let Some(&d) = self.bytes.get(self.at)
            && d.is_ascii_digit()
        {
            *value = value.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            self.at += 1;
        }
        self.at - start
    }

    fn number(&mut self) -> Result<Found<'a>, Syntax> {
        let start = self.at;
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        // The digits of the integer part and the fraction, as one integer, read on the way.
        let mut mantissa = 0u64;
        let int_digits = match self.bytes.get(self.at) {
            Some(b'0') => {
                self.at += 1;
                1
            }
            Some(b'1'..=b'9') => self.digits(&mut mantissa),
            _ => return self.fail("invalid number"),
        };
        let mut fraction_digits = 0;
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            fraction_digits = self.digits(&mut mantissa);
            if fraction_digits == 0 {
                return self.fail("invalid number");
            }
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            exponent = true;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if self.digits(&mut 0) == 0 {
                return self.fail("invalid number");
            }
        }
        let integer = fraction_digits == 0 && !exponent;
        let text = &self.text[start..self.at];
        if !exponent
            && let Some(found) =
                short_decimal(negative, mantissa, int_digits, fraction_digits, text)
        {
            return Ok(found);
        }
        if integer && let Ok(i) = text.parse::<i64>() {
            return Ok(Found::Int(i));
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(if integer {
                Found::BigInt(f, text)
            } else {
                Found::Float(f, text)
            }),
            _ => Err(Syntax {
                at: start,
                what: "number out of range",
            }),
        }
    }

    fn literal<T>(&mut self, word: &'static [u8], found: T) -> Result<T, Syntax> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(found)
        } else {
            self.fail("expected a JSON value")
        }
    }

    /// A value of type `ty` read straight into that type, without the general path's
    /// intermediate form and its messages: a string without escapes (or an RFC 3339 time in
    /// one), a number, `true` or `false`, when the type takes it. `None`, with the position
    /// unchanged, for anything else, which the general path then reads (and accepts or
    /// explains with [`typed`]).
    fn typed_value(&mut self, ty: FieldType) -> Option<Value<'a>> {
        let start = self.at;
        let value = match (ty, *self.bytes.get(start)?) {
            (FieldType::String, b'"') => self.plain_string().map(|s| Value::Str(Cow::Borrowed(s))),
            (FieldType::Timestamp, b'"') => self
                .plain_string()
                .and_then(parse_rfc3339_ms)
                .map(Value::Ts),
            (FieldType::Float | FieldType::Int | FieldType::Timestamp, b'-' | b'0'..=b'9') => {
                // The conversions `typed` accepts for numbers.
                match (ty, self.number()) {
                    (FieldType::Float, Ok(Found::Int(i))) => Some(Value::Float(i as f64)),
                    (FieldType::Float, Ok(Found::Float(f, _) | Found::BigInt(f, _))) => {
                        Some(Value::Float(f))
                    }
                    (FieldType::Int, Ok(Found::Int(i))) => Some(Value::Int(i)),
                    (FieldType::Timestamp, Ok(Found::Int(i))) => Some(Value::Ts(i)),
                    _ => None,
                }
            }
            (FieldType::Bool, b't') => self.literal(b"true", Value::Bool(true)).ok(),
            (FieldType::Bool, b'f') => self.literal(b"false", Value::Bool(false)).ok(),
            _ => None,
        };
        if value.is_none() {
            self.at = start;
        }
        value
    }

    /// Any value; containers are validated and skipped.
    fn value(&mut self, depth: usize) -> Result<Found<'a>, Syntax> {
        match self.bytes.get(self.at) {
            Some(b'"') => Ok(Found::Str(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true", Found::Bool(true)),
            Some(b'f') => self.literal(b"false", Found::Bool(false)),
            Some(b'n') => self.literal(b"null", Found::Null),
            Some(b'{') => {
                self.container(depth, b'}', true)?;
                Ok(Found::Object)
            }
            Some(b'[') => {
                self.container(depth, b']', false)?;
                Ok(Found::Array)
            }
            _ => self.fail("expected a JSON value"),
        }
    }

    fn container(&mut self, depth: usize, close: u8, object: bool) -> Result<(), Syntax> {
        if depth >= MAX_DEPTH {
            return self.fail("nested too deeply");
        }
        self.at += 1;
        self.skip_ws();
        if self.bytes.get(self.at) == Some(&close) {
            self.at += 1;
            return Ok(());
        }
        loop {
            if object {
                self.string()?;
                self.skip_ws();
                self.expect(b':', "expected `:`")?;
                self.skip_ws();
            }
            self.value(depth + 1)?;
            self.skip_ws();
            match self.bytes.get(self.at) {
                Some(b',') => {
                    self.at += 1;
                    self.skip_ws();
                }
                Some(&b) if b == close => {
                    self.at += 1;
                    return Ok(());
                }
                _ => {
                    return self.fail(if object {
                        "expected `,` or `}`"
                    } else {
                        "expected `,` or `]`"
                    });
                }
            }
        }
    }
}

/// Length of the leading run of bytes that need no attention inside a string: everything but
/// `"`, `\\` and control characters. Sixteen bytes at a time where SSE2 is there (all of
/// x86_64), then eight at a time.
pub(super) fn plain_run(bytes: &[u8]) -> usize {
    let mut at = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8,
        };
        while let Some(chunk) = bytes.get(at..at + 16) {
            // SAFETY: SSE2 is part of the x86_64 baseline, and the unaligned load reads the
            // sixteen bytes of `chunk`, which exist.
            let hits = unsafe {
                let x = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
                let quote = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8));
                // Unsigned x <= 0x1f exactly when min(x, 0x1f) == x.
                let limit = _mm_set1_epi8(0x1f);
                let control = _mm_cmpeq_epi8(_mm_min_epu8(x, limit), x);
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
            };
            if hits != 0 {
                return at + hits.trailing_zeros() as usize;
            }
            at += 16;
        }
    }
    at + plain_run_swar(&bytes[at..])
}

/// [`plain_run`] eight bytes at a time: for each test the expression sets the top bit of a
/// byte that matches, and the lowest set bit is always a true match.
pub(super) fn plain_run_swar(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut at = 0;
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let hits = has_zero(x ^ (ONES * u64::from(b'"')))
            | has_zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGH);
        if hits != 0 {
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + words
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(words.remainder().len())
}

/// Powers of ten that a double holds exactly.
const EXACT_POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The value of a number without exponent whose digits fit in a u64, without the general
/// parser: `mantissa` is its `int_digits + fraction_digits` digits as one integer. An integer
/// as is, and a decimal as `mantissa / 10^fraction_digits` when both are exact doubles, so that
/// one correctly rounded division gives exactly what parsing the text does. `None` for
/// anything else (the caller parses the text).
fn short_decimal(
    negative: bool,
    mantissa: u64,
    int_digits: usize,
    fraction_digits: usize,
    text: &str,
) -> Option<Found<'_>> {
    if int_digits + fraction_digits > 19 {
        return None;
    }
    if fraction_digits == 0 {
        let magnitude = i64::try_from(mantissa).ok()?;
        return Some(Found::Int(if negative { -magnitude } else { magnitude }));
    }
    if mantissa > 1 << 53 || fraction_digits >= EXACT_POWERS_OF_TEN.len() {
        return None;
    }
    let magnitude = mantissa as f64 / EXACT_POWERS_OF_TEN[fraction_digits];
    Some(Found::Float(
        if negative { -magnitude } else { magnitude },
        text,
    ))
}

/// `bytes` starts with `prefix` (a quoted key, usually 4 to 16 bytes): two overlapping word
/// comparisons where they fit, rather than a call to `memcmp` for a few bytes.
fn starts_with_key(bytes: &[u8], prefix: &[u8]) -> bool {
    let Some(head) = bytes.get(..prefix.len()) else {
        return false;
    };
    fn ends<const N: usize>(s: &[u8]) -> Option<(&[u8; N], &[u8; N])> {
        Some((s.first_chunk::<N>()?, s.last_chunk::<N>()?))
    }
    match prefix.len() {
        8..=16 => ends::<8>(head) == ends::<8>(prefix),
        4..=7 => ends::<4>(head) == ends::<4>(prefix),
        _ => head == prefix,
    }
}

/// How much of a long value a message quotes.
const QUOTE_LIMIT: usize = 40;

/// `s`, or its first [`QUOTE_LIMIT`] bytes (at a character boundary) when longer.
fn quoted_part(s: &str) -> &str {
    let cut = (0..=QUOTE_LIMIT.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..cut]
}

/// A number's text for a message, as written (cut short if it is very long).
fn quote_number(text: &str) -> String {
    if text.len() <= QUOTE_LIMIT {
        text.to_string()
    } else {
        format!("{}... ({} characters)", quoted_part(text), text.len())
    }
}

fn quote_prefix(s: &str) -> String {
    if s.len() <= QUOTE_LIMIT {
        format!("the string {s:?}")
    } else {
        format!("the string {:?}... ({} bytes)", quoted_part(s), s.len())
    }
}

/// Converts a found value to the declared type, or says why it does not fit.
fn typed<'a>(name: &str, ty: FieldType, found: Found<'a>) -> Result<Value<'a>, String> {
    let wrong = |what: String| format!("field `{name}` should be {}, found {what}", expected(ty));
    match (ty, found) {
        (_, Found::Null) => Ok(Value::Null),
        (FieldType::String, Found::Str(s)) => Ok(Value::Str(s)),
        (FieldType::Timestamp, Found::Str(s)) => {
            parse_rfc3339_ms(&s).map(Value::Ts).ok_or_else(|| {
                format!(
                    "field `{name}` should be {}, found {} which is not a valid RFC 3339 time",
                    expected(ty),
                    quote_prefix(&s)
                )
            })
        }
        (_, Found::Str(s)) => Err(wrong(quote_prefix(&s))),
        (FieldType::Int, Found::Int(i)) => Ok(Value::Int(i)),
        (FieldType::Float, Found::Int(i)) => Ok(Value::Float(i as f64)),
        (FieldType::Timestamp, Found::Int(i)) => Ok(Value::Ts(i)),
        (_, Found::Int(i)) => Err(wrong(format!("the number {i}"))),
        (FieldType::Float, Found::BigInt(f, _) | Found::Float(f, _)) => Ok(Value::Float(f)),
        (FieldType::Int | FieldType::Timestamp, Found::BigInt(_, text)) => Err(wrong(format!(
            "{}, outside the 64-bit integer range",
            quote_number(text)
        ))),
        // The number as written: `12.0` is not an integer, and printing it as `12` would hide why.
        (_, Found::BigInt(_, text) | Found::Float(_, text)) => {
            Err(wrong(format!("the number {}", quote_number(text))))
        }
        (FieldType::Bool, Found::Bool(b)) => Ok(Value::Bool(b)),
        (_, Found::Bool(b)) => Err(wrong(b.to_string())),
        (_, Found::Object) => Err(wrong("an object".into())),
        (_, Found::Array) => Err(wrong("a list".into())),
    }
}

impl JsonDecoder {
    pub fn new(source: &Source) -> Self {
        let quoted_keys = source
            .schema
            .fields
            .iter()
            .map(|f| {
                let plain = f.name.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
                plain.then(|| format!("\"{}\"", f.name).into_bytes().into_boxed_slice())
            })
            .collect();
        JsonDecoder {
            source: source.clone(),
            quoted_keys,
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Decodes one event. Every input maps to an event or a rejection; nothing panics.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<DecodedEvent<'a>, Rejection> {
        check_size(&self.source, bytes)?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            Rejection::new(
                RejectReason::Malformed,
                format!("event is not valid UTF-8 (byte {})", e.valid_up_to()),
            )
        })?;
        let mut parser = Parser { text, bytes, at: 0 };
        parser.skip_ws();
        match bytes.get(parser.at) {
            Some(b'{') => {}
            None => return Err(Rejection::new(RejectReason::Malformed, "event is empty")),
            Some(_) if bytes.starts_with("\u{feff}".as_bytes()) => {
                return Err(Rejection::new(
                    RejectReason::Malformed,
                    "event starts with a UTF-8 byte-order mark, which JSON does not allow",
                ));
            }
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::Malformed,
                    "event is not a JSON object",
                ));
            }
        }
        let schema = &self.source.schema;
        let mut fields = Vec::with_capacity(schema.fields.len());
        fields.resize_with(schema.fields.len(), || Value::Null);
        // Fields whose latest value has the wrong type (a duplicate key's last value wins, so
        // a later good value clears an earlier error); empty and unallocated for good events.
        let mut schema_errors: Vec<(usize, String)> = Vec::new();
        let mut next_guess = 0;
        let parsed = (|| -> Result<(), Syntax> {
            parser.at += 1;
            parser.skip_ws();
            if bytes.get(parser.at) == Some(&b'}') {
                parser.at += 1;
            } else {
                loop {
                    // Producers usually write keys in one order: try the field after the last
                    // one matched, byte for byte, before reading the key and searching them all.
                    let expected = self.quoted_keys.get(next_guess).and_then(Option::as_deref);
                    let index = match expected {
                        Some(quoted)
                            if bytes
                                .get(parser.at..)
                                .is_some_and(|r| starts_with_key(r, quoted)) =>
                        {
                            parser.at += quoted.len();
                            Some(next_guess)
                        }
                        _ => {
                            let key = parser.string()?;
                            schema.fields.iter().position(|f| f.name == key)
                        }
                    };
                    parser.skip_ws();
                    parser.expect(b':', "expected `:`")?;
                    parser.skip_ws();
                    if let Some(index) = index {
                        next_guess = index + 1;
                        let def = &schema.fields[index];
                        if !schema_errors.is_empty() {
                            schema_errors.retain(|(field, _)| *field != index);
                        }
                        // A value the declared type takes is read straight into it; anything
                        // else (a string with escapes, a wrong type, bad syntax) takes the
                        // general path, which accepts it or finds the right error.
                        let typed_value = match parser.typed_value(def.ty) {
                            Some(value) => Ok(value),
                            None => typed(&def.name, def.ty, parser.value(1)?),
                        };
                        match typed_value {
                            Ok(value) => fields[index] = value,
                            Err(message) => {
                                fields[index] = Value::Null;
                                schema_errors.push((index, message));
                            }
                        }
                    } else {
                        parser.value(1)?;
                    }
                    parser.skip_ws();
                    match bytes.get(parser.at) {
                        Some(b',') => {
                            parser.at += 1;
                            parser.skip_ws();
                        }
                        Some(b'}') => {
                            parser.at += 1;
                            break;
                        }
                        _ => return parser.fail("expected `,` or `}`"),
                    }
                }
            }
            parser.skip_ws();
            if parser.at != bytes.len() {
                return parser.fail("trailing characters after the object");
            }
            Ok(())
        })();
        match (parsed, schema_errors.into_iter().next()) {
            (Err(e), _) => Err(Rejection::new(
                RejectReason::Malformed,
                format!("invalid JSON: {} at byte {}", e.what, e.at),
            )),
            (Ok(()), Some((_, message))) => Err(Rejection::new(RejectReason::Schema, message)),
            (Ok(()), None) => finish_event(&self.source, fields),
        }
    }
}
