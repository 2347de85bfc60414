//! Profiles and templates: the built-in ones, and those of the desired repo that add to
//! or replace them.

use std::collections::{BTreeMap, BTreeSet};

use crate::conf::Conf;

use super::super::defaults;
use super::super::diag::Diagnostic;
use super::super::expand::Budget;
use super::super::files::FileSet;
use super::super::load::{expands_within, is_special};
use super::super::locate;
use super::super::rules;
use super::super::schema::RawProfile;
use super::super::spec::{Profile, Template};
use super::super::yaml::{parse, text};
use super::join;

const BUILT_IN: &str = "built-in";

/// The file stem of `dir/NAME.ext`, or a diagnostic.
fn stem<'a>(path: &'a str, dir: &str, ext: &str, diags: &mut Vec<Diagnostic>) -> Option<&'a str> {
    let rest = &path[dir.len()..];
    if rest.split('/').any(|p| p.starts_with('.')) {
        return None;
    }
    match rest.strip_suffix(ext) {
        Some(stem) if !stem.contains('/') && rules::is_class_name(stem) => Some(stem),
        Some(stem) if !stem.contains('/') => {
            diags.push(Diagnostic::new(
                path,
                (1, 1),
                format!("invalid name `{stem}`"),
                "name the file with letters, digits, `.`, `_` and `-`, starting with a letter or digit",
            ));
            None
        }
        _ => {
            diags.push(Diagnostic::new(
                path,
                (1, 1),
                format!("not a {dir}*{ext} file"),
                format!("{dir} holds only *{ext} files, without subdirectories"),
            ));
            None
        }
    }
}

pub(crate) fn templates(
    files: &FileSet,
    diags: &mut Vec<Diagnostic>,
) -> (BTreeMap<String, Template>, BTreeSet<String>) {
    let mut out = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for (name, text) in defaults::TEMPLATES {
        if let Some(t) = template(name, BUILT_IN, text, diags) {
            out.insert(name.to_string(), t);
        }
    }
    for (path, entry) in files.under("templates/") {
        if is_special(entry) {
            if let Some(name) = stem(path, "templates/", ".conf", &mut Vec::new()) {
                out.remove(name);
                broken.insert(name.to_string());
            }
            continue;
        }
        let Some(name) = stem(path, "templates/", ".conf", diags) else {
            continue;
        };
        out.remove(name);
        match text(path, entry, diags).and_then(|src| template(name, path, src, diags)) {
            Some(t) => {
                out.insert(name.to_string(), t);
            }
            None => {
                broken.insert(name.to_string());
            }
        }
    }
    (out, broken)
}

fn template(name: &str, path: &str, src: &str, diags: &mut Vec<Diagnostic>) -> Option<Template> {
    let conf = Conf::parse(src);
    let before = diags.len();
    let line_of = |key: &str, nth: usize| {
        src.lines()
            .enumerate()
            .filter(|(_, l)| l.strip_prefix(key).is_some_and(|r| r.starts_with('=')))
            .nth(nth)
            .map_or((1, 1), |(i, _)| (i + 1, 1))
    };
    for key in conf.duplicates() {
        diags.push(Diagnostic::new(
            path,
            line_of(&key, 1),
            format!("template sets `{key}` twice"),
            "vm-bhyve reads the first assignment and sysrc changes the last; keep one",
        ));
    }
    if conf.get("disk0_name").is_none() {
        diags.push(Diagnostic::new(
            path,
            (1, 1),
            "template has no disk0_name",
            "vm create refuses such a template; add e.g. disk0_name=\"disk0.img\"",
        ));
    }
    if diags.len() > before {
        return None;
    }
    Some(Template {
        name: name.to_string(),
        source: path.to_string(),
        text: src.to_string(),
        config: conf.to_map(),
    })
}

pub(crate) fn profiles(
    files: &FileSet,
    templates: &BTreeMap<String, Template>,
    broken_templates: &BTreeSet<String>,
    budget: &mut Budget,
    diags: &mut Vec<Diagnostic>,
) -> (BTreeMap<String, Profile>, BTreeSet<String>) {
    let mut sources: BTreeMap<String, (String, &str)> = BTreeMap::new();
    for (name, text) in defaults::PROFILES {
        sources.insert(name.to_string(), (BUILT_IN.to_string(), text));
    }
    let mut broken = BTreeSet::new();
    for (path, entry) in files.under("profiles/") {
        if is_special(entry) {
            if let Some(name) = stem(path, "profiles/", ".yaml", &mut Vec::new()) {
                sources.remove(name);
                broken.insert(name.to_string());
            }
            continue;
        }
        let Some(name) = stem(path, "profiles/", ".yaml", diags) else {
            continue;
        };
        match text(path, entry, diags) {
            Some(src) => {
                sources.insert(name.to_string(), (path.to_string(), src));
            }
            None => {
                sources.remove(name);
                broken.insert(name.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    for (name, (path, src)) in sources {
        let before = diags.len();
        if path != BUILT_IN && !expands_within(budget, &path, src, diags) {
            broken.insert(name);
            continue;
        }
        let Some(raw) = parse::<RawProfile>(&path, src, diags) else {
            broken.insert(name);
            continue;
        };
        if raw.cpu == 0 || raw.cpu > 255 {
            diags.push(Diagnostic::new(
                &path,
                locate::value_pos(src, &["cpu"]),
                format!("cpu {} is out of range", raw.cpu),
                "bhyve takes 1 to 255 virtual CPUs",
            ));
        }
        for (key, size) in [("memory", raw.memory), ("disk", raw.disk)] {
            if size.bytes() == 0 {
                diags.push(Diagnostic::new(
                    &path,
                    locate::value_pos(src, &[key]),
                    format!("{key} must be more than 0"),
                    "write a size such as 512M or 20G",
                ));
            }
        }
        if raw.swap >= raw.disk && raw.disk.bytes() > 0 {
            diags.push(Diagnostic::new(
                &path,
                locate::value_pos(src, &["swap"]),
                format!("swap {} leaves no room in disk {}", raw.swap, raw.disk),
                "the swap partition lives inside disk0; make it smaller than the disk",
            ));
        }
        if !templates.contains_key(&raw.template) && !broken_templates.contains(&raw.template) {
            diags.push(Diagnostic::new(
                &path,
                locate::value_pos(src, &["template"]),
                format!("unknown template `{}`", raw.template),
                format!("templates: {}", join(templates.keys())),
            ));
        }
        if diags.len() > before || broken_templates.contains(&raw.template) {
            broken.insert(name);
            continue;
        }
        out.insert(
            name.clone(),
            Profile {
                name,
                source: path,
                cpu: raw.cpu,
                memory: raw.memory,
                disk: raw.disk,
                swap: raw.swap,
                template: raw.template,
            },
        );
    }
    (out, broken)
}
