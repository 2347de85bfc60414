//! Plans and validation results for people (in the style of `terraform plan`) and for
//! programs (JSON with a `format_version`).
//!
//! Text marks: `+` create, `-` destroy, `~` change in place (update, grow a disk, start,
//! stop), `-/+` replace, `!` blocked, `*` already in flight. Colours are the caller's
//! choice ([`Style`]); the CLI turns them on only on a terminal without `NO_COLOR`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::desired::{DesiredState, Diagnostic, Snapshot};
use crate::planner::{Action, Change, HostPlan, InFlight, Plan, Summary};

/// The version of the JSON documents below; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// How to draw text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Use ANSI colours.
    pub color: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn green(self, t: &str) -> String {
        self.paint("32", t)
    }
    fn red(self, t: &str) -> String {
        self.paint("31", t)
    }
    fn yellow(self, t: &str) -> String {
        self.paint("33", t)
    }
    fn cyan(self, t: &str) -> String {
        self.paint("36", t)
    }
    fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }
}

/// `text` with every control character but the line break written as an escape
/// (`\u{1b}`), and the bidirectional overrides too: names, paths and messages come from
/// outside (a desired repo, another host) and must not move the cursor, clear the
/// screen or reorder what a terminal shows. On a colour terminal the colour sequences
/// [`Style`] draws are kept.
pub fn escape_controls(text: &str, style: Style) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if style.color && c == '\x1b' {
            if let Some(len) = sgr_len(rest) {
                out.push_str(&rest[..len]);
                rest = &rest[len..];
                continue;
            }
        }
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\n') || bidi {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The length of one of [`Style`]'s own colour sequences at the start of `s`.
fn sgr_len(s: &str) -> Option<usize> {
    [
        "\x1b[0m", "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m",
    ]
    .iter()
    .find(|seq| s.starts_with(**seq))
    .map(|seq| seq.len())
}

fn short(commit: Option<&str>) -> String {
    match commit {
        Some(c) => c.chars().take(12).collect(),
        None => "(work tree)".to_string(),
    }
}

/// `key="value"` lines, sorted, as vm-bhyve would read them back.
fn conf_text(config: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (k, v) in config {
        let _ = writeln!(s, "{k}=\"{v}\"");
    }
    s
}

/// The config before `changes`, given the config after them.
fn before(after: &BTreeMap<String, String>, changes: &[Change]) -> BTreeMap<String, String> {
    let mut b = after.clone();
    for c in changes {
        match &c.from {
            Some(f) => b.insert(c.key.clone(), f.clone()),
            None => b.remove(&c.key),
        };
    }
    b
}

fn diff(
    out: &mut String,
    style: Style,
    vm: &str,
    after: &BTreeMap<String, String>,
    changes: &[Change],
) {
    if changes.is_empty() {
        return;
    }
    let old = conf_text(&before(after, changes));
    let new = conf_text(after);
    let d = similar::TextDiff::from_lines(&old, &new);
    let text = d
        .unified_diff()
        .context_radius(2)
        .header(&format!("actual/{vm}.conf"), &format!("desired/{vm}.conf"))
        .to_string();
    for line in text.lines() {
        let painted = if line.starts_with("+++") || line.starts_with("---") {
            style.bold(line)
        } else if line.starts_with('+') {
            style.green(line)
        } else if line.starts_with('-') {
            style.red(line)
        } else if line.starts_with("@@") {
            style.cyan(line)
        } else {
            line.to_string()
        };
        let _ = writeln!(out, "        {painted}");
    }
}

fn action(out: &mut String, style: Style, a: &Action) {
    match a {
        Action::Create {
            vm,
            owner,
            resume,
            spec,
            ..
        } => {
            let state = match spec.state {
                DesiredState::Running => "running",
                DesiredState::Stopped => "stopped",
            };
            let _ = writeln!(
                out,
                "  {} create {}{} ({}: {} cpu, {} memory, {} disk, template {}; {state}; owner {owner})",
                style.green("+"),
                style.bold(vm),
                if *resume { " (finish a half-made create)" } else { "" },
                spec.profile,
                spec.cpu,
                spec.memory,
                spec.disk,
                spec.template,
            );
        }
        Action::Update {
            vm,
            changes,
            protect,
            autostart,
            restart,
            config,
            ..
        } => {
            let mut notes = Vec::new();
            if *restart {
                notes.push("restart".to_string());
            }
            if let Some(p) = protect {
                notes.push(format!("protect: {p}"));
            }
            match autostart {
                Some(true) => notes.push("add to vm_list".to_string()),
                Some(false) => notes.push("remove from vm_list".to_string()),
                None => {}
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join(", "))
            };
            let _ = writeln!(
                out,
                "  {} update {}{notes}",
                style.yellow("~"),
                style.bold(vm)
            );
            diff(out, style, vm, config, changes);
        }
        Action::GrowDisk {
            vm,
            disk,
            from,
            to,
            restart,
            ..
        } => {
            let _ = writeln!(
                out,
                "  {} grow {} {disk}: {from} -> {to}{}",
                style.yellow("~"),
                style.bold(vm),
                if *restart { " (restart)" } else { "" }
            );
        }
        Action::Replace {
            vm,
            owner,
            reasons,
            changes,
            spec,
            ..
        } => {
            let _ = writeln!(
                out,
                "  {} replace {} ({}; rebuilt via owner {owner})",
                style.red("-/+"),
                style.bold(vm),
                reasons.join("; ")
            );
            diff(out, style, vm, &spec.config, changes);
        }
        Action::Start { vm, .. } => {
            let _ = writeln!(out, "  {} start {}", style.yellow("~"), style.bold(vm));
        }
        Action::Stop { vm, .. } => {
            let _ = writeln!(out, "  {} stop {}", style.yellow("~"), style.bold(vm));
        }
        Action::Destroy { vm, running, .. } => {
            let _ = writeln!(
                out,
                "  {} destroy {}{}",
                style.red("-"),
                style.bold(vm),
                if *running { " (stopped first)" } else { "" }
            );
        }
    }
}

fn host(out: &mut String, style: Style, h: &HostPlan) {
    let _ = writeln!(out, "{}:", style.bold(&h.host));
    for a in &h.actions {
        action(out, style, a);
    }
    for b in &h.blocked {
        let reason = serde_json::to_value(b.reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} {} blocked ({reason}): {}",
            style.red("!"),
            style.bold(&b.vm),
            b.detail
        );
    }
    out.push('\n');
}

fn kind_name(f: &InFlight) -> String {
    serde_json::to_value(f.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The summary line.
pub fn summary_line(s: &Summary) -> String {
    format!(
        "Plan: {} to create, {} to update, {} to replace, {} to destroy, {} to start, {} to stop, {} disk{} to grow; {} blocked, {} in flight.",
        s.create,
        s.update,
        s.replace,
        s.destroy,
        s.start,
        s.stop,
        s.grow_disk,
        if s.grow_disk == 1 { "" } else { "s" },
        s.blocked,
        s.pending
    )
}

/// The plan as text.
pub fn plan_text(plan: &Plan, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Plan for cluster {} at {}\n",
        plan.cluster,
        short(plan.commit.as_deref())
    );
    for w in &plan.warnings {
        let _ = writeln!(out, "{} {w}", style.yellow("warning:"));
    }
    if !plan.warnings.is_empty() {
        out.push('\n');
    }
    for h in &plan.hosts {
        host(&mut out, style, h);
    }
    if !plan.pending.is_empty() {
        let _ = writeln!(out, "in flight (not planned again):");
        for f in &plan.pending {
            let _ = writeln!(
                out,
                "  {} {} {}{}",
                style.cyan("*"),
                kind_name(f),
                style.bold(&f.vm),
                f.host
                    .as_ref()
                    .map(|h| format!(" (sent to {h})"))
                    .unwrap_or_default()
            );
        }
        out.push('\n');
    }
    if plan.has_changes() {
        let _ = writeln!(out, "{}", style.bold(&summary_line(&plan.summary())));
    } else {
        let _ = writeln!(
            out,
            "{} The hosts match the desired state{}.",
            style.green("No changes."),
            if plan.pending.is_empty() {
                ""
            } else {
                " apart from jobs in flight"
            }
        );
    }
    out
}

#[derive(Serialize)]
struct PlanJson<'a> {
    format_version: u32,
    cluster: &'a str,
    commit: Option<&'a str>,
    changes: bool,
    summary: Summary,
    hosts: &'a [HostPlan],
    pending: &'a [InFlight],
    warnings: &'a [String],
}

/// The plan as JSON (one document, pretty-printed).
pub fn plan_json(plan: &Plan) -> String {
    let doc = PlanJson {
        format_version: FORMAT_VERSION,
        cluster: &plan.cluster,
        commit: plan.commit.as_deref(),
        changes: plan.has_changes(),
        summary: plan.summary(),
        hosts: &plan.hosts,
        pending: &plan.pending,
        warnings: &plan.warnings,
    };
    // Plain structs, strings and maps with string keys always serialize.
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// A validation outcome as text: a one-line success, or every error with its hint.
pub fn validation_text(result: &Result<Snapshot, Vec<Diagnostic>>, style: Style) -> String {
    match result {
        Ok(s) => format!(
            "{} cluster {} at {}: {} hosts, {} VMs, {} profiles, {} templates\n",
            style.green("valid:"),
            s.cluster.id,
            short(s.commit.as_deref()),
            s.cluster.hosts.len(),
            s.vms.len(),
            s.profiles.len(),
            s.templates.len()
        ),
        Err(diags) => {
            let mut out = String::new();
            for d in diags {
                let _ = writeln!(
                    out,
                    "{} {}:{}:{}: {}\n  {} {}",
                    style.red("error:"),
                    d.file,
                    d.line,
                    d.column,
                    d.message,
                    style.cyan("hint:"),
                    d.hint
                );
            }
            let _ = writeln!(
                out,
                "{} error{} in the desired state",
                diags.len(),
                if diags.len() == 1 { "" } else { "s" }
            );
            out
        }
    }
}

#[derive(Serialize)]
struct ValidationJson<'a> {
    format_version: u32,
    valid: bool,
    cluster: Option<&'a str>,
    commit: Option<&'a str>,
    hosts: usize,
    vms: usize,
    errors: &'a [Diagnostic],
}

/// A validation outcome as JSON. `commit` labels an invalid snapshot too.
pub fn validation_json(result: &Result<Snapshot, Vec<Diagnostic>>, commit: Option<&str>) -> String {
    let doc = match result {
        Ok(s) => ValidationJson {
            format_version: FORMAT_VERSION,
            valid: true,
            cluster: Some(&s.cluster.id),
            commit: s.commit.as_deref(),
            hosts: s.cluster.hosts.len(),
            vms: s.vms.len(),
            errors: &[],
        },
        Err(d) => ValidationJson {
            format_version: FORMAT_VERSION,
            valid: false,
            cluster: None,
            commit,
            hosts: 0,
            vms: 0,
            errors: d,
        },
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Kind;

    fn update_plan() -> Plan {
        let config: BTreeMap<String, String> =
            [("cpu", "4"), ("loader", "bhyveload"), ("memory", "1G")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        Plan {
            commit: Some("0123456789abcdef".into()),
            cluster: "lab".into(),
            hosts: vec![HostPlan {
                host: "host1".into(),
                actions: vec![
                    Action::Update {
                        host: "host1".into(),
                        vm: "web1".into(),
                        changes: vec![
                            Change {
                                key: "cpu".into(),
                                from: Some("2".into()),
                                to: Some("4".into()),
                            },
                            Change {
                                key: "graphics".into(),
                                from: Some("yes".into()),
                                to: None,
                            },
                        ],
                        protect: None,
                        autostart: None,
                        restart: true,
                        spec_hash: "h".into(),
                        config,
                    },
                    Action::Destroy {
                        host: "host1".into(),
                        vm: "old".into(),
                        running: true,
                    },
                ],
                blocked: vec![],
            }],
            pending: vec![InFlight {
                vm: "new1".into(),
                kind: Kind::Create,
                host: Some("host2".into()),
            }],
            warnings: vec![],
        }
    }

    #[test]
    fn text_shows_a_unified_diff_and_a_summary() {
        let text = plan_text(&update_plan(), Style::default());
        assert_eq!(
            text,
            "\
Plan for cluster lab at 0123456789ab

host1:
  ~ update web1 (restart)
        --- actual/web1.conf
        +++ desired/web1.conf
        @@ -1,4 +1,3 @@
        -cpu=\"2\"
        -graphics=\"yes\"
        +cpu=\"4\"
         loader=\"bhyveload\"
         memory=\"1G\"
  - destroy old (stopped first)

in flight (not planned again):
  * create new1 (sent to host2)

Plan: 0 to create, 1 to update, 0 to replace, 1 to destroy, 0 to start, 0 to stop, 0 disks to grow; 0 blocked, 1 in flight.
"
        );
        assert!(!text.contains('\x1b'));
        assert!(
            plan_text(&update_plan(), Style { color: true }).contains("\x1b[32m+cpu=\"4\"\x1b[0m")
        );
    }

    #[test]
    fn json_has_a_format_version() {
        let v: serde_json::Value = serde_json::from_str(&plan_json(&update_plan())).unwrap();
        assert_eq!(v["format_version"], 1);
        assert_eq!(v["changes"], true);
        assert_eq!(v["summary"]["update"], 1);
        assert_eq!(v["hosts"][0]["actions"][0]["action"], "update");
        assert_eq!(v["hosts"][0]["actions"][1]["action"], "destroy");
    }
}

#[cfg(test)]
mod escape_tests {
    use super::*;

    /// Guards issue 15, conventions (control characters escaped on output).
    #[test]
    fn control_characters_are_escaped_and_own_colours_kept() {
        let plain = Style { color: false };
        assert_eq!(
            escape_controls("a\x1b[2Jb\tc\u{202e}d\n", plain),
            "a\\u{1b}[2Jb\\u{9}c\\u{202e}d\n"
        );
        let color = Style { color: true };
        let painted = color.red("x");
        assert_eq!(escape_controls(&painted, color), painted);
        assert_eq!(escape_controls(&painted, plain), "\\u{1b}[31mx\\u{1b}[0m");
        assert_eq!(
            escape_controls("\x1b]0;title\x07", color),
            "\\u{1b}]0;title\\u{7}"
        );
    }
}
