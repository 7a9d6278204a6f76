//! The standard library Sluice expressions get: jaq-core, jaq-std and jaq-json, minus whatever
//! reaches outside the message or the process's control.
//!
//! Removed (using one is a compile error that says what to do instead):
//! * `env`, `$ENV`: read the process environment (secrets); pass values in headers instead;
//! * `input`, `inputs`: read further inputs; an expression sees exactly one message body;
//! * `halt`, `halt_error`: exit the process;
//! * `debug`, `stderr`: write to the process's standard error, bypassing logging;
//! * `localtime`, `strflocaltime`: depend on the host's time zone (environment and zoneinfo
//!   files), so a flow would behave differently per host; `gmtime`/`strftime` remain.
//!
//! `now` is kept (timestamps are common in integration flows); flows whose tests must be
//! reproducible should use `$meta.created_at`.

use jaq_core::load::parse::{BinaryOp, Def, Term};
use jaq_core::native::Fun;

use super::budget::{self, Sluice};

/// A removed builtin: its name (filters without `$`, variables with) and what to do instead.
pub(super) const REMOVED: &[(&str, &str)] = &[
    ("env", "pass values in headers"),
    ("$ENV", "pass values in headers"),
    (
        "input",
        "an expression sees one message body as `.`; use `split` or `aggregate` steps",
    ),
    (
        "inputs",
        "an expression sees one message body as `.`; use `split` or `aggregate` steps",
    ),
    ("halt", "use `error(\"...\")` to fail the step"),
    ("halt_error", "use `error(\"...\")` to fail the step"),
    ("debug", "use a `log` step"),
    ("debug_empty", "use a `log` step"),
    ("stderr", "use a `log` step"),
    ("stderr_empty", "use a `log` step"),
    (
        "localtime",
        "it depends on the host's time zone; use `gmtime`",
    ),
    (
        "strflocaltime",
        "it depends on the host's time zone; use `strftime`",
    ),
];

/// The explanation for a removed builtin, if `name` is one.
pub(super) fn removed(name: &str) -> Option<String> {
    REMOVED.iter().find(|(n, _)| *n == name).map(|(n, advice)| {
        let shown = n.trim_end_matches("_empty");
        format!("`{shown}` is not available in Sluice expressions: {advice}")
    })
}

fn is_removed(name: &str) -> bool {
    REMOVED.iter().any(|(n, _)| *n == name)
}

/// Every standard definition, unfiltered (for the classifier).
pub(super) fn all_defs() -> impl Iterator<Item = Def<&'static str>> {
    jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs())
}

/// The standard definitions Sluice offers, with a tick at the start of every recursive one.
pub(super) fn defs() -> Vec<Def<&'static str>> {
    all_defs()
        .filter(|d| !is_removed(d.name))
        .map(|mut d| {
            tick_recursive(&mut d);
            d
        })
        .collect()
}

/// The native filters Sluice offers: jaq's, minus the removed ones, with a ticking `range` and
/// the tick itself.
pub(super) fn funs() -> Vec<Fun<Sluice>> {
    jaq_core::funs::<Sluice>()
        .chain(jaq_std::funs::<Sluice>())
        .chain(jaq_json::funs::<Sluice>())
        .filter(|(name, args, _)| !is_removed(name) && (*name != "range" || args.len() != 3))
        .chain([budget::range_fun(), budget::tick_fun()])
        .collect()
}

/// Puts a tick in front of the body of `def` and of every definition nested in it that calls
/// itself (`def repeat(f): def rec: f, rec; rec;` ticks in `rec`).
fn tick_recursive(def: &mut Def<&'static str>) {
    tick_nested(&mut def.body);
    if calls(&def.body, (def.name, def.args.len())) {
        prepend_tick(&mut def.body);
    }
}

fn tick_nested(term: &mut Term<&'static str>) {
    // Standard definitions nest local `def`s only directly in a body or a pipe's right side.
    match term {
        Term::Def(defs, rest) => {
            for d in defs.iter_mut() {
                tick_recursive(d);
            }
            tick_nested(rest);
        }
        Term::BinOp(l, _, r) => {
            tick_nested(l);
            tick_nested(r);
        }
        _ => {}
    }
}

fn prepend_tick(body: &mut Term<&'static str>) {
    let old = std::mem::take(body);
    *body = Term::BinOp(
        Box::new(Term::Call(budget::TICK, Vec::new())),
        BinaryOp::Pipe(None),
        Box::new(old),
    );
}

/// Whether `term` calls `def` (name, arity) anywhere (ignoring shadowing: a spurious tick is harmless).
fn calls(term: &Term<&'static str>, def: (&str, usize)) -> bool {
    let mut found = std::collections::BTreeSet::new();
    super::classify::calls_of(term, &mut found);
    found.contains(&def)
}
