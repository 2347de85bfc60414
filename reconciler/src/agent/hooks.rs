//! The host's provisioning hooks, run by the worker on create.
//!
//! As in cloud-machine, a host may keep `pre.sh`, `local.sh` and `post.sh` in its hooks
//! directory. Each present, executable hook is run first with `check` (all of them,
//! before anything changes), then with `run`, in that order, from the VM's directory.
//! With a `provision` command configured (the FreeBSD guest builder,
//! `host/provision/provision.sh`), that command runs instead and calls the hooks itself.
//!
//! A hook gets its input in the environment: `FLOTILLA_VM`, `FLOTILLA_VM_DIR`,
//! `FLOTILLA_HOST`, `FLOTILLA_JOB`, `FLOTILLA_COMMIT`, `FLOTILLA_CPU`, `FLOTILLA_MEMORY`,
//! `FLOTILLA_DISK`, `FLOTILLA_SWAP`, `FLOTILLA_OPT_<KEY>` per hook option and
//! `FLOTILLA_SECRET_<NAME>`, the path of each secret file (never its contents). Output
//! goes to a log file per hook whose tail lands in the event log; a hook that runs past
//! the time limit is killed.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why the hooks failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A secret the VM names is not on this host.
    #[error("secret `{name}` is not in {dir} (the VM names it; put the file there)")]
    MissingSecret {
        /// The secret's name.
        name: String,
        /// The secrets directory.
        dir: PathBuf,
    },
    /// A hook could not be started.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The hook.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A hook exited non-zero.
    #[error("{path} {phase} exited with {status}; last output: {tail}")]
    Failed {
        /// The hook.
        path: PathBuf,
        /// `check` or `run`.
        phase: String,
        /// Its exit status.
        status: String,
        /// The end of its output.
        tail: String,
    },
    /// A hook ran too long.
    #[error("{path} {phase} ran longer than {limit:?} and was killed")]
    Timeout {
        /// The hook.
        path: PathBuf,
        /// `check` or `run`.
        phase: String,
        /// The time limit.
        limit: Duration,
    },
}

/// What the hooks are told.
#[derive(Debug, Clone)]
pub struct HookInput {
    /// The VM.
    pub vm: String,
    /// Its directory.
    pub vm_dir: PathBuf,
    /// This host.
    pub host: String,
    /// The job.
    pub job: String,
    /// The desired commit.
    pub commit: String,
    /// Resources, as vm-bhyve writes them.
    pub cpu: u32,
    /// Memory.
    pub memory: String,
    /// Disk.
    pub disk: String,
    /// Swap.
    pub swap: String,
    /// Hook options.
    pub options: Vec<(String, String)>,
    /// Secret names.
    pub secrets: Vec<String>,
}

/// Upper-cases `key` and turns anything but A-Z and 0-9 into `_`.
pub fn env_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            let c = c.to_ascii_uppercase();
            if c.is_ascii_uppercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The environment the hooks get. Secrets are resolved to paths under `secrets_dir`.
pub fn environment(
    input: &HookInput,
    secrets_dir: Option<&Path>,
) -> Result<Vec<(OsString, OsString)>, HookError> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("FLOTILLA_VM".into(), input.vm.clone().into()),
        ("FLOTILLA_VM_DIR".into(), input.vm_dir.clone().into()),
        ("FLOTILLA_HOST".into(), input.host.clone().into()),
        ("FLOTILLA_JOB".into(), input.job.clone().into()),
        ("FLOTILLA_COMMIT".into(), input.commit.clone().into()),
        ("FLOTILLA_CPU".into(), input.cpu.to_string().into()),
        ("FLOTILLA_MEMORY".into(), input.memory.clone().into()),
        ("FLOTILLA_DISK".into(), input.disk.clone().into()),
        ("FLOTILLA_SWAP".into(), input.swap.clone().into()),
    ];
    for (k, v) in &input.options {
        env.push((format!("FLOTILLA_OPT_{}", env_key(k)).into(), v.into()));
    }
    for name in &input.secrets {
        let dir = secrets_dir.unwrap_or(Path::new("/usr/local/etc/flotilla/secrets"));
        // Names are validated by the loader; refuse anything that could leave the dir.
        let path = dir.join(name);
        if name.contains(['/', '\0']) || name.starts_with('.') || !path.is_file() {
            return Err(HookError::MissingSecret {
                name: name.clone(),
                dir: dir.to_path_buf(),
            });
        }
        env.push((
            format!("FLOTILLA_SECRET_{}", env_key(name)).into(),
            path.into(),
        ));
    }
    Ok(env)
}

/// The last `max` bytes of a file, lossily as text.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// Runs `program args…` from `cwd` with `env`, output to `log`, within `limit`.
fn run_one(
    program: &Path,
    args: &[OsString],
    phase: &str,
    cwd: &Path,
    env: &[(OsString, OsString)],
    log: &Path,
    limit: Duration,
) -> Result<String, HookError> {
    let spawn = |source| HookError::Spawn {
        path: program.to_path_buf(),
        source,
    };
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(spawn)?;
    let err = out.try_clone().map_err(spawn)?;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(program)
        .args(args)
        // Its own process group, so a timeout ends what it started too (pkg, tar, …).
        .process_group(0)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(spawn)?;
    let started = Instant::now();
    loop {
        match child.try_wait().map_err(spawn)? {
            Some(status) if status.success() => return Ok(tail(log, 2048)),
            Some(status) => {
                return Err(HookError::Failed {
                    path: program.to_path_buf(),
                    phase: phase.to_string(),
                    status: status.to_string(),
                    tail: tail(log, 1024),
                })
            }
            None if started.elapsed() > limit => {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::Timeout {
                    path: program.to_path_buf(),
                    phase: phase.to_string(),
                    limit,
                });
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What ran and what it printed (the tail), for the event log.
pub type Ran = Vec<(String, String)>;

/// Runs the hooks in `hooks_dir` (check all, then run each), or the `provision` command,
/// for `input`. Logs go to `log_dir`.
pub fn provision(
    hooks_dir: Option<&Path>,
    provision: Option<&Path>,
    secrets_dir: Option<&Path>,
    input: &HookInput,
    log_dir: &Path,
    limit: Duration,
) -> Result<Ran, HookError> {
    let hooks: Vec<PathBuf> = hooks_dir
        .map(|dir| {
            ["pre.sh", "local.sh", "post.sh"]
                .iter()
                .map(|h| dir.join(h))
                .filter(|p| executable(p))
                .collect()
        })
        .unwrap_or_default();
    let mut ran = Vec::new();
    if provision.is_none() && hooks.is_empty() {
        // Nothing consumes options or secrets on this host.
        return Ok(ran);
    }
    let env = environment(input, secrets_dir)?;
    let _ = fs::create_dir_all(log_dir);
    if let Some(cmd) = provision {
        let mut args: Vec<OsString> = vec![
            "-d".into(),
            input.vm_dir.clone().into(),
            "-z".into(),
            input.disk.clone().into(),
            "-s".into(),
            input.swap.clone().into(),
        ];
        args.push("-H".into());
        args.push(hooks_dir.map_or("none".into(), |d| d.as_os_str().to_owned()));
        args.push(input.vm.clone().into());
        let log = log_dir.join(format!("{}.provision.log", input.vm));
        let out = run_one(cmd, &args, "build", &input.vm_dir, &env, &log, limit)?;
        ran.push(("provision".to_string(), out));
        return Ok(ran);
    }
    for phase in ["check", "run"] {
        for hook in &hooks {
            let name = hook.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            let log = log_dir.join(format!("{}.{name}.log", input.vm));
            let out = run_one(
                hook,
                &[phase.into()],
                phase,
                &input.vm_dir,
                &env,
                &log,
                limit,
            )?;
            ran.push((format!("{name} {phase}"), out));
        }
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn input(dir: &Path) -> HookInput {
        HookInput {
            vm: "web1".into(),
            vm_dir: dir.to_path_buf(),
            host: "host1".into(),
            job: "j1".into(),
            commit: "c1".into(),
            cpu: 1,
            memory: "512M".into(),
            disk: "10G".into(),
            swap: "1G".into(),
            options: vec![("time-zone".into(), "UTC".into())],
            secrets: vec!["ts_key".into()],
        }
    }

    fn script(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn hooks_get_options_and_secret_paths_never_contents() {
        let t = tempfile::tempdir().unwrap();
        let hooks = t.path().join("hooks");
        let secrets = t.path().join("secrets");
        fs::create_dir_all(&hooks).unwrap();
        fs::create_dir_all(&secrets).unwrap();
        fs::write(secrets.join("ts_key"), "tskey-SECRET").unwrap();
        script(
            &hooks.join("pre.sh"),
            "#!/bin/sh\necho \"$1 $FLOTILLA_VM $FLOTILLA_OPT_TIME_ZONE $FLOTILLA_SECRET_TS_KEY\"\n",
        );
        let ran = provision(
            Some(&hooks),
            None,
            Some(&secrets),
            &input(t.path()),
            &t.path().join("logs"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(ran.len(), 2);
        assert_eq!(ran[0].0, "pre.sh check");
        assert!(ran[1].1.contains("run web1 UTC"), "{ran:?}");
        assert!(ran[1].1.ends_with("secrets/ts_key"), "{ran:?}");
        assert!(!format!("{ran:?}").contains("tskey-SECRET"));
    }

    #[test]
    fn a_missing_secret_a_failing_hook_and_a_slow_hook_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let hooks = t.path().join("hooks");
        fs::create_dir_all(&hooks).unwrap();
        script(
            &hooks.join("post.sh"),
            "#!/bin/sh\necho broken >&2\nexit 3\n",
        );
        // A secret is resolved only when a hook will run, and must then exist.
        let e = provision(
            Some(&hooks),
            None,
            Some(t.path()),
            &input(t.path()),
            t.path(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, HookError::MissingSecret { .. }), "{e}");
        let mut i = input(t.path());
        i.secrets.clear();
        let e = provision(
            Some(&hooks),
            None,
            None,
            &i,
            t.path(),
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("post.sh check exited with exit status: 3"),
            "{e}"
        );
        assert!(e.contains("broken"), "{e}");
        script(&hooks.join("post.sh"), "#!/bin/sh\nexec sleep 5\n");
        let e = provision(
            Some(&hooks),
            None,
            None,
            &i,
            t.path(),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
    }
}
