//! PostgreSQL values <-> JSON: result rows to objects, JSON parameters bound in the
//! placeholder's type, and rows in `COPY` text format.

use std::error::Error;

use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::{Map, Number, Value};
use sluice_core::ProcessError;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

type BoxError = Box<dyn Error + Sync + Send>;

/// A row as a JSON object, column name -> value.
pub fn row_to_json(row: &Row) -> Result<Value, ProcessError> {
    let mut object = Map::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = column_value(row, i, column.type_()).map_err(|e| {
            ProcessError::invalid_input(format!(
                "cannot read column `{}` of type {}: {e}",
                column.name(),
                column.type_()
            ))
        })?;
        object.insert(column.name().to_owned(), value);
    }
    Ok(Value::Object(object))
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<Option<T>, BoxError> {
    row.try_get::<_, Option<T>>(i).map_err(Into::into)
}

fn opt<T>(value: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    value.map_or(Value::Null, f)
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

fn column_value(row: &Row, i: usize, ty: &Type) -> Result<Value, BoxError> {
    Ok(match *ty {
        Type::BOOL => opt(get::<bool>(row, i)?, Value::Bool),
        Type::INT2 => opt(get::<i16>(row, i)?, Value::from),
        Type::INT4 => opt(get::<i32>(row, i)?, Value::from),
        Type::INT8 => opt(get::<i64>(row, i)?, Value::from),
        Type::OID => opt(get::<u32>(row, i)?, Value::from),
        Type::FLOAT4 => opt(get::<f32>(row, i)?, |f| float(f64::from(f))),
        Type::FLOAT8 => opt(get::<f64>(row, i)?, float),
        Type::NUMERIC => opt(get::<Numeric>(row, i)?, |n| number_from_text(&n.0)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            opt(get::<String>(row, i)?, Value::String)
        }
        Type::JSON | Type::JSONB => get::<Value>(row, i)?.unwrap_or(Value::Null),
        Type::TIMESTAMPTZ => opt(get::<DateTime<Utc>>(row, i)?, |t| {
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }),
        Type::TIMESTAMP => opt(get::<NaiveDateTime>(row, i)?, |t| {
            Value::String(
                t.and_utc()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            )
        }),
        Type::DATE => opt(get::<NaiveDate>(row, i)?, |d| Value::String(d.to_string())),
        Type::TIME => opt(get::<NaiveTime>(row, i)?, |t| Value::String(t.to_string())),
        Type::UUID => opt(get::<uuid::Uuid>(row, i)?, |u| Value::String(u.to_string())),
        Type::BYTEA => opt(get::<Vec<u8>>(row, i)?, |b| {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }),
        Type::BOOL_ARRAY => array(get::<Vec<Option<bool>>>(row, i)?, Value::Bool),
        Type::INT2_ARRAY => array(get::<Vec<Option<i16>>>(row, i)?, Value::from),
        Type::INT4_ARRAY => array(get::<Vec<Option<i32>>>(row, i)?, Value::from),
        Type::INT8_ARRAY => array(get::<Vec<Option<i64>>>(row, i)?, Value::from),
        Type::FLOAT8_ARRAY => array(get::<Vec<Option<f64>>>(row, i)?, float),
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY => {
            array(get::<Vec<Option<String>>>(row, i)?, Value::String)
        }
        Type::JSONB_ARRAY | Type::JSON_ARRAY => array(get::<Vec<Option<Value>>>(row, i)?, |v| v),
        _ => {
            return Err(format!(
                "Sluice does not map this type to JSON; cast the column in the query (`{}::text`)",
                row.columns()[i].name()
            )
            .into());
        }
    })
}

fn array<T>(values: Option<Vec<Option<T>>>, f: impl Fn(T) -> Value) -> Value {
    values.map_or(Value::Null, |vs| {
        Value::Array(vs.into_iter().map(|v| v.map_or(Value::Null, &f)).collect())
    })
}

/// A decimal as text, from PostgreSQL's binary `numeric`.
struct Numeric(String);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        decode_numeric(raw).map(Numeric)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// Decodes `numeric`'s binary form: digit count, weight (of the first base-10000 digit),
/// sign, display scale, then the digits.
fn decode_numeric(raw: &[u8]) -> Result<String, BoxError> {
    let word = |i: usize| -> Result<u16, BoxError> {
        raw.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".into())
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    match sign {
        NUMERIC_NAN => return Ok("NaN".into()),
        NUMERIC_PINF => return Ok("Infinity".into()),
        NUMERIC_NINF => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|k| word(8 + 2 * k))
        .collect::<Result<_, _>>()?;
    let digit = |g: i32| -> u16 {
        usize::try_from(g)
            .ok()
            .and_then(|g| digits.get(g).copied())
            .unwrap_or(0)
    };
    let mut out = String::new();
    if sign == NUMERIC_NEG {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for g in 0..=weight {
            if g == 0 {
                out.push_str(&digit(g).to_string());
            } else {
                out.push_str(&format!("{:04}", digit(g)));
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut fraction = String::new();
        let mut g = weight + 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit(g)));
            g += 1;
        }
        fraction.truncate(dscale);
        out.push_str(&fraction);
    }
    Ok(out)
}

/// Encodes a decimal string (`-12.340`) as binary `numeric`.
fn encode_numeric(text: &str, out: &mut BytesMut) -> Result<(), BoxError> {
    let bad = || -> BoxError { format!("`{text}` is not a decimal number").into() };
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int_part, frac_part) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let dscale = u16::try_from(frac_part.len()).map_err(|_| bad())?;
    let int_part = int_part.trim_start_matches('0');
    // Pad the integer part on the left and the fraction on the right to whole base-10000 digits.
    let int_pad = (4 - int_part.len() % 4) % 4;
    let frac_pad = (4 - frac_part.len() % 4) % 4;
    let all = format!(
        "{}{int_part}{frac_part}{}",
        "0".repeat(int_pad),
        "0".repeat(frac_pad)
    );
    let mut groups: Vec<i16> = all
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
        .collect();
    let int_groups = (int_part.len() + int_pad) / 4;
    let mut weight = i32::try_from(int_groups).map_err(|_| bad())? - 1;
    // Strip leading zero groups (each lowers the weight) and trailing ones.
    let leading = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading);
    weight -= i32::try_from(leading).map_err(|_| bad())?;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    out.put_u16(u16::try_from(groups.len()).map_err(|_| bad())?);
    out.put_i16(i16::try_from(weight).map_err(|_| bad())?);
    out.put_u16(if negative && !groups.is_empty() {
        NUMERIC_NEG
    } else {
        0
    });
    out.put_u16(dscale);
    for g in groups {
        out.put_i16(g);
    }
    Ok(())
}

/// A JSON number from decimal text: an integer when it is one, else a double.
fn number_from_text(text: &str) -> Value {
    if let Ok(i) = text.parse::<i64>() {
        return Value::from(i);
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => float(f),
        _ => Value::String(text.to_owned()),
    }
}

/// A JSON value bound to a placeholder, converted to the placeholder's type.
#[derive(Debug)]
pub struct Param<'a>(pub &'a Value);

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn int_of(value: &Value) -> Result<i64, BoxError> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .ok_or_else(|| format!("{n} is not a whole number").into()),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number").into()),
        Value::Bool(b) => Ok(i64::from(*b)),
        other => Err(format!("{other} is not a whole number").into()),
    }
}

fn float_of(value: &Value) -> Result<f64, BoxError> {
    match value {
        Value::Number(n) => n.as_f64().ok_or_else(|| "not a number".into()),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a number").into()),
        other => Err(format!("{other} is not a number").into()),
    }
}

fn timestamp_of(value: &Value) -> Result<DateTime<Utc>, BoxError> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("{value} is not an RFC 3339 timestamp string"))?;
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f"))
        .map(|t| t.and_utc())
        .map_err(|_| format!("`{text}` is not an RFC 3339 timestamp").into())
}

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let v = self.0;
        if v.is_null() {
            return Ok(IsNull::Yes);
        }
        match *ty {
            Type::BOOL => match v {
                Value::Bool(b) => b.to_sql(ty, out),
                Value::String(s) if s == "true" || s == "false" => (s == "true").to_sql(ty, out),
                other => Err(format!("{other} is not a boolean").into()),
            },
            Type::INT2 => i16::try_from(int_of(v)?)?.to_sql(ty, out),
            Type::INT4 => i32::try_from(int_of(v)?)?.to_sql(ty, out),
            Type::INT8 => int_of(v)?.to_sql(ty, out),
            Type::OID => u32::try_from(int_of(v)?)?.to_sql(ty, out),
            Type::FLOAT4 => (float_of(v)? as f32).to_sql(ty, out),
            Type::FLOAT8 => float_of(v)?.to_sql(ty, out),
            Type::NUMERIC => {
                encode_numeric(&text_of(v), out)?;
                Ok(IsNull::No)
            }
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                text_of(v).to_sql(ty, out)
            }
            Type::JSON | Type::JSONB => v.to_sql(ty, out),
            Type::TIMESTAMPTZ => timestamp_of(v)?.to_sql(ty, out),
            Type::TIMESTAMP => timestamp_of(v)?.naive_utc().to_sql(ty, out),
            Type::DATE => {
                let text = text_of(v);
                NaiveDate::parse_from_str(&text, "%Y-%m-%d")
                    .map_err(|_| format!("`{text}` is not a date (YYYY-MM-DD)"))?
                    .to_sql(ty, out)
            }
            Type::UUID => {
                let text = text_of(v);
                uuid::Uuid::parse_str(&text)
                    .map_err(|_| format!("`{text}` is not a UUID"))?
                    .to_sql(ty, out)
            }
            Type::BYTEA => {
                let text = text_of(v);
                base64::engine::general_purpose::STANDARD
                    .decode(text.as_bytes())
                    .map_err(|_| "bytea parameters are base64 strings")?
                    .to_sql(ty, out)
            }
            _ => Err(format!(
                "cannot bind a JSON value to type {ty}; cast the placeholder in the query (`$1::text::{ty}`)"
            )
            .into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Appends one row in `COPY ... FROM STDIN` text format: tab-separated, `\N` for NULL,
/// backslash escapes; PostgreSQL parses each field into its column's type.
pub fn copy_row(row: &[&Value], out: &mut Vec<u8>) {
    for (i, value) in row.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match value {
            Value::Null => out.extend_from_slice(b"\\N"),
            Value::Bool(true) => out.push(b't'),
            Value::Bool(false) => out.push(b'f'),
            // Numbers never need escaping.
            Value::Number(n) => {
                let _ = serde_json::to_writer(&mut *out, n);
            }
            Value::String(s) => copy_escape(s, out),
            other => {
                // JSON text escapes control characters itself; only backslashes need doubling.
                let json = serde_json::to_vec(other).unwrap_or_default();
                copy_escape_bytes(&json, out);
            }
        }
    }
    out.push(b'\n');
}

fn copy_escape(text: &str, out: &mut Vec<u8>) {
    copy_escape_bytes(text.as_bytes(), out);
}

fn copy_escape_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    // Most values need no escape: copy them whole.
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roundtrip(text: &str) -> String {
        let mut out = BytesMut::new();
        encode_numeric(text, &mut out).unwrap();
        decode_numeric(&out).unwrap()
    }

    #[test]
    fn numeric_binary_round_trips() {
        for (input, expected) in [
            ("0", "0"),
            ("1", "1"),
            ("-1", "-1"),
            ("12345678", "12345678"),
            ("10000", "10000"),
            ("0.5", "0.5"),
            ("-12.340", "-12.340"),
            ("0.00001", "0.00001"),
            ("123456.789012", "123456.789012"),
            ("0007", "7"),
            ("0.0", "0.0"),
        ] {
            assert_eq!(roundtrip(input), expected, "{input}");
        }
        for bad in ["", "abc", "1.2.3", "1e5", "-"] {
            assert!(encode_numeric(bad, &mut BytesMut::new()).is_err(), "{bad}");
        }
        assert_eq!(number_from_text("12"), json!(12));
        assert_eq!(number_from_text("-0.25"), json!(-0.25));
        assert_eq!(number_from_text("NaN"), json!("NaN"));
    }

    #[test]
    fn copy_text_escapes_and_maps_json() {
        let mut out = Vec::new();
        let values = [
            json!(1),
            json!("a\tb\\c\nd"),
            Value::Null,
            json!(true),
            json!({"k": [1]}),
        ];
        copy_row(&values.iter().collect::<Vec<_>>(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1\ta\\tb\\\\c\\nd\t\\N\tt\t{\"k\":[1]}\n"
        );
    }

    #[test]
    fn params_convert_to_the_placeholder_type_or_say_how_to_cast() {
        let mut out = BytesMut::new();
        assert!(Param(&json!("42")).to_sql(&Type::INT4, &mut out).is_ok());
        assert!(Param(&json!(1.5)).to_sql(&Type::INT4, &mut out).is_err());
        assert!(Param(&json!(70000)).to_sql(&Type::INT2, &mut out).is_err());
        assert!(
            Param(&json!("2024-05-01T10:00:00+02:00"))
                .to_sql(&Type::TIMESTAMPTZ, &mut out)
                .is_ok()
        );
        assert!(
            Param(&json!("yesterday"))
                .to_sql(&Type::TIMESTAMPTZ, &mut out)
                .is_err()
        );
        assert!(matches!(
            Param(&Value::Null).to_sql(&Type::INT4, &mut out),
            Ok(IsNull::Yes)
        ));
        let Err(err) = Param(&json!("x")).to_sql(&Type::INET, &mut out) else {
            panic!("inet is not bound from JSON")
        };
        assert!(err.to_string().contains("$1::text::inet"), "{err}");
    }
}
