//! The desired-repo loader (`flotilla::desired::load`) on hostile repos: it must never
//! panic, only report errors, and it must give the same answer every time.
//!
//! The input is the repo's files in one text, so that a seed is readable and the fuzzer
//! mutates YAML rather than a binary layout: a line `@@ PATH` starts the file PATH, a line
//! `@@> PATH` starts a file that was too large to read (its size is past the limit by
//! the length of what follows), a line `@@~ PATH` starts an entry that is not a regular
//! file (a symlink; what follows is ignored), and whatever comes before the first such
//! line is `cluster.yaml`.
#![no_main]

use flotilla::actual::HostActual;
use flotilla::desired::{self, FileSet, Special, MAX_FILE_SIZE};
use flotilla::planner::{self, PlanOptions};
use flotilla::render::{self, Style};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files = file_set(data);
    let result = desired::load(&files, Some("0123456789abcdef".into()));
    // The loader is deterministic: every host must reach the same verdict on a commit.
    assert_eq!(result, desired::load(&files, Some("0123456789abcdef".into())));
    match result {
        Err(invalid) => {
            let _ = invalid.render();
            let diags = Err(invalid.0);
            let _ = render::validation_text(&diags, Style { color: true });
            let _ = render::validation_json(&diags, None);
        }
        Ok(snapshot) => {
            for spec in snapshot.vms.values() {
                assert_eq!(spec.spec_hash, spec.compute_hash());
            }
            // What a host does next with a valid snapshot: plan it against empty hosts.
            let actual: Vec<HostActual> = snapshot
                .cluster
                .hosts
                .keys()
                .map(|h| HostActual {
                    host: h.clone(),
                    vms: Vec::new(),
                })
                .collect();
            let plan = planner::plan(&snapshot, &actual, &[], &PlanOptions::default());
            let _ = render::plan_text(&plan, Style { color: true });
            let _ = render::plan_json(&plan);
            let ok = Ok(snapshot);
            let _ = render::validation_text(&ok, Style::default());
            let _ = render::validation_json(&ok, None);
        }
    }
});

/// Splits the input into files (see the module documentation).
fn file_set(data: &[u8]) -> FileSet {
    let mut files = FileSet::new();
    let mut path = String::from("cluster.yaml");
    let mut kind = Kind::Data;
    let mut body = Vec::new();
    let mut explicit = false;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let header = if let Some(p) = line.strip_prefix(b"@@> ") {
            Some((p, Kind::TooLarge))
        } else if let Some(p) = line.strip_prefix(b"@@~ ") {
            Some((p, Kind::Symlink))
        } else {
            line.strip_prefix(b"@@ ").map(|p| (p, Kind::Data))
        };
        let Some((p, next)) = header else {
            body.extend_from_slice(line);
            continue;
        };
        // The implicit cluster.yaml only when something came before the first header.
        if explicit || !body.is_empty() {
            put(&mut files, &path, kind, std::mem::take(&mut body));
        }
        explicit = true;
        path = String::from_utf8_lossy(p)
            .trim_end_matches(['\n', '\r'])
            .to_string();
        kind = next;
    }
    if explicit || !body.is_empty() {
        put(&mut files, &path, kind, body);
    }
    files
}

#[derive(Clone, Copy)]
enum Kind {
    Data,
    TooLarge,
    Symlink,
}

fn put(files: &mut FileSet, path: &str, kind: Kind, body: Vec<u8>) {
    match kind {
        Kind::Data => files.insert(path, body),
        Kind::TooLarge => files.insert_too_large(path, MAX_FILE_SIZE + 1 + body.len() as u64),
        Kind::Symlink => files.insert_not_regular(path, Special::Symlink),
    }
}
