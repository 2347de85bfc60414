//! A real beanstalkd for tests (feature `testing`): started on a free port (of the
//! loopback address unless [`Config::listen`] says otherwise), stopped when dropped.
//!
//! ```no_run
//! let server = beanstalk::testing::Beanstalkd::start().expect("beanstalkd installed");
//! println!("listening on {}", server.addr());
//! ```

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Keep a binlog (`-b`) in a temporary directory, so jobs survive a restart.
    pub binlog: bool,
    /// `-z`: the largest job body in bytes (beanstalkd's default is 65535).
    pub max_job_size: Option<u64>,
    /// The program to run; `beanstalkd` from `PATH` when unset.
    pub program: Option<PathBuf>,
    /// `-l`: the address to listen on; 127.0.0.1 when unset. It must be reachable from
    /// this process: readiness is checked by connecting to it.
    pub listen: Option<Ipv4Addr>,
    /// A command the server is started through, with the program and its arguments
    /// appended: `["ip", "netns", "exec", "NAME"]` starts it in a network namespace.
    /// The wrapper must exec the program in its own process (as `ip netns exec` does):
    /// the server is recognised, and killed, by that process's id.
    pub wrapper: Vec<OsString>,
}

/// A running beanstalkd (on 127.0.0.1 unless configured otherwise), killed on drop.
#[derive(Debug)]
pub struct Beanstalkd {
    child: Option<Child>,
    port: u16,
    config: Config,
    binlog_dir: Option<tempfile::TempDir>,
}

/// A port free on `ip`, or on the loopback address when `ip` is not this network
/// namespace's (a server started in another namespace has that namespace's ports to
/// itself, so any port will do, and the bind in `spawn` is checked anyway).
fn free_port(ip: Ipv4Addr) -> io::Result<u16> {
    let listener = match TcpListener::bind((ip, 0)) {
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        }
        other => other,
    }?;
    Ok(listener.local_addr()?.port())
}

impl Beanstalkd {
    /// Starts a server with the default configuration.
    pub fn start() -> io::Result<Beanstalkd> {
        Beanstalkd::start_with(Config::default())
    }

    /// Starts a server with `config`.
    pub fn start_with(config: Config) -> io::Result<Beanstalkd> {
        let binlog_dir = if config.binlog {
            Some(
                tempfile::Builder::new()
                    .prefix("beanstalkd-binlog")
                    .tempdir()?,
            )
        } else {
            None
        };
        let mut server = Beanstalkd {
            child: None,
            port: 0,
            config,
            binlog_dir,
        };
        // Another test may take the port between our probe and beanstalkd's bind; then
        // beanstalkd exits at once and the next free port is tried.
        let mut last = None;
        for _ in 0..20 {
            server.port = free_port(server.ip())?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("could not start beanstalkd")))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let program = self
            .config
            .program
            .clone()
            .unwrap_or_else(|| PathBuf::from("beanstalkd"));
        let mut cmd = match self.config.wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(&program);
                cmd
            }
            None => Command::new(&program),
        };
        cmd.arg("-l")
            .arg(self.ip().to_string())
            .args(["-p", &self.port.to_string()]);
        if let Some(dir) = &self.binlog_dir {
            cmd.arg("-b").arg(dir.path());
        }
        if let Some(z) = self.config.max_job_size {
            cmd.args(["-z", &z.to_string()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run {}{} (install the `beanstalkd` package): {e}",
                    self.config
                        .wrapper
                        .iter()
                        .map(|w| format!("{} ", w.to_string_lossy()))
                        .collect::<String>(),
                    program.display()
                ),
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "beanstalkd exited with {status} on port {}",
                    self.port
                )));
            }
            if let Ok(sock) = TcpStream::connect((self.ip(), self.port)) {
                // Another test's server may hold the port (it took it between our probe
                // and our bind, and ours is about to exit): only our own pid will do.
                if server_pid(sock) == Some(child.id()) {
                    self.child = Some(child);
                    return Ok(());
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("port {} belongs to another server", self.port),
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "beanstalkd did not accept connections within 10 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `IP:PORT`: `127.0.0.1:PORT` unless [`Config::listen`] names another address.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip(), self.port)
    }

    /// The address it listens on.
    pub fn ip(&self) -> Ipv4Addr {
        self.config.listen.unwrap_or(Ipv4Addr::LOCALHOST)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The binlog directory, when started with one.
    pub fn binlog_dir(&self) -> Option<&Path> {
        self.binlog_dir.as_ref().map(|d| d.path())
    }

    /// Kills the server (SIGKILL: no chance to flush anything but what the binlog has).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (and binlog).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Asks the server on `sock` for its pid.
fn server_pid(mut sock: TcpStream) -> Option<u32> {
    use std::io::{Read, Write};
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    sock.write_all(b"stats\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((crate::proto::Answer::Ok(body), _))) = crate::proto::parse_answer(&buf) {
            return crate::stats::ServerStats::parse(&body)
                .ok()
                .and_then(|s| u32::try_from(s.pid).ok());
        }
        let n = sock.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Drop for Beanstalkd {
    fn drop(&mut self) {
        self.stop();
    }
}
