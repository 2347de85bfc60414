//! Finding where a key is in a YAML file's text.
//!
//! serde_yaml_ng reports positions for what it refuses itself, but keeps no spans for
//! values that parse and are wrong only in context (an unknown profile, a duplicate
//! name). Those are rare, so instead of paying for spans on every file, the loader asks
//! this scanner afterwards: it walks block mappings line by line, which is how people
//! write these files. Anything it cannot follow (flow mappings, odd indentation) falls
//! back to the enclosing key, or to the start of the file.

/// Position of the key at `path` (one key per level of nested block mappings), and the
/// column where its value starts on the same line, if it does. 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    pub line: usize,
    pub column: usize,
    pub value_column: Option<usize>,
}

impl Found {
    pub fn key(self) -> (usize, usize) {
        (self.line, self.column)
    }
    pub fn value(self) -> (usize, usize) {
        (self.line, self.value_column.unwrap_or(self.column))
    }
}

/// The `nth` (0-based) occurrence of the last key of `path` under the first occurrences
/// of the keys before it.
pub(crate) fn find_nth(src: &str, path: &[&str], nth: usize) -> Option<Found> {
    if path.is_empty() {
        return None;
    }
    let mut depth = 0;
    let mut parent_indent: isize = -1;
    let mut child_indent: Option<usize> = None;
    let mut seen = 0;
    for (i, line) in src.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        let indent = line.len() - body.len();
        if body.is_empty() || body.starts_with('#') || (indent == 0 && body.starts_with("---")) {
            continue;
        }
        if indent as isize <= parent_indent {
            return None;
        }
        let level = *child_indent.get_or_insert(indent);
        if indent != level {
            continue;
        }
        let Some((key, value_offset)) = key_of(body) else {
            continue;
        };
        if key != path[depth] {
            continue;
        }
        if depth + 1 == path.len() {
            if seen == nth {
                return Some(Found {
                    line: i + 1,
                    column: indent + 1,
                    value_column: value_offset.map(|o| indent + o + 1),
                });
            }
            seen += 1;
            continue;
        }
        depth += 1;
        parent_indent = indent as isize;
        child_indent = None;
    }
    None
}

/// The first occurrence of `path`.
pub(crate) fn find(src: &str, path: &[&str]) -> Option<Found> {
    find_nth(src, path, 0)
}

/// The best position for a problem with the value at `path`: the value, else the deepest
/// key found on the way there, else the start of the file.
pub(crate) fn value_pos(src: &str, path: &[&str]) -> (usize, usize) {
    for n in (1..=path.len()).rev() {
        if let Some(f) = find(src, &path[..n]) {
            return if n == path.len() { f.value() } else { f.key() };
        }
    }
    (1, 1)
}

/// Like [`value_pos`] but points at the key itself.
pub(crate) fn key_pos(src: &str, path: &[&str]) -> (usize, usize) {
    for n in (1..=path.len()).rev() {
        if let Some(f) = find(src, &path[..n]) {
            return f.key();
        }
    }
    (1, 1)
}

/// The position of the list item `item` under the key at `path` (`tags: [a, b]` or a
/// block list), else the key's position.
pub(crate) fn item_pos(src: &str, path: &[&str], item: &str) -> (usize, usize) {
    let Some(found) = find(src, path) else {
        return key_pos(src, path);
    };
    for (i, line) in src.lines().enumerate().skip(found.line - 1) {
        let from = if i + 1 == found.line {
            found.value_column.map_or(line.len(), |c| c - 1)
        } else {
            let body = line.trim_start_matches(' ');
            if !body.starts_with('-') && !body.is_empty() && !body.starts_with('#') {
                // A block list item always starts with `-`; anything else ends the list,
                // unless the value was a flow list spanning lines (rare; accept the loss).
                if found.value_column.is_none() {
                    break;
                }
            }
            0
        };
        let Some(rest) = line.get(from..) else {
            continue;
        };
        if let Some(off) = find_token(rest, item) {
            return (i + 1, from + off + 1);
        }
        if found.value_column.is_some() && line.contains(']') {
            break;
        }
    }
    found.key()
}

/// `item` in `text` as a whole token (not part of a longer word), possibly quoted.
fn find_token(text: &str, item: &str) -> Option<usize> {
    if item.is_empty() {
        return None;
    }
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(off) = text[start..].find(item) {
        let at = start + off;
        let end = at + item.len();
        let before_ok = at == 0 || is_delim(bytes[at - 1]);
        let after_ok = end == bytes.len() || is_delim(bytes[end]);
        if before_ok && after_ok {
            return Some(if at > 0 && matches!(bytes[at - 1], b'"' | b'\'') {
                at - 1
            } else {
                at
            });
        }
        start = at + 1;
    }
    None
}

fn is_delim(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'[' | b']' | b',' | b'"' | b'\'' | b'-' | b'#'
    )
}

/// The key of a `key: value` line and the offset of the value within `body`, if any.
fn key_of(body: &str) -> Option<(&str, Option<usize>)> {
    let (key, rest_at) = if let Some(q @ (b'"' | b'\'')) = body.bytes().next() {
        let close = body[1..].find(q as char)? + 1;
        (&body[1..close], close + 1)
    } else {
        let colon = body
            .find(": ")
            .or_else(|| body.strip_suffix(':').map(|k| k.len()))?;
        (body[..colon].trim_end(), colon)
    };
    let after = body.get(rest_at..)?;
    let after = after.strip_prefix(':')?;
    let trimmed = after.trim_start_matches(' ');
    let value = if trimmed.is_empty() || trimmed.starts_with('#') {
        None
    } else {
        Some(body.len() - trimmed.len())
    };
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "\
cluster: lab
# comment
hosts:
  host1:
    next: host2
    limits:
      memory: 8G
  host2:
    next: nope
policies:
  hop_limit: 3
tags: [a, bb, \"c\"]
secrets:
  - one
  - two/x
";

    #[test]
    fn finds_nested_keys_and_values() {
        assert_eq!(find(SRC, &["cluster"]).unwrap().value(), (1, 10));
        assert_eq!(
            find(SRC, &["hosts", "host2", "next"]).unwrap().value(),
            (9, 11)
        );
        assert_eq!(
            find(SRC, &["hosts", "host1", "limits", "memory"])
                .unwrap()
                .key(),
            (7, 7)
        );
        assert_eq!(
            find(SRC, &["policies", "hop_limit"]).unwrap().value(),
            (11, 14)
        );
        assert_eq!(find(SRC, &["hosts", "host1", "memory"]), None);
        assert_eq!(find(SRC, &["hosts", "host3"]), None);
    }

    #[test]
    fn finds_list_items() {
        assert_eq!(item_pos(SRC, &["tags"], "bb"), (12, 11));
        assert_eq!(item_pos(SRC, &["tags"], "c"), (12, 15));
        assert_eq!(item_pos(SRC, &["secrets"], "two/x"), (15, 5));
    }

    #[test]
    fn finds_the_second_occurrence() {
        let src = "name: a\ncpu: 1\nconfig:\n  x: 1\n  x: 2\ncpu: 2\n";
        assert_eq!(find_nth(src, &["cpu"], 1).unwrap().key(), (6, 1));
        assert_eq!(find_nth(src, &["config", "x"], 1).unwrap().key(), (5, 3));
    }

    #[test]
    fn falls_back_to_the_nearest_key() {
        assert_eq!(value_pos(SRC, &["hosts", "host1", "beanstalkd"]), (4, 3));
        assert_eq!(value_pos(SRC, &["nothing"]), (1, 1));
    }
}
