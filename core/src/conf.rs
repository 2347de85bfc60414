//! rc-style configuration files as vm-bhyve reads them and as `sysrc` edits them.
//!
//! vm-bhyve and `sysrc` disagree about the same file, and flotilla has to see it the way
//! each of them does:
//!
//! - **Reading** (vm-bhyve's `config::load`/`config::get`): only lines that start with a
//!   lower-case letter count; everything from the first `#` on is dropped, even inside
//!   quotes; trailing spaces go; every `"` is removed but `'` is kept; the key is the text
//!   before the first `=`; and the **first** assignment of a key wins.
//! - **Writing** (`sysrc -f FILE key=value`, used by vm-bhyve's `config::set`): the
//!   **last** assignment is replaced in place, keeping its quoting style and whatever
//!   follows the value (a comment); an unquoted value becomes `"value"`; a key that is
//!   not there is appended as `key="value"`. `sysrc -x key` removes every assignment.
//! - **rc.conf** is sourced by `sh`, so there the last assignment wins: [`shell_get`].
//!
//! Because of the first/last split, a file with a duplicate key can be edited by `sysrc`
//! without vm-bhyve ever seeing the change. [`Conf::duplicates`] finds such keys.

use std::collections::BTreeMap;

/// A configuration file as vm-bhyve's `config::load` sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conf {
    entries: Vec<(String, String)>,
}

impl Conf {
    /// Parses `text` with vm-bhyve's rules (see the module documentation). Never fails:
    /// lines vm-bhyve would ignore are ignored.
    pub fn parse(text: &str) -> Conf {
        let mut entries = Vec::new();
        for raw in text.split('\n') {
            // grep '^[a-z]'
            if !raw.as_bytes().first().is_some_and(u8::is_ascii_lowercase) {
                continue;
            }
            // awk -F# '{print $1}'
            let line = raw.split('#').next().unwrap_or("");
            // sed -e 's@ *$@@': spaces only, a tab or CR stays.
            let line = line.trim_end_matches(' ');
            // tr -d '"'
            let line: String = line.chars().filter(|&c| c != '"').collect();
            // ${line%%=*} and ${line#*=}: without a `=` both are the whole line.
            let (key, value) = match line.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (line.clone(), line.clone()),
            };
            entries.push((key, value));
        }
        Conf { entries }
    }

    /// Parses bytes that may not be UTF-8; invalid sequences become U+FFFD, which no
    /// key vm-bhyve reads can contain.
    pub fn parse_bytes(bytes: &[u8]) -> Conf {
        Conf::parse(&String::from_utf8_lossy(bytes))
    }

    /// The value of `key` as `config::get` returns it: the first assignment.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `config::yesno`: true for yes, on, true or 1 in any case.
    pub fn yes(&self, key: &str) -> bool {
        self.get(key).is_some_and(is_yes)
    }

    /// Every assignment in file order, duplicates included.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// Every key with the value vm-bhyve uses (the first assignment).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        for (k, v) in &self.entries {
            map.entry(k.clone()).or_insert_with(|| v.clone());
        }
        map
    }

    /// Keys assigned more than once: `sysrc` would edit a different line than the one
    /// vm-bhyve reads.
    pub fn duplicates(&self) -> Vec<String> {
        let mut seen = BTreeMap::new();
        for (k, _) in &self.entries {
            *seen.entry(k.as_str()).or_insert(0u32) += 1;
        }
        seen.into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k.to_string())
            .collect()
    }
}

/// rc.subr's `checkyesno` / vm-bhyve's `config::yesno` truth test.
pub fn is_yes(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "yes" | "true" | "on" | "1")
}

/// Why `sysrc` refused an edit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysrcError {
    /// The key is not a shell variable name.
    #[error("invalid variable name `{0}`")]
    BadName(String),
    /// The last assignment's value starts with a back-tick, `$` or `\`: `sysrc` leaves
    /// expressions it did not write alone and fails.
    #[error("`{0}` is assigned with an expression sysrc does not rewrite")]
    Expression(String),
}

/// True for a name `sysrc` accepts as a variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_var_name(key: &str) -> bool {
    let mut b = key.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn is_space(c: char) -> bool {
    // POSIX [[:space:]]
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// If `line` assigns `key` (`^[[:space:]]*key=`), the byte offset just past the `=`.
fn assignment_end(line: &str, key: &str) -> Option<usize> {
    let lead = line.len() - line.trim_start_matches(is_space).len();
    let rest = &line[lead..];
    if rest.starts_with(key) && rest[key.len()..].starts_with('=') {
        Some(lead + key.len() + 1)
    } else {
        None
    }
}

/// Splits `text` into lines, each keeping its own `\n`.
fn lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

/// `sysrc -f FILE key=value` applied to the file's `text`; returns the new text.
///
/// The last assignment is rewritten in place, as sysrc's awk script does it: a
/// single-quoted value stays single-quoted, a double-quoted one double-quoted, an
/// unquoted or empty-after-space one becomes `"value"`, and what followed the old value
/// (a comment, say) is kept. Without an assignment, `key="value"` is appended, after a
/// newline if the text lacks a final one (vm-bhyve's `config::set` adds it first).
pub fn sysrc_set(text: &str, key: &str, value: &str) -> Result<String, SysrcError> {
    if !is_var_name(key) {
        return Err(SysrcError::BadName(key.to_string()));
    }
    let mut ls = lines(text);
    let found = ls
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, l)| assignment_end(l, key).map(|end| (i, end)));
    let Some((i, end)) = found else {
        let mut out = text.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("{key}=\"{value}\"\n"));
        return Ok(out);
    };
    let line = ls[i];
    let (body, nl) = match line.strip_suffix('\n') {
        Some(b) => (b, "\n"),
        None => (line, ""),
    };
    let prefix = &body[..end];
    let old = &body[end..];
    let new_line = match old.chars().next() {
        Some('`' | '$' | '\\') => return Err(SysrcError::Expression(key.to_string())),
        Some('\'') => {
            let after = &old[1..];
            let close = after.find('\'');
            match close {
                Some(c) => format!("{prefix}'{value}'{}", &after[c + 1..]),
                // An unterminated quote loses its closing character, as in sysrc.
                None => format!("{prefix}'{value}"),
            }
        }
        Some('"') => {
            let after = &old[1..];
            // ^"(.*\\+")*[^"]* : skip past the last escaped quote, then to the next quote.
            let start = after.rfind("\\\"").map_or(0, |p| p + 2);
            let tail = &after[start..];
            match tail.find('"') {
                Some(c) => format!("{prefix}\"{value}\"{}", &tail[c + 1..]),
                None => format!("{prefix}\"{value}"),
            }
        }
        Some(c) if is_space(c) || c == ';' => format!("{prefix}\"{value}\"{old}"),
        Some(_) => {
            let cut = old.find(is_space).unwrap_or(old.len());
            format!("{prefix}\"{value}\"{}", &old[cut..])
        }
        // `key=` with nothing after it: awk's %c of an empty string prints nothing, so
        // the new value goes in unquoted.
        None => format!("{prefix}{value}"),
    };
    let replaced = format!("{new_line}{nl}");
    ls[i] = &replaced;
    Ok(ls.concat())
}

/// `sysrc -x key`: removes every assignment of `key`. Returns the new text and whether
/// anything was removed.
pub fn sysrc_delete(text: &str, key: &str) -> (String, bool) {
    let mut removed = false;
    let kept: Vec<&str> = lines(text)
        .into_iter()
        .filter(|l| {
            let hit = assignment_end(l, key).is_some();
            removed |= hit;
            !hit
        })
        .collect();
    (kept.concat(), removed)
}

/// The value of `key` as `sh` would see it after sourcing the file: the last assignment,
/// with one level of quoting removed. Good enough for rc.conf variables such as
/// `vm_list` and `vm_dir`; command substitutions are not evaluated.
pub fn shell_get(text: &str, key: &str) -> Option<String> {
    let line = lines(text)
        .into_iter()
        .rev()
        .find(|l| assignment_end(l, key).is_some())?;
    let end = assignment_end(line, key)?;
    Some(shell_word(line[end..].trim_end_matches('\n')))
}

/// Reads one shell word with `"`, `'` and `\` quoting, stopping at unquoted blanks, `;`
/// or `#`.
fn shell_word(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    out.push(q);
                }
            }
            '"' => {
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => {
                            if let Some(&n) = chars.peek() {
                                if matches!(n, '"' | '\\' | '$' | '`') {
                                    out.push(n);
                                    chars.next();
                                    continue;
                                }
                            }
                            out.push('\\');
                        }
                        _ => out.push(q),
                    }
                }
            }
            '\\' => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            c if is_space(c) || c == ';' || c == '#' => break,
            c => out.push(c),
        }
    }
    out
}

/// `sysrc key+=words`: appends each word not already in the list.
pub fn words_add(current: &str, add: &str) -> String {
    let mut words: Vec<&str> = current.split_whitespace().collect();
    for w in add.split_whitespace() {
        if !words.contains(&w) {
            words.push(w);
        }
    }
    words.join(" ")
}

/// `sysrc key-=words`: removes every occurrence of each word.
pub fn words_remove(current: &str, remove: &str) -> String {
    let gone: Vec<&str> = remove.split_whitespace().collect();
    current
        .split_whitespace()
        .filter(|w| !gone.contains(w))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "loader=\"bhyveload\"\n\
        cpu=1\n\
        memory=256M # enough for now\n\
        # a comment line\n\
        network0_type=\"virtio-net\"\n\
        Uppercase=\"ignored\"\n\
        \x20indented=\"ignored\"\n\
        comment=\"a # inside quotes\"\n\
        single='kept quotes'\n\
        trailing=\"x\"   \n\
        cpu=4\n";

    #[test]
    fn reads_like_config_load() {
        let c = Conf::parse(SAMPLE);
        assert_eq!(c.get("loader"), Some("bhyveload"));
        assert_eq!(
            c.get("memory"),
            Some("256M"),
            "comment and trailing space dropped"
        );
        assert_eq!(
            c.get("comment"),
            Some("a"),
            "`#` inside quotes still starts a comment"
        );
        assert_eq!(
            c.get("single"),
            Some("'kept quotes'"),
            "single quotes are kept"
        );
        assert_eq!(c.get("trailing"), Some("x"));
        assert_eq!(c.get("Uppercase"), None, "keys must start lower-case");
        assert_eq!(c.get("indented"), None, "keys must start the line");
        assert_eq!(c.get("cpu"), Some("1"), "the first assignment wins on read");
        assert_eq!(c.duplicates(), vec!["cpu".to_string()]);
        assert_eq!(c.to_map().get("cpu").map(String::as_str), Some("1"));
    }

    #[test]
    fn odd_lines_read_like_the_shell_code() {
        let c = Conf::parse("novalue\nempty=\nwith=equals=sign\r\n");
        assert_eq!(c.get("novalue"), Some("novalue"));
        assert_eq!(c.get("empty"), Some(""));
        assert_eq!(
            c.get("with"),
            Some("equals=sign\r"),
            "CR is not a space to sed"
        );
    }

    #[test]
    fn sysrc_replaces_the_last_assignment_in_place() {
        let out = sysrc_set(SAMPLE, "cpu", "8").unwrap();
        assert!(out.contains("cpu=1\n"), "first assignment untouched: {out}");
        assert!(
            out.ends_with("cpu=\"8\"\n"),
            "unquoted value becomes quoted: {out}"
        );
        // vm-bhyve still reads the first one: the duplicate hides the edit.
        assert_eq!(Conf::parse(&out).get("cpu"), Some("1"));
    }

    #[test]
    fn sysrc_keeps_quote_style_and_trailing_text() {
        let t = "memory=256M # enough\nsingle='a b' # c\ndouble=\"x\" # d\nnull= # e\nbare=\n";
        let out = sysrc_set(t, "memory", "1G").unwrap();
        assert!(out.starts_with("memory=\"1G\" # enough\n"), "{out}");
        let out = sysrc_set(t, "single", "z").unwrap();
        assert!(out.contains("single='z' # c\n"), "{out}");
        let out = sysrc_set(t, "double", "y").unwrap();
        assert!(out.contains("double=\"y\" # d\n"), "{out}");
        let out = sysrc_set(t, "null", "n").unwrap();
        assert!(out.contains("null=\"n\" # e\n"), "{out}");
        let out = sysrc_set(t, "bare", "b").unwrap();
        assert!(out.ends_with("bare=b\n"), "{out}");
    }

    #[test]
    fn sysrc_skips_past_escaped_quotes() {
        let t = "opts=\"a \\\"b\\\" c\" # x\n";
        assert_eq!(sysrc_set(t, "opts", "n").unwrap(), "opts=\"n\" # x\n");
    }

    #[test]
    fn sysrc_appends_new_keys_after_a_newline() {
        assert_eq!(
            sysrc_set("cpu=1", "uuid", "u").unwrap(),
            "cpu=1\nuuid=\"u\"\n"
        );
        assert_eq!(sysrc_set("", "uuid", "u").unwrap(), "uuid=\"u\"\n");
        assert_eq!(
            sysrc_set("cpu=1\n", "uuid", "u").unwrap(),
            "cpu=1\nuuid=\"u\"\n"
        );
    }

    #[test]
    fn sysrc_refuses_expressions_and_bad_names() {
        assert_eq!(
            sysrc_set("x=$(hostname)\n", "x", "y"),
            Err(SysrcError::Expression("x".into()))
        );
        assert_eq!(
            sysrc_set("", "1x", "y"),
            Err(SysrcError::BadName("1x".into()))
        );
        assert_eq!(
            sysrc_set("", "a-b", "y"),
            Err(SysrcError::BadName("a-b".into()))
        );
    }

    #[test]
    fn sysrc_delete_removes_every_assignment() {
        let (out, removed) =
            sysrc_delete("a=1\ndisk0_size=\"8G\"\nb=2\n disk0_size=1\n", "disk0_size");
        assert!(removed);
        assert_eq!(out, "a=1\nb=2\n");
        let (out, removed) = sysrc_delete("a=1\n", "zz");
        assert!(!removed);
        assert_eq!(out, "a=1\n");
    }

    #[test]
    fn shell_get_takes_the_last_assignment() {
        let t = "vm_list=\"a\"\nvm_enable=YES\nvm_list=\"a b\" # autostart\nvm_dir='/v m'\n";
        assert_eq!(shell_get(t, "vm_list").as_deref(), Some("a b"));
        assert_eq!(shell_get(t, "vm_enable").as_deref(), Some("YES"));
        assert_eq!(shell_get(t, "vm_dir").as_deref(), Some("/v m"));
        assert_eq!(shell_get(t, "nope"), None);
    }

    #[test]
    fn word_lists_add_once_and_remove_all() {
        assert_eq!(words_add("a b", "b c"), "a b c");
        assert_eq!(words_add("", "a"), "a");
        assert_eq!(words_remove("a b a c", "a"), "b c");
    }

    #[test]
    fn round_trip_of_a_created_guest_conf() {
        // What `vm create` does to a template: uuid and mac appended, size removed.
        let template = "loader=\"bhyveload\"\ncpu=1\nmemory=256M\ndisk0_name=\"disk0.img\"\ndisk0_size=\"8G\"\n";
        let t = sysrc_set(template, "uuid", "u-1").unwrap();
        let t = sysrc_set(&t, "cpu", "2").unwrap();
        let (t, _) = sysrc_delete(&t, "disk0_size");
        assert_eq!(
            t,
            "loader=\"bhyveload\"\ncpu=\"2\"\nmemory=256M\ndisk0_name=\"disk0.img\"\nuuid=\"u-1\"\n"
        );
        let c = Conf::parse(&t);
        assert_eq!(c.get("cpu"), Some("2"));
        assert_eq!(c.get("disk0_size"), None);
    }

    proptest::proptest! {
        #[test]
        fn parse_and_edit_never_panic(text in "(?s)\\PC{0,200}", key in "[a-z_]{1,8}", value in "[ -~]{0,10}") {
            let c = Conf::parse(&text);
            let _ = c.to_map();
            let _ = sysrc_set(&text, &key, &value);
            let _ = sysrc_delete(&text, &key);
            let _ = shell_get(&text, &key);
        }

        #[test]
        fn a_set_value_reads_back(key in "[a-z][a-z0-9_]{0,8}", value in "[a-zA-Z0-9./:_-]{0,12}") {
            let t = sysrc_set("loader=\"bhyveload\"\n# note\n", &key, &value).unwrap();
            let c = Conf::parse(&t);
            if key != "loader" {
                proptest::prop_assert_eq!(c.get(&key), Some(value.as_str()));
            }
        }
    }
}
