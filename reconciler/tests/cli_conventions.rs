//! The conventions every subcommand keeps (issue 15, "Conventions of a good CLI and
//! daemon"): errors printed once, a quiet exit when the reader of the output has gone,
//! control characters from outside escaped, completions and a man page.

mod cli_support;

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use cli_support::*;

/// Guards issue 15, conventions (errors printed once): the OS error of a missing path
/// was printed twice ("(os error 2): No such file or directory (os error 2)").
#[test]
fn an_error_is_printed_once() {
    let out = flotilla(&["validate", "/nonexistent/desired"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

/// Guards issue 15, conventions (errors printed once): an agent configuration error
/// gave its position twice (`agent.yaml:2:1: … at line 2 column 1`).
#[test]
fn an_agent_config_error_gives_its_position_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, "host: h1\nbogus: 1\n").unwrap();
    let out = flotilla(&["agent", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("agent.yaml:2:1: unknown field `bogus`"),
        "{err}"
    );
    assert!(!err.contains("at line"), "{err}");
}

/// Guards issue 15, conventions (no panic on a closed pipe): `flotilla … | head -1`
/// exited 101 with a panic message once the reader had gone. The reader here is gone
/// before the command writes: the other end of a socket pair is closed first.
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    for args in [
        vec!["validate", EXAMPLE],
        vec!["validate", "--output", "json", EXAMPLE],
    ] {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(ours);
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(&args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}

/// Guards issue 15, conventions (no panic on a closed pipe), the issue's own example:
/// `flotilla events | head -1` exited 101 before the conventions (events now prints
/// through the same escaping, flushing writer as every command). The local event log
/// here has many lines and the reader is gone before the first is written.
#[test]
fn events_to_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let line = r#"{"at":1795986000,"at_ms":1795986000000,"host":"h1","kind":"job","vm":"web1","job":null,"commit":null,"message":"built"}"#;
    std::fs::write(state.join("events.jsonl"), format!("{line}\n").repeat(5000)).unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "host: h1\ndesired:\n  url: /nonexistent\nstate_dir: {}\nkey_file: /nonexistent/key\n",
            state.display()
        ),
    )
    .unwrap();
    for output in ["text", "json"] {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(ours);
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["events", "--output", output, "--config"])
            .arg(&config)
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{output}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{output}");
    }
}

/// Guards issue 15, conventions (control characters escaped): a VM name from the
/// desired repo reached the terminal with its escape sequences (here: clear the
/// screen, and a right-to-left override).
#[test]
fn control_characters_from_outside_are_escaped() {
    let repo = Repo::example();
    repo.write(
        "vms/evil.yaml",
        "name: \"web\\e[2J\\u202e1\"\nprofile: CS0\n",
    );
    let out = flotilla(&["validate", &repo.work.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        !text.contains('\x1b') && !text.contains('\u{202e}'),
        "{text:?}"
    );
    assert!(text.contains(r"web\u{1b}[2J\u{202e}1"), "{text}");
}

/// Guards issue 15, conventions (completions and a man page from the clap
/// definitions; `apply --help` lists its exit codes).
#[test]
fn completions_man_page_and_exit_codes_in_help() {
    let out = flotilla(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("flotilla"), "{}", stdout(&out));
    let out = flotilla(&["man"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(".ie") || stdout(&out).contains(".TH"));
    let out = flotilla(&["apply", "--help"]);
    let help = stdout(&out);
    assert!(help.contains("Exit status"), "{help}");
    assert!(help.contains("2 "), "{help}");
}
