//! Diagnostics: every problem in a flow file, with where it is and what to do.

use std::fmt;
use std::sync::Arc;

use super::node::Loc;

/// One problem found in a flow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as given on the command line.
    pub file: Arc<str>,
    /// Where in it.
    pub loc: Loc,
    /// The field path, e.g. `flows[0].steps[1].transform.expression`.
    pub path: String,
    /// What is wrong, lower case.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.file, self.loc.line, self.loc.column, self.message
        )?;
        if !self.path.is_empty() {
            write!(f, "\n  at: {}", self.path)?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every problem found while loading, in file order. A runtime never starts with any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sorts by file, line, column (the order a reader fixes them in).
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| {
            (&a.file, a.loc.line, a.loc.column).cmp(&(&b.file, b.loc.line, b.loc.column))
        });
        self.0.dedup();
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        let n = self.0.len();
        write!(f, "{n} error{}", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Diagnostics {}

/// Collects diagnostics for one file.
#[derive(Debug)]
pub struct Reporter {
    file: Arc<str>,
    found: Vec<Diagnostic>,
}

impl Reporter {
    /// A reporter for `file`.
    pub fn new(file: Arc<str>) -> Self {
        Reporter {
            file,
            found: Vec::new(),
        }
    }

    /// Records a problem.
    pub fn error(
        &mut self,
        loc: Loc,
        path: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        self.found.push(Diagnostic {
            file: Arc::clone(&self.file),
            loc,
            path: path.to_owned(),
            message: message.into(),
            help,
        });
    }

    /// The file name.
    pub fn file(&self) -> &Arc<str> {
        &self.file
    }

    /// How many problems so far.
    pub fn count(&self) -> usize {
        self.found.len()
    }

    /// The problems found.
    pub fn finish(self) -> Vec<Diagnostic> {
        self.found
    }
}

/// "did you mean `x`?" for the candidate closest to `word`, when one is close enough.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let best = candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(format!("did you mean `{}`?", best.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["recipient_list", "transform", "filter"];
        assert_eq!(
            suggest("recipientlist", names).as_deref(),
            Some("did you mean `recipient_list`?")
        );
        assert_eq!(
            suggest("transfrom", names).as_deref(),
            Some("did you mean `transform`?")
        );
        assert_eq!(suggest("zzz", names), None);
    }
}
