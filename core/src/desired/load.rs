//! From a [`FileSet`] to a validated [`Snapshot`], or every error at once: the order in
//! which files are read and checked. Reading YAML is in `yaml`, the checks in `check`.

use std::collections::BTreeMap;

use super::check::{self, VmCtx};
use super::diag::{Diagnostic, Invalid};
use super::expand::Budget;
use super::files::{Entry, FileSet, TREE_DIRS};
use super::schema::RawCluster;
use super::spec::Snapshot;
use super::yaml::{parse, text};

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
            .map(|(src, raw)| check::cluster("cluster.yaml", src, raw, &mut diags)),
    };

    let (templates, broken_templates) = check::templates(files, &mut diags);
    let (profiles, broken_profiles) = check::profiles(
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
            check::vms(&ctx, &vm_files)
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
            let (_, d) = check::vms(&ctx, &vm_files);
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
pub(crate) fn expands_within(
    budget: &mut Budget,
    path: &str,
    src: &str,
    diags: &mut Vec<Diagnostic>,
) -> bool {
    match budget.check(path, src) {
        Ok(()) => true,
        Err(d) => {
            diags.push(d);
            false
        }
    }
}

pub(crate) fn is_special(entry: &Entry) -> bool {
    matches!(entry, Entry::NotRegular(_))
}
