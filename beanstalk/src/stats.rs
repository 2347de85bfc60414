//! Typed views of the YAML bodies of `stats`, `stats-tube`, `stats-job` and the tube lists.
//!
//! beanstalkd writes these bodies with `printf`, one `key: value` per line after `---`,
//! so a line parser is exact and avoids pulling a YAML library into a queue client. Keys
//! a newer server adds are kept in `extra` rather than dropped or refused.

use std::collections::BTreeMap;

/// A stats body that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stats answer: {0}")]
pub struct StatsError(pub String);

/// Splits a stats body into its `key: value` pairs (quotes around values removed).
fn pairs(body: &[u8]) -> Result<BTreeMap<String, String>, StatsError> {
    let text = std::str::from_utf8(body).map_err(|_| StatsError("not UTF-8".into()))?;
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line == "---" {
            continue;
        }
        let (k, v) = line
            .split_once(": ")
            .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
            .ok_or_else(|| StatsError(format!("line {line:?} is not `key: value`")))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        map.insert(k.to_string(), v.to_string());
    }
    Ok(map)
}

/// Reads only `max-job-size` from a `stats` body.
pub fn max_job_size(body: &[u8]) -> Result<u64, StatsError> {
    take(&mut pairs(body)?, "max-job-size")
}

/// Parses the YAML list body of `list-tubes` and `list-tubes-watched`.
pub fn parse_list(body: &[u8]) -> Result<Vec<String>, StatsError> {
    let text = std::str::from_utf8(body).map_err(|_| StatsError("not UTF-8".into()))?;
    text.lines()
        .filter(|l| !l.is_empty() && *l != "---")
        .map(|l| {
            l.strip_prefix("- ")
                .map(str::to_string)
                .ok_or_else(|| StatsError(format!("line {l:?} is not a list item")))
        })
        .collect()
}

fn take<T: std::str::FromStr>(
    map: &mut BTreeMap<String, String>,
    key: &str,
) -> Result<T, StatsError> {
    let v = map
        .remove(key)
        .ok_or_else(|| StatsError(format!("missing key `{key}`")))?;
    v.parse()
        .map_err(|_| StatsError(format!("key `{key}` has value {v:?} of the wrong type")))
}

/// Declares a stats struct whose fields are read from the named keys.
macro_rules! stats_struct {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty = $key:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// Keys this client does not know (from a newer server).
            pub extra: BTreeMap<String, String>,
        }

        impl $name {
            /// Parses the body of the answer.
            pub fn parse(body: &[u8]) -> Result<$name, StatsError> {
                let mut map = pairs(body)?;
                Ok($name {
                    $($field: take(&mut map, $key)?,)*
                    extra: map,
                })
            }
        }
    };
}

stats_struct! {
    /// The answer to `stats-job <id>`.
    JobStats {
        /// The job id.
        id: u64 = "id",
        /// The tube holding the job.
        tube: String = "tube",
        /// `ready`, `delayed`, `reserved` or `buried`.
        state: String = "state",
        /// Priority.
        pri: u32 = "pri",
        /// Seconds since the put.
        age: u64 = "age",
        /// Delay given at put or release.
        delay: u64 = "delay",
        /// Time to run, in seconds.
        ttr: u64 = "ttr",
        /// Seconds left until a reserved or delayed job changes state.
        time_left: u64 = "time-left",
        /// Binlog file holding the job (0 without binlog).
        file: u64 = "file",
        /// Times reserved.
        reserves: u64 = "reserves",
        /// Times its TTR ran out.
        timeouts: u64 = "timeouts",
        /// Times released.
        releases: u64 = "releases",
        /// Times buried.
        buries: u64 = "buries",
        /// Times kicked.
        kicks: u64 = "kicks",
    }
}

stats_struct! {
    /// The answer to `stats-tube <tube>`.
    TubeStats {
        /// The tube's name.
        name: String = "name",
        /// Ready jobs with priority below 1024.
        current_jobs_urgent: u64 = "current-jobs-urgent",
        /// Ready jobs.
        current_jobs_ready: u64 = "current-jobs-ready",
        /// Reserved jobs.
        current_jobs_reserved: u64 = "current-jobs-reserved",
        /// Delayed jobs.
        current_jobs_delayed: u64 = "current-jobs-delayed",
        /// Buried jobs.
        current_jobs_buried: u64 = "current-jobs-buried",
        /// Jobs ever created in the tube.
        total_jobs: u64 = "total-jobs",
        /// Connections using the tube.
        current_using: u64 = "current-using",
        /// Connections waiting in a reserve on the tube.
        current_waiting: u64 = "current-waiting",
        /// Connections watching the tube.
        current_watching: u64 = "current-watching",
        /// Seconds the tube was paused for.
        pause: u64 = "pause",
        /// `delete` commands on the tube.
        cmd_delete: u64 = "cmd-delete",
        /// `pause-tube` commands on the tube.
        cmd_pause_tube: u64 = "cmd-pause-tube",
        /// Seconds until the pause ends.
        pause_time_left: u64 = "pause-time-left",
    }
}

stats_struct! {
    /// The answer to `stats`: the whole server.
    ServerStats {
        /// Ready jobs with priority below 1024.
        current_jobs_urgent: u64 = "current-jobs-urgent",
        /// Ready jobs.
        current_jobs_ready: u64 = "current-jobs-ready",
        /// Reserved jobs.
        current_jobs_reserved: u64 = "current-jobs-reserved",
        /// Delayed jobs.
        current_jobs_delayed: u64 = "current-jobs-delayed",
        /// Buried jobs.
        current_jobs_buried: u64 = "current-jobs-buried",
        /// `put` commands.
        cmd_put: u64 = "cmd-put",
        /// `peek` commands.
        cmd_peek: u64 = "cmd-peek",
        /// `peek-ready` commands.
        cmd_peek_ready: u64 = "cmd-peek-ready",
        /// `peek-delayed` commands.
        cmd_peek_delayed: u64 = "cmd-peek-delayed",
        /// `peek-buried` commands.
        cmd_peek_buried: u64 = "cmd-peek-buried",
        /// `reserve` commands.
        cmd_reserve: u64 = "cmd-reserve",
        /// `reserve-with-timeout` commands.
        cmd_reserve_with_timeout: u64 = "cmd-reserve-with-timeout",
        /// `touch` commands.
        cmd_touch: u64 = "cmd-touch",
        /// `use` commands.
        cmd_use: u64 = "cmd-use",
        /// `watch` commands.
        cmd_watch: u64 = "cmd-watch",
        /// `ignore` commands.
        cmd_ignore: u64 = "cmd-ignore",
        /// `delete` commands.
        cmd_delete: u64 = "cmd-delete",
        /// `release` commands.
        cmd_release: u64 = "cmd-release",
        /// `bury` commands.
        cmd_bury: u64 = "cmd-bury",
        /// `kick` commands.
        cmd_kick: u64 = "cmd-kick",
        /// `stats` commands.
        cmd_stats: u64 = "cmd-stats",
        /// `stats-job` commands.
        cmd_stats_job: u64 = "cmd-stats-job",
        /// `stats-tube` commands.
        cmd_stats_tube: u64 = "cmd-stats-tube",
        /// `list-tubes` commands.
        cmd_list_tubes: u64 = "cmd-list-tubes",
        /// `list-tube-used` commands.
        cmd_list_tube_used: u64 = "cmd-list-tube-used",
        /// `list-tubes-watched` commands.
        cmd_list_tubes_watched: u64 = "cmd-list-tubes-watched",
        /// `pause-tube` commands.
        cmd_pause_tube: u64 = "cmd-pause-tube",
        /// Times a reserved job's TTR ran out.
        job_timeouts: u64 = "job-timeouts",
        /// Jobs created since start.
        total_jobs: u64 = "total-jobs",
        /// Largest body the server accepts, in bytes.
        max_job_size: u64 = "max-job-size",
        /// Tubes that exist.
        current_tubes: u64 = "current-tubes",
        /// Open connections.
        current_connections: u64 = "current-connections",
        /// Connections that have put a job.
        current_producers: u64 = "current-producers",
        /// Connections that have reserved a job.
        current_workers: u64 = "current-workers",
        /// Connections waiting in a reserve.
        current_waiting: u64 = "current-waiting",
        /// Connections since start.
        total_connections: u64 = "total-connections",
        /// The server's process id.
        pid: u64 = "pid",
        /// The server's version.
        version: String = "version",
        /// User CPU time, seconds.
        rusage_utime: f64 = "rusage-utime",
        /// System CPU time, seconds.
        rusage_stime: f64 = "rusage-stime",
        /// Seconds since start.
        uptime: u64 = "uptime",
        /// Oldest binlog file index in use.
        binlog_oldest_index: u64 = "binlog-oldest-index",
        /// Binlog file index being written.
        binlog_current_index: u64 = "binlog-current-index",
        /// Binlog records written during compaction.
        binlog_records_migrated: u64 = "binlog-records-migrated",
        /// Binlog records written.
        binlog_records_written: u64 = "binlog-records-written",
        /// Largest binlog file size.
        binlog_max_size: u64 = "binlog-max-size",
        /// Whether the server refuses puts (drain mode, after SIGUSR1).
        draining: bool = "draining",
        /// Random id of this server process.
        id: String = "id",
        /// The host's name.
        hostname: String = "hostname",
        /// The kernel's name and version.
        os: String = "os",
        /// The machine type.
        platform: String = "platform",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_stats_parse_with_unknown_keys_kept() {
        let body = b"---\nid: 5\ntube: default\nstate: ready\npri: 1024\nage: 3\ndelay: 0\nttr: 60\ntime-left: 0\nfile: 0\nreserves: 1\ntimeouts: 0\nreleases: 1\nburies: 0\nkicks: 0\nnew-key: x\n";
        let s = JobStats::parse(body).unwrap();
        assert_eq!(s.id, 5);
        assert_eq!(s.state, "ready");
        assert_eq!(s.extra.get("new-key").map(String::as_str), Some("x"));
    }

    #[test]
    fn missing_or_mistyped_keys_are_named() {
        assert_eq!(
            JobStats::parse(b"---\nid: 5\n").unwrap_err(),
            StatsError("missing key `tube`".into())
        );
        let e = JobStats::parse(b"---\nid: five\n").unwrap_err();
        assert!(e.0.contains("`id`"), "{e}");
        assert!(JobStats::parse(b"\xff").is_err());
        assert!(JobStats::parse(b"---\nnot a pair\n").is_err());
    }

    #[test]
    fn lists_parse() {
        assert_eq!(
            parse_list(b"---\n- default\n- flotilla.create\n").unwrap(),
            vec!["default", "flotilla.create"]
        );
        assert!(parse_list(b"---\nx\n").is_err());
    }
}
