//! `vm-sim`'s answers compared with vm-bhyve's, character for character, where research
//! part B gives the text: `vm list`, `vm create`'s result, `vm start`, `vm info`, and
//! every row of table B.4 (message, stream, `$0:` prefix and exit code).

mod vm_sim_support;

use std::path::Path;

use vm_sim_support::{text, SimHost};

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Runs `vm ARGS` and checks exit code, stdout and stderr exactly.
#[track_caller]
fn expect(host: &SimHost, args: &[&str], code: i32, stdout: &str, stderr: &str) {
    let out = host.vm(args);
    assert_eq!(
        (
            out.status.code(),
            text(&out.stdout).as_str(),
            text(&out.stderr).as_str()
        ),
        (Some(code), stdout, stderr),
        "vm {}",
        args.join(" ")
    );
}

fn conf_value(host: &SimHost, name: &str, key: &str) -> String {
    let c = flotilla::conf::Conf::parse(&host.read(&format!("{name}/{name}.conf")));
    c.get(key)
        .unwrap_or_else(|| panic!("{key} missing"))
        .to_string()
}

#[test]
fn create_prints_nothing_and_writes_the_observed_conf() {
    let host = SimHost::new();
    expect(
        &host,
        &["create", "-t", "default", "-s", "1G", "alpha"],
        0,
        "",
        "",
    );
    let uuid = conf_value(&host, "alpha", "uuid");
    let mac = conf_value(&host, "alpha", "network0_mac");
    assert_eq!(
        host.read("alpha/alpha.conf"),
        fill(
            &golden("create_alpha.conf"),
            &[("UUID", uuid.clone()), ("MAC", mac.clone())]
        )
    );
    // uuidgen's shape, and B.3's MAC: 58:9c:fc:0X:XX:XX from md5 of name:0:time:i.
    assert_eq!(uuid.len(), 36);
    assert!(mac.starts_with("58:9c:fc:0") && mac.len() == 17, "{mac}");
    let log = host.read("alpha/vm-bhyve.log");
    assert!(
        log.contains(&format!("generated static mac {mac} (based on 'alpha:0:")),
        "{log}"
    );
    let key = log
        .split("(based on '")
        .nth(1)
        .unwrap()
        .trim_end()
        .trim_end_matches("')");
    let hex = flotilla_lab::sim::md5::hex(key.as_bytes());
    assert_eq!(
        mac,
        format!("58:9c:fc:0{}:{}:{}", &hex[0..1], &hex[1..3], &hex[3..5])
    );
    // disk0.img: mode 600, 1 GiB apparent, sparse.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = std::fs::metadata(host.path("alpha/disk0.img")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert!(md.blocks() * 512 < 1 << 20, "the image is sparse");
}

#[test]
fn create_defaults_to_20g_and_strips_template_disk_sizes() {
    let host = SimHost::new();
    host.write(
        ".templates/two.conf",
        "loader=\"bhyveload\"\ncpu=1\nmemory=512M\ndisk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\n\
         disk1_type=\"virtio-blk\"\ndisk1_name=\"disk1.img\"\ndisk1_size=\"2G\"\n",
    );
    expect(
        &host,
        &["create", "-t", "two", "-c", "2", "-m", "1G", "big"],
        0,
        "",
        "",
    );
    assert_eq!(
        std::fs::metadata(host.path("big/disk0.img")).unwrap().len(),
        20 << 30
    );
    assert_eq!(
        std::fs::metadata(host.path("big/disk1.img")).unwrap().len(),
        2 << 30
    );
    let conf = host.read("big/big.conf");
    assert!(!conf.contains("disk1_size"), "{conf}");
    assert!(
        conf.contains("cpu=\"2\"\nmemory=\"1G\"\n"),
        "sysrc rewrote in place: {conf}"
    );
}

#[test]
fn list_matches_the_reference_output() {
    let host = SimHost::new();
    host.write(
        ".templates/uefi.conf",
        "loader=\"uefi\"\ncpu=1\nmemory=256M\ngraphics=\"yes\"\ngraphics_listen=\"127.0.0.1\"\n\
         graphics_port=\"5900\"\ndisk0_type=\"nvme\"\ndisk0_name=\"disk0.img\"\n",
    );
    expect(&host, &["create", "-s", "1G", "alpha"], 0, "", "");
    expect(
        &host,
        &[
            "create", "-t", "uefi", "-c", "4", "-m", "2G", "-s", "1G", "beta",
        ],
        0,
        "",
        "",
    );
    let rc = host.path(".config/rc.conf");
    let out = std::process::Command::new(&host.sysrc)
        .args(["-f", rc.to_str().unwrap(), "vm_list+=alpha"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "vm_list:  -> alpha\n");
    let start = host.vm(&["start", "alpha"]);
    assert_eq!(
        text(&start.stdout),
        fill(
            &golden("start_alpha.txt"),
            &[("VM_DIR", host.vm_dir.display().to_string())]
        )
    );
    assert_eq!(start.status.code(), Some(0));
    assert!(host.vm(&["start", "beta"]).status.success());
    let alpha = host.bhyve_pid("alpha");
    let beta = host.bhyve_pid("beta");
    assert_eq!(
        host.list(),
        fill(
            &golden("list_reference.txt"),
            &[
                ("PID_ALPHA", alpha.to_string()),
                ("PID_BETA", beta.to_string())
            ]
        )
    );
    // `vm li` is `vm list`; `-r` hides only Stopped rows.
    assert_eq!(text(&host.vm(&["li", "-r"]).stdout), host.list());
}

#[test]
fn info_matches_vm_bhyve_layout_stopped_and_running() {
    let host = SimHost::new();
    expect(&host, &["create", "-s", "1G", "alpha"], 0, "", "");
    let vars = |pid: String| {
        vec![
            ("UUID", conf_value(&host, "alpha", "uuid")),
            ("MAC", conf_value(&host, "alpha", "network0_mac")),
            ("VM_DIR", host.vm_dir.display().to_string()),
            ("PID_ALPHA", pid),
        ]
    };
    expect(
        &host,
        &["info", "alpha"],
        0,
        &fill(&golden("info_alpha_stopped.txt"), &vars(String::new())),
        "",
    );
    assert!(host.vm(&["start", "alpha"]).status.success());
    let pid = host.bhyve_pid("alpha");
    expect(
        &host,
        &["info", "alpha"],
        0,
        &fill(&golden("info_alpha_running.txt"), &vars(pid.to_string())),
        "",
    );
    // Without a name: every guest.
    expect(
        &host,
        &["info"],
        0,
        &fill(&golden("info_alpha_running.txt"), &vars(pid.to_string())),
        "",
    );
}

#[test]
fn datastore_list_prints_printf_columns() {
    let host = SimHost::new();
    let ds2 = host.tmp.path().join("ds2");
    std::fs::create_dir(&ds2).unwrap();
    expect(
        &host,
        &["datastore", "add", "ds2", ds2.to_str().unwrap()],
        0,
        "",
        "",
    );
    let row = |a: &str, b: &str, c: &str, d: &str| format!("{a:<15} {b:<11} {c:<25} {d}\n");
    let want = format!(
        "NAME            TYPE        PATH                      ZFS DATASET\n{}{}",
        row("default", "directory", host.vm_dir.to_str().unwrap(), "-"),
        row("ds2", "directory", ds2.to_str().unwrap(), "-"),
    );
    expect(&host, &["datastore", "list"], 0, &want, "");
    expect(
        &host,
        &["create", "-d", "ds2", "-s", "1M", "gamma"],
        0,
        "",
        "",
    );
    assert!(ds2.join("gamma/gamma.conf").is_file());
    let p = host.prefix();
    expect(
        &host,
        &["create", "gamma"],
        1,
        "",
        &format!(
            "{p}ERROR: virtual machine already exists in {}/gamma\n",
            ds2.display()
        ),
    );
    assert!(host.list().contains("gamma  ds2 "), "{}", host.list());
}

/// Table B.4, row by row.
#[test]
fn every_error_row_of_table_b4() {
    let host = SimHost::new();
    let p = host.prefix();
    let vm_dir = host.vm_dir.display().to_string();

    for bad in ["a", "-bad", "bad_", "bad name"] {
        // `-bad` is taken by getopts as options, as in vm-bhyve, and gives the usage.
        if bad.starts_with('-') {
            let out = host.vm(&["create", bad]);
            assert_eq!(out.status.code(), Some(1));
            assert!(text(&out.stdout).starts_with("Usage: vm"), "{out:?}");
            expect(
                &host,
                &["create", "--", bad],
                1,
                "",
                &format!("{p}ERROR: invalid virtual machine name - '{bad}'\n"),
            );
            continue;
        }
        expect(
            &host,
            &["create", bad],
            1,
            "",
            &format!("{p}ERROR: invalid virtual machine name - '{bad}'\n"),
        );
    }
    expect(&host, &["create", "alpha"], 0, "", "");
    expect(
        &host,
        &["create", "alpha"],
        1,
        "",
        &format!("{p}ERROR: virtual machine already exists in {vm_dir}/alpha\n"),
    );
    expect(
        &host,
        &["create", "-t", "nosuch", "beta"],
        1,
        "",
        &format!("{p}ERROR: unable to find template {vm_dir}/.templates/nosuch.conf\n"),
    );
    expect(
        &host,
        &["create", "-d", "nosuch", "beta"],
        1,
        "",
        &format!("{p}ERROR: unable to load datastore - 'nosuch'\n"),
    );
    host.write(".templates/nodisk.conf", "cpu=1\nmemory=256M\n");
    expect(
        &host,
        &["create", "-t", "nodisk", "beta"],
        1,
        "",
        &format!("{p}ERROR: template is missing disk0_name specification\n"),
    );

    expect(
        &host,
        &["destroy", "nosuch"],
        1,
        "",
        &format!("{p}ERROR: nosuch doesn't appear to be a valid virtual machine\n"),
    );

    expect(
        &host,
        &["start", "nosuch"],
        0,
        "Starting nosuch\n  ! nosuch does not seem to be a valid virtual machine\n",
        "",
    );
    expect(
        &host,
        &["stop", "nosuch"],
        0,
        "",
        &format!("{p}WARNING: nosuch doesn't appear to be a running virtual machine\n"),
    );
    expect(
        &host,
        &["poweroff", "beta"],
        1,
        "",
        &format!("{p}ERROR: beta doesn't appear to be a running virtual machine\n"),
    );
    expect(
        &host,
        &["reset", "beta"],
        1,
        "",
        &format!("{p}ERROR: beta doesn't appear to be a running virtual machine\n"),
    );
    expect(
        &host,
        &["info", "nosuch"],
        1,
        "",
        &format!("{p}ERROR: unable to locate virtual machine 'nosuch'\n"),
    );

    // Running: start refuses on stdout with exit 0, destroy refuses on the lock.
    assert!(host.vm(&["start", "alpha"]).status.success());
    host.bhyve_pid("alpha");
    expect(
        &host,
        &["start", "alpha"],
        0,
        &format!("Starting alpha\n  * found guest in {vm_dir}/alpha\n  ! guest appears to be running already\n"),
        "",
    );
    let locked = format!(
        "{p}WARNING: alpha appears to be running on {} (locked)\n",
        host.hostname
    );
    expect(&host, &["destroy", "-f", "alpha"], 1, "", &locked);
    expect(&host, &["destroy", "alpha"], 1, "", &locked);
    // /dev/vmm present without a lock.
    std::fs::remove_file(host.path("alpha/run.lock")).unwrap();
    expect(
        &host,
        &["destroy", "-f", "alpha"],
        1,
        "",
        &format!("{p}WARNING: alpha appears to be running locally (vmm exists)\n"),
    );
    expect(&host, &["poweroff", "-f", "alpha"], 0, "", "");
    host.wait_state("alpha", |s| s == "Stopped");
    // `_run` removes `console` last; until then it could remove the lock written next.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while host.path("alpha/console").exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // A lock from another host blocks destroy too.
    host.write("alpha/run.lock", "otherhost\n");
    expect(
        &host,
        &["destroy", "-f", "alpha"],
        1,
        "",
        &format!("{p}WARNING: alpha appears to be running on otherhost (locked)\n"),
    );
    std::fs::remove_file(host.path("alpha/run.lock")).unwrap();

    // The startup checks.
    host.write(".config/rc.conf", "vm_enable=\"NO\"\n");
    expect(
        &host,
        &["list"],
        1,
        "",
        &format!("{p}ERROR: $vm_enable is not enabled in /etc/rc.conf!\n"),
    );
    host.write(
        ".config/rc.conf",
        "vm_enable=\"YES\"\nvm_dir=\"/nonexistent/vm\"\n",
    );
    expect(
        &host,
        &["list"],
        1,
        "",
        &format!("{p}ERROR: $vm_dir has not been configured or is not a valid directory\n"),
    );
}

#[test]
fn commands_abbreviate_and_unknown_ones_print_usage() {
    let host = SimHost::new();
    let p = host.prefix();
    expect(
        &host,
        &["st", "alpha"],
        1,
        "",
        &format!("{p}ERROR: ambiguous command 'st'\n"),
    );
    let out = host.vm(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("Usage: vm"));
    assert_eq!(text(&out.stderr), "");
    expect(
        &host,
        &["li"],
        0,
        "NAME  DATASTORE  LOADER  CPU  MEMORY  VNC  AUTO  STATE\n",
        "",
    );
}
