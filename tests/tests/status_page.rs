//! The agent's status page (issue 15, "A status page") opened in headless Chromium
//! against a running three-host lab cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::actual::RunState;
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(60);

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Debian's `chromium`, or a loud failure: this test never passes without a browser.
fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "CHROMIUM IS NOT INSTALLED: the status page test needs Debian's `chromium` package \
         (scripts/install-deps installs it); it cannot check the page without a browser"
    );
}

/// Runs headless Chromium with `args` and the page's URL; its stdout. Killed after
/// two minutes so a stuck browser fails the test rather than hanging it.
fn run_chromium(profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            // Root in CI and containers: Chromium's sandbox refuses to run as root.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for chromium").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("chromium's output");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Guards issue 15, "A status page": the page at `/` shows the cluster's hosts with
/// capacity bars and applied commits, its VMs with state and host, and the desired
/// tip's validation, filled in by its own script from `/status.json`; a screenshot is
/// kept in the target directory (`tmp/status-page.png`).
#[test]
fn the_status_page_shows_a_running_cluster_in_chromium() {
    let browser = chromium();
    let specs = vec![
        HostSpec::new("host1", Some("host2")).limits("4G", "100G", 8),
        HostSpec::new("host2", Some("host3")).limits("4G", "100G", 8),
        HostSpec::new("host3", None).limits("4G", "100G", 8),
    ];
    let mut c = Cluster::start(&specs, Options::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = std::fs::read_to_string(&c.hosts[0].config).unwrap();
    std::fs::write(&c.hosts[0].config, format!("{cfg}http: 127.0.0.1:{port}\n")).unwrap();
    c.start_agents();
    let commit = c.commit(
        &[
            (
                "vms/web1.yaml",
                Some(&vm_yaml("web1", "CS0", "host: host1\n")),
            ),
            (
                "vms/db1.yaml",
                Some(&vm_yaml("db1", "CS0", "host: host2\n")),
            ),
        ],
        "two VMs",
    );
    c.wait_until("web1 and db1 running", CONVERGE, |c| {
        c.running_complete(0, "web1") && c.running_complete(1, "db1")
    });
    c.wait_until(
        "status.json shows both and the commit applied",
        CONVERGE,
        |_| {
            let j = http_get(port, "/status.json");
            j.contains("\"vm\":\"web1\"")
                && j.contains("\"vm\":\"db1\"")
                && j.matches(&format!("\"applied_commit\":\"{commit}\""))
                    .count()
                    == 3
        },
    );
    let page = http_get(port, "/");
    assert!(
        page.contains(" 200 ") && page.contains("<script>"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external resources"
    );

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let dom = run_chromium(
        profile.path(),
        &["--virtual-time-budget=10000", "--dump-dom"],
        &url,
    );
    for want in [
        "agent healthy",
        "the desired tip validates",
        &commit[..10],
        "host1",
        "host2",
        "host3",
        "web1",
        "db1",
        "running",
        // Capacity bars: used and limit of each resource.
        "/ 4G",
        "/ 100G",
        "/ 8",
    ] {
        assert!(dom.contains(want), "{want} on the page:\n{dom}");
    }
    assert!(
        dom.contains(r#"<div id="banner" class="ok">agent healthy</div>"#),
        "{dom}"
    );
    // The owner column: each VM's owner under the desired state (pinned here).
    assert!(
        dom.contains("<td>web1</td><td>host1</td><td class=\"ok\">running</td><td>host1</td>"),
        "{dom}"
    );
    assert!(c
        .vms(0)
        .iter()
        .any(|v| v.name == "web1" && v.state == RunState::Running));

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        profile.path(),
        &[
            "--virtual-time-budget=10000",
            "--window-size=1280,1000",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    );
    let len = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 10_000,
        "a screenshot at {} ({len} bytes)",
        shot.display()
    );
    eprintln!(
        "status page screenshot: {} (browser {})",
        shot.display(),
        browser.display()
    );
    c.stop_agent(0);
}
