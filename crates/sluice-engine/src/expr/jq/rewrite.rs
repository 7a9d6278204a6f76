//! Puts a tick at the start of every user definition, so recursion in user code checks the
//! run's budget (see [`super::budget`]).
//!
//! jaq's loader only accepts source text, so the tick is inserted in the text, after the `:` of
//! each `def name(args):`. The original text is compiled first, so error offsets always refer to
//! what the user wrote.

use jaq_core::load::lex::{StrPart, Tok, Token};

/// What is inserted after each `def ...:`.
const TICK_PREFIX: &str = " __sluice_tick |";

/// `code` with ticks in every definition, or `None` if it defines nothing (or does not lex).
pub(super) fn with_ticks(code: &str) -> Option<String> {
    let tokens = jaq_core::load::Lexer::new(code).lex().ok()?;
    let mut points = Vec::new();
    def_bodies(code, &tokens, &mut points);
    if points.is_empty() {
        return None;
    }
    points.sort_unstable();
    let mut out = String::with_capacity(code.len() + points.len() * TICK_PREFIX.len());
    let mut last = 0;
    for p in points {
        out.push_str(code.get(last..p)?);
        out.push_str(TICK_PREFIX);
        last = p;
    }
    out.push_str(code.get(last..)?);
    Some(out)
}

/// Byte offsets just after the `:` of every `def name(args):` in `tokens`, recursively.
fn def_bodies(code: &str, tokens: &[Token<&str>], out: &mut Vec<usize>) {
    for (i, Token(text, tok)) in tokens.iter().enumerate() {
        match tok {
            Tok::Word if *text == "def" => {
                // `def name:` or `def name(args):`, so the colon is one of the next three tokens.
                let colon = tokens
                    .iter()
                    .skip(i + 1)
                    .take(3)
                    .find(|Token(t, k)| matches!(k, Tok::Sym) && *t == ":");
                if let Some(end) = colon.and_then(|Token(t, _)| offset_in(code, t).map(|o| o + 1)) {
                    out.push(end);
                }
            }
            Tok::Block(inner) => def_bodies(code, inner, out),
            Tok::Str(parts) => {
                for part in parts {
                    if let StrPart::Term(t) = part {
                        def_bodies(code, std::slice::from_ref(t), out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Where `part` (a slice of `whole`) starts in `whole`.
pub(super) fn offset_in(whole: &str, part: &str) -> Option<usize> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (start + part.len() <= whole.len()).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_a_tick_in_every_definition() {
        assert_eq!(with_ticks(".a"), None);
        assert_eq!(
            with_ticks("def f: f; f").as_deref(),
            Some("def f: __sluice_tick | f; f")
        );
        assert_eq!(
            with_ticks("def f($x; g): def h: g; [h, $x]; f(1; 2)").as_deref(),
            Some("def f($x; g): __sluice_tick | def h: __sluice_tick | g; [h, $x]; f(1; 2)")
        );
        assert_eq!(
            with_ticks("(def f: 1; f)").as_deref(),
            Some("(def f: __sluice_tick | 1; f)")
        );
    }
}
