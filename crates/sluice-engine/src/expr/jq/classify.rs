//! Static classification of jq programs: which can run inline on the calling task.
//!
//! A program is *bounded* when its work is bounded by the size of its input: it defines no
//! functions of its own (so it cannot recurse) and calls none of the builtins that generate
//! without bound or recurse (`range`, `repeat`, `recurse`, `while`, `until`, `path`/`paths`,
//! `walk`, `getpath`, `combinations`, and every standard definition that calls one of those or
//! itself). Bounded programs run inline; the others run on the blocking pool under a timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Def, Pattern, Term};
use jaq_core::path::Part;

/// Builtins that generate without bound or whose cost is not bounded by the input's size.
const UNBOUNDED_SEEDS: &[&str] = &[
    "range",
    "repeat",
    "recurse",
    "while",
    "until",
    "path",
    "paths",
    "path_value",
    "pick",
    "getpath",
    "setpath",
    "delpaths",
    "walk",
    "combinations",
];

/// What the classifier learned about a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Analysis {
    /// Runs in time bounded by its input; safe to run inline.
    pub bounded: bool,
    /// Reads `$headers`.
    pub uses_headers: bool,
    /// Reads `$meta`.
    pub uses_meta: bool,
}

/// Standard definitions (name, arity) that recurse or call an unbounded filter, found by a
/// fixpoint over the standard library.
static UNBOUNDED_DEFS: LazyLock<BTreeSet<(&'static str, usize)>> = LazyLock::new(|| {
    let mut calls: BTreeMap<(&'static str, usize), BTreeSet<(&'static str, usize)>> =
        BTreeMap::new();
    for def in super::stdlib::all_defs() {
        let mut called = BTreeSet::new();
        calls_of(&def.body, &mut called);
        calls
            .entry((def.name, def.args.len()))
            .or_default()
            .extend(called);
    }
    let mut unbounded = BTreeSet::new();
    loop {
        let before = unbounded.len();
        for (def, called) in &calls {
            if called
                .iter()
                .any(|c| c == def || UNBOUNDED_SEEDS.contains(&c.0) || unbounded.contains(c))
            {
                unbounded.insert(*def);
            }
        }
        if unbounded.len() == before {
            return unbounded;
        }
    }
});

/// Whether calling `name` with `arity` arguments may take unbounded time.
fn is_unbounded(name: &str, arity: usize) -> bool {
    UNBOUNDED_SEEDS.contains(&name) || UNBOUNDED_DEFS.contains(&(name, arity))
}

/// Classifies `code`. Code that does not parse as a plain term (module directives) is unbounded.
pub(super) fn analyze(code: &str) -> Analysis {
    let Some(term) = jaq_core::load::parse(code, |p| p.term()) else {
        return Analysis {
            bounded: false,
            uses_headers: true,
            uses_meta: true,
        };
    };
    let mut walker = Walker {
        analysis: Analysis {
            bounded: true,
            uses_headers: false,
            uses_meta: false,
        },
    };
    walker.term(&term);
    walker.analysis
}

/// Every filter (name, arity) called in `term` (including nested definitions' bodies).
pub(super) fn calls_of<'s>(term: &Term<&'s str>, out: &mut BTreeSet<(&'s str, usize)>) {
    visit(term, &mut |t| {
        if let Term::Call(name, args) = t {
            out.insert((*name, args.len()));
        }
    });
}

struct Walker {
    analysis: Analysis,
}

impl Walker {
    fn term(&mut self, term: &Term<&str>) {
        visit(term, &mut |t| match t {
            Term::Def(..) => self.analysis.bounded = false,
            Term::Call(name, args) if is_unbounded(name, args.len()) => {
                self.analysis.bounded = false
            }
            Term::Var("$headers") => self.analysis.uses_headers = true,
            Term::Var("$meta") => self.analysis.uses_meta = true,
            _ => {}
        });
    }
}

/// Calls `f` on `term` and every term inside it, depth first.
fn visit<'s>(term: &Term<&'s str>, f: &mut dyn FnMut(&Term<&'s str>)) {
    f(term);
    match term {
        Term::Id | Term::Recurse | Term::Num(_) | Term::Break(_) | Term::Var(_) => {}
        Term::Str(_, parts) => {
            for part in parts {
                if let StrPart::Term(t) = part {
                    visit(t, f);
                }
            }
        }
        Term::Arr(inner) => {
            if let Some(t) = inner {
                visit(t, f);
            }
        }
        Term::Obj(entries) => {
            for (k, v) in entries {
                visit(k, f);
                if let Some(v) = v {
                    visit(v, f);
                }
            }
        }
        Term::Neg(t) | Term::Label(_, t) => visit(t, f),
        Term::BinOp(l, op, r) => {
            visit(l, f);
            if let BinaryOp::Pipe(Some(p)) = op {
                visit_pattern(p, f);
            }
            visit(r, f);
        }
        Term::Fold(_, xs, pattern, args) => {
            visit(xs, f);
            visit_pattern(pattern, f);
            for a in args {
                visit(a, f);
            }
        }
        Term::TryCatch(t, catch) => {
            visit(t, f);
            if let Some(c) = catch {
                visit(c, f);
            }
        }
        Term::IfThenElse(branches, otherwise) => {
            for (cond, then) in branches {
                visit(cond, f);
                visit(then, f);
            }
            if let Some(e) = otherwise {
                visit(e, f);
            }
        }
        Term::Def(defs, rest) => {
            for Def { body, .. } in defs {
                visit(body, f);
            }
            visit(rest, f);
        }
        Term::Call(_, args) => {
            for a in args {
                visit(a, f);
            }
        }
        Term::Path(t, path) => {
            visit(t, f);
            for (part, _) in &path.0 {
                match part {
                    Part::Index(i) => visit(i, f),
                    Part::Range(from, to) => {
                        for t in [from, to].into_iter().flatten() {
                            visit(t, f);
                        }
                    }
                }
            }
        }
    }
}

fn visit_pattern<'s>(pattern: &Pattern<&'s str>, f: &mut dyn FnMut(&Term<&'s str>)) {
    match pattern {
        Pattern::Var(_) => {}
        Pattern::Arr(items) => {
            for p in items {
                visit_pattern(p, f);
            }
        }
        Pattern::Obj(entries) => {
            for (k, p) in entries {
                visit(k, f);
                visit_pattern(p, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_programs() {
        let bounded = [
            ".",
            ".a.b",
            "{id: .id, n: (.items | length)}",
            "[.items[] | select(.ok) | .name]",
            "map(.price * .qty) | add",
            ".name | test(\"^a\")",
            "to_entries | from_entries",
            "reduce .[] as $x (0; . + $x)",
            "\"hi \\(.name)\"",
            "$headers[\"x-id\"] // $meta.id",
            "if .a then .b elif .c then .d else empty end",
            "sort_by(.k) | unique | first",
            "..|numbers",
        ];
        let unbounded = [
            "def f: f; f",
            "def inc: . + 1; inc",
            "[range(10)]",
            "range(1; 5)",
            "repeat(1)",
            "[limit(3; repeat(1))]",
            "recurse(.children[])",
            "until(. > 100; . * 2)",
            "[while(. < 100; . + 1)]",
            "[paths]",
            "walk(.)",
            "getpath([\"a\"])",
            "[.[] | combinations]",
            "transpose",
            "flatten",
            "reduce range(3) as $i (0; . + $i)",
            "{a: [range(3)]}",
            "\"\\([range(2)])\"",
            "import \"x\" as x; .",
        ];
        for p in bounded {
            assert!(analyze(p).bounded, "{p} should be bounded");
        }
        for p in unbounded {
            assert!(!analyze(p).bounded, "{p} should be unbounded");
        }
    }

    #[test]
    fn finds_variable_uses() {
        let a = analyze(".a");
        assert!(!a.uses_headers && !a.uses_meta);
        let a = analyze("$headers.x, [$meta.id]");
        assert!(a.uses_headers && a.uses_meta);
    }
}
