//! The agent under a real supervisord, with the program section shipped in
//! `host/supervisord/flotilla-agent.conf` (issue 6): it reaches RUNNING; a
//! `supervisorctl stop` in the middle of a create ends it cleanly, well within
//! `stopwaitsecs`, with the job released back to the queue (not lost) and no half-made
//! VM left; a start picks the job up again and builds the VM exactly once.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::actual::RunState;
use flotilla_e2e::{bin_dir, vm_yaml, Cluster, HostSpec, Options};

struct Supervisord {
    child: Child,
    conf: std::path::PathBuf,
}

impl Supervisord {
    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("supervisorctl")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("supervisorctl (Debian package `supervisor`)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn state(&self) -> String {
        self.ctl(&["status", "flotilla-agent"])
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string()
    }

    fn wait_state(&self, want: &str, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.state() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "flotilla-agent not {want} after {timeout:?}: {}",
            self.ctl(&["status"])
        );
    }
}

impl Drop for Supervisord {
    /// Regression: a SIGKILL alone left the agent running, orphaned, after the test.
    /// `shutdown` stops the program first, as on a host.
    fn drop(&mut self) {
        self.ctl(&["shutdown"]);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped program section with this machine's paths.
fn program_section(agent_config: &Path, log: &Path) -> String {
    let shipped = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/supervisord/flotilla-agent.conf"),
    )
    .expect("host/supervisord/flotilla-agent.conf");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    shipped
        .lines()
        .filter(|l| root || !l.starts_with("user="))
        .map(|l| {
            if l.starts_with("command=") {
                format!(
                    "command={} agent --config {}",
                    bin_dir().join("flotilla").display(),
                    agent_config.display()
                )
            } else if l.starts_with("stdout_logfile=") {
                format!("stdout_logfile={}", log.display())
            } else if l.starts_with("environment=") {
                format!("{l},MALLOC_ARENA_MAX=\"1\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn supervisorctl_stop_during_a_create_releases_the_job_and_a_restart_finishes_it() {
    let c = Cluster::start(
        &[HostSpec::new("host1", None)],
        Options {
            sim_delay_ms: 3000,
            ..Options::default()
        },
    );
    let dir = c.dir.path().join("supervisor");
    fs::create_dir_all(&dir).unwrap();
    let log = dir.join("agent.log");
    let conf = dir.join("supervisord.conf");
    let section = program_section(&c.hosts[0].config, &log);
    assert!(section.contains("stopwaitsecs=600") && section.contains("exitcodes=0,78"));
    fs::write(
        &conf,
        format!(
            "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
             [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nnodaemon=true\n\n\
             [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n{section}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let sup = Supervisord {
        child: Command::new("supervisord")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("supervisord (Debian package `supervisor`)"),
        conf,
    };
    sup.wait_state("RUNNING", Duration::from_secs(30));

    c.commit(
        &[("vms/slow1.yaml", Some(&vm_yaml("slow1", "CS0", "")))],
        "one VM",
    );
    c.wait_until("the build under way", Duration::from_secs(30), |c| {
        c.events(0)
            .iter()
            .any(|e| e.kind == "job" && e.message.contains("building"))
    });
    let stopping = Instant::now();
    sup.ctl(&["stop", "flotilla-agent"]);
    sup.wait_state("STOPPED", Duration::from_secs(600));
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(600),
        "stopped within stopwaitsecs: {took:?}"
    );
    let events = c.events(0);
    assert!(
        events
            .iter()
            .any(|e| e.kind == "stop" && e.message == "agent stopped"),
        "the agent ended cleanly, not killed"
    );
    // The job is back on the queue, and nothing half-made is left.
    let stats = c
        .tube_stats(0, flotilla::message::tubes::CREATE)
        .expect("the create tube exists");
    assert_eq!(stats.current_jobs_reserved, 0, "{stats:?}");
    assert_eq!(
        stats.current_jobs_ready + stats.current_jobs_delayed,
        1,
        "released, not lost: {stats:?}"
    );
    assert!(
        c.names(0).is_empty(),
        "the half-made VM was cleaned up: {:?}",
        c.names(0)
    );

    sup.ctl(&["start", "flotilla-agent"]);
    sup.wait_state("RUNNING", Duration::from_secs(30));
    c.wait_until(
        "slow1 built after the restart",
        Duration::from_secs(60),
        |c| {
            c.vms(0).iter().any(|v| {
                v.name == "slow1"
                    && v.state == RunState::Running
                    && v.marker.as_ref().is_some_and(|m| m.complete)
            })
        },
    );
    assert_eq!(c.names(0), vec!["slow1".to_string()], "built exactly once");
}
