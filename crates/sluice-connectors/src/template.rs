//! `{placeholder}` templates for URLs and file names, parsed once when the flow is built.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as is.
    Literal(String),
    /// A `{name}` placeholder.
    Placeholder(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`.
    #[error(
        "`{{` at byte {0} has no closing `}}`; close the placeholder, e.g. `{{http.param.id}}`"
    )]
    Unclosed(usize),
    /// `{}`.
    #[error("empty placeholder `{{}}` at byte {0}; name a header inside the braces")]
    Empty(usize),
    /// A `}` without its `{`.
    #[error("`}}` at byte {0} has no opening `{{`; remove it or open a placeholder")]
    Stray(usize),
}

impl Template {
    /// Parses `text`; placeholders are `{name}` and may not nest.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(i) = rest.find(['{', '}']) {
            if rest[i..].starts_with('}') {
                return Err(TemplateError::Stray(offset + i));
            }
            literal.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let close = after.find('}').ok_or(TemplateError::Unclosed(offset + i))?;
            let name = &after[..close];
            if name.contains('{') {
                return Err(TemplateError::Unclosed(offset + i));
            }
            if name.trim().is_empty() {
                return Err(TemplateError::Empty(offset + i));
            }
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Placeholder(name.trim().to_owned()));
            let consumed = i + 1 + close + 1;
            offset += consumed;
            rest = &rest[consumed..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { parts })
    }

    /// The pieces, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The placeholder names, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template; `value` resolves a placeholder name or says why it cannot.
    pub fn render<E>(&self, mut value: impl FnMut(&str) -> Result<String, E>) -> Result<String, E> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(name) => out.push_str(&value(name)?),
            }
        }
        Ok(out)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a header value is safe as
/// one URL path segment or query value.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_literals_and_placeholders() {
        let t = Template::parse("http://h/crm/{http.param.id}?x={ q }").unwrap();
        assert_eq!(
            t.parts(),
            &[
                Part::Literal("http://h/crm/".into()),
                Part::Placeholder("http.param.id".into()),
                Part::Literal("?x=".into()),
                Part::Placeholder("q".into()),
            ]
        );
        let out: Result<String, ()> = t.render(|n| Ok(n.to_uppercase()));
        assert_eq!(out.unwrap(), "http://h/crm/HTTP.PARAM.ID?x=Q");
    }

    #[test]
    fn rejects_broken_braces() {
        assert_eq!(Template::parse("a{b"), Err(TemplateError::Unclosed(1)));
        assert_eq!(Template::parse("a{}"), Err(TemplateError::Empty(1)));
        assert_eq!(Template::parse("a}b"), Err(TemplateError::Stray(1)));
        assert_eq!(Template::parse("{a{b}"), Err(TemplateError::Unclosed(0)));
    }

    #[test]
    fn percent_encodes_reserved_bytes() {
        assert_eq!(percent_encode("a b/c?d&é"), "a%20b%2Fc%3Fd%26%C3%A9");
        assert_eq!(percent_encode("Az09-._~"), "Az09-._~");
    }
}
