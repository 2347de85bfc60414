//! A `sysrc` for hosts that have none: the subset vm-bhyve and flotilla use, with
//! `sysrc`'s editing rules from [`flotilla::conf`].
//!
//! `sysrc [-f FILE] [-i] [-n] [-q] [-x] [-v] [-e] NAME[=|+=|-=VALUE] ...`; without `-f`
//! it edits the simulator's rc.conf. Reached as `vm-sim sysrc ...` or through a link
//! named `sysrc`.
//!
//! Like FreeBSD's sysrc it takes no lock: it reads the file, edits, and replaces it
//! through a temporary file, with `sysrc_window_ms` (sim.conf, default 20 ms; env
//! `VM_SIM_SYSRC_WINDOW_MS`) between the read and the write. A second edit of the same
//! file in that window is lost, as on a host.

use std::fs;
use std::path::PathBuf;

use super::cmd::getopts;
use flotilla::conf;

/// Runs `sysrc ARGS...` and returns its exit code.
pub fn main(args: &[String]) -> i32 {
    let Ok((opts, ops)) = getopts(args, "f:inqxve") else {
        eprintln!("usage: sysrc [-f file] [-inqxve] name[[+|-]=value] ...");
        return 1;
    };
    let has = |c: char| opts.iter().any(|(o, _)| *o == c);
    let file = opts
        .iter()
        .rev()
        .find(|(o, _)| *o == 'f')
        .map(|(_, f)| PathBuf::from(f))
        .unwrap_or_else(super::host::rc_conf_path);
    let (ignore, names_only, quiet, delete) = (has('i'), has('n'), has('q'), has('x'));
    if ops.is_empty() {
        eprintln!("usage: sysrc [-f file] [-inqxve] name[[+|-]=value] ...");
        return 1;
    }
    let window = sysrc_window();
    let mut text = fs::read(&file)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let original = text.clone();
    let mut status = 0;
    for op in &ops {
        let (key, action) = if let Some((k, v)) = op.split_once("+=") {
            (k, Some(('+', v)))
        } else if let Some((k, v)) = op.split_once("-=") {
            (k, Some(('-', v)))
        } else if let Some((k, v)) = op.split_once('=') {
            (k, Some(('=', v)))
        } else {
            (op.as_str(), None)
        };
        if !conf::is_var_name(key) {
            eprintln!("sysrc: {key}: invalid variable name");
            status = 1;
            continue;
        }
        let old = conf::shell_get(&text, key);
        match action {
            None if delete => {
                let (new, removed) = conf::sysrc_delete(&text, key);
                if !removed && !ignore {
                    eprintln!("sysrc: {key}: not found");
                    status = 1;
                }
                text = new;
            }
            None => match old {
                Some(v) if names_only => println!("{v}"),
                Some(v) => println!("{key}: {v}"),
                None => {
                    if !ignore {
                        eprintln!("sysrc: unknown variable '{key}'");
                    }
                    status = 1;
                }
            },
            Some((how, value)) => {
                let current = old.clone().unwrap_or_default();
                let new_value = match how {
                    '+' => conf::words_add(&current, value),
                    '-' => conf::words_remove(&current, value),
                    _ => value.to_string(),
                };
                match conf::sysrc_set(&text, key, &new_value) {
                    Ok(new) => {
                        text = new;
                        if !quiet {
                            println!("{key}: {current} -> {new_value}");
                        }
                    }
                    Err(e) => {
                        eprintln!("sysrc: {e}");
                        status = 1;
                    }
                }
            }
        }
    }
    if text != original {
        std::thread::sleep(window);
        if let Err(e) = replace(&file, &text) {
            eprintln!("sysrc: {}: {e}", file.display());
            return 1;
        }
    }
    status
}

/// The read-to-write window of an edit.
fn sysrc_window() -> std::time::Duration {
    if let Some(ms) = std::env::var("VM_SIM_SYSRC_WINDOW_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return std::time::Duration::from_millis(ms);
    }
    match std::env::var_os("VM_SIM_DIR") {
        Some(d) if !d.is_empty() => {
            super::host::Settings::load(std::path::Path::new(&d)).sysrc_window
        }
        _ => super::host::Settings::load(std::path::Path::new("/nonexistent")).sysrc_window,
    }
}

/// Replaces `file` through a temporary file and a rename, as sysrc's `mv` does.
fn replace(file: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = file.with_extension(format!("sysrc.{}", std::process::id()));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, file)
}
