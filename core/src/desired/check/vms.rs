//! VM files: each checked alone (in parallel when there are many), then what must be
//! unique across them: names, MAC addresses, disk paths.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::size::Size;

use super::super::diag::Diagnostic;
use super::super::locate;
use super::super::rules;
use super::super::schema::RawVm;
use super::super::spec::{Host, Profile, Template, VmSpec};
use super::super::yaml::parse_one;
use super::join;

/// Below this many VM files, parsing on one thread is faster than starting others.
const PARALLEL_THRESHOLD: usize = 512;

pub(crate) struct VmCtx<'a> {
    pub hosts: &'a BTreeMap<String, Host>,
    pub profiles: &'a BTreeMap<String, Profile>,
    pub broken_profiles: &'a BTreeSet<String>,
    pub templates: &'a BTreeMap<String, Template>,
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

pub(crate) fn vms<'a>(
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
            Err(d) => out.diags.extend(d),
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
