//! A native evaluator for the simple shapes most transforms and conditions take.
//!
//! jaq evaluates on its own value type, so every run through it converts the body from
//! `serde_json::Value` and every output back: for a typical order-sized body that conversion
//! and the interpreter cost more than the rest of the message's path together. Programs made
//! only of paths, literals, object and array construction, arithmetic, comparisons, `if`,
//! `//`, `and`/`or` and a handful of builtins are compiled here to a small tree that runs on
//! `serde_json::Value` directly, borrowing from the input wherever it can.
//!
//! # The contract
//! The native tree is an optimization, never a second semantics. Whenever a run meets anything
//! it does not model exactly (any runtime error, an integer overflow, a big integer, iterating
//! an object whose key order jaq could see differently, ...) it stops with [`Bail`] and the
//! caller runs the same input through jaq, whose result or error is the answer. Native code is
//! pure, so running jaq after a bail is always safe. A differential test (`native_tests`)
//! compares both evaluators on generated programs and inputs.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::Arc;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Term};
use jaq_core::ops::{Cmp, Math};
use jaq_core::path::{Opt, Part};
use serde_json::{Map, Number, Value};

/// The run met something the native tree does not model exactly; jaq must evaluate instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bail;

/// The variables a program may read.
pub(super) struct Env<'a> {
    /// `$headers` (null when the program does not read it).
    pub headers: &'a Value,
    /// `$meta` (null when the program does not read it).
    pub meta: &'a Value,
}

/// A compiled program.
#[derive(Debug, Clone)]
pub(super) enum Native {
    /// `.`
    Id,
    /// A literal (number, string, `true`, `false`, `null`, `[]`, `{}`).
    Lit(Value),
    /// `"text \(term) text"`
    Interpolate(Vec<Piece>),
    /// `[term]`
    Collect(Box<Native>),
    /// `{key: term, ...}` with literal keys.
    Object(Vec<(String, Native)>),
    /// `-term`
    Neg(Box<Native>),
    /// `l | r`
    Pipe(Box<Native>, Box<Native>),
    /// `l, r`
    Comma(Box<Native>, Box<Native>),
    /// `l // r`
    Alt(Box<Native>, Box<Native>),
    /// `l and r`
    And(Box<Native>, Box<Native>),
    /// `l or r`
    Or(Box<Native>, Box<Native>),
    /// `l + r`, `l - r`, ...
    Math(Math, Box<Native>, Box<Native>),
    /// `l == r`, `l < r`, ...
    Cmp(Cmp, Box<Native>, Box<Native>),
    /// `if c then t elif ... else e end`
    If(Vec<(Native, Native)>, Option<Box<Native>>),
    /// `term.a[0][]...`
    Path(Box<Native>, Vec<(Step, Opt)>),
    /// `$headers`
    Headers,
    /// `$meta`
    Meta,
    /// `select(f)`
    Select(Box<Native>),
    /// `empty`
    Empty,
    /// A builtin of arity 0 applied to the input.
    Builtin(Builtin),
}

/// A part of an interpolated string.
#[derive(Debug, Clone)]
pub(super) enum Piece {
    Text(String),
    Term(Native),
}

/// One step of a path.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// `.name`
    Field(String),
    /// `.[n]`, negative from the end.
    Index(i64),
    /// `.[]`
    Iterate,
}

/// Builtins of arity 0 the native tree implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Builtin {
    Length,
    AsciiUpcase,
    AsciiDowncase,
    Add,
    Keys,
    ToString,
    Type,
    Not,
}

/// Compiles `term`, or `None` if it uses anything the native tree does not implement.
pub(super) fn compile(term: &Term<&str>) -> Option<Native> {
    let boxed = |t: &Term<&str>| compile(t).map(Box::new);
    Some(match term {
        Term::Id => Native::Id,
        Term::Num(n) => Native::Lit(Value::Number(literal_number(n)?)),
        Term::Str(None, parts) => string(parts)?,
        Term::Arr(None) => Native::Lit(Value::Array(Vec::new())),
        Term::Arr(Some(t)) => Native::Collect(boxed(t)?),
        Term::Obj(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let key = literal_string(key)?;
                let value = match value {
                    Some(v) => compile(v)?,
                    // `{a}` is `{a: .a}`.
                    None => Native::Path(
                        Box::new(Native::Id),
                        vec![(Step::Field(key.clone()), Opt::Essential)],
                    ),
                };
                out.push((key, value));
            }
            Native::Object(out)
        }
        Term::Neg(t) => Native::Neg(boxed(t)?),
        Term::BinOp(l, op, r) => {
            let (l, r) = (boxed(l)?, boxed(r)?);
            match op {
                BinaryOp::Pipe(None) => Native::Pipe(l, r),
                BinaryOp::Comma => Native::Comma(l, r),
                BinaryOp::Alt => Native::Alt(l, r),
                BinaryOp::And => Native::And(l, r),
                BinaryOp::Or => Native::Or(l, r),
                BinaryOp::Math(op) => Native::Math(*op, l, r),
                BinaryOp::Cmp(op) => Native::Cmp(*op, l, r),
                _ => return None,
            }
        }
        Term::IfThenElse(branches, otherwise) => {
            let mut out = Vec::with_capacity(branches.len());
            for (cond, then) in branches {
                out.push((compile(cond)?, compile(then)?));
            }
            let otherwise = match otherwise {
                Some(e) => Some(boxed(e)?),
                None => None,
            };
            Native::If(out, otherwise)
        }
        Term::Var(name) => match *name {
            "$headers" => Native::Headers,
            "$meta" => Native::Meta,
            _ => return None,
        },
        Term::Path(base, path) => {
            let mut steps = Vec::with_capacity(path.0.len());
            for (part, opt) in &path.0 {
                steps.push((step(part)?, *opt));
            }
            Native::Path(boxed(base)?, steps)
        }
        Term::Call(name, args) => call(name, args)?,
        _ => return None,
    })
}

fn call(name: &str, args: &[Term<&str>]) -> Option<Native> {
    Some(match (name, args) {
        ("true", []) => Native::Lit(Value::Bool(true)),
        ("false", []) => Native::Lit(Value::Bool(false)),
        ("null", []) => Native::Lit(Value::Null),
        ("empty", []) => Native::Empty,
        ("not", []) => Native::Builtin(Builtin::Not),
        ("length", []) => Native::Builtin(Builtin::Length),
        ("ascii_upcase", []) => Native::Builtin(Builtin::AsciiUpcase),
        ("ascii_downcase", []) => Native::Builtin(Builtin::AsciiDowncase),
        ("add", []) => Native::Builtin(Builtin::Add),
        ("keys", []) => Native::Builtin(Builtin::Keys),
        ("tostring", []) => Native::Builtin(Builtin::ToString),
        ("type", []) => Native::Builtin(Builtin::Type),
        ("select", [f]) => Native::Select(Box::new(compile(f)?)),
        // `map(f)` is `[.[] | f]`.
        ("map", [f]) => Native::Collect(Box::new(Native::Pipe(
            Box::new(Native::Path(
                Box::new(Native::Id),
                vec![(Step::Iterate, Opt::Essential)],
            )),
            Box::new(compile(f)?),
        ))),
        _ => return None,
    })
}

fn step(part: &Part<Term<&str>>) -> Option<Step> {
    match part {
        Part::Range(None, None) => Some(Step::Iterate),
        Part::Range(..) => None,
        Part::Index(Term::Num(n)) => n.parse().ok().map(Step::Index),
        Part::Index(Term::Neg(n)) => match &**n {
            Term::Num(n) => n.parse::<i64>().ok().map(|i| Step::Index(-i)),
            _ => None,
        },
        Part::Index(key) => literal_string(key).map(Step::Field),
    }
}

/// A number literal as jaq reads it: an integer if it is one that fits, else a float.
fn literal_number(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Number::from(i));
    }
    // Integers beyond 64 bits are big integers in jaq: not modelled.
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<f64>().ok().and_then(Number::from_f64)
}

/// A string literal without interpolation or format.
fn literal_string(term: &Term<&str>) -> Option<String> {
    match term {
        Term::Str(None, parts) => {
            let mut out = String::new();
            for part in parts {
                match part {
                    StrPart::Str(s) => out.push_str(s),
                    StrPart::Char(c) => out.push(*c),
                    StrPart::Term(_) => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

fn string(parts: &[StrPart<&str, Term<&str>>]) -> Option<Native> {
    let mut pieces: Vec<Piece> = Vec::new();
    for part in parts {
        match part {
            StrPart::Str(s) => push_text(&mut pieces, s),
            StrPart::Char(c) => push_text(&mut pieces, c.encode_utf8(&mut [0; 4])),
            StrPart::Term(t) => pieces.push(Piece::Term(compile(t)?)),
        }
    }
    Some(match pieces.as_slice() {
        [] => Native::Lit(Value::String(String::new())),
        [Piece::Text(s)] => Native::Lit(Value::String(s.clone())),
        _ => Native::Interpolate(pieces),
    })
}

fn push_text(pieces: &mut Vec<Piece>, s: &str) {
    match pieces.last_mut() {
        Some(Piece::Text(text)) => text.push_str(s),
        _ => pieces.push(Piece::Text(s.to_owned())),
    }
}

/// Where outputs go: each is borrowed from the input (or the variables) when it can be.
type Sink<'s, 'a> = dyn FnMut(Cow<'a, Value>) -> Result<(), Bail> + 's;

impl Native {
    /// Runs the program on `input`; every output, in order.
    pub(super) fn run(&self, input: &Value, env: &Env<'_>) -> Result<Vec<Value>, Bail> {
        let mut out = Vec::new();
        self.each(input, true, env, &mut |v| {
            out.push(v.into_owned());
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs on `input`. `pristine`: `input` is the message body or a part of it (or of
    /// `$headers`), whose objects jaq holds in key order too; objects the program built may be
    /// in another order in jaq, so iterating them is left to jaq.
    /// [`Native::run`] on a shared input, handing the input back on a bail. When nothing else
    /// holds the input, `. + {...}` (the most common transform) adds to the input itself
    /// instead of copying it first.
    pub(super) fn run_shared(
        &self,
        input: Arc<Value>,
        env: &Env<'_>,
    ) -> Result<Vec<Value>, Arc<Value>> {
        if let Native::Math(Math::Add, l, r) = self
            && matches!(**l, Native::Id)
            && input.is_object()
            && Arc::strong_count(&input) == 1
        {
            let added = match single(r, &input, true, env) {
                Ok(added) => added.into_owned(),
                Err(Bail) => return Err(input),
            };
            return match (Arc::try_unwrap(input), added) {
                (Ok(Value::Object(mut map)), Value::Object(added)) => {
                    map.extend(added);
                    Ok(vec![Value::Object(map)])
                }
                (Ok(original), added) => {
                    // Not an object on the right: the general rules (and their errors) apply.
                    let sum = math(Math::Add, Cow::Borrowed(&original), Cow::Owned(added));
                    sum.map(|v| vec![v]).map_err(|Bail| Arc::new(original))
                }
                (Err(shared), _) => self.run(&shared, env).map_err(|Bail| shared),
            };
        }
        self.run(&input, env).map_err(|Bail| input)
    }

    fn each<'a>(
        &self,
        input: &'a Value,
        pristine: bool,
        env: &Env<'a>,
        out: &mut Sink<'_, 'a>,
    ) -> Result<(), Bail> {
        match self {
            Native::Id => out(Cow::Borrowed(input)),
            Native::Lit(v) => out(Cow::Owned(v.clone())),
            Native::Headers => out(Cow::Borrowed(env.headers)),
            // jaq builds `$meta` in its own key order: never pristine.
            Native::Meta => out(Cow::Owned(env.meta.clone())),
            Native::Empty => Ok(()),
            Native::Interpolate(pieces) => {
                let mut text = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(s) => text.push_str(s),
                        Piece::Term(t) => {
                            let value = single(t, input, pristine, env)?;
                            interpolate(&value, &mut text)?
                        }
                    }
                }
                out(Cow::Owned(Value::String(text)))
            }
            Native::Collect(t) => {
                let mut items = Vec::new();
                t.each(input, pristine, env, &mut |v| {
                    items.push(v.into_owned());
                    Ok(())
                })?;
                out(Cow::Owned(Value::Array(items)))
            }
            Native::Object(entries) => object_from(entries, Map::new(), input, pristine, env, out),
            Native::Neg(t) => t.each(input, pristine, env, &mut |v| {
                let n = match number(&v)? {
                    Num::Int(i) => Num::Int(i.checked_neg().ok_or(Bail)?),
                    Num::Float(f) => Num::Float(-f),
                };
                out(Cow::Owned(n.into_value()?))
            }),
            Native::Pipe(l, r) => l.each(input, pristine, env, &mut |v| match v {
                Cow::Borrowed(b) => r.each(b, pristine, env, out),
                Cow::Owned(o) => r.each(&o, false, env, &mut |w| out(Cow::Owned(w.into_owned()))),
            }),
            Native::Comma(l, r) => {
                l.each(input, pristine, env, out)?;
                r.each(input, pristine, env, out)
            }
            Native::Alt(l, r) => {
                let mut truthy = Vec::new();
                l.each(input, pristine, env, &mut |v| {
                    if is_truthy(&v) {
                        truthy.push(v);
                    }
                    Ok(())
                })?;
                if truthy.is_empty() {
                    r.each(input, pristine, env, out)
                } else {
                    truthy.into_iter().try_for_each(&mut *out)
                }
            }
            Native::And(l, r) => l.each(input, pristine, env, &mut |v| {
                if is_truthy(&v) {
                    r.each(input, pristine, env, &mut |w| out(boolean(is_truthy(&w))))
                } else {
                    out(boolean(false))
                }
            }),
            Native::Or(l, r) => l.each(input, pristine, env, &mut |v| {
                if is_truthy(&v) {
                    out(boolean(true))
                } else {
                    r.each(input, pristine, env, &mut |w| out(boolean(is_truthy(&w))))
                }
            }),
            // jaq's order for several outputs on both sides: the left side varies slowest.
            Native::Math(op, l, r) => l.each(input, pristine, env, &mut |lv| {
                r.each(input, pristine, env, &mut |rv| {
                    out(Cow::Owned(math(*op, lv.clone(), rv)?))
                })
            }),
            Native::Cmp(op, l, r) => l.each(input, pristine, env, &mut |lv| {
                r.each(input, pristine, env, &mut |rv| {
                    out(boolean(compare(*op, &lv, &rv)?))
                })
            }),
            Native::If(branches, otherwise) => {
                if_from(branches, otherwise, input, pristine, env, out)
            }
            Native::Path(base, steps) => {
                base.each(input, pristine, env, &mut |v| walk(steps, v, pristine, out))
            }
            Native::Select(f) => f.each(input, pristine, env, &mut |v| {
                if is_truthy(&v) {
                    out(Cow::Borrowed(input))
                } else {
                    Ok(())
                }
            }),
            Native::Builtin(b) => out(builtin(*b, input)?),
        }
    }
}

/// Builds objects from `entries` on top of `done`: one object per combination of the values'
/// outputs, the first entry varying slowest (as jaq does); none if a value has no output.
fn object_from<'a>(
    entries: &[(String, Native)],
    done: Map<String, Value>,
    input: &'a Value,
    pristine: bool,
    env: &Env<'a>,
    out: &mut Sink<'_, 'a>,
) -> Result<(), Bail> {
    let Some(((key, value), rest)) = entries.split_first() else {
        return out(Cow::Owned(Value::Object(done)));
    };
    let mut first = None;
    let mut more = Vec::new();
    value.each(input, pristine, env, &mut |v| {
        match first {
            None => first = Some(v),
            Some(_) => more.push(v),
        }
        Ok(())
    })?;
    let Some(first) = first else {
        return Ok(());
    };
    if more.is_empty() {
        // The common case, one output: the map moves along instead of being copied.
        let mut map = done;
        map.insert(key.clone(), first.into_owned());
        return object_from(rest, map, input, pristine, env, out);
    }
    for v in std::iter::once(first).chain(more) {
        let mut map = done.clone();
        map.insert(key.clone(), v.into_owned());
        object_from(rest, map, input, pristine, env, out)?;
    }
    Ok(())
}

/// The only output of `t`; none or several is not modelled.
fn single<'a>(
    t: &Native,
    input: &'a Value,
    pristine: bool,
    env: &Env<'a>,
) -> Result<Cow<'a, Value>, Bail> {
    let mut only = None;
    t.each(input, pristine, env, &mut |v| {
        if only.is_some() {
            return Err(Bail);
        }
        only = Some(v);
        Ok(())
    })?;
    only.ok_or(Bail)
}

fn if_from<'a>(
    branches: &[(Native, Native)],
    otherwise: &Option<Box<Native>>,
    input: &'a Value,
    pristine: bool,
    env: &Env<'a>,
    out: &mut Sink<'_, 'a>,
) -> Result<(), Bail> {
    let Some(((cond, then), rest)) = branches.split_first() else {
        return match otherwise {
            Some(e) => e.each(input, pristine, env, out),
            None => out(Cow::Borrowed(input)),
        };
    };
    cond.each(input, pristine, env, &mut |c| {
        if is_truthy(&c) {
            then.each(input, pristine, env, out)
        } else {
            if_from(rest, otherwise, input, pristine, env, out)
        }
    })
}

/// Applies `steps` to `value`; `pristine` as in [`Native::each`], for a borrowed `value`.
fn walk<'a>(
    steps: &[(Step, Opt)],
    value: Cow<'a, Value>,
    pristine: bool,
    out: &mut Sink<'_, 'a>,
) -> Result<(), Bail> {
    let Some(((step, opt), rest)) = steps.split_first() else {
        return out(value);
    };
    let optional = matches!(opt, Opt::Optional);
    // A value of the wrong kind: nothing with `?`, otherwise an error (jaq's to report).
    let mismatch = || if optional { Ok(()) } else { Err(Bail) };
    match step {
        Step::Field(name) => match value {
            Cow::Borrowed(Value::Object(map)) => match map.get(name) {
                Some(v) => walk(rest, Cow::Borrowed(v), pristine, out),
                None => walk(rest, Cow::Owned(Value::Null), pristine, out),
            },
            Cow::Owned(Value::Object(mut map)) => walk(
                rest,
                Cow::Owned(map.remove(name).unwrap_or(Value::Null)),
                pristine,
                out,
            ),
            Cow::Borrowed(Value::Null) | Cow::Owned(Value::Null) => {
                walk(rest, Cow::Owned(Value::Null), pristine, out)
            }
            _ => mismatch(),
        },
        Step::Index(i) => match value {
            Cow::Borrowed(Value::Array(items)) => match index(items.len(), *i) {
                Some(at) => walk(rest, Cow::Borrowed(&items[at]), pristine, out),
                None => walk(rest, Cow::Owned(Value::Null), pristine, out),
            },
            Cow::Owned(Value::Array(mut items)) => {
                let item = index(items.len(), *i).map_or(Value::Null, |at| items.swap_remove(at));
                walk(rest, Cow::Owned(item), pristine, out)
            }
            // jaq looks a number up among an object's keys, where it never is.
            Cow::Borrowed(Value::Null | Value::Object(_))
            | Cow::Owned(Value::Null | Value::Object(_)) => {
                walk(rest, Cow::Owned(Value::Null), pristine, out)
            }
            _ => mismatch(),
        },
        Step::Iterate => match value {
            Cow::Borrowed(Value::Array(items)) => items
                .iter()
                .try_for_each(|v| walk(rest, Cow::Borrowed(v), pristine, out)),
            Cow::Owned(Value::Array(items)) => items
                .into_iter()
                .try_for_each(|v| walk(rest, Cow::Owned(v), pristine, out)),
            Cow::Borrowed(Value::Object(map)) if pristine => map
                .values()
                .try_for_each(|v| walk(rest, Cow::Borrowed(v), pristine, out)),
            Cow::Borrowed(Value::Object(_)) | Cow::Owned(Value::Object(_)) => Err(Bail),
            _ => mismatch(),
        },
    }
}

/// The position `i` names in a sequence of `len` (negative from the end), if inside it.
fn index(len: usize, i: i64) -> Option<usize> {
    let len = i64::try_from(len).ok()?;
    let at = if i < 0 { len + i } else { i };
    (0..len).contains(&at).then_some(at as usize)
}

fn boolean<'a>(b: bool) -> Cow<'a, Value> {
    Cow::Owned(Value::Bool(b))
}

fn is_truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
}

/// A number as jaq holds it: a machine integer or a float (big integers are not modelled).
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(n: &Number) -> Result<Num, Bail> {
        if let Some(i) = n.as_i64() {
            Ok(Num::Int(i))
        } else if n.is_f64() {
            n.as_f64().map(Num::Float).ok_or(Bail)
        } else {
            Err(Bail)
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn into_value(self) -> Result<Value, Bail> {
        match self {
            Num::Int(i) => Ok(Value::Number(i.into())),
            Num::Float(f) => Number::from_f64(f).map(Value::Number).ok_or(Bail),
        }
    }
}

fn number(v: &Value) -> Result<Num, Bail> {
    match v {
        Value::Number(n) => Num::of(n),
        _ => Err(Bail),
    }
}

fn math(op: Math, l: Cow<'_, Value>, r: Cow<'_, Value>) -> Result<Value, Bail> {
    if let (Value::Number(a), Value::Number(b)) = (&*l, &*r) {
        return arithmetic(op, Num::of(a)?, Num::of(b)?)?.into_value();
    }
    if op != Math::Add {
        return Err(Bail);
    }
    Ok(match (l, r) {
        (Cow::Borrowed(Value::Null) | Cow::Owned(Value::Null), other)
        | (other, Cow::Borrowed(Value::Null) | Cow::Owned(Value::Null)) => other.into_owned(),
        (l, r) => match (l.into_owned(), r) {
            (Value::String(mut a), r) => match &*r {
                Value::String(b) => {
                    a.push_str(b);
                    Value::String(a)
                }
                _ => return Err(Bail),
            },
            (Value::Array(mut a), r) => match r.into_owned() {
                Value::Array(b) => {
                    a.extend(b);
                    Value::Array(a)
                }
                _ => return Err(Bail),
            },
            (Value::Object(mut a), r) => match r.into_owned() {
                Value::Object(b) => {
                    a.extend(b);
                    Value::Object(a)
                }
                _ => return Err(Bail),
            },
            _ => return Err(Bail),
        },
    })
}

fn arithmetic(op: Math, a: Num, b: Num) -> Result<Num, Bail> {
    let result = match (op, a, b) {
        (Math::Add, Num::Int(x), Num::Int(y)) => x.checked_add(y).map(Num::Int),
        (Math::Sub, Num::Int(x), Num::Int(y)) => x.checked_sub(y).map(Num::Int),
        (Math::Mul, Num::Int(x), Num::Int(y)) => x.checked_mul(y).map(Num::Int),
        (Math::Add, x, y) => Some(Num::Float(x.as_f64() + y.as_f64())),
        (Math::Sub, x, y) => Some(Num::Float(x.as_f64() - y.as_f64())),
        (Math::Mul, x, y) => Some(Num::Float(x.as_f64() * y.as_f64())),
        // Division is always a float in jaq; division by zero is its error to report.
        (Math::Div, x, y) if y.as_f64() != 0.0 => Some(Num::Float(x.as_f64() / y.as_f64())),
        _ => None,
    };
    result.ok_or(Bail)
}

fn compare(op: Cmp, l: &Value, r: &Value) -> Result<bool, Bail> {
    Ok(match op {
        Cmp::Eq => equal(l, r)?,
        Cmp::Ne => !equal(l, r)?,
        Cmp::Lt => order(l, r)? == Ordering::Less,
        Cmp::Le => order(l, r)? != Ordering::Greater,
        Cmp::Gt => order(l, r)? == Ordering::Greater,
        Cmp::Ge => order(l, r)? != Ordering::Less,
    })
}

/// jq's equality: numbers by value (`1 == 1.0`), containers element by element.
fn equal(l: &Value, r: &Value) -> Result<bool, Bail> {
    Ok(match (l, r) {
        (Value::Number(a), Value::Number(b)) => {
            num_order(Num::of(a)?, Num::of(b)?) == Ordering::Equal
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Ok(false);
            }
            for (x, y) in a.iter().zip(b) {
                if !equal(x, y)? {
                    return Ok(false);
                }
            }
            true
        }
        (Value::Object(a), Value::Object(b)) => {
            if a.len() != b.len() {
                return Ok(false);
            }
            for (k, x) in a {
                match b.get(k) {
                    Some(y) if equal(x, y)? => {}
                    _ => return Ok(false),
                }
            }
            true
        }
        _ => l == r,
    })
}

/// jq's order: null < false < true < numbers < strings < arrays < objects. Objects against
/// objects are not modelled.
fn order(l: &Value, r: &Value) -> Result<Ordering, Bail> {
    let rank = |v: &Value| match v {
        Value::Null => 0,
        Value::Bool(false) => 1,
        Value::Bool(true) => 2,
        Value::Number(_) => 3,
        Value::String(_) => 4,
        Value::Array(_) => 5,
        Value::Object(_) => 6,
    };
    Ok(match (l, r) {
        (Value::Number(a), Value::Number(b)) => num_order(Num::of(a)?, Num::of(b)?),
        (Value::String(a), Value::String(b)) => a.cmp(b),
        (Value::Array(a), Value::Array(b)) => {
            for (x, y) in a.iter().zip(b) {
                match order(x, y)? {
                    Ordering::Equal => {}
                    other => return Ok(other),
                }
            }
            a.len().cmp(&b.len())
        }
        (Value::Object(_), Value::Object(_)) => return Err(Bail),
        _ => rank(l).cmp(&rank(r)),
    })
}

fn num_order(a: Num, b: Num) -> Ordering {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => x.cmp(&y),
        (x, y) => x.as_f64().total_cmp(&y.as_f64()),
    }
}

fn builtin<'a>(b: Builtin, input: &'a Value) -> Result<Cow<'a, Value>, Bail> {
    let owned = |v: Value| Ok(Cow::Owned(v));
    match (b, input) {
        (Builtin::Not, v) => owned(Value::Bool(!is_truthy(v))),
        (Builtin::Length, Value::Null) => owned(Value::from(0)),
        (Builtin::Length, Value::Number(n)) => owned(
            match Num::of(n)? {
                Num::Int(i) => Num::Int(i.checked_abs().ok_or(Bail)?),
                Num::Float(f) => Num::Float(f.abs()),
            }
            .into_value()?,
        ),
        (Builtin::Length, Value::String(s)) => owned(Value::from(s.chars().count())),
        (Builtin::Length, Value::Array(a)) => owned(Value::from(a.len())),
        (Builtin::Length, Value::Object(o)) => owned(Value::from(o.len())),
        (Builtin::AsciiUpcase, Value::String(s)) => owned(Value::String(s.to_ascii_uppercase())),
        (Builtin::AsciiDowncase, Value::String(s)) => owned(Value::String(s.to_ascii_lowercase())),
        (Builtin::Add, Value::Array(items)) => {
            let mut sum = Cow::Owned(Value::Null);
            for item in items {
                sum = Cow::Owned(math(Math::Add, sum, Cow::Borrowed(item))?);
            }
            Ok(sum)
        }
        (Builtin::Keys, Value::Object(o)) => owned(Value::Array(
            o.keys().map(|k| Value::String(k.clone())).collect(),
        )),
        (Builtin::Keys, Value::Array(a)) => {
            owned(Value::Array((0..a.len()).map(Value::from).collect()))
        }
        (Builtin::ToString, Value::String(_)) => Ok(Cow::Borrowed(input)),
        (Builtin::ToString, v) => {
            let mut text = String::new();
            interpolate(v, &mut text)?;
            owned(Value::String(text))
        }
        (Builtin::Type, v) => owned(Value::String(
            match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            }
            .to_owned(),
        )),
        _ => Err(Bail),
    }
}

/// Appends `v` as string interpolation and `tostring` write it: strings as they are, other
/// scalars as JSON. Floats, arrays and objects are not modelled (jaq's number formatting
/// differs from serde_json's in places).
fn interpolate(v: &Value, out: &mut String) -> Result<(), Bail> {
    use std::fmt::Write;
    match v {
        Value::String(s) => out.push_str(s),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Number(n) => match Num::of(n)? {
            Num::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Num::Float(_) => return Err(Bail),
        },
        Value::Array(_) | Value::Object(_) => return Err(Bail),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
