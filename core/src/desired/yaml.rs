//! Reading a desired file: its text, its YAML, and serde_yaml_ng's errors turned into
//! diagnostics with a position and a hint. What the values mean is checked in `check`.

use serde::de::DeserializeOwned;

use super::diag::Diagnostic;
use super::files::Entry;
use super::locate;

/// The largest file the loader reads (1 MiB): a VM file is a few hundred bytes, and a
/// cap keeps a hostile file from costing memory and time.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// The deepest nesting of flow collections (`[`, `{`) accepted. The YAML parser's time
/// grows with the square of this depth (200,000 levels took minutes), and no desired
/// file needs more than two.
pub const MAX_FLOW_DEPTH: usize = 32;

/// The file's text, or why it is refused before parsing.
pub(crate) fn text<'a>(
    path: &str,
    entry: &'a Entry,
    diags: &mut Vec<Diagnostic>,
) -> Option<&'a str> {
    let data = match entry {
        // Reported once by `not_regular`.
        Entry::NotRegular(_) => return None,
        Entry::TooLarge(size) => {
            diags.push(Diagnostic::new(
                path,
                (1, 1),
                format!("file is {size} bytes, more than the limit of {MAX_FILE_SIZE}"),
                "a desired file describes one object in a few lines; split it or remove what is not needed",
            ));
            return None;
        }
        Entry::Data(d) if d.len() as u64 > MAX_FILE_SIZE => {
            diags.push(Diagnostic::new(
                path,
                (1, 1),
                format!("file is {} bytes, more than the limit of {MAX_FILE_SIZE}", d.len()),
                "a desired file describes one object in a few lines; split it or remove what is not needed",
            ));
            return None;
        }
        Entry::Data(d) => d,
    };
    match std::str::from_utf8(data) {
        Ok(s) => Some(s),
        Err(e) => {
            let (line, column) = line_col(data, e.valid_up_to());
            diags.push(Diagnostic::new(
                path,
                (line, column),
                "file is not valid UTF-8",
                "save the file as UTF-8",
            ));
            None
        }
    }
}

fn line_col(data: &[u8], at: usize) -> (usize, usize) {
    let before = &data[..at.min(data.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, column)
}

/// Refuses flow nesting deeper than [`MAX_FLOW_DEPTH`], outside quotes and comments.
fn flow_too_deep(src: &str) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut comment = false;
    let mut line = 1;
    let mut line_start = 0;
    let bytes = src.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            line += 1;
            line_start = i + 1;
            comment = false;
            // A quote left open is more likely an apostrophe the scan misread than a
            // multi-line string; resetting keeps it from hiding nesting that follows.
            quote = None;
            continue;
        }
        if comment {
            continue;
        }
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                // Quotes open a string only where a scalar starts (`it's` does not).
                b'"' | b'\''
                    if i == line_start
                        || matches!(bytes[i - 1], b' ' | b'\t' | b'[' | b'{' | b',' | b':') =>
                {
                    quote = Some(b)
                }
                b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => comment = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some((line, i - line_start + 1));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    None
}

/// Deserializes one YAML document, turning serde_yaml_ng's error into a diagnostic.
pub(crate) fn parse<T: DeserializeOwned>(
    path: &str,
    src: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    match parse_one(path, src) {
        Ok(v) => Some(v),
        Err(d) => {
            diags.extend(d);
            None
        }
    }
}

/// Deserializes one YAML document, or every schema error it has (not only the first,
/// where serde stops: an operator fixing four typos should not need four runs).
pub(crate) fn parse_one<T: DeserializeOwned>(path: &str, src: &str) -> Result<T, Vec<Diagnostic>> {
    if let Some(pos) = flow_too_deep(src) {
        return Err(vec![Diagnostic::new(
            path,
            pos,
            format!("nesting deeper than {MAX_FLOW_DEPTH} levels"),
            "desired files are flat mappings; this looks like generated or hostile input",
        )]);
    }
    serde_yaml_ng::from_str::<T>(src).map_err(|e| {
        let mut all = vec![yaml_error(path, src, &e)];
        // Only a file that is valid YAML can be taken apart key by key.
        if let Ok(serde_yaml_ng::Value::Mapping(root)) =
            serde_yaml_ng::from_str::<serde_yaml_ng::Value>(src)
        {
            let mut more = Vec::new();
            every_error::<T>(path, src, &mut Vec::new(), &root, &mut more);
            for d in more {
                if !all.iter().any(|a| a.message == d.message) {
                    all.push(d);
                }
            }
        }
        all
    })
}

/// The schema errors under the mapping at `at`, found by deserializing each of its
/// entries alone (wrapped back into its path), so that one error does not hide the
/// next. A "missing field" at or above `at` is only the wrapping's doing; missing fields
/// are reported by the whole file's parse.
fn every_error<T: DeserializeOwned>(
    path: &str,
    src: &str,
    at: &mut Vec<String>,
    map: &serde_yaml_ng::Mapping,
    out: &mut Vec<Diagnostic>,
) {
    use serde_yaml_ng::{Mapping, Value};
    let here = at.join(".");
    for (k, v) in map {
        let Some(key) = k.as_str() else { continue };
        let mut doc = Mapping::new();
        doc.insert(k.clone(), v.clone());
        let mut doc = Value::Mapping(doc);
        for outer in at.iter().rev() {
            let mut m = Mapping::new();
            m.insert(Value::String(outer.clone()), doc);
            doc = Value::Mapping(m);
        }
        let Ok(text) = serde_yaml_ng::to_string(&doc) else {
            continue;
        };
        let Err(e) = serde_yaml_ng::from_str::<T>(&text) else {
            continue;
        };
        let message = strip_marks(&e.to_string());
        let (prefix, rest) = match message.split_once(": ") {
            Some((p, r)) if !p.contains(' ') => (p, r),
            _ => ("", message.as_str()),
        };
        let above = prefix.is_empty() || prefix == here || here.starts_with(&format!("{prefix}."));
        if rest.starts_with("missing field") && above {
            continue;
        }
        at.push(key.to_string());
        let inner = at.join(".");
        let owned = at.clone();
        let keys: Vec<&str> = owned.iter().map(String::as_str).collect();
        if prefix == here {
            // About the key itself (unknown, duplicate).
            let pos = locate::key_pos(src, &keys);
            out.push(Diagnostic::new(
                path,
                pos,
                message.clone(),
                yaml_hint(&message),
            ));
        } else if prefix == inner && rest.starts_with("missing field") {
            let pos = locate::key_pos(src, &keys);
            out.push(Diagnostic::new(
                path,
                pos,
                message.clone(),
                yaml_hint(&message),
            ));
        } else if let (Value::Mapping(m), true) = (
            v,
            prefix == inner || prefix.starts_with(&format!("{inner}.")),
        ) {
            let before = out.len();
            every_error::<T>(path, src, at, m, out);
            if out.len() == before {
                let pos = locate::key_pos(src, &keys);
                out.push(Diagnostic::new(
                    path,
                    pos,
                    message.clone(),
                    yaml_hint(&message),
                ));
            }
        } else {
            let pos = locate::value_pos(src, &keys);
            out.push(Diagnostic::new(
                path,
                pos,
                message.clone(),
                yaml_hint(&message),
            ));
        }
        at.pop();
    }
}

pub(crate) fn yaml_error(path: &str, src: &str, e: &serde_yaml_ng::Error) -> Diagnostic {
    // Diagnostic::new shortens what the message quotes; the key is looked up whole first.
    let message = strip_marks(&e.to_string());
    let mut pos = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    // serde reports a duplicate at the start of the mapping; point at the second key.
    if let Some((prefix, key)) = duplicate_of(&message) {
        let mut keys: Vec<&str> = prefix.map(|p| p.split('.').collect()).unwrap_or_default();
        keys.push(key);
        if let Some(found) = locate::find_nth(src, &keys, 1) {
            pos = found.key();
        }
    }
    let hint = yaml_hint(&message);
    Diagnostic::new(path, pos, message, hint)
}

/// For "a.b: duplicate field `k`" or "duplicate key `k`": the path and the key.
fn duplicate_of(message: &str) -> Option<(Option<&str>, &str)> {
    let (prefix, rest) = match message.find(": duplicate ") {
        Some(i) => (Some(&message[..i]), &message[i + 2..]),
        None => (None, message),
    };
    let rest = rest
        .strip_prefix("duplicate field `")
        .or_else(|| rest.strip_prefix("duplicate key `"))?;
    let key = &rest[..rest.find('`')?];
    Some((prefix, key))
}

/// Removes serde_yaml_ng's " at line N column M": the diagnostic carries them apart.
pub fn strip_marks(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let after = &after[digits..];
        if let Some(col) = after.strip_prefix(" column ") {
            let d = col.bytes().take_while(u8::is_ascii_digit).count();
            rest = &col[d..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The accepted word closest to a misspelt one in serde's "unknown field `x`, expected
/// one of `a`, `b`" (or "unknown variant"), if one is close enough to be meant.
fn did_you_mean(message: &str) -> Option<String> {
    let i = message
        .find("unknown field `")
        .or_else(|| message.find("unknown variant `"))?;
    let mut parts = message[i..].split('`');
    parts.next();
    let wrong = parts.next()?;
    // Every other part between backquotes is an accepted word.
    parts
        .skip(1)
        .step_by(2)
        .map(|w| (strsim::jaro_winkler(wrong, w), w))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, w)| w.to_string())
}

fn yaml_hint(message: &str) -> String {
    if let Some(word) = did_you_mean(message) {
        return format!("did you mean `{word}`?");
    }
    yaml_hint_static(message).to_string()
}

fn yaml_hint_static(message: &str) -> &'static str {
    if message.contains("unknown field") {
        "remove the key or correct its spelling; the keys this place accepts are listed"
    } else if message.contains("missing field") {
        "add the missing key"
    } else if message.contains("duplicate") {
        "each key may appear only once in a mapping"
    } else if message.contains("is not a size") {
        "write a size as a whole number with an optional K, M, G or T suffix, e.g. 512M or 20G"
    } else if message.contains("is not a duration") {
        "write a duration such as 30s, 5m or 1h"
    } else if message.contains("unknown variant") {
        "use one of the listed values"
    } else if message.contains("recursion limit") {
        "desired files are flat mappings; remove the nesting"
    } else if message.contains("repetition limit") || message.contains("anchor") {
        "write values out instead of multiplying them with YAML anchors and aliases"
    } else if message.contains("invalid type") || message.contains("invalid value") {
        "give the value the type this key expects"
    } else if message.contains("more than one document") {
        "keep one document per file (remove the extra `---`)"
    } else {
        "fix the YAML syntax at this position"
    }
}
