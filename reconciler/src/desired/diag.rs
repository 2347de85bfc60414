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
            message: message.into(),
            hint: hint.into(),
        }
    }
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
