//! The agent's own configuration file: who this host is and where things are.
//!
//! YAML, parsed strictly (unknown keys are errors, with line and column). A bad file is
//! reported and the agent exits 78 (`EX_CONFIG`), which supervisord is told not to
//! restart: restarting cannot fix a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::desired::parse_duration;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse or has a bad value.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Parsed, but a value cannot work.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A duration in the config: `250ms`, `30s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).ok_or_else(|| {
            serde::de::Error::custom(format_args!(
                "`{s}` is not a duration (write e.g. 250ms, 30s, 5m or 1h30m)"
            ))
        })
    }
}

/// Where the desired repo is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredConfig {
    /// A local path, file://, ssh:// or https:// URL.
    pub url: String,
    /// The branch to follow.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// How often to fetch without a trigger; default: cluster.yaml's
    /// `policies.reconcile_interval`.
    #[serde(default)]
    pub poll_interval: Option<Dur>,
    /// Watch a local repo for commits (a file-system watch); off leaves the interval and
    /// triggers.
    #[serde(default = "yes")]
    pub watch: bool,
}

fn yes() -> bool {
    true
}

/// The default message window: three hours.
pub fn default_window() -> Dur {
    Dur(Duration::from_secs(3 * 3600))
}

/// The default clock skew the hosts may have: a few seconds, which NTP keeps to well
/// under one.
pub fn default_max_clock_skew() -> Dur {
    Dur(Duration::from_secs(5))
}

/// The largest `max_clock_skew` accepted: well under the grace a create's deadline gets
/// on its owner ([`super::decide::DEADLINE_GRACE`]), so a worker whose clock is behind
/// never builds a create its owner has given up on.
pub const MAX_CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(30);

fn default_branch() -> String {
    "main".into()
}

/// How to reach vm-bhyve.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The `vm` command.
    #[serde(default = "default_vm")]
    pub vm_command: PathBuf,
    /// The `sysrc` command.
    #[serde(default = "default_sysrc")]
    pub sysrc_command: PathBuf,
    /// The simulator's `vm_dir` (sets `VM_SIM_DIR`); only for `vm-sim`.
    #[serde(default)]
    pub sim_dir: Option<PathBuf>,
    /// How long a guest may take to start.
    #[serde(default)]
    pub start_timeout: Option<Dur>,
    /// Pause between two looks at `vm list` while waiting for a guest.
    #[serde(default)]
    pub poll_interval: Option<Dur>,
    /// How long the agent keeps a listing of its VMs while neither it nor the watch of
    /// the vm_dir sees a change (default 5m; 0s lists every time).
    #[serde(default)]
    pub list_interval: Option<Dur>,
}

fn default_vm() -> PathBuf {
    "/usr/local/sbin/vm".into()
}
fn default_sysrc() -> PathBuf {
    "/usr/sbin/sysrc".into()
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            vm_command: default_vm(),
            sysrc_command: default_sysrc(),
            sim_dir: None,
            start_timeout: None,
            poll_interval: None,
            list_interval: None,
        }
    }
}

/// How the worker runs jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Creates built at once on this host.
    #[serde(default = "default_max_creates")]
    pub max_creates: usize,
    /// Tries of a failing job before it is buried.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Longest a hook may run.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: Dur,
    /// How long a guest may take to shut down before it is powered off.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Dur,
    /// How long the owner waits before planning again a create that came back
    /// unplaceable or failed (a new spec retries at once).
    #[serde(default = "default_retry_failed")]
    pub retry_failed: Dur,
    /// First backoff after a failure; doubled at each further try.
    #[serde(default = "default_backoff")]
    pub backoff: Dur,
    /// How long the owner waits for a create's result before it may plan it again
    /// (if no inventory shows the VM).
    #[serde(default = "default_create_deadline")]
    pub create_deadline: Dur,
}

fn default_max_creates() -> usize {
    2
}
fn default_retries() -> u32 {
    3
}
fn default_hook_timeout() -> Dur {
    Dur(Duration::from_secs(30 * 60))
}
fn default_stop_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_retry_failed() -> Dur {
    Dur(Duration::from_secs(600))
}
fn default_backoff() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_create_deadline() -> Dur {
    Dur(Duration::from_secs(2 * 3600))
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_creates: default_max_creates(),
            retries: default_retries(),
            hook_timeout: default_hook_timeout(),
            stop_timeout: default_stop_timeout(),
            retry_failed: default_retry_failed(),
            backoff: default_backoff(),
            create_deadline: default_create_deadline(),
        }
    }
}

/// Thresholds past which the host forwards creates even with room under its limits.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverloadConfig {
    /// Share (0..1) of the memory limit in use by running guests.
    #[serde(default)]
    pub memory_in_use: Option<f64>,
    /// A file the host probe writes (one `key value` per line: `memory_in_use 0.93`,
    /// `net_bytes 12345`, rctl values); `None` reads nothing but the VMs.
    #[serde(default)]
    pub probe_file: Option<PathBuf>,
    /// Network bytes per second past which the host counts as overloaded.
    #[serde(default)]
    pub net_bytes: Option<u64>,
}

/// How the agent logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Which host picks a create's first hop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstHop {
    /// The owner itself (cloud-machine's default).
    #[default]
    Owner,
    /// The host whose inventory shows the most free memory.
    LeastLoaded,
    /// The host whose beanstalkd answered fastest.
    LowestLatency,
}

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in cluster.yaml.
    pub host: String,
    /// The desired repo.
    pub desired: DesiredConfig,
    /// This host's beanstalkd; default: its address in cluster.yaml.
    #[serde(default)]
    pub beanstalkd: Option<String>,
    /// vm-bhyve.
    #[serde(default)]
    pub backend: BackendConfig,
    /// Intents, event log, cached desired repo.
    pub state_dir: PathBuf,
    /// The cluster key file (HMAC-SHA256; see [`crate::auth`]).
    pub key_file: PathBuf,
    /// Messages sent longer ago than this (or this far in the future) are refused.
    #[serde(default = "default_window")]
    pub message_window: Dur,
    /// The most the hosts' clocks may disagree (default 5 s, at most
    /// [`MAX_CLOCK_SKEW_LIMIT`]): deadlines are set by one host's clock and checked by
    /// another's. A peer's inventory stamped further ahead of this host's clock, or a
    /// peer reporting such a skew itself, stops this host sending creates until it is
    /// back within it.
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew: Dur,
    /// `pre.sh`, `local.sh`, `post.sh`.
    #[serde(default)]
    pub hooks_dir: Option<PathBuf>,
    /// The guest builder run on create instead of the hooks (it runs them itself):
    /// `host/provision/provision.sh` on FreeBSD.
    #[serde(default)]
    pub provision: Option<PathBuf>,
    /// One file per secret name.
    #[serde(default)]
    pub secrets_dir: Option<PathBuf>,
    /// The worker.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Overload thresholds.
    #[serde(default)]
    pub overload: OverloadConfig,
    /// How the owner picks a create's first hop.
    #[serde(default)]
    pub first_hop: FirstHop,
    /// `/metrics`, `/healthz` and the status page on this address (loopback): an
    /// `IP:PORT`, or a bare port for `127.0.0.1:PORT`; off when absent.
    #[serde(default, deserialize_with = "http_addr")]
    pub http: Option<SocketAddr>,
    /// Log format.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// `http:` as an address or a bare port on the IPv4 loopback.
fn http_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Http {
        Port(u16),
        Addr(SocketAddr),
    }
    Ok(
        match <Option<Http> as serde::Deserialize>::deserialize(d)? {
            None => None,
            Some(Http::Port(p)) => Some(SocketAddr::from(([127, 0, 0, 1], p))),
            Some(Http::Addr(a)) => Some(a),
        },
    )
}

impl AgentConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AgentConfig::parse(path, &text)
    }

    /// Parses and checks `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                // The position is in the error's own prefix already.
                message: crate::desired::strip_marks(&e.to_string()),
            }
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if cfg.host.is_empty() {
            return Err(invalid("`host` is empty".into()));
        }
        if cfg.worker.max_creates == 0 {
            return Err(invalid("`worker.max_creates` must be at least 1".into()));
        }
        if let Some(addr) = cfg.http {
            if !addr.ip().is_loopback() {
                return Err(invalid(format!(
                    "`http: {addr}` is not a loopback address; /metrics is served on loopback only (put a proxy in front to expose it)"
                )));
            }
        }
        if cfg.max_clock_skew.0 > MAX_CLOCK_SKEW_LIMIT {
            return Err(invalid(format!(
                "`max_clock_skew` must be at most {}s: deadlines have {}s of grace",
                MAX_CLOCK_SKEW_LIMIT.as_secs(),
                super::decide::DEADLINE_GRACE
            )));
        }
        if let Some(share) = cfg.overload.memory_in_use {
            if !(0.0..=1.0).contains(&share) {
                return Err(invalid(format!(
                    "`overload.memory_in_use: {share}` must be between 0 and 1"
                )));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_gets_the_defaults() {
        let cfg = AgentConfig::parse(
            Path::new("agent.yaml"),
            "host: host1\ndesired: {url: /srv/desired}\nstate_dir: /var/db/flotilla\nkey_file: /k\n",
        )
        .unwrap();
        assert_eq!(cfg.desired.branch, "main");
        assert_eq!(cfg.worker.max_creates, 2);
        assert_eq!(cfg.backend.vm_command, PathBuf::from("/usr/local/sbin/vm"));
        assert_eq!(cfg.first_hop, FirstHop::Owner);
        assert!(cfg.http.is_none());
    }

    /// Guards issue 14, case 4: the skew the cluster runs with must stay within the
    /// grace a create's deadline has, or a worker behind could build a create its owner
    /// gave up on.
    #[test]
    fn the_clock_skew_defaults_to_a_few_seconds_and_is_bounded() {
        let base = "host: h\ndesired: {url: x}\nstate_dir: /s\nkey_file: /k\n";
        let cfg = AgentConfig::parse(Path::new("agent.yaml"), base).unwrap();
        assert_eq!(cfg.max_clock_skew.0, Duration::from_secs(5));
        let e = AgentConfig::parse(
            Path::new("agent.yaml"),
            &format!("{base}max_clock_skew: 2m\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`max_clock_skew` must be at most 30s"), "{e}");
    }

    /// Guards issue 15, conventions (durations as operators write them in agent.yaml).
    #[test]
    fn durations_in_agent_yaml_as_operators_write_them() {
        let cfg = AgentConfig::parse(
            Path::new("agent.yaml"),
            "host: h\ndesired: {url: x, poll_interval: 1h30m}\nstate_dir: /s\nkey_file: /k\n",
        )
        .unwrap();
        assert_eq!(
            cfg.desired.poll_interval.map(|d| d.0),
            Some(Duration::from_secs(5400))
        );
    }

    /// Guards the shipped sample against drifting from the parser.
    #[test]
    fn the_shipped_sample_parses() {
        let text = include_str!("../../../host/agent.yaml.sample");
        let cfg = AgentConfig::parse(Path::new("host/agent.yaml.sample"), text).unwrap();
        assert_eq!(cfg.host, "host1");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_place() {
        let e = AgentConfig::parse(
            Path::new("agent.yaml"),
            "host: host1\ndesired: {url: x}\nstate_dir: /s\nkey_file: /k\nworkr: {}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("agent.yaml:5:1: unknown field `workr`"),
            "{e}"
        );
        let e = AgentConfig::parse(
            Path::new("agent.yaml"),
            "host: h\ndesired: {url: x, poll_interval: soon}\nstate_dir: /s\nkey_file: /k\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`soon` is not a duration"), "{e}");
        let e = AgentConfig::parse(
            Path::new("agent.yaml"),
            "host: h\ndesired: {url: x}\nstate_dir: /s\nkey_file: /k\nhttp: 0.0.0.0:9108\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a loopback address"), "{e}");
    }

    /// Guards issue 15 (metrics served loopback by default): a bare port binds the
    /// loopback address, and an address is taken as given.
    #[test]
    fn http_takes_a_port_for_loopback_or_an_address() {
        let parse = |http: &str| {
            AgentConfig::parse(
                Path::new("agent.yaml"),
                &format!(
                    "host: h\ndesired: {{url: x}}\nstate_dir: /s\nkey_file: /k\nhttp: {http}\n"
                ),
            )
            .map(|c| c.http)
        };
        assert_eq!(
            parse("9108").unwrap(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9108)))
        );
        assert_eq!(parse("\"[::1]:9108\"").unwrap(), "[::1]:9108".parse().ok());
        assert_eq!(parse("null").unwrap(), None);
    }
}
