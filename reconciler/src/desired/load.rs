//! From a [`FileSet`] to a validated [`Snapshot`], or every error at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::de::DeserializeOwned;

use crate::conf::Conf;
use crate::size::Size;

use super::defaults;
use super::diag::{quote, Diagnostic, Invalid};
use super::expand::Budget;
use super::files::{Entry, FileSet, TREE_DIRS};
use super::locate;
use super::rules;
use super::schema::{RawCluster, RawProfile, RawVm};
use super::spec::{Cluster, Host, HostLimits, Policies, Profile, Snapshot, Template, VmSpec};

/// The largest file the loader reads (1 MiB): a VM file is a few hundred bytes, and a
/// cap keeps a hostile file from costing memory and time.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// The deepest nesting of flow collections (`[`, `{`) accepted. The YAML parser's time
/// grows with the square of this depth (200,000 levels took minutes), and no desired
/// file needs more than two.
pub const MAX_FLOW_DEPTH: usize = 32;

/// Below this many VM files, parsing on one thread is faster than starting others.
const PARALLEL_THRESHOLD: usize = 512;

const BUILT_IN: &str = "built-in";

/// Parses and validates the desired repo in `files`. `commit` labels the snapshot.
pub fn load(files: &FileSet, commit: Option<String>) -> Result<Snapshot, Invalid> {
    let mut diags = Vec::new();
    not_regular(files, &mut diags);
    // Checked file by file in a fixed order (cluster.yaml, profiles, vms) before each is
    // parsed, so that every host refuses the same files.
    let mut budget = Budget::new();

    let cluster = match files.get("cluster.yaml") {
        None => {
            diags.push(Diagnostic::new(
                "cluster.yaml",
                (1, 1),
                "missing cluster.yaml",
                "the desired repo needs a cluster.yaml at its root naming the cluster and its hosts",
            ));
            None
        }
        Some(entry) => text("cluster.yaml", entry, &mut diags)
            .filter(|src| expands_within(&mut budget, "cluster.yaml", src, &mut diags))
            .and_then(|src| parse::<RawCluster>("cluster.yaml", src, &mut diags).map(|r| (src, r)))
            .map(|(src, raw)| cluster("cluster.yaml", src, raw, &mut diags)),
    };

    let (templates, broken_templates) = templates(files, &mut diags);
    let (profiles, broken_profiles) = profiles(
        files,
        &templates,
        &broken_templates,
        &mut budget,
        &mut diags,
    );

    let mut vm_files = Vec::new();
    for (path, entry) in files.under("vms/") {
        if path.split('/').any(|part| part.starts_with('.')) || is_special(entry) {
            continue;
        }
        if !path.ends_with(".yaml") {
            let hint = if path.ends_with(".yml") {
                "rename it to .yaml; only .yaml files are read"
            } else {
                "vms/ holds only VM files (*.yaml); move other files elsewhere"
            };
            diags.push(Diagnostic::new(path, (1, 1), "not a .yaml file", hint));
            continue;
        }
        if let Some(src) = text(path, entry, &mut diags) {
            if expands_within(&mut budget, path, src, &mut diags) {
                vm_files.push((path, src));
            }
        }
    }

    let (vms, mut vm_diags) = match &cluster {
        Some(c) => {
            let ctx = VmCtx {
                hosts: &c.hosts,
                profiles: &profiles,
                broken_profiles: &broken_profiles,
                templates: &templates,
            };
            vms(&ctx, &vm_files)
        }
        // Without hosts, pins and every_host cannot be checked: check the files alone.
        None => {
            let hosts = BTreeMap::new();
            let ctx = VmCtx {
                hosts: &hosts,
                profiles: &profiles,
                broken_profiles: &broken_profiles,
                templates: &templates,
            };
            let (_, d) = vms(&ctx, &vm_files);
            (
                BTreeMap::new(),
                d.into_iter()
                    .filter(|d| !d.message.starts_with("unknown host"))
                    .collect(),
            )
        }
    };
    diags.append(&mut vm_diags);

    match cluster {
        Some(cluster) if diags.is_empty() => Ok(Snapshot {
            commit,
            cluster,
            profiles,
            templates,
            vms,
        }),
        _ => {
            diags.sort();
            diags.dedup();
            Err(Invalid(diags))
        }
    }
}

/// Reports every entry of the desired tree that is not a regular file, and a file where
/// one of its directories belongs: skipped, it would read as a removal.
fn not_regular(files: &FileSet, diags: &mut Vec<Diagnostic>) {
    for (path, entry) in files.iter() {
        match entry {
            Entry::NotRegular(kind) => diags.push(Diagnostic::new(
                path,
                (1, 1),
                format!("{kind}, not a regular file"),
                kind.hint(),
            )),
            _ if TREE_DIRS.contains(&path) => diags.push(Diagnostic::new(
                path,
                (1, 1),
                "a file where a directory belongs",
                format!("`{path}` is a directory of the desired repo; move the file elsewhere"),
            )),
            _ => {}
        }
    }
}

/// True when the YAML file's aliases stay within the budget; else reports why.
fn expands_within(budget: &mut Budget, path: &str, src: &str, diags: &mut Vec<Diagnostic>) -> bool {
    match budget.check(path, src) {
        Ok(()) => true,
        Err(d) => {
            diags.push(d);
            false
        }
    }
}

fn is_special(entry: &Entry) -> bool {
    matches!(entry, Entry::NotRegular(_))
}

/// The file's text, or why it is refused before parsing.
fn text<'a>(path: &str, entry: &'a Entry, diags: &mut Vec<Diagnostic>) -> Option<&'a str> {
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
fn parse<T: DeserializeOwned>(path: &str, src: &str, diags: &mut Vec<Diagnostic>) -> Option<T> {
    match parse_one(path, src) {
        Ok(v) => Some(v),
        Err(d) => {
            diags.push(d);
            None
        }
    }
}

fn parse_one<T: DeserializeOwned>(path: &str, src: &str) -> Result<T, Diagnostic> {
    if let Some(pos) = flow_too_deep(src) {
        return Err(Diagnostic::new(
            path,
            pos,
            format!("nesting deeper than {MAX_FLOW_DEPTH} levels"),
            "desired files are flat mappings; this looks like generated or hostile input",
        ));
    }
    serde_yaml_ng::from_str::<T>(src).map_err(|e| yaml_error(path, src, &e))
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
fn strip_marks(message: &str) -> String {
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

fn yaml_hint(message: &str) -> &'static str {
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

fn cluster(path: &str, src: &str, raw: RawCluster, diags: &mut Vec<Diagnostic>) -> Cluster {
    if !rules::is_host_name(&raw.cluster) {
        diags.push(Diagnostic::new(
            path,
            locate::value_pos(src, &["cluster"]),
            format!("invalid cluster id `{}`", raw.cluster),
            rules::HOST_NAME_HINT,
        ));
    }
    if raw.hosts.0.is_empty() {
        diags.push(Diagnostic::new(
            path,
            locate::key_pos(src, &["hosts"]),
            "no hosts",
            "name at least one host under `hosts:`",
        ));
    }
    let names: BTreeSet<&str> = raw.hosts.0.iter().map(|(n, _)| n.as_str()).collect();
    let mut hosts = BTreeMap::new();
    for (name, h) in &raw.hosts.0 {
        if !rules::is_host_name(name) {
            diags.push(Diagnostic::new(
                path,
                locate::key_pos(src, &["hosts", name]),
                format!("invalid host name `{name}`"),
                rules::HOST_NAME_HINT,
            ));
        }
        if !rules::is_address(&h.beanstalkd) {
            diags.push(Diagnostic::new(
                path,
                locate::value_pos(src, &["hosts", name, "beanstalkd"]),
                format!("`{}` is not a beanstalkd address", h.beanstalkd),
                "write host:port, e.g. 10.0.0.1:11300",
            ));
        }
        if let Some(next) = &h.next {
            if next == name {
                diags.push(Diagnostic::new(
                    path,
                    locate::value_pos(src, &["hosts", name, "next"]),
                    format!("host `{name}` names itself as next"),
                    "name another host, or null to end the hop chain here",
                ));
            } else if !names.contains(next.as_str()) {
                diags.push(Diagnostic::new(
                    path,
                    locate::value_pos(src, &["hosts", name, "next"]),
                    format!("hop chain: unknown host `{next}`"),
                    format!(
                        "next must be one of the hosts ({}) or null",
                        join(names.iter())
                    ),
                ));
            }
        }
        hosts.insert(
            name.clone(),
            Host {
                name: name.clone(),
                beanstalkd: h.beanstalkd.clone(),
                next: h.next.clone(),
                limits: HostLimits {
                    memory: h.limits.memory,
                    storage: h.limits.storage,
                    vms: h.limits.vms,
                },
            },
        );
    }

    let mut policies = Policies::default();
    let p = &raw.policies;
    if let Some(share) = p.prune_guard {
        if share.is_finite() && (0.0..=1.0).contains(&share) {
            policies.prune_guard = share;
        } else {
            diags.push(Diagnostic::new(
                path,
                locate::value_pos(src, &["policies", "prune_guard"]),
                format!("prune_guard {share} is not a share"),
                "write a number from 0 (destroy nothing without override) to 1 (no guard), e.g. 0.5",
            ));
        }
    }
    if let Some(hops) = p.hop_limit {
        if hops <= 64 {
            policies.hop_limit = hops;
        } else {
            diags.push(Diagnostic::new(
                path,
                locate::value_pos(src, &["policies", "hop_limit"]),
                format!("hop_limit {hops} is more than 64"),
                "a create needs at most as many hops as there are hosts",
            ));
        }
    }
    for (key, value, slot) in [
        (
            "reconcile_interval",
            p.reconcile_interval,
            &mut policies.reconcile_interval,
        ),
        ("ttr", p.ttr, &mut policies.ttr),
    ] {
        if let Some(v) = value {
            if v.0.as_secs() == 0 {
                diags.push(Diagnostic::new(
                    path,
                    locate::value_pos(src, &["policies", key]),
                    format!("{key} must be at least one second"),
                    "write a duration such as 30s, 5m or 1h",
                ));
            } else {
                *slot = v.0;
            }
        }
    }

    Cluster {
        id: raw.cluster,
        hosts,
        policies,
    }
}

fn join<'a>(items: impl Iterator<Item = &'a (impl AsRef<str> + ?Sized + 'a)>) -> String {
    let all: Vec<&str> = items.map(|s| s.as_ref()).collect();
    let v: Vec<String> = all.iter().take(12).map(|s| quote(s)).collect();
    if all.len() > 12 {
        format!("{}, … ({} in all)", v.join(", "), all.len())
    } else if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

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

fn templates(
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

fn profiles(
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

struct VmCtx<'a> {
    hosts: &'a BTreeMap<String, Host>,
    profiles: &'a BTreeMap<String, Profile>,
    broken_profiles: &'a BTreeSet<String>,
    templates: &'a BTreeMap<String, Template>,
}

/// A value that must be unique across VMs (a MAC address, a disk path).
struct Claim<'a> {
    value: String,
    vm: String,
    file: &'a str,
    key: String,
}

#[derive(Default)]
struct VmOut<'a> {
    /// Every VM name a file declares, even when the file has other errors, so that a
    /// duplicate is reported together with them.
    names: Vec<(String, &'a str)>,
    specs: Vec<VmSpec>,
    diags: Vec<Diagnostic>,
    macs: Vec<Claim<'a>>,
    disks: Vec<Claim<'a>>,
}

fn vms<'a>(
    ctx: &VmCtx<'_>,
    files: &[(&'a str, &'a str)],
) -> (BTreeMap<String, VmSpec>, Vec<Diagnostic>) {
    let chunks: Vec<VmOut<'a>> = if files.len() < PARALLEL_THRESHOLD {
        vec![vm_chunk(ctx, files)]
    } else {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let per = files.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = files
                .chunks(per)
                .map(|chunk| s.spawn(move || vm_chunk(ctx, chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };

    let mut diags = Vec::new();
    let mut out: BTreeMap<String, VmSpec> = BTreeMap::new();
    let src_of = |file: &str| {
        files
            .binary_search_by(|(p, _)| (*p).cmp(file))
            .map_or("", |i| files[i].1)
    };
    let mut macs: HashMap<String, Claim<'a>> = HashMap::new();
    let mut disks: HashMap<String, Claim<'a>> = HashMap::new();
    let mut names: HashMap<String, &'a str> = HashMap::new();
    for chunk in chunks {
        diags.extend(chunk.diags);
        for (name, file) in chunk.names {
            match names.get(name.as_str()) {
                Some(first) => {
                    let first_pos = locate::value_pos(src_of(first), &["name"]);
                    diags.push(Diagnostic::new(
                        file,
                        locate::value_pos(src_of(file), &["name"]),
                        format!("duplicate VM name `{name}`"),
                        format!(
                            "`{name}` is already declared in {first}:{}:{}; VM names are unique in the cluster",
                            first_pos.0, first_pos.1
                        ),
                    ));
                }
                None => {
                    names.insert(name, file);
                }
            }
        }
        for spec in chunk.specs {
            out.entry(spec.name.clone()).or_insert(spec);
        }
        for (claims, seen, what) in [
            (chunk.macs, &mut macs, "MAC address"),
            (chunk.disks, &mut disks, "disk path"),
        ] {
            for c in claims {
                if let Some(first) = seen.get(&c.value) {
                    let first_pos = locate::value_pos(src_of(first.file), &["config", &first.key]);
                    diags.push(Diagnostic::new(
                        c.file,
                        locate::value_pos(src_of(c.file), &["config", &c.key]),
                        format!(
                            "{what} `{}` of `{}` is also used by `{}`",
                            c.value, c.vm, first.vm
                        ),
                        format!(
                            "{}:{}:{} claims it first; give each VM its own {what}",
                            first.file, first_pos.0, first_pos.1
                        ),
                    ));
                } else {
                    seen.insert(c.value.clone(), c);
                }
            }
        }
    }
    (out, diags)
}

fn vm_chunk<'a>(ctx: &VmCtx<'_>, files: &[(&'a str, &'a str)]) -> VmOut<'a> {
    let mut out = VmOut::default();
    for &(path, src) in files {
        match parse_one::<RawVm>(path, src) {
            Ok(raw) => vm(ctx, path, src, raw, &mut out),
            Err(d) => out.diags.push(d),
        }
    }
    out
}

fn vm<'a>(ctx: &VmCtx<'_>, path: &'a str, src: &str, raw: RawVm, out: &mut VmOut<'a>) {
    let d = &mut out.diags;
    let before = d.len();
    let err = |d: &mut Vec<Diagnostic>, pos, msg: String, hint: String| {
        d.push(Diagnostic::new(path, pos, msg, hint));
    };

    if !rules::is_vm_name(&raw.name) {
        err(
            d,
            locate::value_pos(src, &["name"]),
            format!("invalid VM name `{}`", raw.name),
            rules::VM_NAME_HINT.to_string(),
        );
    }
    let profile = match ctx.profiles.get(&raw.profile) {
        Some(p) => Some(p),
        None => {
            if !ctx.broken_profiles.contains(&raw.profile) {
                err(
                    d,
                    locate::value_pos(src, &["profile"]),
                    format!("unknown profile `{}`", raw.profile),
                    format!("profiles: {}", join(ctx.profiles.keys())),
                );
            }
            None
        }
    };
    if let Some(host) = &raw.host {
        if raw.every_host {
            err(
                d,
                locate::key_pos(src, &["host"]),
                "`host` and `every_host: true` exclude each other".to_string(),
                "remove `host` to run one VM per host, or `every_host` to pin one VM".to_string(),
            );
        } else if !ctx.hosts.contains_key(host) {
            err(
                d,
                locate::value_pos(src, &["host"]),
                format!("unknown host `{host}`"),
                format!("hosts in cluster.yaml: {}", join(ctx.hosts.keys())),
            );
        }
    }
    if let Some(start) = &raw.start_at {
        if raw.host.is_some() || raw.every_host {
            err(
                d,
                locate::key_pos(src, &["start_at"]),
                "`start_at` and `host` (or `every_host`) exclude each other".to_string(),
                "`host: H` means the VM must run on H; `start_at: H` means its placement starts at H and the hop chain may place it further".to_string(),
            );
        } else if !ctx.hosts.contains_key(start) {
            err(
                d,
                locate::value_pos(src, &["start_at"]),
                format!("unknown host `{start}`"),
                format!("hosts in cluster.yaml: {}", join(ctx.hosts.keys())),
            );
        }
    }
    if rules::is_vm_name(&raw.name) {
        if raw.every_host {
            for host in ctx.hosts.keys() {
                out.names.push((format!("{}-{host}", raw.name), path));
            }
        } else {
            out.names.push((raw.name.clone(), path));
        }
    }
    let d = &mut out.diags;
    if raw.every_host && rules::is_vm_name(&raw.name) {
        for host in ctx.hosts.keys() {
            let name = format!("{}-{host}", raw.name);
            if !rules::is_vm_name(&name) {
                err(
                    d,
                    locate::value_pos(src, &["name"]),
                    format!("every_host VM name `{name}` would be refused by vm-bhyve"),
                    rules::VM_NAME_HINT.to_string(),
                );
                // One report is enough: the fix (a shorter name) is the same for every host.
                break;
            }
        }
    }
    if raw.cpu.is_some_and(|c| c == 0 || c > 255) {
        err(
            d,
            locate::value_pos(src, &["cpu"]),
            format!("cpu {} is out of range", raw.cpu.unwrap_or(0)),
            "bhyve takes 1 to 255 virtual CPUs".to_string(),
        );
    }
    for (key, size) in [("memory", raw.memory), ("disk", raw.disk)] {
        if size.is_some_and(|s| s.bytes() == 0) {
            err(
                d,
                locate::value_pos(src, &[key]),
                format!("{key} must be more than 0"),
                "write a size such as 512M or 20G".to_string(),
            );
        }
    }
    if let (Some(p), Some(disk)) = (profile, raw.disk) {
        if disk.bytes() > 0 && disk <= p.swap {
            err(
                d,
                locate::value_pos(src, &["disk"]),
                format!(
                    "disk {disk} leaves no room beside the profile's {} of swap",
                    p.swap
                ),
                "make the disk larger than the swap partition".to_string(),
            );
        }
    }
    for tag in &raw.tags {
        if !rules::is_tag(tag) {
            err(
                d,
                locate::item_pos(src, &["tags"], tag),
                format!("invalid tag `{tag}`"),
                "tags are single words without spaces or commas".to_string(),
            );
        }
    }
    let mut claims_mac = Vec::new();
    let mut claims_disk = Vec::new();
    let config: BTreeMap<&str, &str> = raw
        .config
        .0
        .iter()
        .map(|(k, v)| (k.as_str(), v.0.as_str()))
        .collect();
    for (key, value) in &raw.config.0 {
        let value = &value.0;
        if !rules::is_config_key(key) {
            err(
                d,
                locate::key_pos(src, &["config", key]),
                format!("invalid vm-bhyve config key `{key}`"),
                "vm-bhyve reads keys of lower-case letters, digits and `_`, starting with a letter"
                    .to_string(),
            );
            continue;
        }
        let reserved = match key.as_str() {
            "cpu" | "memory" => Some(format!("set `{key}:` at the top level of the VM file")),
            "disk0_size" => Some("set `disk:` at the top level of the VM file".to_string()),
            "uuid" => Some("vm-bhyve generates the uuid; remove the key".to_string()),
            _ => None,
        };
        if let Some(hint) = reserved {
            err(
                d,
                locate::key_pos(src, &["config", key]),
                format!("config key `{key}` is not set through `config`"),
                hint,
            );
            continue;
        }
        if let Some(c) = rules::bad_config_char(value) {
            err(
                d,
                locate::value_pos(src, &["config", key]),
                format!("config value of `{key}` contains {c:?}"),
                "vm-bhyve's config reader drops or mangles `\"`, `#`, `\\`, `$`, backquotes and control characters".to_string(),
            );
            continue;
        }
        if let Some((_, "mac")) = rules::indexed_key(key, "network") {
            if !rules::is_mac(value) {
                err(
                    d,
                    locate::value_pos(src, &["config", key]),
                    format!("`{value}` is not a MAC address"),
                    "write six hex pairs separated by `:`, e.g. 58:9c:fc:00:00:01".to_string(),
                );
            } else {
                claims_mac.push((value.to_ascii_lowercase(), key.clone()));
            }
        }
        if let Some((n, "name")) = rules::indexed_key(key, "disk") {
            let dev = config.get(format!("disk{n}_dev").as_str()).copied();
            if value.starts_with('/') || matches!(dev, Some("custom")) {
                claims_disk.push((value.clone(), key.clone()));
            }
        }
    }
    if raw.every_host && !(claims_mac.is_empty() && claims_disk.is_empty()) {
        let key = claims_mac
            .first()
            .or(claims_disk.first())
            .map(|c| c.1.clone())
            .unwrap_or_default();
        err(
            d,
            locate::key_pos(src, &["config", &key]),
            format!("an every_host VM cannot set `{key}`"),
            "every host's instance would get the same value; declare the VMs one by one instead"
                .to_string(),
        );
    }
    for (key, value) in &raw.hooks.0 {
        if !rules::is_hook_key(key) {
            err(
                d,
                locate::key_pos(src, &["hooks", key]),
                format!("invalid hook option `{key}`"),
                "hook options are lower-case letters, digits, `_` and `-`, starting with a letter"
                    .to_string(),
            );
        } else if value.0.chars().any(char::is_control) {
            err(
                d,
                locate::value_pos(src, &["hooks", key]),
                format!("hook option `{key}` contains a control character"),
                "hook options are one-line values; put longer content in a secret".to_string(),
            );
        }
    }
    for secret in &raw.secrets {
        if !rules::is_secret_name(secret) {
            let msg = if secret.contains('/') {
                format!("secret name `{secret}` contains a path")
            } else {
                format!("invalid secret name `{secret}`")
            };
            err(
                d,
                locate::item_pos(src, &["secrets"], secret),
                msg,
                "name the secret only (letters, digits, `.`, `_`, `-`); each host keeps its file under its own secrets directory".to_string(),
            );
        }
    }

    let Some(profile) = profile else {
        return;
    };
    if d.len() > before {
        return;
    }
    let Some(template) = ctx.templates.get(&profile.template) else {
        return;
    };
    let cpu = raw.cpu.unwrap_or(profile.cpu);
    let memory = raw.memory.unwrap_or(profile.memory);
    let disk = raw.disk.unwrap_or(profile.disk);
    let hooks: BTreeMap<String, String> = raw.hooks.0.into_iter().map(|(k, v)| (k, v.0)).collect();
    let extra: Vec<(String, String)> = raw.config.0.into_iter().map(|(k, v)| (k, v.0)).collect();
    let instances: Vec<(String, Option<String>)> = if raw.every_host {
        ctx.hosts
            .keys()
            .map(|h| (format!("{}-{h}", raw.name), Some(h.clone())))
            .collect()
    } else {
        vec![(raw.name.clone(), raw.host.clone())]
    };
    for (name, host) in instances {
        let config = effective_config(template, cpu, memory, &extra);
        let mut spec = VmSpec {
            name: name.clone(),
            file: path.to_string(),
            profile: profile.name.clone(),
            template: template.name.clone(),
            cpu,
            memory,
            disk,
            swap: profile.swap,
            host,
            start_at: raw.start_at.clone(),
            tags: raw.tags.clone(),
            state: raw.state,
            protect: raw.protect,
            replace: raw.replace,
            config,
            hooks: hooks.clone(),
            secrets: raw.secrets.clone(),
            spec_hash: String::new(),
        };
        spec.spec_hash = spec.compute_hash();
        out.specs.push(spec);
        for (value, key) in &claims_mac {
            out.macs.push(Claim {
                value: value.clone(),
                vm: name.clone(),
                file: path,
                key: key.clone(),
            });
        }
        for (value, key) in &claims_disk {
            out.disks.push(Claim {
                value: value.clone(),
                vm: name.clone(),
                file: path,
                key: key.clone(),
            });
        }
    }
}

/// The vm-bhyve config a VM should have: the template's keys without the create-time
/// `diskN_size`, then `cpu` and `memory`, then the VM's own keys.
fn effective_config(
    template: &Template,
    cpu: u32,
    memory: Size,
    extra: &[(String, String)],
) -> BTreeMap<String, String> {
    let mut config: BTreeMap<String, String> = template
        .config
        .iter()
        .filter(|(k, _)| !matches!(rules::indexed_key(k, "disk"), Some((_, "size"))))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    config.insert("cpu".to_string(), cpu.to_string());
    config.insert("memory".to_string(), memory.to_string());
    for (k, v) in extra {
        config.insert(k.clone(), v.clone());
    }
    config
}
