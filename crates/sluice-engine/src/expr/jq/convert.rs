//! Conversions between `serde_json::Value` and jaq's `Val`, with the output-size budget applied
//! while converting results (so an oversized result is never serialized in full).

use jaq_json::{Num, Val};
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use sluice_core::Headers;

use crate::expr::MetaView;

/// Deepest result accepted: deeper values would risk the stack of whoever serializes them.
pub(super) const MAX_DEPTH: usize = 256;

/// Why a result could not be converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TooBig {
    Bytes,
    Depth,
}

/// A JSON value as a jaq value. Numbers keep their integer-ness; big integers stay exact.
pub(super) fn to_val(value: &Value) -> Val {
    // Deserializing from a `Value` cannot fail: every JSON value has a jaq counterpart.
    Val::deserialize(value).unwrap_or_default()
}

/// Message headers as a jaq object of strings.
pub(super) fn headers_val(headers: &Headers) -> Val {
    Val::obj(
        headers
            .iter()
            .map(|(k, v)| (Val::from(k.clone()), Val::from(v.clone())))
            .collect(),
    )
}

/// Message metadata as a jaq object (see [`MetaView`]).
pub(super) fn meta_val(meta: &MetaView) -> Val {
    let s = |s: &str| Val::from(s.to_owned());
    let opt = |o: &Option<String>| o.as_deref().map_or(Val::Null, s);
    Val::obj(
        [
            (s("id"), s(&meta.id)),
            (s("correlation_id"), opt(&meta.correlation_id)),
            (s("origin"), opt(&meta.origin)),
            (s("created_at"), s(&meta.created_at)),
            (s("pattern"), s(meta.pattern)),
        ]
        .into_iter()
        .collect(),
    )
}

/// A jaq value as JSON, charging its estimated serialized size to `budget`.
///
/// Non-finite numbers become `null` (as in jq); non-string object keys are written as their jq
/// text form.
pub(super) fn to_json(val: &Val, budget: &mut usize, depth: usize) -> Result<Value, TooBig> {
    if depth > MAX_DEPTH {
        return Err(TooBig::Depth);
    }
    let charge = |budget: &mut usize, n: usize| -> Result<(), TooBig> {
        *budget = budget.checked_sub(n).ok_or(TooBig::Bytes)?;
        Ok(())
    };
    Ok(match val {
        Val::Null => {
            charge(budget, 4)?;
            Value::Null
        }
        Val::Bool(b) => {
            charge(budget, 5)?;
            Value::Bool(*b)
        }
        Val::Num(n) => {
            charge(budget, 8)?;
            num_to_json(n)
        }
        Val::TStr(b) | Val::BStr(b) => {
            charge(budget, b.len() + 2)?;
            Value::String(String::from_utf8_lossy(b).into_owned())
        }
        Val::Arr(items) => {
            charge(budget, 2 + items.len())?;
            let mut out = Vec::with_capacity(items.len());
            for item in items.iter() {
                out.push(to_json(item, budget, depth + 1)?);
            }
            Value::Array(out)
        }
        Val::Obj(entries) => {
            charge(budget, 2 + entries.len() * 2)?;
            let mut out = Map::with_capacity(entries.len());
            for (k, v) in entries.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => other.to_string(),
                };
                charge(budget, key.len() + 2)?;
                let v = to_json(v, budget, depth + 1)?;
                out.insert(key, v);
            }
            Value::Object(out)
        }
    })
}

/// Charges `value`'s estimated serialized size to `budget` exactly as [`to_json`] would, for
/// results computed without jaq.
pub(super) fn charge_json(value: &Value, budget: &mut usize, depth: usize) -> Result<(), TooBig> {
    if depth > MAX_DEPTH {
        return Err(TooBig::Depth);
    }
    fn take(budget: &mut usize, n: usize) -> Result<(), TooBig> {
        *budget = budget.checked_sub(n).ok_or(TooBig::Bytes)?;
        Ok(())
    }
    match value {
        Value::Null => take(budget, 4),
        Value::Bool(_) => take(budget, 5),
        Value::Number(_) => take(budget, 8),
        Value::String(s) => take(budget, s.len() + 2),
        Value::Array(items) => {
            take(budget, 2 + items.len())?;
            items
                .iter()
                .try_for_each(|item| charge_json(item, budget, depth + 1))
        }
        Value::Object(entries) => {
            take(budget, 2 + entries.len() * 2)?;
            for (k, v) in entries {
                take(budget, k.len() + 2)?;
                charge_json(v, budget, depth + 1)?;
            }
            Ok(())
        }
    }
}

fn num_to_json(n: &Num) -> Value {
    match n {
        Num::Int(i) => Value::Number(Number::from(*i)),
        Num::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        // Big integers and decimal literals: JSON's own number syntax, parsed by serde_json
        // (exact when it fits 64 bits, the nearest float otherwise).
        other => other
            .to_string()
            .parse::<Number>()
            .map_or(Value::Null, Value::Number),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_json() {
        let v = json!({"a": [1, -2, 2.5, "s", null, true, {"b": 18446744073709551615u64}]});
        let mut budget = usize::MAX;
        assert_eq!(to_json(&to_val(&v), &mut budget, 0).unwrap(), v);
    }

    #[test]
    fn charges_the_budget() {
        let mut budget = 10;
        assert_eq!(
            to_json(&to_val(&json!("a long string")), &mut budget, 0),
            Err(TooBig::Bytes)
        );
        let mut budget = 100;
        to_json(&to_val(&json!("abc")), &mut budget, 0).unwrap();
        assert_eq!(budget, 95);
    }
}
