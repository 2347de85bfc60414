//! The examples under `examples/` and the JSON Schemas under `schemas/` (issue 15,
//! "Examples" and the JSON Schema bullet): every example desired repo validates with
//! `flotilla validate` and against the YAML schemas its files name in their
//! yaml-language-server modeline, every example agent.yaml parses and names a host of
//! its repo, the example hooks accept the FreeBSD example's hook options and secrets,
//! and real `validate`, `plan` and `events` outputs validate against their schemas.

mod cli_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::*;
use flotilla::agent::config::AgentConfig;
use flotilla::agent::hooks::{self, HookInput};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("reconciler/ sits in the repository")
        .to_path_buf()
}

/// Each example: its directory under `examples/`, and its agent.yaml files.
fn examples() -> Vec<(PathBuf, Vec<PathBuf>)> {
    let dir = root().join("examples");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("examples/") {
        let path = e.expect("entry").path();
        if !path.join("desired").is_dir() {
            continue;
        }
        let mut agents = Vec::new();
        if path.join("agent.yaml").is_file() {
            agents.push(path.join("agent.yaml"));
        }
        if let Ok(rd) = std::fs::read_dir(path.join("agents")) {
            for a in rd {
                agents.push(a.expect("entry").path());
            }
        }
        agents.sort();
        out.push((path, agents));
    }
    out.sort();
    out
}

fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = root().join("schemas/v1").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).expect("a schema is JSON");
    jsonschema::validator_for(&value)
        .unwrap_or_else(|e| panic!("{} is not a valid JSON Schema: {e}", path.display()))
}

/// Every error of `doc` against `v`, one per line; empty when it validates.
fn errors(v: &jsonschema::Validator, doc: &serde_json::Value) -> String {
    v.iter_errors(doc)
        .map(|e| format!("  {} at {}\n", e, e.instance_path()))
        .collect()
}

/// The four example repos the issue asks for are there, each with an agent.yaml.
fn assert_the_four_examples(ex: &[(PathBuf, Vec<PathBuf>)]) {
    let names: BTreeSet<String> = ex
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["single-host", "three-host-chain", "fleet", "freebsd-guests"] {
        assert!(
            names.contains(want),
            "examples/{want} is missing: {names:?}"
        );
    }
    for (p, agents) in ex {
        assert!(!agents.is_empty(), "{} has no agent.yaml", p.display());
    }
}

/// Guards issue 15, Examples: each example desired repo passes `flotilla validate`,
/// and each of its agent.yaml files passes the agent's own config parser and names a
/// host of that repo's cluster.yaml.
#[test]
fn every_example_validates_with_its_agent_configs() {
    let ex = examples();
    assert_the_four_examples(&ex);
    for (dir, agents) in &ex {
        let desired = dir.join("desired");
        let out = flotilla(&["validate", desired.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{}{}",
            desired.display(),
            stdout(&out),
            stderr(&out)
        );
        let snap = load_dir(&desired);
        for a in agents {
            let cfg = AgentConfig::load(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
            assert!(
                snap.cluster.hosts.contains_key(&cfg.host),
                "{}: host `{}` is not in {}/cluster.yaml",
                a.display(),
                cfg.host,
                desired.display()
            );
        }
    }
}

/// Which schema a desired repo's file follows, by its place in the repo.
fn schema_for(rel: &Path) -> &'static str {
    match rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy())
    {
        Some(c) if c == "vms" => "vm.schema.json",
        Some(c) if c == "profiles" => "profile.schema.json",
        _ => "cluster.schema.json",
    }
}

/// Guards issue 15, the YAML JSON Schema: every YAML file of every example names the
/// right schema in its first line (`# yaml-language-server: $schema=RELATIVE`, a path
/// that exists from the file), and validates against it; and a few mistakes the
/// loader refuses, the schema refuses too.
#[test]
fn the_examples_validate_against_the_yaml_schemas_their_modelines_name() {
    const MODELINE: &str = "# yaml-language-server: $schema=";
    let mut checked = 0;
    for (dir, _) in examples() {
        let desired = dir.join("desired");
        let mut files = Vec::new();
        files_under(&desired, "yaml", &mut files);
        for f in files {
            let rel = f.strip_prefix(&desired).unwrap();
            let want = schema_for(rel);
            let text = std::fs::read_to_string(&f).unwrap();
            let first = text.lines().next().unwrap_or_default();
            let named = first
                .strip_prefix(MODELINE)
                .unwrap_or_else(|| panic!("{}: no modeline in its first line", f.display()));
            let target = f.parent().unwrap().join(named);
            assert!(
                target.is_file() && named.ends_with(&format!("schemas/v1/{want}")),
                "{}: the modeline names {named}, not an existing schemas/v1/{want}",
                f.display()
            );
            let doc: serde_json::Value =
                serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let errs = errors(&schema(want), &doc);
            assert!(errs.is_empty(), "{} against {want}:\n{errs}", f.display());
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} example files checked");

    // The schemas are not empty shells: typical mistakes are caught in the editor.
    let vm = schema("vm.schema.json");
    for bad in [
        "name: web1\nprofil: CS1\n",
        "name: web1\nprofile: CS1\nmemory: 1.5G\n",
        "name: web1\nprofile: CS1\nhost: h1\nstart_at: h2\n",
        "name: web1\nprofile: CS1\nsecrets: [keys/web]\n",
        "name: web1\nprofile: CS1\nstate: paused\n",
        "name: -web\nprofile: CS1\n",
    ] {
        let doc: serde_json::Value = serde_yaml_ng::from_str(bad).unwrap();
        assert!(!vm.is_valid(&doc), "vm.schema.json accepts {bad:?}");
    }
    let cluster = schema("cluster.schema.json");
    for bad in [
        "cluster: c\nhosts: {h1: {beanstalkd: a:1, limits: {memory: 1G, storage: 1G}}}\n",
        "cluster: c\nhosts: {h1: {beanstalkd: a:1, limits: {memory: 1G, storage: 1G, vms: 1}}}\npolicies: {prune_guard: 2}\n",
        "cluster: c\nhosts: {h1: {beanstalkd: a:1, limits: {memory: 1G, storage: 1G, vms: 1}}}\npolicies: {ttr: soon}\n",
    ] {
        let doc: serde_json::Value = serde_yaml_ng::from_str(bad).unwrap();
        assert!(!cluster.is_valid(&doc), "cluster.schema.json accepts {bad:?}");
    }
    // The repository's own example and its built-in profiles follow the schemas too.
    let mut files = Vec::new();
    files_under(&root().join("desired"), "yaml", &mut files);
    files_under(&root().join("profiles"), "yaml", &mut files);
    for f in files {
        let rel = f.strip_prefix(root()).unwrap();
        let rel = rel.strip_prefix("desired").unwrap_or(rel);
        let want = schema_for(rel);
        let doc: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let errs = errors(&schema(want), &doc);
        assert!(errs.is_empty(), "{} against {want}:\n{errs}", f.display());
    }
}

/// Guards issue 15, Examples (FreeBSD guests built with the hooks and secrets by
/// reference): the example hooks' `check` accepts every VM of the example, given the
/// environment the worker builds (options as FLOTILLA_OPT_*, each named secret as a
/// path under the host's secrets directory).
#[test]
fn the_example_hooks_accept_the_freebsd_examples_options_and_secrets() {
    let desired = root().join("examples/freebsd-guests/desired");
    let snap = load_dir(&desired);
    let secrets = tempfile::tempdir().unwrap();
    let components = tempfile::tempdir().unwrap();
    let mut named = 0;
    for spec in snap.vms.values() {
        for s in &spec.secrets {
            std::fs::write(secrets.path().join(s), "not a real secret\n").unwrap();
            named += 1;
        }
        let input = HookInput {
            vm: spec.name.clone(),
            vm_dir: secrets.path().join(&spec.name),
            host: "bsd1".into(),
            job: "job-1".into(),
            commit: "0".repeat(40),
            cpu: spec.cpu,
            memory: spec.memory.to_string(),
            disk: spec.disk.to_string(),
            swap: spec.swap.to_string(),
            options: spec
                .hooks
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            secrets: spec.secrets.clone(),
        };
        let env = hooks::environment(&input, Some(secrets.path()))
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        for hook in ["pre.sh", "local.sh", "post.sh"] {
            let out = Command::new("sh")
                .arg(root().join("host/hooks").join(hook))
                .arg("check")
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("FLOTILLA_COMPONENTS", components.path())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .expect("sh");
            assert!(
                out.status.success(),
                "{hook} check refuses {}: {}",
                spec.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(named >= 2, "the example names its secrets ({named})");
}

/// Guards issue 15, the JSON Schemas of `validate` and `plan`: real outputs, valid and
/// invalid, with changes and blocked items, validate against their schemas.
#[test]
fn validate_and_plan_json_follow_their_schemas() {
    let validate = schema("validate.schema.json");
    let plan = schema("plan.schema.json");

    let out = flotilla(&["validate", EXAMPLE, "--output", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], true);
    let errs = errors(&validate, &doc);
    assert!(errs.is_empty(), "valid:\n{errs}{doc:#}");

    let repo = Repo::example();
    repo.write("vms/typo.yaml", "name: typo\nprofil: CS0\n");
    repo.write("vms/web1.yaml", "name: web1\nprofile: CS1\nhost: host9\n");
    let out = flotilla(&["validate", repo.work.to_str().unwrap(), "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    let errs = errors(&validate, &doc);
    assert!(errs.is_empty(), "invalid:\n{errs}{doc:#}");

    // Creates for an empty cluster; then every action kind and a blocked item against
    // a state that drifted.
    let snap = load_dir(Path::new(EXAMPLE));
    let empty = repo.path("empty.json");
    save(
        &empty,
        snap.cluster
            .hosts
            .keys()
            .map(|h| flotilla::actual::HostActual {
                host: h.clone(),
                vms: vec![],
            })
            .collect(),
    );
    let mut hosts = matching(&snap);
    for h in &mut hosts {
        for vm in &mut h.vms {
            match vm.name.as_str() {
                // update in place (memory)
                "web1" => {
                    vm.config.insert("memory".into(), "256M".into());
                }
                // start
                "web2" => vm.state = flotilla::actual::RunState::Stopped,
                // stop
                "staging" => {
                    vm.state = flotilla::actual::RunState::Running;
                    vm.autostart = Some(1);
                }
                // grow the disk
                "db1" => vm.disks[0].size = flotilla::size::Size::gib(50),
                _ => {}
            }
        }
    }
    // destroy: a managed VM no file declares; blocked: a desired name taken by an
    // unmanaged VM.
    for h in &mut hosts {
        h.vms.retain(|vm| vm.name != "ci-runner");
    }
    let first = &mut hosts[0];
    let mut gone = first.vms[0].clone();
    gone.name = "retired".into();
    first.vms.push(gone);
    let mut squatter = first.vms[0].clone();
    squatter.name = "ci-runner".into();
    squatter.marker = None;
    first.vms.push(squatter);
    let drifted = repo.path("drifted.json");
    save(&drifted, hosts);

    let mut kinds = BTreeSet::new();
    let mut blocked = 0;
    for state in [&empty, &drifted] {
        let out = flotilla(&[
            "plan",
            EXAMPLE,
            "--inventory",
            state,
            "--output",
            "json",
            "--allow-prune",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let errs = errors(&plan, &doc);
        assert!(errs.is_empty(), "plan against {state}:\n{errs}{doc:#}");
        for h in doc["hosts"].as_array().unwrap() {
            for a in h["actions"].as_array().unwrap() {
                kinds.insert(a["action"].as_str().unwrap().to_string());
            }
            blocked += h["blocked"].as_array().unwrap().len();
        }
    }
    for k in ["create", "update", "grow_disk", "start", "stop", "destroy"] {
        assert!(kinds.contains(k), "no {k} action was checked: {kinds:?}");
    }
    assert!(blocked >= 1, "no blocked item was checked");
}

/// Guards issue 15, the JSON Schema of `events` (and its version field): each line of
/// `flotilla events --output json` validates against events.schema.json, which asks for
/// `format_version` like the other JSON outputs. Before the fix a line had no version:
/// "\"format_version\" is a required property".
#[test]
fn events_json_lines_carry_a_version_and_follow_their_schema() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The event log as the agent writes it (agent/events.rs): one JSON object a line.
    std::fs::write(
        state.join("events.jsonl"),
        concat!(
            r#"{"at":1700000000,"at_ms":1700000000123,"host":"host1","kind":"snapshot","commit":"0123456789abcdef0123456789abcdef01234567","message":"loaded 3 VMs"}"#,
            "\n",
            r#"{"at":1700000001,"at_ms":1700000001000,"host":"host1","kind":"emit","vm":"web1","job":"j-1","message":"create sent to host1"}"#,
            "\n",
            r#"{"at":1700000002,"at_ms":1700000002000,"host":"host1","kind":"error","vm":"web2","message":"unplaceable: no room"}"#,
            "\n",
        ),
    )
    .unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "host: host1\ndesired: {{url: /nonexistent}}\nstate_dir: {}\nkey_file: /nonexistent\n",
            state.display()
        ),
    )
    .unwrap();
    let out = flotilla(&[
        "events",
        "--config",
        cfg.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = schema("events.schema.json");
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in lines {
        let doc: serde_json::Value = serde_json::from_str(line).unwrap();
        let errs = errors(&v, &doc);
        assert!(errs.is_empty(), "{line}:\n{errs}");
    }
}
