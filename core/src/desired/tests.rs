//! One test per validation error: the exact message, its place and its hint.

use super::*;
use crate::size::Size;

const CLUSTER: &str = "\
cluster: lab
hosts:
  host1:
    beanstalkd: 127.0.0.1:11301
    next: host2
    limits: { memory: 16G, storage: 400G, vms: 16 }
  host2:
    beanstalkd: 127.0.0.1:11302
    limits: { memory: 16G, storage: 400G, vms: 16 }
";

fn repo(files: &[(&str, &str)]) -> FileSet {
    let mut set = FileSet::new();
    if !files.iter().any(|(p, _)| *p == "cluster.yaml") {
        set.insert("cluster.yaml", CLUSTER);
    }
    for (p, t) in files {
        set.insert(*p, *t);
    }
    set
}

/// Each error as `file:line:col: message | hint`.
fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match load(&repo(files), None) {
        Ok(_) => vec![],
        Err(Invalid(d)) => d
            .iter()
            .map(|d| {
                format!(
                    "{}:{}:{}: {} | {}",
                    d.file, d.line, d.column, d.message, d.hint
                )
            })
            .collect(),
    }
}

fn one(files: &[(&str, &str)]) -> String {
    let e = errors(files);
    assert_eq!(e.len(), 1, "{e:#?}");
    e.into_iter().next().unwrap_or_default()
}

#[test]
fn a_valid_repo_loads_with_defaults_and_effective_config() {
    let snap = load(
        &repo(&[
            (
                "vms/web.yaml",
                "name: web1\nprofile: CS2\ncpu: 4\nconfig:\n  network0_switch: lan\n",
            ),
            (
                "vms/mon.yaml",
                "name: mon\nprofile: CS0\nevery_host: true\n",
            ),
        ]),
        Some("abc".into()),
    )
    .unwrap();
    assert_eq!(snap.commit.as_deref(), Some("abc"));
    assert_eq!(snap.profiles.len(), 6);
    let web = &snap.vms["web1"];
    assert_eq!(
        (web.cpu, web.memory, web.disk, web.swap),
        (4, Size::gib(1), Size::gib(40), Size::gib(4))
    );
    assert_eq!(web.config["cpu"], "4");
    assert_eq!(web.config["memory"], "1G");
    assert_eq!(web.config["network0_switch"], "lan");
    assert_eq!(web.config["disk0_type"], "nvme");
    assert_eq!(web.config["loader"], "bhyveload");
    assert_eq!(web.spec_hash.len(), 64);
    assert_eq!(web.spec_hash, web.compute_hash());
    assert_eq!(
        snap.vms.keys().collect::<Vec<_>>(),
        ["mon-host1", "mon-host2", "web1"]
    );
    assert_eq!(snap.vms["mon-host2"].host.as_deref(), Some("host2"));
    assert_eq!(snap.cluster.policies.prune_guard, 0.5);
}

#[test]
fn the_example_repo_is_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../desired");
    let mut set = FileSet::new();
    fn walk(dir: &std::path::Path, rel: &str, set: &mut FileSet) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &rel, set);
            } else {
                set.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    walk(std::path::Path::new(root), "", &mut set);
    let snap = load(&set, None).unwrap();
    assert_eq!(snap.cluster.hosts.len(), 3);
    assert!(snap.vms.len() >= 6);
}

#[test]
fn a_repo_profile_overrides_the_built_in_one() {
    let snap = load(
        &repo(&[
            (
                "profiles/CS0.yaml",
                "cpu: 2\nmemory: 1G\ndisk: 10G\nswap: 1G\ntemplate: mine\n",
            ),
            (
                "templates/mine.conf",
                "loader=\"uefi\"\ndisk0_name=\"disk0.img\"\ndisk0_size=\"5G\"\n",
            ),
            ("vms/a.yaml", "name: ab\nprofile: CS0\n"),
        ]),
        None,
    )
    .unwrap();
    let ab = &snap.vms["ab"];
    assert_eq!((ab.cpu, ab.template.as_str()), (2, "mine"));
    assert_eq!(ab.config.get("disk0_size"), None, "create-time key kept");
    assert_eq!(ab.config["loader"], "uefi");
}

#[test]
fn unknown_key() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\ncpus: 2\n")]),
        "vms/a.yaml:3:1: unknown field `cpus`, expected one of `name`, `profile`, `cpu`, `memory`, `disk`, `host`, `start_at`, `every_host`, `tags`, `state`, `protect`, `replace`, `config`, `hooks`, `secrets`, `description` | did you mean `cpu`?"
    );
}

#[test]
fn unknown_key_in_a_host() {
    let cluster = CLUSTER.replace("    next: host2\n", "    nxt: host2\n");
    assert_eq!(
        one(&[("cluster.yaml", &cluster)]),
        "cluster.yaml:5:5: hosts.host1: unknown field `nxt`, expected one of `beanstalkd`, `next`, `limits` | did you mean `next`?"
    );
}

/// Guards issue 15 (conventions: every schema error of a file in one run): four misspelt
/// keys and a bad value in one VM file are five errors of one run, not five runs.
#[test]
fn every_schema_error_of_a_file_in_one_run() {
    let e = errors(&[(
        "vms/a.yaml",
        "name: web1\nprofile: CS0\nmemroy: 2G\ncpus: 2\ndisk: lots\ndsik: 10G\ntagz: [a]\n",
    )]);
    let short: Vec<String> = e
        .iter()
        .map(|l| l.split(", expected").next().unwrap_or(l).to_string())
        .collect();
    assert_eq!(
        short,
        [
            "vms/a.yaml:3:1: unknown field `memroy`",
            "vms/a.yaml:4:1: unknown field `cpus`",
            "vms/a.yaml:5:7: disk: `lots` is not a size (expected a number with an optional K, M, G or T suffix, e.g. 256M or 20G) | write a size as a whole number with an optional K, M, G or T suffix, e.g. 512M or 20G",
            "vms/a.yaml:6:1: unknown field `dsik`",
            "vms/a.yaml:7:1: unknown field `tagz`",
        ],
        "{e:#?}"
    );
}

/// Guards issue 15 (conventions): the errors of nested mappings (two hosts, the
/// policies) are all reported too, each at its key.
#[test]
fn every_schema_error_of_cluster_yaml_in_one_run() {
    let cluster = CLUSTER
        .replace("    next: host2\n", "    nxt: host2\n")
        .replace(
            "    beanstalkd: 127.0.0.1:11302\n",
            "    beanstalk: 127.0.0.1:11302\n",
        )
        + "policies:\n  prune_gaurd: 0.5\n";
    let e = errors(&[("cluster.yaml", &cluster)]);
    let short: Vec<String> = e
        .iter()
        .map(|l| l.split(", expected").next().unwrap_or(l).to_string())
        .collect();
    assert_eq!(
        short,
        [
            "cluster.yaml:5:5: hosts.host1: unknown field `nxt`",
            "cluster.yaml:8:5: hosts.host2: unknown field `beanstalk`",
            "cluster.yaml:11:3: policies: unknown field `prune_gaurd`",
        ],
        "{e:#?}"
    );
}

/// Guards issue 15 (conventions): a misspelt key is answered with the key it most
/// likely means.
#[test]
fn misspelt_key_did_you_mean() {
    let e = one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nmemroy: 2G\n")]);
    assert!(e.ends_with("| did you mean `memory`?"), "{e}");
    let e = one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nzzzzzz: 2G\n")]);
    assert!(!e.contains("did you mean"), "{e}");
}

#[test]
fn duplicate_key() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\ncpu: 1\ncpu: 2\n")]),
        "vms/a.yaml:4:1: duplicate field `cpu` | each key may appear only once in a mapping"
    );
    assert_eq!(
        one(&[(
            "vms/a.yaml",
            "name: web1\nprofile: CS0\nconfig:\n  x_y: a\n  x_y: b\n"
        )]),
        "vms/a.yaml:5:3: config: duplicate key `x_y` | each key may appear only once in a mapping"
    );
}

#[test]
fn duplicate_host() {
    let cluster = format!("{CLUSTER}  host1:\n    beanstalkd: 1.2.3.4:1\n    limits: {{ memory: 1G, storage: 1G, vms: 1 }}\n");
    assert_eq!(
        one(&[("cluster.yaml", &cluster)]),
        "cluster.yaml:10:3: hosts: duplicate key `host1` | each key may appear only once in a mapping"
    );
}

#[test]
fn duplicate_vm_names() {
    assert_eq!(
        one(&[
            ("vms/a.yaml", "name: web1\nprofile: CS0\n"),
            ("vms/b.yaml", "# again\nname: web1\nprofile: CS1\n"),
        ]),
        "vms/b.yaml:2:7: duplicate VM name `web1` | `web1` is already declared in vms/a.yaml:1:7; VM names are unique in the cluster"
    );
}

#[test]
fn duplicate_vm_name_through_every_host() {
    assert_eq!(
        one(&[
            ("vms/a.yaml", "name: mon\nprofile: CS0\nevery_host: true\n"),
            ("vms/b.yaml", "name: mon-host2\nprofile: CS0\n"),
        ]),
        "vms/b.yaml:1:7: duplicate VM name `mon-host2` | `mon-host2` is already declared in vms/a.yaml:1:7; VM names are unique in the cluster"
    );
}

#[test]
fn unknown_profile() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS9\n")]),
        "vms/a.yaml:2:10: unknown profile `CS9` | profiles: CS0, CS1, CS2, CS3, CS4, CS5"
    );
}

#[test]
fn unknown_template() {
    assert_eq!(
        one(&[(
            "profiles/big.yaml",
            "cpu: 8\nmemory: 16G\ndisk: 100G\nswap: 4G\ntemplate: huge\n"
        )]),
        "profiles/big.yaml:5:11: unknown template `huge` | templates: CS0, CS1, CS2, CS3, CS4, CS5"
    );
}

#[test]
fn a_broken_profile_is_reported_once() {
    let e = errors(&[
        (
            "profiles/big.yaml",
            "cpu: 8\nmemory: lots\ndisk: 100G\nswap: 4G\ntemplate: CS0\n",
        ),
        ("vms/a.yaml", "name: web1\nprofile: big\n"),
    ]);
    assert_eq!(
        e,
        ["profiles/big.yaml:2:9: memory: `lots` is not a size (expected a number with an optional K, M, G or T suffix, e.g. 256M or 20G) | write a size as a whole number with an optional K, M, G or T suffix, e.g. 512M or 20G"]
    );
}

#[test]
fn unknown_host() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nhost: host9\n")]),
        "vms/a.yaml:3:7: unknown host `host9` | hosts in cluster.yaml: host1, host2"
    );
}

#[test]
fn bad_size() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nmemory: 1.5G\n")]),
        "vms/a.yaml:3:9: memory: `1.5G` is not a size (expected a number with an optional K, M, G or T suffix, e.g. 256M or 20G) | write a size as a whole number with an optional K, M, G or T suffix, e.g. 512M or 20G"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\ndisk: 0\n")]),
        "vms/a.yaml:3:7: disk must be more than 0 | write a size such as 512M or 20G"
    );
}

#[test]
fn names_vm_bhyve_refuses() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: bad_\nprofile: CS0\n")]),
        "vms/a.yaml:1:7: invalid VM name `bad_` | vm-bhyve accepts 2 to 231 characters: letters, digits and `.`, `_`, `-`, starting and ending with a letter or digit"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: a\nprofile: CS0\n")]),
        "vms/a.yaml:1:7: invalid VM name `a` | vm-bhyve accepts 2 to 231 characters: letters, digits and `.`, `_`, `-`, starting and ending with a letter or digit"
    );
    let long = "a".repeat(229);
    assert_eq!(
        one(&[("vms/a.yaml", &format!("name: {long}\nprofile: CS0\nevery_host: true\n"))]),
        // Issue 11, hole 8: a long value is quoted by its start, end and length.
        format!("vms/a.yaml:1:7: every_host VM name `{}…aaaaaaaaaa-host1 (235 bytes)` would be refused by vm-bhyve | vm-bhyve accepts 2 to 231 characters: letters, digits and `.`, `_`, `-`, starting and ending with a letter or digit", &long[..48]),
    );
}

#[test]
fn hop_chain_with_an_unknown_host() {
    let cluster = CLUSTER.replace("next: host2", "next: host7");
    assert_eq!(
        one(&[("cluster.yaml", &cluster)]),
        "cluster.yaml:5:11: hop chain: unknown host `host7` | next must be one of the hosts (host1, host2) or null"
    );
    let cluster = CLUSTER.replace("next: host2", "next: host1");
    assert_eq!(
        one(&[("cluster.yaml", &cluster)]),
        "cluster.yaml:5:11: host `host1` names itself as next | name another host, or null to end the hop chain here"
    );
}

#[test]
fn same_mac_address_twice() {
    assert_eq!(
        one(&[
            ("vms/a.yaml", "name: web1\nprofile: CS0\nconfig:\n  network0_mac: 58:9c:fc:00:00:01\n"),
            ("vms/b.yaml", "name: web2\nprofile: CS0\nconfig:\n  network1_mac: 58:9C:FC:00:00:01\n"),
        ]),
        "vms/b.yaml:4:17: MAC address `58:9c:fc:00:00:01` of `web2` is also used by `web1` | vms/a.yaml:4:17 claims it first; give each VM its own MAC address"
    );
}

#[test]
fn same_disk_path_twice() {
    assert_eq!(
        one(&[
            ("vms/a.yaml", "name: web1\nprofile: CS0\nconfig:\n  disk1_dev: custom\n  disk1_name: /dev/da1\n"),
            ("vms/b.yaml", "name: web2\nprofile: CS0\nconfig:\n  disk1_name: /dev/da1\n"),
        ]),
        "vms/b.yaml:4:15: disk path `/dev/da1` of `web2` is also used by `web1` | vms/a.yaml:5:15 claims it first; give each VM its own disk path"
    );
}

#[test]
fn every_host_cannot_claim_a_mac() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: mon\nprofile: CS0\nevery_host: true\nconfig:\n  network0_mac: 58:9c:fc:00:00:01\n")]),
        "vms/a.yaml:5:3: an every_host VM cannot set `network0_mac` | every host's instance would get the same value; declare the VMs one by one instead"
    );
}

#[test]
fn secret_name_with_a_path() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nsecrets:\n  - ok-key\n  - ../etc/shadow\n")]),
        "vms/a.yaml:5:5: secret name `../etc/shadow` contains a path | name the secret only (letters, digits, `.`, `_`, `-`); each host keeps its file under its own secrets directory"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nsecrets: [a, keys/b]\n")]),
        "vms/a.yaml:3:14: secret name `keys/b` contains a path | name the secret only (letters, digits, `.`, `_`, `-`); each host keeps its file under its own secrets directory"
    );
}

#[test]
fn config_keys_and_values() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nconfig:\n  Graphics: yes\n")]),
        "vms/a.yaml:4:3: invalid vm-bhyve config key `Graphics` | vm-bhyve reads keys of lower-case letters, digits and `_`, starting with a letter"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nconfig:\n  memory: 4G\n")]),
        "vms/a.yaml:4:3: config key `memory` is not set through `config` | set `memory:` at the top level of the VM file"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nconfig:\n  bhyve_options: \"-x # y\"\n")]),
        "vms/a.yaml:4:18: config value of `bhyve_options` contains '#' | vm-bhyve's config reader drops or mangles `\"`, `#`, `\\`, `$`, backquotes and control characters"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nconfig:\n  network0_mac: nope\n")]),
        "vms/a.yaml:4:17: `nope` is not a MAC address | write six hex pairs separated by `:`, e.g. 58:9c:fc:00:00:01"
    );
}

#[test]
fn pin_and_every_host_exclude_each_other() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: mon\nprofile: CS0\nhost: host1\nevery_host: true\n")]),
        "vms/a.yaml:3:1: `host` and `every_host: true` exclude each other | remove `host` to run one VM per host, or `every_host` to pin one VM"
    );
}

#[test]
fn wrong_types_and_values() {
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nstate: paused\n")]),
        "vms/a.yaml:3:8: state: unknown variant `paused`, expected `running` or `stopped` | use one of the listed values"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nprotect: yes\n")]),
        "vms/a.yaml:3:10: protect: invalid type: string \"yes\", expected a boolean | give the value the type this key expects"
    );
    assert_eq!(
        one(&[("vms/a.yaml", "profile: CS0\n")]),
        "vms/a.yaml:1:1: missing field `name` | add the missing key"
    );
}

#[test]
fn policies_are_checked() {
    let cluster = format!("{CLUSTER}policies:\n  prune_guard: 1.5\n  ttr: 0s\n");
    assert_eq!(
        errors(&[("cluster.yaml", &cluster)]),
        [
            "cluster.yaml:11:16: prune_guard 1.5 is not a share | write a number from 0 (destroy nothing without override) to 1 (no guard), e.g. 0.5",
            "cluster.yaml:12:8: ttr must be at least one second | write a duration such as 30s, 5m or 1h",
        ]
    );
    let cluster = format!("{CLUSTER}policies:\n  reconcile_interval: soon\n");
    assert_eq!(
        one(&[("cluster.yaml", &cluster)]),
        "cluster.yaml:11:23: policies.reconcile_interval: `soon` is not a duration (expected e.g. 90, 30s, 5m, 1h30m or 2d) | write a duration such as 30s, 5m or 1h"
    );
}

#[test]
fn bad_beanstalkd_address() {
    let cluster = CLUSTER.replace("127.0.0.1:11302", "127.0.0.1");
    assert_eq!(
        one(&[("cluster.yaml", &cluster)]),
        "cluster.yaml:8:17: `127.0.0.1` is not a beanstalkd address | write host:port, e.g. 10.0.0.1:11300"
    );
}

#[test]
fn missing_cluster_and_stray_files() {
    let mut set = FileSet::new();
    set.insert("vms/a.yml", "name: ab\nprofile: CS0\n");
    set.insert("vms/.gitkeep", "");
    let Err(Invalid(d)) = load(&set, None) else {
        panic!()
    };
    let got: Vec<String> = d
        .iter()
        .map(|d| format!("{}:{}:{}: {}", d.file, d.line, d.column, d.message))
        .collect();
    assert_eq!(
        got,
        [
            "cluster.yaml:1:1: missing cluster.yaml",
            "vms/a.yml:1:1: not a .yaml file"
        ]
    );
}

#[test]
fn all_errors_are_reported_together_in_file_order() {
    let e = errors(&[
        ("vms/b.yaml", "name: web2\nprofile: CS9\nhost: host9\n"),
        ("vms/a.yaml", "name: web1\nprofile: CS0\nsecrets: [x/y]\n"),
    ]);
    let places: Vec<&str> = e
        .iter()
        .map(|s| s.split(": ").next().unwrap_or(""))
        .collect();
    assert_eq!(
        places,
        ["vms/a.yaml:3:11", "vms/b.yaml:2:10", "vms/b.yaml:3:7"]
    );
}

#[test]
fn too_large_and_not_utf8() {
    let mut set = repo(&[]);
    set.insert_too_large("vms/huge.yaml", 5 << 20);
    set.insert("vms/bin.yaml", b"name: a\xff\n".to_vec());
    let Err(Invalid(d)) = load(&set, None) else {
        panic!()
    };
    assert_eq!(
        d[0].to_string(),
        "vms/bin.yaml:1:8: file is not valid UTF-8\n  hint: save the file as UTF-8"
    );
    assert_eq!(
        d[1].message,
        "file is 5242880 bytes, more than the limit of 1048576"
    );
}

#[test]
fn hostile_yaml_is_refused_quickly() {
    let start = std::time::Instant::now();
    let deep = format!(
        "name: web1\nprofile: CS0\ntags: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        one(&[("vms/a.yaml", &deep)]),
        "vms/a.yaml:3:39: nesting deeper than 32 levels | desired files are flat mappings; this looks like generated or hostile input"
    );
    let sneaky = format!(
        "name: web1\nprofile: CS0\ndescription: it's {}\n",
        "[".repeat(100_000)
    );
    assert_eq!(
        one(&[("vms/a.yaml", &sneaky)]),
        "vms/a.yaml:3:51: nesting deeper than 32 levels | desired files are flat mappings; this looks like generated or hostile input"
    );
    // A billion laughs: nine levels of ten aliases each.
    let mut bomb = String::from(
        "name: web1\nprofile: CS0\nhooks:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..9 {
        let p = i - 1;
        bomb.push_str(&format!("  a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
    }
    bomb.push_str("tags: *a8\n");
    let e = errors(&[("vms/a.yaml", &bomb)]);
    assert_eq!(e.len(), 1, "{e:?}");
    let mut block = String::from("name: web1\nprofile: CS0\ntags:\n");
    for i in 0..1000 {
        block.push_str(&" ".repeat(i + 1));
        block.push_str("-\n");
    }
    assert_eq!(errors(&[("vms/a.yaml", &block)]).len(), 1);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn templates_are_checked() {
    assert_eq!(
        one(&[("templates/x.conf", "loader=\"uefi\"\ncpu=1\n")]),
        "templates/x.conf:1:1: template has no disk0_name | vm create refuses such a template; add e.g. disk0_name=\"disk0.img\""
    );
    assert_eq!(
        one(&[("templates/x.conf", "disk0_name=\"a.img\"\ncpu=1\ncpu=2\n")]),
        "templates/x.conf:3:1: template sets `cpu` twice | vm-bhyve reads the first assignment and sysrc changes the last; keep one"
    );
}

/// Issue 11, hole 5: `host` (must run there) and `start_at` (placement starts there) are
/// two meanings with two names; they exclude each other and name known hosts.
#[test]
fn start_at_names_a_known_host_and_excludes_host() {
    let e = one(&[(
        "vms/a.yaml",
        "name: web1\nprofile: CS0\nhost: host1\nstart_at: host1\n",
    )]);
    assert!(
        e.starts_with("vms/a.yaml:4:1: `start_at` and `host`"),
        "{e}"
    );
    let e = one(&[("vms/a.yaml", "name: web1\nprofile: CS0\nstart_at: host9\n")]);
    assert!(
        e.starts_with("vms/a.yaml:3:11: unknown host `host9`"),
        "{e}"
    );
}

/// Guards issue 11, hole 4: an entry that is not a regular file is one error with its
/// path wherever it is in the desired tree, and what refers to it does not add more.
#[test]
fn entries_that_are_not_regular_files_are_errors() {
    let mut set = repo(&[
        ("vms/a.yaml", "name: a1\nprofile: big\n"),
        (
            "profiles/big.yaml",
            "cpu: 2\nmemory: 1G\ndisk: 20G\nswap: 1G\ntemplate: mine\n",
        ),
    ]);
    set.insert_not_regular("templates/mine.conf", Special::Symlink);
    set.insert_not_regular("vms/.hidden.yaml", Special::Fifo);
    set.insert_not_regular("vms/team", Special::Submodule);
    set.insert("profiles", "not a directory");
    let Err(Invalid(d)) = load(&set, None) else {
        panic!()
    };
    let got: Vec<String> = d
        .iter()
        .map(|d| format!("{}: {}", d.file, d.message))
        .collect();
    assert_eq!(
        got,
        [
            "profiles: a file where a directory belongs",
            "templates/mine.conf: a symlink, not a regular file",
            "vms/.hidden.yaml: a FIFO, not a regular file",
            "vms/team: a submodule, not a regular file",
        ]
    );
    let mut cluster = repo(&[]);
    cluster.insert_not_regular("cluster.yaml", Special::Symlink);
    let Err(Invalid(d)) = load(&cluster, None) else {
        panic!()
    };
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].file, "cluster.yaml");
}

/// A VM file whose `tags:` repeats one anchored string of `size` bytes `aliases` times.
fn alias_attack(size: usize, aliases: usize) -> String {
    let mut s = String::with_capacity(size + aliases * 6 + 64);
    s.push_str("name: web1\nprofile: CS0\ndescription: &big ");
    s.push_str(&"x".repeat(size));
    s.push_str("\ntags: [");
    for _ in 0..aliases {
        s.push_str("*big, ");
    }
    s.push_str("]\n");
    s
}

/// The longest run of `x` in `s`: how much of the attack's string an error quotes.
fn longest_x_run(s: &str) -> usize {
    s.split(|c| c != 'x').map(str::len).max().unwrap_or(0)
}

/// Guards issue 11, hole 8: one anchored 900 KB string used 1,000 times in `tags:` took
/// 33 s and 1.7 GB to refuse, and every error echoed the whole string. It is refused
/// before it is expanded, with the file, the line of the alias and a short quote.
#[test]
fn an_anchored_string_repeated_many_times_is_refused_before_it_expands() {
    const ALIASES: usize = 1_000;
    let src = alias_attack(900_000, ALIASES);
    assert!(src.len() as u64 <= MAX_FILE_SIZE);
    let start = std::time::Instant::now();
    let e = errors(&[("vms/a.yaml", &src)]);
    eprintln!(
        "{} aliases of 900 KB: {} errors in {:?}",
        ALIASES,
        e.len(),
        start.elapsed()
    );
    let longest = e.iter().map(|d| d.len()).max().unwrap_or(0);
    assert_eq!(
        e.len(),
        1,
        "{} errors, the longest {longest} bytes",
        e.len()
    );
    assert!(
        longest < 500,
        "an error of {longest} bytes: {}…",
        &e[0][..150]
    );
    assert!(
        e[0].starts_with("vms/a.yaml:4:1: aliases expand this file past "),
        "{}",
        &e[0][..longest.min(300)]
    );
    assert!(longest_x_run(&e[0]) <= 40, "{}", e[0]);
}

/// Guards issue 11, hole 8: every agent loads the same commit, so expansion spread over
/// many files, each under its own limit, is bounded for the repo as a whole.
#[test]
fn aliases_across_files_are_bounded_per_repo() {
    let mut files: Vec<(String, String)> = Vec::new();
    for i in 0..300 {
        let mut s = format!(
            "name: v{i:03}\nprofile: CS0\nhooks:\n  a: &d {}\n",
            "x".repeat(2_000)
        );
        for k in 0..8 {
            s.push_str(&format!("  b{k}: *d\n"));
        }
        files.push((format!("vms/v{i:03}.yaml"), s));
    }
    let borrowed: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, s)| (p.as_str(), s.as_str()))
        .collect();
    // Each file alone is fine.
    assert_eq!(errors(&borrowed[..1]), Vec::<String>::new());
    let e = errors(&borrowed);
    assert!(!e.is_empty());
    assert!(
        e.iter()
            .all(|d| d.contains(": aliases expand the desired repo past ")),
        "{:?}",
        e.iter().map(|d| &d[..d.len().min(200)]).collect::<Vec<_>>()
    );
    // The files before the one that crosses the limit are read; from it on, none with aliases.
    let first: usize = e[0]["vms/v".len().."vms/v".len() + 3].parse().unwrap();
    assert!(first > 100 && first < 300, "{}", e[0]);
    assert_eq!(e.len(), 300 - first);
}

proptest::proptest! {
    /// Guards issue 11, hole 8: ordinary files that use a few anchors and aliases (as
    /// profiles and VM files legitimately do) still load, to the same result as the
    /// file written out.
    #[test]
    fn a_few_aliases_still_load(
        value in "[a-z0-9]{1,60}",
        aliases in 1usize..12,
        tags in proptest::collection::vec("[a-z]{1,10}", 1..6),
    ) {
        let mut with = format!("name: web1\nprofile: CS0\ntags: &t [{}]\nhooks:\n  a: &v {value}\n", tags.join(", "));
        let mut plain = format!("name: web1\nprofile: CS0\ntags: [{}]\nhooks:\n  a: {value}\n", tags.join(", "));
        for k in 0..aliases {
            with.push_str(&format!("  b{k}: *v\n"));
            plain.push_str(&format!("  b{k}: {value}\n"));
        }
        let snap = load(&repo(&[("vms/web.yaml", &with)]), None);
        let want = load(&repo(&[("vms/web.yaml", &plain)]), None);
        proptest::prop_assert!(snap.is_ok(), "{:?}", snap);
        proptest::prop_assert_eq!(snap, want);
        let profile = format!("cpu: &n 2\nmemory: 1G\ndisk: 20G\nswap: 1G\ntemplate: CS0\ndescription: &d {value}\n");
        proptest::prop_assert!(load(&repo(&[("profiles/p.yaml", &profile)]), None).is_ok());
    }
}

/// Guards issue 11, hole 8: a number written with thousands of digits is one small value
/// to the walk that counts, but a string of all its digits to a field that reads text; it
/// is counted by the length of its text, so repeating it cannot slip past the bound.
#[test]
fn a_long_number_repeated_is_counted_by_its_text() {
    let mut src = format!(
        "name: web1\nprofile: CS0\ndescription: &n 1.{}\nhooks:\n",
        "0".repeat(10_000)
    );
    for i in 0..40 {
        src.push_str(&format!("  h{i}: *n\n"));
    }
    let e = one(&[("vms/a.yaml", &src)]);
    assert!(
        e.starts_with("vms/a.yaml:9:3: aliases expand this file past "),
        "{e}"
    );
    assert!(
        e.contains("at `hooks.h4`; the repeated value is at line 3"),
        "{e}"
    );
}

/// Guards issue 11, hole 8: what an error quotes of the YAML is at most a few dozen
/// characters, also in the YAML library's own messages.
#[test]
fn errors_quote_at_most_a_few_dozen_characters() {
    let long = "y".repeat(5_000);
    let e = one(&[(
        "vms/a.yaml",
        &format!("name: web1\nprofile: CS0\ncpu: {long}\n"),
    )]);
    assert!(e.len() < 400, "{e}");
    assert!(e.contains(" (5000 bytes)"), "{e}");
    let e = one(&[(
        "vms/a.yaml",
        &format!("name: web1\nprofile: CS0\n{long}: 1\n"),
    )]);
    assert!(e.len() < 600, "{e}");
    assert_eq!(super::diag::quote("short"), "short");
}
