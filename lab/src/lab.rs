//! A whole flotilla cluster on one machine: `flotilla-demo`, the end-to-end tests and
//! the cluster benchmark all run on it.
//!
//! [`Cluster::start`] starts, per host, a real beanstalkd on a free loopback port and a
//! simulated vm-bhyve directory (the `vm-sim` binary reached as `vm` and `sysrc`), and
//! makes the desired repo a real git repository whose `cluster.yaml` names those ports.
//! Agents are real `flotilla agent` processes; tests commit to the repo and watch the
//! simulated hosts converge. Everything lives in one temporary directory and every
//! process is stopped on drop.
//!
//! With [`Options::isolate`], one host (its beanstalkd, its agent and the simulated
//! `vm` commands the agent runs) lives in its own network namespace behind a veth pair
//! ([`Netns`]), so a test can [`Cluster::cut`] it off the network and
//! [`Cluster::heal`] it. Needs root; [`netns_available`] says whether this machine
//! allows it.

#[cfg(target_os = "linux")]
mod netns;
#[cfg(not(target_os = "linux"))]
#[path = "lab/netns_none.rs"]
mod netns;

pub use netns::{netns_available, netns_check, Netns};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use beanstalk::testing::{Beanstalkd, Config};

use flotilla::actual::ActualVm;
use flotilla::backend::Backend;

/// The directory holding the `flotilla` and `vm-sim` binaries: beside the running
/// program (`flotilla-demo`), or one level up (a test or example under `target/`). Under
/// cargo, builds them once if a test runs before they exist.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        let beside = exe.parent().expect("exe dir").to_path_buf();
        if beside.join("flotilla").exists() && beside.join("vm-sim").exists() {
            return beside;
        }
        // target/<profile>/deps/<test> or target/<profile>/examples/<bench>
        let dir = beside.parent().expect("target dir").to_path_buf();
        // `cargo test --test NAME` builds no binaries, so what is there may be stale:
        // under cargo, always bring them up to date (instant when they are). The
        // features are those of `scripts/test`, so the two never rebuild each other.
        if std::env::var_os("CARGO").is_some() {
            let release = dir.ends_with("release");
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_default());
            cmd.args(["build", "--workspace", "--all-features", "--bins"]);
            if release {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("cargo build");
            assert!(st.success(), "building flotilla's binaries failed");
        }
        dir
    })
}

/// One host's shape in cluster.yaml.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Its name.
    pub name: String,
    /// The next host on the hop chain.
    pub next: Option<String>,
    /// Memory limit, e.g. `16G`.
    pub memory: String,
    /// Storage limit.
    pub storage: String,
    /// VM count limit.
    pub vms: u32,
}

impl HostSpec {
    /// `name` with roomy limits and `next`.
    pub fn new(name: &str, next: Option<&str>) -> HostSpec {
        HostSpec {
            name: name.into(),
            next: next.map(str::to_string),
            memory: "64G".into(),
            storage: "4T".into(),
            vms: 500,
        }
    }

    /// Sets the limits.
    pub fn limits(mut self, memory: &str, storage: &str, vms: u32) -> HostSpec {
        self.memory = memory.into();
        self.storage = storage.into();
        self.vms = vms;
        self
    }
}

/// Knobs of the simulated hosts and agents.
#[derive(Debug, Clone)]
pub struct Options {
    /// `create_delay_ms` and `start_delay_ms` of the simulator.
    pub sim_delay_ms: u64,
    /// Keep the simulator's realistic slowness (a start locks late and takes about half
    /// a second, `vm list`/`vm info` take tens of milliseconds, sysrc has a window that
    /// loses concurrent edits). Off, the lab asks vm-sim for speed: tests that do not
    /// care about these costs run faster. `FLOTILLA_LAB_SIM_REALISTIC=1` turns it on
    /// for every test, to see the whole suite against the realistic simulator.
    pub sim_realistic: bool,
    /// The agents' fetch interval (they also watch the local repo).
    pub poll: &'static str,
    /// `worker.max_creates`.
    pub max_creates: usize,
    /// Extra lines for every agent.yaml (indented YAML at top level).
    pub extra_config: String,
    /// Extra `policies:` lines.
    pub policies: String,
    /// The cluster id.
    pub cluster: String,
    /// beanstalkd's time-to-run of a job (`policies.ttr`).
    pub ttr: &'static str,
    /// `worker.retry_failed`: how long a failed job waits before it is planned again.
    pub retry_failed: &'static str,
    /// The host to run in its own network namespace (see [`Cluster::cut`]). Every
    /// beanstalkd then listens on an address of the veth pair instead of the loopback
    /// address, which the namespace cannot reach: this host's on the namespace's end,
    /// the others' on this namespace's end (reachable from both sides, and from this
    /// machine only). [`Cluster::start`] panics when namespaces are not available
    /// ([`netns_check`] says why).
    pub isolate: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sim_delay_ms: 0,
            sim_realistic: false,
            poll: "1s",
            max_creates: 2,
            extra_config: String::new(),
            policies: String::new(),
            cluster: "e2e".into(),
            ttr: "60s",
            retry_failed: "3s",
            isolate: None,
        }
    }
}

/// One host: its beanstalkd, simulated vm-bhyve, agent config and agent.
pub struct Host {
    /// Its name.
    pub name: String,
    /// Its beanstalkd.
    pub beanstalkd: Beanstalkd,
    /// The simulator's vm_dir.
    pub vm_dir: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// The agent's config file.
    pub config: PathBuf,
    /// The agent's stderr log.
    pub log: PathBuf,
    /// The running agent.
    pub agent: Option<Child>,
}

/// A cluster on this machine.
pub struct Cluster {
    /// The temporary directory holding everything.
    pub dir: tempfile::TempDir,
    /// The desired repo (a git work tree on branch `main`).
    pub repo: PathBuf,
    /// The hosts, in the order given.
    pub hosts: Vec<Host>,
    /// Their shapes.
    pub specs: Vec<HostSpec>,
    /// The options.
    pub options: Options,
    /// The namespace of the host named by [`Options::isolate`]. Declared last so that
    /// it is removed after the hosts' processes are stopped.
    pub netns: Option<Netns>,
    /// Second agents started under a host's name ([`Cluster::start_twin`]).
    pub twins: Vec<Twin>,
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=flotilla-test",
            "-c",
            "user.email=test@flotilla.invalid",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes `<root>/vm`, a simulated vm-bhyve directory of host `name`, and `<root>/secrets`.
fn init_sim(bin: &Path, root: &Path, name: &str, delay_ms: u64, realistic: bool) {
    let vm_dir = root.join("vm");
    fs::create_dir_all(&vm_dir).unwrap();
    fs::create_dir_all(root.join("secrets")).unwrap();
    let out = Command::new(bin.join("vm"))
        .arg("init")
        .env("VM_SIM_DIR", &vm_dir)
        .env("VM_SIM_HOSTNAME", name)
        .output()
        .expect("vm init");
    assert!(out.status.success(), "vm init: {out:?}");
    fs::write(
        vm_dir.join(".config/sim.conf"),
        format!(
            "stop_resend_ms=20\nshutdown_ms=50\ncreate_delay_ms={delay_ms}\nstart_delay_ms={delay_ms}\n{}",
            if realistic || std::env::var_os("FLOTILLA_LAB_SIM_REALISTIC").is_some() {
                ""
            } else {
                "start_lock_ms=0\nlocked_ms=0\nlist_delay_ms=0\nsysrc_window_ms=0\n"
            }
        ),
    )
    .unwrap();
}

impl Cluster {
    /// Starts beanstalkd servers and simulated hosts (no agents yet) and commits
    /// `cluster.yaml` with no VMs.
    pub fn start(specs: &[HostSpec], options: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let sim = bin_dir().join("vm-sim");
        std::os::unix::fs::symlink(&sim, bin.join("vm")).unwrap();
        std::os::unix::fs::symlink(&sim, bin.join("sysrc")).unwrap();
        if let Some(name) = &options.isolate {
            assert!(
                specs.iter().any(|s| &s.name == name),
                "Options::isolate names {name}, which is not a host"
            );
        }
        let netns = options.isolate.as_ref().map(|_| {
            Netns::create().unwrap_or_else(|e| {
                panic!("cannot make a network namespace (check netns_available() first): {e}")
            })
        });
        let mut hosts = Vec::new();
        for spec in specs {
            let (listen, wrapper) = match &netns {
                Some(ns) if options.isolate.as_ref() == Some(&spec.name) => {
                    (Some(ns.addr()), ns.exec_prefix())
                }
                Some(ns) => (Some(ns.root_addr()), Vec::new()),
                None => (None, Vec::new()),
            };
            let beanstalkd = Beanstalkd::start_with(Config {
                binlog: true,
                max_job_size: Some(2 * 1024 * 1024),
                program: None,
                listen,
                wrapper,
            })
            .expect("start beanstalkd (is it installed? scripts/install-deps)");
            let root = dir.path().join(&spec.name);
            let vm_dir = root.join("vm");
            let state_dir = root.join("state");
            init_sim(
                &bin,
                &root,
                &spec.name,
                options.sim_delay_ms,
                options.sim_realistic,
            );
            let config = root.join("agent.yaml");
            let log = root.join("agent.log");
            hosts.push(Host {
                name: spec.name.clone(),
                beanstalkd,
                vm_dir,
                state_dir,
                config,
                log,
                agent: None,
            });
        }
        // One cluster key for every host, as an operator would copy it (mode 0600).
        let key = dir.path().join("cluster.key");
        fs::write(
            &key,
            format!(
                "lab-key-{}-{}\n",
                std::process::id(),
                "0123456789abcdef0123456789abcdef"
            ),
        )
        .unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let repo = dir.path().join("desired");
        fs::create_dir_all(repo.join("vms")).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        let cluster = Cluster {
            dir,
            repo,
            hosts,
            specs: specs.to_vec(),
            options,
            netns,
            twins: Vec::new(),
        };
        for h in &cluster.hosts {
            fs::write(&h.config, cluster.agent_config(h)).unwrap();
        }
        fs::write(
            cluster.repo.join("cluster.yaml"),
            cluster.cluster_yaml(specs),
        )
        .unwrap();
        fs::write(cluster.repo.join("vms/.keep"), "").unwrap();
        cluster.commit_all("cluster");
        cluster
    }

    fn agent_config(&self, h: &Host) -> String {
        let bin = self.dir.path().join("bin");
        format!(
            "host: {name}\n\
             desired:\n  url: {repo}\n  branch: main\n  poll_interval: {poll}\n\
             backend:\n  vm_command: {vm}\n  sysrc_command: {sysrc}\n  sim_dir: {vm_dir}\n  poll_interval: 20ms\n  start_timeout: 20s\n\
             state_dir: {state}\n\
             key_file: {key}\n\
             secrets_dir: {secrets}\n\
             worker:\n  max_creates: {mc}\n  retries: 2\n  backoff: 200ms\n  stop_timeout: 2s\n  retry_failed: {retry_failed}\n\
             {extra}",
            name = h.name,
            repo = self.repo.display(),
            poll = self.options.poll,
            vm = bin.join("vm").display(),
            sysrc = bin.join("sysrc").display(),
            vm_dir = h.vm_dir.display(),
            state = h.state_dir.display(),
            key = self.key_file().display(),
            secrets = h.secrets_dir().display(),
            mc = self.options.max_creates,
            retry_failed = self.options.retry_failed,
            extra = self.options.extra_config,
        )
    }

    /// cluster.yaml for `specs` with this cluster's beanstalkd ports.
    pub fn cluster_yaml(&self, specs: &[HostSpec]) -> String {
        let mut s = format!("cluster: {}\nhosts:\n", self.options.cluster);
        for spec in specs {
            let h = self
                .hosts
                .iter()
                .find(|h| h.name == spec.name)
                .expect("host");
            s += &format!(
                "  {}:\n    beanstalkd: {}\n    next: {}\n    limits:\n      memory: {}\n      storage: {}\n      vms: {}\n",
                spec.name,
                h.beanstalkd.addr(),
                spec.next.as_deref().unwrap_or("null"),
                spec.memory,
                spec.storage,
                spec.vms
            );
        }
        s += &format!(
            "policies:\n  reconcile_interval: 2s\n  prune_guard: 1.0\n  hop_limit: 5\n  ttr: {}\n{}",
            self.options.ttr, self.options.policies
        );
        s
    }

    /// Writes (Some) or deletes (None) files in the repo and commits; returns the commit.
    pub fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        for (path, content) in files {
            let p = self.repo.join(path);
            match content {
                Some(c) => {
                    fs::create_dir_all(p.parent().unwrap()).unwrap();
                    fs::write(&p, c).unwrap();
                }
                None => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        self.commit_all(message)
    }

    fn commit_all(&self, message: &str) -> String {
        git(&self.repo, &["add", "-A"]);
        git(
            &self.repo,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    /// `stats-tube` of `tube` on host `i`'s beanstalkd; `None` for a tube never used.
    pub fn tube_stats(&self, i: usize, tube: &str) -> Option<beanstalk::TubeStats> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut client = beanstalk::Client::connect(self.hosts[i].beanstalkd.addr())
                .await
                .ok()?;
            client.stats_tube(tube).await.ok()
        })
    }

    /// The cluster key file every agent uses.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("cluster.key")
    }

    /// The cluster keys, for tests that sign messages themselves.
    pub fn keys(&self) -> flotilla::auth::Keys {
        flotilla::auth::Keys::load(&self.key_file()).expect("the lab's key file")
    }

    /// Starts every host's agent.
    pub fn start_agents(&mut self) {
        for i in 0..self.hosts.len() {
            self.start_agent(i);
        }
    }

    /// Starts host `i`'s agent (logs appended to its `agent.log`).
    pub fn start_agent(&mut self, i: usize) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.hosts[i].log)
            .unwrap();
        let flotilla = bin_dir().join("flotilla");
        // The simulated `vm` commands the agent runs inherit its namespace.
        let mut cmd = match self.netns_of(i) {
            Some(ns) => ns.command(&flotilla),
            None => Command::new(&flotilla),
        };
        let h = &mut self.hosts[i];
        let child = cmd
            .args(["agent", "--config"])
            .arg(&h.config)
            .env("FLOTILLA_LOG", "info,flotilla=debug")
            // glibc keeps one malloc arena per thread that allocates; the agent's blocking
            // threads would each hold freed memory. One arena keeps its memory small.
            .env("MALLOC_ARENA_MAX", "1")
            // Counts the agent's `vm` and `sysrc` calls (see `Cluster::calls`).
            .env("VM_SIM_CALL_LOG", h.vm_dir.with_file_name("calls.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start flotilla agent");
        h.agent = Some(child);
    }

    /// The namespace host `i` runs in, if it is the isolated one.
    fn netns_of(&self, i: usize) -> Option<&Netns> {
        let isolated = self.options.isolate.as_deref()?;
        (self.hosts[i].name == isolated)
            .then_some(self.netns.as_ref())
            .flatten()
    }

    /// Cuts host `i` off the network: nothing outside its namespace reaches its
    /// beanstalkd, and its agent reaches no other host's, while all its processes keep
    /// running. Panics unless `i` is the host named by [`Options::isolate`].
    pub fn cut(&self, i: usize) {
        self.isolated(i).cut().expect("cut the host off");
    }

    /// Joins host `i` to the network again after [`Cluster::cut`].
    pub fn heal(&self, i: usize) {
        self.isolated(i).heal().expect("join the host again");
    }

    fn isolated(&self, i: usize) -> &Netns {
        self.netns_of(i).unwrap_or_else(|| {
            panic!(
                "host {} is not in a network namespace (Options::isolate)",
                self.hosts[i].name
            )
        })
    }

    /// Sends SIGTERM to host `i`'s agent and waits for it; returns its exit code.
    pub fn stop_agent(&mut self, i: usize) -> Option<i32> {
        let mut child = self.hosts[i].agent.take()?;
        // SAFETY-free: kill(2) through the `kill` program keeps the crate free of unsafe.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends signal `sig` (a name `kill` knows, such as `HUP`) to host `i`'s agent.
    pub fn signal_agent(&self, i: usize, sig: &str) {
        let child = self.hosts[i].agent.as_ref().expect("the agent runs");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    /// True while host `i`'s agent process runs.
    pub fn agent_alive(&mut self, i: usize) -> bool {
        match self.hosts[i].agent.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills host `i`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut child) = self.hosts[i].agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a second agent under host `i`'s name: the same config but its own state
    /// directory and simulated vm_dir, and the same beanstalkd (it learns the address
    /// from cluster.yaml, as host `i`'s agent does). Returns its index in `twins`.
    pub fn start_twin(&mut self, i: usize) -> usize {
        let j = self.twins.len();
        let name = self.hosts[i].name.clone();
        let root = self.dir.path().join(format!("{name}-twin{j}"));
        init_sim(
            &self.dir.path().join("bin"),
            &root,
            &name,
            self.options.sim_delay_ms,
            self.options.sim_realistic,
        );
        let twin = Twin {
            vm_dir: root.join("vm"),
            state_dir: root.join("state"),
            config: root.join("agent.yaml"),
            log: root.join("agent.log"),
            agent: None,
        };
        let text = self.agent_config(&self.hosts[i]);
        let text = text
            .replace(
                &self.hosts[i].vm_dir.display().to_string(),
                &twin.vm_dir.display().to_string(),
            )
            .replace(
                &self.hosts[i].state_dir.display().to_string(),
                &twin.state_dir.display().to_string(),
            );
        fs::write(&twin.config, text).unwrap();
        let log = fs::File::create(&twin.log).unwrap();
        let child = Command::new(bin_dir().join("flotilla"))
            .args(["agent", "--config"])
            .arg(&twin.config)
            .env("FLOTILLA_LOG", "info,flotilla=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the twin agent");
        self.twins.push(Twin {
            agent: Some(child),
            ..twin
        });
        j
    }

    /// The twin's exit status once it has exited (`None` while it runs).
    pub fn twin_exit(&mut self, j: usize) -> Option<std::process::ExitStatus> {
        self.twins[j].agent.as_mut()?.try_wait().ok().flatten()
    }

    /// VM names in twin `j`'s simulated vm_dir, sorted.
    pub fn twin_names(&self, j: usize) -> Vec<String> {
        let cfg = flotilla::agent::config::AgentConfig::load(&self.twins[j].config).unwrap();
        flotilla::agent::backend_for(&cfg)
            .list()
            .expect("vm list")
            .into_iter()
            .map(|v| v.name)
            .collect()
    }

    /// The backend of host `i`, for looking at its VMs.
    pub fn backend(&self, i: usize) -> flotilla::backend::VmBhyve {
        let cfg = flotilla::agent::config::AgentConfig::load(&self.hosts[i].config).unwrap();
        flotilla::agent::backend_for(&cfg)
    }

    /// Makes and starts a VM on host `i` as an operator would, with vm-bhyve by hand
    /// (so without a marker: flotilla must never touch it). Returns its `.conf` path.
    pub fn make_by_hand(&self, i: usize, name: &str) -> PathBuf {
        use flotilla::backend::{Backend, CreateSpec};
        let b = self.backend(i);
        b.create(&CreateSpec {
            name: name.into(),
            datastore: None,
            template: "default".into(),
            disk_size: None,
            cpu: None,
            memory: None,
        })
        .expect("vm create");
        b.start(name).expect("vm start");
        self.hosts[i].vm_dir.join(name).join(format!("{name}.conf"))
    }

    /// The `vm` and `sysrc` command lines host `i`'s agent has run (its own calls only,
    /// not the lab's), oldest first.
    pub fn calls(&self, i: usize) -> Vec<String> {
        fs::read_to_string(self.hosts[i].vm_dir.with_file_name("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every VM on host `i`.
    pub fn vms(&self, i: usize) -> Vec<ActualVm> {
        self.backend(i).list().expect("vm list")
    }

    /// VM names on host `i`, sorted.
    pub fn names(&self, i: usize) -> Vec<String> {
        self.vms(i).into_iter().map(|v| v.name).collect()
    }

    /// The hosts (by index) that have a VM named `vm`, managed or not.
    pub fn holders(&self, vm: &str) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|i| self.names(*i).iter().any(|n| n == vm))
            .collect()
    }

    /// Whether host `i` runs `vm`, built to the end (its marker says complete).
    pub fn running_complete(&self, i: usize, vm: &str) -> bool {
        self.vms(i).iter().any(|v| {
            v.name == vm
                && v.state == flotilla::actual::RunState::Running
                && v.marker.as_ref().is_some_and(|m| m.complete)
        })
    }

    /// Polls `cond` every 100 ms until it holds or `timeout` passes; panics with the
    /// agents' logs and `what` on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Cluster) -> bool,
    ) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {timeout:?} waiting for: {what}\n{}",
            self.logs()
        );
    }

    /// The tail of every agent's log and event log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let hosts = self
            .hosts
            .iter()
            .map(|h| (h.name.clone(), &h.log, &h.state_dir));
        let twins = self.twins.iter().enumerate();
        let twins = twins.map(|(j, t)| (format!("twin{j}"), &t.log, &t.state_dir));
        for (name, log, state_dir) in hosts.chain(twins) {
            let log = fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out += &format!(
                "--- {name} agent.log (last 40 lines, newest first)\n{}\n",
                tail.join("\n")
            );
            let ev = fs::read_to_string(state_dir.join("events.jsonl")).unwrap_or_default();
            let tail: Vec<&str> = ev.lines().rev().take(30).collect();
            out += &format!("--- {name} events (newest first)\n{}\n", tail.join("\n"));
        }
        out
    }

    /// Runs `flotilla ARGS` and returns (exit code, stdout, stderr).
    pub fn flotilla(&self, args: &[&str]) -> (i32, String, String) {
        Cluster::output(Command::new(bin_dir().join("flotilla")).args(args))
    }

    /// [`Cluster::flotilla`] where host `i` runs: inside its network namespace if it
    /// has one, so `status` shows the cluster as that host sees it.
    pub fn flotilla_on(&self, i: usize, args: &[&str]) -> (i32, String, String) {
        let flotilla = bin_dir().join("flotilla");
        let mut cmd = match self.netns_of(i) {
            Some(ns) => ns.command(&flotilla),
            None => Command::new(&flotilla),
        };
        Cluster::output(cmd.args(args))
    }

    fn output(cmd: &mut Command) -> (i32, String, String) {
        let out = cmd.output().expect("run flotilla");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The events of host `i`'s agent.
    pub fn events(&self, i: usize) -> Vec<flotilla::agent::events::Event> {
        flotilla::agent::events::read(&self.hosts[i].state_dir.join("events.jsonl"))
            .unwrap_or_default()
    }
}

/// A second agent under an existing host's name (see [`Cluster::start_twin`]).
pub struct Twin {
    /// Its simulated vm_dir.
    pub vm_dir: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Its stderr log.
    pub log: PathBuf,
    /// The running agent.
    pub agent: Option<Child>,
}

impl Host {
    /// Where the host's agent finds secret files.
    pub fn secrets_dir(&self) -> PathBuf {
        self.vm_dir.parent().unwrap_or(&self.vm_dir).join("secrets")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill_agent(i);
        }
        for t in &mut self.twins {
            if let Some(mut child) = t.agent.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Guests of the simulator are real processes: power them all off.
        let configs = self.hosts.iter().map(|h| &h.config);
        for config in configs.chain(self.twins.iter().map(|t| &t.config)) {
            let Ok(cfg) = flotilla::agent::config::AgentConfig::load(config) else {
                continue;
            };
            let Ok(vms) = flotilla::agent::backend_for(&cfg).list() else {
                continue;
            };
            let vm_dir = cfg.backend.sim_dir.clone().unwrap_or_default();
            for vm in vms {
                if vm.state != flotilla::actual::RunState::Stopped {
                    let _ = Command::new(self.dir.path().join("bin/vm"))
                        .args(["poweroff", "-f", &vm.name])
                        .env("VM_SIM_DIR", &vm_dir)
                        .env("VM_SIM_HOSTNAME", &cfg.host)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// A VM file for the desired repo.
pub fn vm_yaml(name: &str, profile: &str, extra: &str) -> String {
    format!("name: {name}\nprofile: {profile}\n{extra}")
}
