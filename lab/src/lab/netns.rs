//! A network namespace joined to this one by a veth pair, so the lab can cut one host
//! off the network while its processes keep running (issue 7, item 3).
//!
//! The pair gets a /30 of 198.18.0.0/15, the range RFC 2544 sets aside for testing
//! network equipment: no real network should route it, and a subnet something on
//! this machine already routes is skipped. Names carry this process's id and a
//! counter, so tests running in parallel (and in other test binaries) never collide,
//! and namespaces left behind by a test process that was killed are removed by the
//! next one.
//!
//! A cut takes the namespace's end of the pair down. The root end stays up and keeps
//! its route, so packets for the namespace are dropped at the veth instead of
//! following the default route off the machine; and each side keeps its own address
//! (Linux keeps the local route of an address whose link is down), so every host
//! still reaches its own beanstalkd.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The prefix of every namespace the lab makes: `flotilla-PID-N`.
const NS_PREFIX: &str = "flotilla-";

/// The `ip` program of iproute2 (root's `PATH` has it; a test's may not have `/sbin`).
fn ip_program() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|d| d.join("ip"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("ip"))
    })
}

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new(ip_program())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ip_program().display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this machine lets the lab put a host in its own network namespace: tries
/// the whole setup once (a namespace, a veth pair with addresses, a program run
/// inside) and removes it again. `Err` says what failed. `FLOTILLA_LAB_NETNS=off` in
/// the environment answers `Err` without trying, to run a test's fallback on a
/// machine that has namespaces.
pub fn netns_check() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if std::env::var_os("FLOTILLA_LAB_NETNS").is_some_and(|v| v == "off") {
                return Err("turned off by FLOTILLA_LAB_NETNS=off".into());
            }
            let ns = Netns::create()?;
            let out = Command::new(ip_program())
                .args(ns.exec_prefix().iter().skip(1))
                .arg("true")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run ip netns exec: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip netns exec: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(())
        })
        .clone()
}

/// [`netns_check`] as a yes or no.
pub fn netns_available() -> bool {
    netns_check().is_ok()
}

/// A network namespace with a veth pair to this process's namespace; both are removed
/// on drop (also while a failing test unwinds).
#[derive(Debug)]
pub struct Netns {
    name: String,
    root_if: String,
    ns_if: String,
    root_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
}

impl Netns {
    /// Makes the namespace and the pair, both ends up, loopback up inside.
    pub fn create() -> Result<Netns, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes: "fl" + a pid of at most 7 digits
        // (Linux's pid_max is 2^22) + "r" or "n" + the counter.
        let root_if = format!("fl{pid}r{k}");
        let ns_if = format!("fl{pid}n{k}");
        if root_if.len() > 15 {
            return Err(format!("interface name {root_if} is too long"));
        }
        let name = format!("{NS_PREFIX}{pid}-{k}");
        ip(&["netns", "add", &name])?;
        // From here on, drop removes what was made, whatever fails next.
        let mut ns = Netns {
            name,
            root_if,
            ns_if,
            root_addr: Ipv4Addr::UNSPECIFIED,
            ns_addr: Ipv4Addr::UNSPECIFIED,
        };
        ip(&[
            "link",
            "add",
            &ns.root_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
            "netns",
            &ns.name,
        ])?;
        // Up before the address is added: the kernel adds the subnet's route only for
        // a link that is up, and the check below counts routes.
        ip(&["link", "set", &ns.root_if, "up"])?;
        // A subnet another test or process takes at the same moment shows up as a
        // second route for it: then this one moves on to the next subnet.
        let start = pid.wrapping_mul(97).wrapping_add(k.wrapping_mul(7919));
        for attempt in 0..64u32 {
            let net = subnet(start.wrapping_add(attempt));
            if routed(net)? {
                continue;
            }
            let [a, b, c, d] = net.octets();
            let root_addr = Ipv4Addr::new(a, b, c, d + 1);
            let ns_addr = Ipv4Addr::new(a, b, c, d + 2);
            ip(&[
                "addr",
                "add",
                &format!("{root_addr}/30"),
                "dev",
                &ns.root_if,
            ])?;
            if routes(net)? > 1 {
                ip(&["addr", "flush", "dev", &ns.root_if])?;
                continue;
            }
            ns.root_addr = root_addr;
            ns.ns_addr = ns_addr;
            break;
        }
        if ns.root_addr.is_unspecified() {
            return Err("no free /30 in 198.18.0.0/15".into());
        }
        ns.ip_in(&[
            "addr",
            "add",
            &format!("{}/30", ns.ns_addr),
            "dev",
            &ns.ns_if,
        ])?;
        ns.ip_in(&["link", "set", "lo", "up"])?;
        ns.ip_in(&["link", "set", &ns.ns_if, "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`: `ip` acting inside the namespace.
    fn ip_in(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The namespace's name (`ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of the namespace's end of the pair: what listens inside binds here.
    pub fn addr(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// The address of this namespace's end: the namespace reaches servers of this
    /// namespace that listen here.
    pub fn root_addr(&self) -> Ipv4Addr {
        self.root_addr
    }

    /// `ip netns exec NAME`: a program and its arguments appended run inside (ip execs
    /// it, so the process id is the program's).
    pub fn exec_prefix(&self) -> Vec<OsString> {
        vec![
            ip_program().as_os_str().to_owned(),
            "netns".into(),
            "exec".into(),
            self.name.clone().into(),
        ]
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(ip_program());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Cuts the namespace off: its end of the pair goes down. Connections from inside
    /// fail at once (no route); packets from outside are dropped, so connections
    /// from here time out, as across a real network partition.
    pub fn cut(&self) -> Result<(), String> {
        self.ip_in(&["link", "set", &self.ns_if, "down"]).map(drop)
    }

    /// Joins the namespace again. Neighbour entries that failed during the cut are
    /// flushed, or the first connection after it would fail with "no route to host".
    pub fn heal(&self) -> Result<(), String> {
        self.ip_in(&["link", "set", &self.ns_if, "up"])?;
        ip(&["neigh", "flush", "dev", &self.root_if])?;
        self.ip_in(&["neigh", "flush", "dev", &self.ns_if])
            .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. The namespace itself goes when its last
        // process has exited; the name is released at once.
        let _ = ip(&["link", "del", &self.root_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The `i`th /30 of 198.18.0.0/15 (32768 of them).
fn subnet(i: u32) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    Ipv4Addr::from(base + (i % 32768) * 4)
}

/// How many routes of the main table cover `net`/30 or lie inside it, the default
/// route aside.
fn routes(net: Ipv4Addr) -> Result<usize, String> {
    let prefix = format!("{net}/30");
    let mut n = 0;
    for selector in ["match", "root"] {
        n += ip(&["-4", "route", "show", selector, &prefix])?
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with("default"))
            .count();
    }
    // A route of exactly this prefix is both a match and a root: count it once.
    let exact = ip(&["-4", "route", "show", "exact", &prefix])?
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    Ok(n - exact)
}

/// Whether something on this machine already routes `net`/30.
fn routed(net: Ipv4Addr) -> Result<bool, String> {
    Ok(routes(net)? > 0)
}

/// Removes namespaces (and their pairs) of lab processes that no longer run: a test
/// killed by a signal cannot clean up after itself.
fn sweep_stale() {
    let dead = |pid: &str| {
        pid.parse::<u32>().is_ok_and(|p| {
            p > 1 && p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()
        })
    };
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(NS_PREFIX) else {
                continue;
            };
            if rest.split_once('-').is_some_and(|(pid, _)| dead(pid)) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    // A namespace that still holds a process lives on after `netns del`, and its pair
    // with it: delete the pairs too.
    if let Ok(links) = ip(&["-o", "link", "show", "type", "veth"]) {
        for l in links.lines() {
            // "7: fl123r0@if2: <...": the name is the second field, before any '@'.
            let Some(ifname) = l.split_whitespace().nth(1) else {
                continue;
            };
            let ifname = ifname.trim_end_matches(':');
            let ifname = ifname.split('@').next().unwrap_or(ifname);
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let Some((pid, k)) = ifname.strip_prefix("fl").and_then(|r| r.split_once('r')) else {
                continue;
            };
            if digits(pid) && digits(k) && dead(pid) {
                let _ = ip(&["link", "del", ifname]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beanstalk::testing::{Beanstalkd, Config};
    use std::net::TcpStream;
    use std::time::Duration;

    fn reaches(addr: &str) -> bool {
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(500)).is_ok()
    }

    #[test]
    fn a_cut_drops_traffic_to_the_namespace_and_a_heal_restores_it_at_once() {
        if let Err(why) = netns_check() {
            eprintln!("SKIPPED: network namespaces are not available here: {why}");
            return;
        }
        let ns = Netns::create().unwrap();
        let (name, root_if) = (ns.name.clone(), ns.root_if.clone());
        assert!(root_if.len() <= 15);
        let inside = Beanstalkd::start_with(Config {
            listen: Some(ns.addr()),
            wrapper: ns.exec_prefix(),
            ..Config::default()
        })
        .expect("beanstalkd inside");
        let outside = Beanstalkd::start_with(Config {
            listen: Some(ns.root_addr()),
            ..Config::default()
        })
        .expect("beanstalkd outside");
        assert!(reaches(&inside.addr()) && reaches(&outside.addr()));
        ns.cut().unwrap();
        assert!(!reaches(&inside.addr()), "the namespace is cut off");
        assert!(
            reaches(&outside.addr()),
            "this side keeps its address during a cut"
        );
        ns.heal().unwrap();
        assert!(reaches(&inside.addr()), "reachable again right after heal");
        drop(inside);
        drop(ns);
        assert!(
            !ip(&["netns", "list"]).unwrap().contains(&name),
            "namespace removed"
        );
        assert!(
            ip(&["link", "show", &root_if]).is_err(),
            "veth pair removed"
        );
    }

    #[test]
    fn a_test_that_panics_leaves_no_namespace_behind() {
        if let Err(why) = netns_check() {
            eprintln!("SKIPPED: network namespaces are not available here: {why}");
            return;
        }
        let made = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(|| {
            let ns = Netns::create().unwrap();
            *made.lock().unwrap() = Some((ns.name.clone(), ns.root_if.clone()));
            panic!("a failing test");
        });
        assert!(r.is_err());
        let (name, root_if) = made.lock().unwrap().take().expect("made one");
        assert!(!ip(&["netns", "list"]).unwrap().contains(&name));
        assert!(ip(&["link", "show", &root_if]).is_err());
    }

    #[test]
    fn subnets_are_disjoint_30s_of_the_benchmarking_range() {
        assert_eq!(subnet(0), Ipv4Addr::new(198, 18, 0, 0));
        assert_eq!(subnet(1), Ipv4Addr::new(198, 18, 0, 4));
        assert_eq!(subnet(32767), Ipv4Addr::new(198, 19, 255, 252));
        assert_eq!(subnet(32768), subnet(0));
    }
}
