//! jq expressions (via jaq) with Sluice's limits.
//!
//! # Language
//! The program sees the message body as `.`, the headers as `$headers` (an object of strings)
//! and the metadata as `$meta` (`id`, `correlation_id`, `origin`, `created_at` in RFC 3339,
//! `pattern` = `in_only`/`in_out`). The standard library is jaq's (core, std, json) minus the
//! builtins listed in [`stdlib`] (`env`, `$ENV`, `input`, `inputs`, `halt`, `halt_error`,
//! `debug`, `stderr`, `localtime`, `strflocaltime`).
//!
//! # Evaluation
//! A program that `native.rs` can compile (paths, construction, arithmetic, comparisons, `if`,
//! `//`, common builtins) first runs natively on the `serde_json::Value` body; on anything the
//! native tree does not model exactly it hands the input back and jaq evaluates it, so jaq's
//! result or error is always the answer.
//!
//! # Limits
//! A program is compiled once. [`classify`] decides statically whether it is *bounded* (no user
//! definitions, no generating or recursive builtins): bounded programs run inline on the calling
//! task, which is the hot path of most flows. Every other program runs on tokio's blocking pool
//! under [`JqLimits::timeout`], and is also interrupted from within (see [`budget`]): each user
//! definition, each recursive standard definition and each `range` element ticks a budget that
//! fails once the deadline has passed or the stack is too deep, so the thread actually stops.
//! A thread that still runs past its timeout (a single builtin working on a huge value) is
//! abandoned: the step fails at once and the thread finishes on its own; at most
//! [`MAX_ABANDONED`] may be abandoned at a time, after which unbounded programs fail fast until
//! some finish. On both paths, outputs are limited to [`JqLimits::max_outputs`] values and
//! [`JqLimits::max_output_bytes`] of estimated serialized size.
//!
//! Residual risk, documented rather than solved: a single builtin can allocate without bound
//! (`"x" * 1e10`, deeply nested results built by `reduce`); the time limit fails the step but
//! cannot reclaim that memory.

mod budget;
mod classify;
mod convert;
mod native;
mod rewrite;
mod stdlib;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Ctx, Vars};
use jaq_json::Val;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::{ErrorKind, Headers, Message, ProcessError};

use self::budget::{Budget, RunData, Sluice, Stop};
use self::convert::TooBig;
use crate::expr::MetaView;

/// How many timed-out evaluations may still be running on the blocking pool at once.
pub const MAX_ABANDONED: usize = 8;

/// Limits applied to every evaluation of a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JqLimits {
    /// Longest an unbounded program may run (default 1s).
    pub timeout: Duration,
    /// Most outputs a program may produce (default 10 000).
    pub max_outputs: usize,
    /// Largest estimated serialized size of all outputs together (default 16 MiB).
    pub max_output_bytes: usize,
}

impl Default for JqLimits {
    fn default() -> Self {
        JqLimits {
            timeout: Duration::from_secs(1),
            max_outputs: 10_000,
            max_output_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A program that does not compile: where (a byte offset into the code, when known) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JqCompileError {
    /// Byte offset of the offending token in the code.
    pub offset: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl JqCompileError {
    fn at(offset: Option<usize>, message: impl Into<String>) -> Self {
        JqCompileError {
            offset,
            message: message.into(),
        }
    }
}

/// Compiles `code` once, for many evaluations under `limits`.
pub fn compile(code: &str, limits: JqLimits) -> Result<Arc<dyn JqProgram>, JqCompileError> {
    Ok(Arc::new(compile_program(code, limits)?))
}

fn compile_program(code: &str, limits: JqLimits) -> Result<Program, JqCompileError> {
    // The original text is compiled first so errors point at what the user wrote.
    let plain = compile_filter(code).map_err(first_error)?;
    let analysis = classify::analyze(code);
    let filter = if analysis.bounded {
        plain
    } else {
        // If the ticked text does not compile (an unusual spelling of `def`), the program still
        // runs, bounded by the timeout alone.
        rewrite::with_ticks(code)
            .and_then(|ticked| compile_filter(&ticked).ok())
            .unwrap_or(plain)
    };
    // Only bounded programs can be native: the native tree has no definitions or recursion.
    let native = analysis
        .bounded
        .then(|| jaq_core::load::parse(code, |p| p.term()))
        .flatten()
        .and_then(|term| native::compile(&term));
    Ok(Program {
        compiled: Arc::new(Compiled {
            source: code.into(),
            filter,
            native,
            bounded: analysis.bounded,
            uses_headers: analysis.uses_headers,
            uses_meta: analysis.uses_meta,
            limits,
        }),
    })
}

type Filter = jaq_core::Filter<Sluice>;

/// Compile errors as (byte offset in `code`, message).
type Errors = Vec<(Option<usize>, String)>;

fn compile_filter(code: &str) -> Result<Filter, Errors> {
    let arena = Arena::default();
    let loader = Loader::new(stdlib::defs());
    let locate = |at: Option<&str>| at.and_then(|s| rewrite::offset_in(code, s));
    let modules = match loader.load(&arena, File { code, path: () }) {
        Ok(modules) => modules,
        Err(errors) => {
            return Err(errors
                .into_iter()
                .flat_map(|(_, e)| load_errors(e))
                .map(|(at, message)| (locate(at), message))
                .collect());
        }
    };
    let compiled = jaq_core::Compiler::default()
        .with_funs(stdlib::funs())
        .with_global_vars(["$headers", "$meta"])
        .compile(modules);
    compiled.map_err(|errors| {
        errors
            .into_iter()
            .flat_map(|(_, undefined)| undefined)
            .map(|(name, kind)| (locate(Some(name)), undefined_message(name, &kind)))
            .collect()
    })
}

fn load_errors(e: jaq_core::load::Error<&str>) -> Vec<(Option<&str>, String)> {
    use jaq_core::load::Error;
    match e {
        Error::Io(items) => items
            .into_iter()
            .map(|(path, _)| {
                (
                    Some(path),
                    "modules cannot be imported in Sluice expressions: define the function in the expression".to_owned(),
                )
            })
            .collect(),
        Error::Lex(items) => items
            .into_iter()
            .map(|(expect, at)| (Some(at), format!("expected {}", expect.as_str())))
            .collect(),
        Error::Parse(items) => items
            .into_iter()
            .map(|(expect, found)| {
                let message = if found.is_empty() {
                    format!("expected {} but the expression ended", expect.as_str())
                } else {
                    format!("expected {} but found `{found}`", expect.as_str())
                };
                (Some(found), message)
            })
            .collect(),
    }
}

fn undefined_message(name: &str, kind: &jaq_core::compile::Undefined) -> String {
    use jaq_core::compile::Undefined;
    if let Some(message) = stdlib::removed(name) {
        return message;
    }
    match kind {
        Undefined::Filter(arity) => format!(
            "undefined function `{name}/{arity}`; check its spelling and number of arguments"
        ),
        Undefined::Var => format!(
            "undefined variable `{name}`; the variables are `$headers`, `$meta` and those bound with `as`"
        ),
        other => format!("undefined {} `{name}`", other.as_str()),
    }
}

fn first_error(errors: Errors) -> JqCompileError {
    match errors.into_iter().next() {
        Some((offset, message)) => JqCompileError::at(offset, message),
        None => JqCompileError::at(None, "the expression does not compile"),
    }
}

/// A compiled program, shared with blocking-pool threads.
struct Compiled {
    source: Box<str>,
    filter: Filter,
    /// The same program compiled to run on JSON values directly, when it is simple enough.
    native: Option<native::Native>,
    bounded: bool,
    uses_headers: bool,
    uses_meta: bool,
    limits: JqLimits,
}

/// The [`JqProgram`] handed to components.
pub struct Program {
    compiled: Arc<Compiled>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("jq::Program")
            .field("source", &self.compiled.source)
            .field("bounded", &self.compiled.bounded)
            .finish_non_exhaustive()
    }
}

/// The message parts a program reads, captured only if it reads them.
struct Inputs<'m> {
    headers: Option<std::borrow::Cow<'m, Headers>>,
    meta: Option<MetaView>,
}

impl Compiled {
    fn inputs<'m>(&self, msg: &'m Message) -> Inputs<'m> {
        Inputs {
            headers: self
                .uses_headers
                .then_some(std::borrow::Cow::Borrowed(&msg.headers)),
            meta: self.uses_meta.then(|| MetaView::of(msg)),
        }
    }

    /// Runs the native tree under the same output limits as jaq (and with the same errors);
    /// `Ok(Err(input))` hands the input back when jaq must evaluate instead.
    fn evaluate_native(
        &self,
        native: &native::Native,
        input: Arc<Value>,
        msg: &Message,
        first_only: bool,
    ) -> Result<Result<Vec<Value>, Arc<Value>>, ProcessError> {
        let headers = if self.uses_headers {
            Value::Object(
                msg.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )
        } else {
            Value::Null
        };
        let meta = if self.uses_meta {
            MetaView::of(msg).to_json()
        } else {
            Value::Null
        };
        let env = native::Env {
            headers: &headers,
            meta: &meta,
        };
        let mut outputs = match native.run_shared(input, &env) {
            Ok(outputs) => outputs,
            Err(input) => return Ok(Err(input)),
        };
        if first_only {
            outputs.truncate(1);
        }
        if outputs.len() > self.limits.max_outputs {
            return Err(self.too_many_outputs());
        }
        let mut bytes_left = self.limits.max_output_bytes;
        for output in &outputs {
            convert::charge_json(output, &mut bytes_left, 0).map_err(|e| self.too_big(e))?;
        }
        Ok(Ok(outputs))
    }

    fn too_many_outputs(&self) -> ProcessError {
        ProcessError::expression(format!(
            "expression produced more than {} outputs; use `limit(n; ...)` or `first(...)` to take fewer",
            self.limits.max_outputs
        ))
    }

    fn too_big(&self, e: TooBig) -> ProcessError {
        match e {
            TooBig::Bytes => ProcessError::expression(format!(
                "expression output exceeds {} bytes; produce less data",
                self.limits.max_output_bytes
            )),
            TooBig::Depth => ProcessError::expression(format!(
                "expression output is nested deeper than {} levels",
                convert::MAX_DEPTH
            )),
        }
    }

    /// Runs the program to completion (or to its first output if `first_only`) on this thread.
    ///
    /// A panic inside jaq (some builtins panic on extreme arguments, e.g. a string repeated a
    /// near-`i64::MAX` number of times overflows its capacity) fails the step instead of the
    /// task running the flow.
    fn evaluate(
        &self,
        input: &Value,
        vars: &Inputs<'_>,
        timed: bool,
        first_only: bool,
    ) -> Result<Vec<Value>, ProcessError> {
        let run =
            std::panic::AssertUnwindSafe(|| self.evaluate_jaq(input, vars, timed, first_only));
        std::panic::catch_unwind(run).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".to_owned());
            Err(ProcessError::expression(format!(
                "expression failed inside jq ({why}); check the values its operators receive"
            )))
        })
    }

    fn evaluate_jaq(
        &self,
        input: &Value,
        vars: &Inputs<'_>,
        timed: bool,
        first_only: bool,
    ) -> Result<Vec<Value>, ProcessError> {
        let stack_marker = 0u8;
        let budget = if timed {
            let base = std::hint::black_box(&stack_marker) as *const u8 as usize;
            Budget::new(self.limits.timeout, base)
        } else {
            Budget::unlimited()
        };
        let headers = vars
            .headers
            .as_deref()
            .map_or(Val::Null, convert::headers_val);
        let meta = vars.meta.as_ref().map_or(Val::Null, convert::meta_val);
        let data = RunData {
            lut: &self.filter.lut,
            budget: &budget,
        };
        let ctx = Ctx::<Sluice>::new(data, Vars::new([headers, meta]));
        let mut bytes_left = self.limits.max_output_bytes;
        let mut outputs = Vec::new();
        for item in self.filter.id.run((ctx, convert::to_val(input))) {
            if let Some(stop) = budget.stopped() {
                return Err(self.stop_error(stop));
            }
            let val = match item {
                Ok(val) => val,
                Err(exn) => return Err(runtime_error(exn)),
            };
            if outputs.len() == self.limits.max_outputs {
                return Err(self.too_many_outputs());
            }
            let json = convert::to_json(&val, &mut bytes_left, 0).map_err(|e| self.too_big(e))?;
            outputs.push(json);
            if first_only {
                break;
            }
        }
        // A program may catch the budget's error and carry on; the run still failed.
        if let Some(stop) = budget.stopped() {
            return Err(self.stop_error(stop));
        }
        Ok(outputs)
    }

    fn stop_error(&self, stop: Stop) -> ProcessError {
        match stop {
            Stop::Time => self.timeout_error(),
            Stop::Stack => ProcessError::expression(
                "expression recursed too deeply; make the recursion shallower or iterate with `reduce`",
            ),
        }
    }

    fn timeout_error(&self) -> ProcessError {
        ProcessError::expression(format!(
            "expression exceeded its time limit of {}",
            HumanDuration(self.limits.timeout)
        ))
    }
}

fn runtime_error(exn: jaq_core::Exn<'_, Val>) -> ProcessError {
    match exn.get_err() {
        Ok(error) => ProcessError::expression(match error.into_val() {
            // `error("text")` carries a string: show it without JSON quotes.
            Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(&b).into_owned(),
            other => other.to_string(),
        }),
        // `halt` is not available and labels are always bound, so this is unreachable in practice.
        Err(_) => ProcessError::new(
            ErrorKind::Internal,
            "expression stopped without an error value",
        ),
    }
}

/// How many timed-out evaluations are still running.
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const GAVE_UP: u8 = 2;

impl Program {
    async fn run_limited(
        &self,
        input: Arc<Value>,
        msg: &Message,
        first_only: bool,
    ) -> Result<Vec<Value>, ProcessError> {
        let compiled = &self.compiled;
        let input = match &compiled.native {
            Some(native) => match compiled.evaluate_native(native, input, msg, first_only)? {
                Ok(outputs) => return Ok(outputs),
                Err(input) => input,
            },
            None => input,
        };
        if compiled.bounded {
            return compiled.evaluate(&input, &compiled.inputs(msg), false, first_only);
        }
        if ABANDONED.load(Ordering::Acquire) >= MAX_ABANDONED {
            return Err(ProcessError::expression(format!(
                "{MAX_ABANDONED} expressions are still running past their time limit; \
                 fix the expression that loops (it failed earlier with a time limit error)"
            )));
        }
        let inputs = compiled.inputs(msg);
        let owned = Inputs {
            headers: inputs
                .headers
                .map(|h| std::borrow::Cow::Owned(h.into_owned())),
            meta: inputs.meta,
        };
        let state = Arc::new(AtomicU8::new(RUNNING));
        let thread_state = Arc::clone(&state);
        let thread_compiled = Arc::clone(compiled);
        let handle = tokio::task::spawn_blocking(move || {
            let result = thread_compiled.evaluate(&input, &owned, true, first_only);
            if thread_state
                .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // The caller gave up on this run and counted it as abandoned.
                ABANDONED.fetch_sub(1, Ordering::AcqRel);
            }
            result
        });
        match tokio::time::timeout(compiled.limits.timeout, handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ProcessError::new(
                ErrorKind::Internal,
                format!("expression evaluation failed: {join}"),
            )),
            Err(_elapsed) => {
                // Count first, so the thread's decrement can never precede the increment.
                ABANDONED.fetch_add(1, Ordering::AcqRel);
                if state
                    .compare_exchange(RUNNING, GAVE_UP, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    ABANDONED.fetch_sub(1, Ordering::AcqRel);
                }
                Err(compiled.timeout_error())
            }
        }
    }
}

#[async_trait]
impl JqProgram for Program {
    async fn run(&self, input: Arc<Value>, msg: &Message) -> Result<Vec<Value>, ProcessError> {
        self.run_limited(input, msg, false).await
    }

    async fn test(&self, input: Arc<Value>, msg: &Message) -> Result<bool, ProcessError> {
        let first = self.run_limited(input, msg, true).await?;
        Ok(first
            .first()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false))))
    }

    fn source(&self) -> &str {
        &self.compiled.source
    }
}

#[cfg(test)]
mod tests;
