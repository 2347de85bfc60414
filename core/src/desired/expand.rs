//! A bound on what YAML aliases expand to, checked before anything is expanded.
//!
//! serde_yaml_ng replays an anchored node every time an alias names it, and the types
//! the loader deserializes into copy what is replayed: one anchored 900 KB string used
//! 1,000 times became 900 MB of strings (and as many in error messages). Its own limit
//! counts alias jumps, not bytes, so it does not stop that.
//!
//! The check walks each file that could hold an alias (one with a `*`) through
//! serde_yaml_ng itself before the real parse, with a visitor that copies nothing and
//! only adds up sizes, and stops the walk as soon as the sum passes the bound. Using the
//! same parser matters: a second YAML parser could read a file's structure differently
//! and pass what libyaml then expands. (serde_yaml_ng keeps its event stream private, and
//! the parser under it, unsafe-libyaml, offers only unsafe functions.)
//!
//! A node costs 1 plus its text: a string its length; a number, boolean or null the length
//! of the longest token in the file, because the visitor sees only the parsed value and a
//! number can be written with any count of digits (`1.000…0`), which a typed field
//! deserializing it as a string would copy in full.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use super::diag::{quote, Diagnostic};
use super::locate;

/// A file may expand to this many times its size (plus [`EXPANSION_SLACK`]).
pub const EXPANSION_FACTOR: u64 = 4;

/// What any file may expand to beyond [`EXPANSION_FACTOR`] times its size, so that a
/// small file may still repeat a short value a few times.
pub const EXPANSION_SLACK: u64 = 16 << 10;

/// What aliases may add, over the whole desired repo, beyond the size of the files
/// themselves: every agent loads the same commit, so many files each within their own
/// bound must not add up to more.
pub const MAX_REPO_EXPANSION: u64 = 4 << 20;

/// The expansion left to one desired repo's files, handed from file to file in path
/// order so that every host reaches the same verdict.
#[derive(Debug)]
pub(crate) struct Budget {
    repo_left: u64,
}

impl Budget {
    pub fn new() -> Budget {
        Budget {
            repo_left: MAX_REPO_EXPANSION,
        }
    }

    /// Checks one YAML file; a file refused here is not parsed.
    pub fn check(&mut self, path: &str, src: &str) -> Result<(), Diagnostic> {
        // Only an alias (`*name`) replays anything; without one, what a file holds is
        // its own text.
        if !src.contains('*') {
            return Ok(());
        }
        let len = src.len() as u64;
        let file_limit = len
            .saturating_mul(EXPANSION_FACTOR)
            .saturating_add(EXPANSION_SLACK);
        let repo_limit = len.saturating_add(self.repo_left);
        let limit = file_limit.min(repo_limit);
        let walk = Walk {
            left: Cell::new(limit),
            over: RefCell::new(None),
            token: longest_token(src),
        };
        let result = Node {
            walk: &walk,
            path: None,
        }
        .deserialize(serde_yaml_ng::Deserializer::from_str(src));
        match (result, walk.over.into_inner()) {
            (Ok(()), _) => {
                let used = limit - walk.left.get();
                self.repo_left = self.repo_left.saturating_sub(used.saturating_sub(len));
                Ok(())
            }
            (Err(e), Some(keys)) => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let pos = if keys.is_empty() {
                    e.location().map_or((1, 1), |l| (l.line(), l.column()))
                } else {
                    locate::key_pos(src, &keys)
                };
                let what = if keys.is_empty() {
                    String::new()
                } else {
                    format!(" at `{}`", quote(&keys.join(".")))
                };
                let repeated = e.location().map_or(String::new(), |l| {
                    format!("; the repeated value is at line {}", l.line())
                });
                Err(if repo_limit < file_limit {
                    Diagnostic::new(
                        path,
                        pos,
                        format!(
                            "aliases expand the desired repo past {} bytes more than its files{what}{repeated}",
                            MAX_REPO_EXPANSION
                        ),
                        "write values out instead of repeating them with YAML anchors and aliases; all files together may grow by at most this much",
                    )
                } else {
                    Diagnostic::new(
                        path,
                        pos,
                        format!("aliases expand this file past {file_limit} bytes{what}{repeated}"),
                        format!(
                            "write values out instead of repeating them with YAML anchors and aliases; a file may expand to {EXPANSION_FACTOR} times its size"
                        ),
                    )
                })
            }
            // Refused for what the parse itself would refuse (a syntax error, too deep,
            // too many alias jumps, a second document): the walk went no further than
            // the budget allows, and the real parse is not trusted past that point.
            (Err(e), None) => Err(super::yaml::yaml_error(path, src, &e)),
        }
    }
}

/// The longest run of characters that a plain scalar of a number could span.
fn longest_token(src: &str) -> u64 {
    src.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '{' | '}'))
        .map(str::len)
        .max()
        .unwrap_or(0) as u64
}

struct Walk {
    left: Cell<u64>,
    /// Set when the budget ran out: the keys leading to the node that crossed it.
    over: RefCell<Option<Vec<String>>>,
    token: u64,
}

/// One step of the path from the document's root, for the error's position.
struct Step<'a> {
    parent: Option<&'a Step<'a>>,
    key: Option<String>,
}

impl Walk {
    fn charge<E: de::Error>(&self, path: Option<&Step<'_>>, cost: u64) -> Result<(), E> {
        let cost = cost.saturating_add(1);
        match self.left.get().checked_sub(cost) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                let mut keys = Vec::new();
                let mut at = path;
                while let Some(step) = at {
                    if let Some(k) = &step.key {
                        keys.push(k.clone());
                    }
                    at = step.parent;
                }
                keys.reverse();
                *self.over.borrow_mut() = Some(keys);
                Err(E::custom("expansion limit reached"))
            }
        }
    }
}

/// Any node: adds up its size and its children's.
#[derive(Clone, Copy)]
struct Node<'w, 'p> {
    walk: &'w Walk,
    path: Option<&'p Step<'p>>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A mapping's key: a node whose text, when it is a string, names the path below it.
struct Key<'w, 'p> {
    node: Node<'w, 'p>,
}

impl<'de> DeserializeSeed<'de> for Key<'_, '_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_, '_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
        self.node.walk.charge(self.node.path, v.len() as u64)?;
        // Only a short prefix: the key is for the error's position and message.
        Ok(Some(v.chars().take(64).collect()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Option<String>, A::Error> {
        self.node.visit_seq(a).map(|()| None)
    }

    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Option<String>, A::Error> {
        self.node.visit_map(a).map(|()| None)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<Option<String>, A::Error> {
        self.node.visit_enum(a).map(|()| None)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Option<String>, E> {
        self.node.visit_bytes(v).map(|()| None)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Option<String>, E> {
        self.node.visit_bool(v).map(|()| None)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<String>, E> {
        self.node.visit_i64(v).map(|()| None)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<String>, E> {
        self.node.visit_u64(v).map(|()| None)
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Option<String>, E> {
        self.node.visit_i128(v).map(|()| None)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Option<String>, E> {
        self.node.visit_u128(v).map(|()| None)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<String>, E> {
        self.node.visit_f64(v).map(|()| None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        self.node.visit_unit().map(|()| None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        self.node.visit_none().map(|()| None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        self.node.visit_some(d).map(|()| None)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.walk.charge(self.path, v.len() as u64)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.walk.charge(self.path, v.len() as u64)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.walk.charge(self.path, self.walk.token)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.walk.charge(self.path, 0)?;
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.walk.charge(self.path, 0)?;
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        self.walk.charge(self.path, 0)?;
        while a.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        self.walk.charge(self.path, 0)?;
        while let Some(key) = a.next_key_seed(Key { node: self })? {
            let step = Step {
                parent: self.path,
                key,
            };
            a.next_value_seed(Node {
                walk: self.walk,
                path: Some(&step),
            })?;
        }
        Ok(())
    }

    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): the tag, then the value.
        let (_, variant) = a.variant_seed(Key { node: self })?;
        variant.newtype_variant_seed(self)
    }
}
