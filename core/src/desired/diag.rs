//! Validation errors with their place in the desired repo.

use std::fmt;

use serde::Serialize;

/// One problem in the desired repo: where it is, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    /// The file, relative to the repo's root, with `/` separators.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl Diagnostic {
    pub(crate) fn new(
        file: &str,
        (line, column): (usize, usize),
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            file: file.to_string(),
            line,
            column,
            message: bounded(&message.into()),
            hint: bounded(&hint.into()),
        }
    }
}

/// The longest message or hint kept whole; the longest a diagnostic makes is a few
/// hundred characters (a list of accepted keys).
const MAX_TEXT: usize = 1024;

/// `text` with its quotes shortened, and cut at [`MAX_TEXT`] whatever it holds.
fn bounded(text: &str) -> String {
    let short = shorten_quotes(text);
    if short.chars().count() <= MAX_TEXT {
        return short;
    }
    let mut cut: String = short.chars().take(MAX_TEXT).collect();
    cut.push('…');
    cut
}

/// The most characters of the desired repo's text that an error quotes.
pub const MAX_QUOTE: usize = 64;

/// `text` as an error quotes it: whole when short, else its start, its end (where a
/// suffix such as `-host1` shows) and its length, so that a hostile value of a megabyte
/// does not become a megabyte of error.
pub(crate) fn quote(text: &str) -> String {
    let n = text.chars().count();
    if n <= MAX_QUOTE {
        return text.to_string();
    }
    let start: String = text.chars().take(MAX_QUOTE - 16).collect();
    let end: String = text.chars().skip(n - 16).collect();
    format!("{start}…{end} ({} bytes)", text.len())
}

/// `message` with every quoted part (between backquotes or double quotes) longer than
/// [`MAX_QUOTE`] shortened by [`quote`]: for messages of the YAML library, which quote
/// values whole.
pub(crate) fn shorten_quotes(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let q = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find(q) else {
            // A lone quote character (`'"'`) opens nothing; the length cap covers the rest.
            out.push_str(rest);
            return out;
        };
        out.push_str(&quote(&rest[..close]));
        out.push(q);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}\n  hint: {}",
            self.file, self.line, self.column, self.message, self.hint
        )
    }
}

/// Every problem found in one snapshot, sorted by file, line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} error{} in the desired state", .0.len(), if .0.len() == 1 { "" } else { "s" })]
pub struct Invalid(pub Vec<Diagnostic>);

impl Invalid {
    /// The errors, one after another, as the CLI prints them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.0 {
            out.push_str("error: ");
            out.push_str(&d.to_string());
            out.push('\n');
        }
        out
    }
}
