//! `flotilla status` and `flotilla events` of a live cluster against their JSON Schemas
//! in `schemas/v1/` (issue 15, the JSON Schema bullet): the documents a program reads
//! must be the documents the schemas describe, with VMs running, a create that came
//! back unplaceable and so a failure to show.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(90);

fn schema(name: &str) -> jsonschema::Validator {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/v1")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).expect("a schema is JSON");
    jsonschema::validator_for(&value)
        .unwrap_or_else(|e| panic!("{} is not a valid JSON Schema: {e}", path.display()))
}

fn errors(v: &jsonschema::Validator, doc: &serde_json::Value) -> String {
    v.iter_errors(doc)
        .map(|e| format!("  {} at {}\n", e, e.instance_path()))
        .collect()
}

/// Guards issue 15, the JSON Schemas of `status` and `events`: on a two-host cluster
/// with two VMs running and a pinned create its host has no room for, `status
/// --output json` (hosts, VMs, the create waiting to retry, its failure) and every
/// line of `events --output json` on each host validate against status.schema.json
/// and events.schema.json.
#[test]
fn status_and_events_of_a_live_cluster_follow_their_schemas() {
    let mut c = Cluster::start(
        &[
            HostSpec::new("host1", Some("host2")),
            HostSpec::new("host2", None).limits("1G", "100G", 5),
        ],
        Options::default(),
    );
    c.start_agents();
    c.commit(
        &[
            (
                "vms/vm-a.yaml",
                Some(&vm_yaml("vm-a", "CS0", "host: host1\n")),
            ),
            (
                "vms/vm-b.yaml",
                Some(&vm_yaml("vm-b", "CS0", "host: host2\n")),
            ),
            // CS3 wants 2G; host2 has 1G: unplaceable, with host2's reason.
            (
                "vms/big.yaml",
                Some(&vm_yaml("big", "CS3", "host: host2\n")),
            ),
        ],
        "two VMs and one too big for its host",
    );
    c.wait_until("vm-a and vm-b running", CONVERGE, |c| {
        c.running_complete(0, "vm-a") && c.running_complete(1, "vm-b")
    });
    let config = c.hosts[0].config.to_str().unwrap().to_string();
    let mut last = serde_json::Value::Null;
    c.wait_until(
        "status shows both VMs and the failed create",
        CONVERGE,
        |c| {
            let (code, out, _) = c.flotilla(&["status", "--config", &config, "--output", "json"]);
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&out) else {
                return false;
            };
            let vms = doc["vms"].as_array().map_or(0, Vec::len);
            let failed = doc["failures"].as_array().is_some_and(|f| !f.is_empty());
            let retrying = doc["in_flight"]
                .as_array()
                .is_some_and(|f| f.iter().any(|p| !p[1]["retry_at"].is_null()));
            last = doc;
            code == 0 && vms == 2 && (failed || retrying)
        },
    );
    let errs = errors(&schema("status.schema.json"), &last);
    assert!(errs.is_empty(), "status:\n{errs}{last:#}");

    let events = schema("events.schema.json");
    for (i, h) in c.hosts.iter().enumerate() {
        let cfg = h.config.to_str().unwrap();
        let (code, out, err) = c.flotilla(&["events", "--config", cfg, "--output", "json"]);
        assert_eq!(code, 0, "events of host{}: {err}", i + 1);
        let lines: Vec<&str> = out.lines().collect();
        assert!(!lines.is_empty(), "host{} logged no events", i + 1);
        for line in lines {
            let doc: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("host{}: {e}: {line}", i + 1));
            let errs = errors(&events, &doc);
            assert!(errs.is_empty(), "host{} event {line}:\n{errs}", i + 1);
        }
    }
    // The cluster is still there for the failure messages above; stop it now.
    for i in 0..c.hosts.len() {
        c.stop_agent(i);
    }
}
