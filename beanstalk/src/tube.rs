//! Tube names, checked before they are sent.

/// Why a tube name was refused. beanstalkd answers `BAD_FORMAT` to all of these; checking
/// locally gives a clearer message and keeps a bad name from costing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TubeError {
    /// The empty string.
    #[error("tube name is empty")]
    Empty,
    /// More than 200 bytes.
    #[error("tube name is {0} bytes long; beanstalkd allows at most 200")]
    TooLong(usize),
    /// Starts with `-`.
    #[error("tube name {0:?} starts with '-', which beanstalkd refuses")]
    LeadingDash(String),
    /// A character outside `A-Za-z0-9-+/;.$_()`.
    #[error(
        "tube name {name:?} contains {ch:?}; allowed are letters, digits and - + / ; . $ _ ( )"
    )]
    BadChar {
        /// The name.
        name: String,
        /// The first bad character.
        ch: char,
    },
}

/// Longest tube name beanstalkd accepts, in bytes.
pub const MAX_TUBE_LEN: usize = 200;

/// Checks a tube name against beanstalkd's rules: 1 to 200 bytes of `A-Za-z0-9-+/;.$_()`,
/// not starting with `-`.
///
/// ```
/// assert!(beanstalk::check_tube("flotilla.create").is_ok());
/// assert!(beanstalk::check_tube("-bad").is_err());
/// assert!(beanstalk::check_tube("with space").is_err());
/// ```
pub fn check_tube(name: &str) -> Result<(), TubeError> {
    if name.is_empty() {
        return Err(TubeError::Empty);
    }
    if name.len() > MAX_TUBE_LEN {
        return Err(TubeError::TooLong(name.len()));
    }
    if name.starts_with('-') {
        return Err(TubeError::LeadingDash(name.to_string()));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-+/;.$_()".contains(*c)))
    {
        return Err(TubeError::BadChar {
            name: name.to_string(),
            ch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_beanstalkd_accepts() {
        for ok in [
            "default",
            "a",
            "flotilla.create",
            "x-+/;.$_()9",
            &"t".repeat(200),
        ] {
            assert_eq!(check_tube(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_what_beanstalkd_refuses() {
        assert_eq!(check_tube(""), Err(TubeError::Empty));
        assert_eq!(check_tube(&"t".repeat(201)), Err(TubeError::TooLong(201)));
        assert_eq!(check_tube("-x"), Err(TubeError::LeadingDash("-x".into())));
        assert!(matches!(
            check_tube("a b"),
            Err(TubeError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            check_tube("a\r\n"),
            Err(TubeError::BadChar { ch: '\r', .. })
        ));
        assert!(matches!(check_tube("é"), Err(TubeError::BadChar { .. })));
    }
}
