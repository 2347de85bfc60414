//! Throughput of this client against a beanstalkd, compared with Python's greenstalk on
//! the same server in the same run.
//!
//! Run it through `beanstalk/bench/run` (installs greenstalk, builds in release, prints the
//! table). Directly: `cargo run --release -p beanstalk --features testing --example bench
//! -- [--addr HOST:PORT] [--python PYTHON]`; without `--addr` it starts its own beanstalkd.
//!
//! Measured, each the best of three rounds:
//! - (a) sequential cycles: `put` a 1 KiB body, `reserve` it, `delete` it, one after the other;
//! - (b) puts: 1 KiB bodies, pipelined with `put_many` in batches of 1,000;
//!   and sequential `put`s for reference;
//! - (c) the same with greenstalk: cycles (a) and sequential puts (it cannot pipeline).

use std::process::Command;
use std::time::{Duration, Instant};

use beanstalk::{Client, PutJob, PutParams};

const BODY: usize = 1024;
const CYCLES: u64 = 20_000;
const PUTS: u64 = 200_000;
const SEQ_PUTS: u64 = 50_000;
const BATCH: usize = 1000;
const ROUNDS: usize = 3;

const P: PutParams = PutParams {
    pri: 1024,
    delay: 0,
    ttr: 120,
};

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn cycles(addr: &str, tube: &str) -> f64 {
    let mut c = Client::connect(addr).await.expect("connect");
    c.use_tube(tube).await.unwrap();
    c.watch(tube).await.unwrap();
    c.ignore("default").await.unwrap();
    let body = vec![b'c'; BODY];
    let start = Instant::now();
    for _ in 0..CYCLES {
        c.put(&body, P).await.unwrap();
        let job = c.reserve().await.unwrap();
        c.delete(job.id).await.unwrap();
    }
    rate(CYCLES, start.elapsed())
}

/// The same cycles with the client's pipelining: the `delete` of one cycle goes out in
/// one write with the `put` and `reserve` of the next, one round trip per cycle. Each
/// job is still put, reserved and deleted before the next one is reserved.
async fn pipelined_cycles(addr: &str, tube: &str) -> f64 {
    use beanstalk::proto::{Answer, Request};
    let mut c = Client::connect(addr).await.expect("connect");
    c.use_tube(tube).await.unwrap();
    c.watch(tube).await.unwrap();
    c.ignore("default").await.unwrap();
    let body = vec![b'c'; BODY];
    let put = Request::Put {
        pri: P.pri,
        delay: P.delay,
        ttr: P.ttr,
        body: &body,
    };
    let start = Instant::now();
    let mut held = None;
    for _ in 0..CYCLES {
        let answers = match held {
            None => c.pipeline(&[put, Request::Reserve]).await.unwrap(),
            Some(id) => {
                let a = c
                    .pipeline(&[Request::Delete(id), put, Request::Reserve])
                    .await
                    .unwrap();
                assert_eq!(a[0], Answer::Deleted);
                a
            }
        };
        match answers.last() {
            Some(Answer::Reserved(id, _)) => held = Some(*id),
            other => panic!("{other:?}"),
        }
    }
    if let Some(id) = held {
        c.delete(id).await.unwrap();
    }
    rate(CYCLES, start.elapsed())
}

async fn sequential_puts(addr: &str, tube: &str) -> f64 {
    let mut c = Client::connect(addr).await.expect("connect");
    c.use_tube(tube).await.unwrap();
    let body = vec![b's'; BODY];
    let start = Instant::now();
    for _ in 0..SEQ_PUTS {
        c.put(&body, P).await.unwrap();
    }
    rate(SEQ_PUTS, start.elapsed())
}

async fn pipelined_puts(addr: &str, tube: &str) -> f64 {
    let mut c = Client::connect(addr).await.expect("connect");
    c.use_tube(tube).await.unwrap();
    let body = vec![b'p'; BODY];
    let jobs: Vec<PutJob<'_>> = (0..BATCH).map(|_| PutJob::new(&body, P)).collect();
    let start = Instant::now();
    let mut done = 0;
    while done < PUTS {
        for r in c.put_many(&jobs).await.unwrap() {
            r.unwrap();
        }
        done += BATCH as u64;
    }
    rate(done, start.elapsed())
}

/// What beanstalkd itself accepts: pre-encoded puts blasted down a raw socket by one
/// thread while another counts the answers. No client does less work than this, so it is
/// the ceiling for (b).
fn raw_socket_puts(addr: &str, tube: &str) -> f64 {
    use std::io::{BufRead, BufReader, Write};
    let mut sock = std::net::TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    sock.write_all(format!("use {tube}\r\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut chunk = Vec::new();
    for _ in 0..BATCH {
        chunk.extend_from_slice(format!("put 1024 0 120 {BODY}\r\n").as_bytes());
        chunk.extend_from_slice(&[b'r'; BODY]);
        chunk.extend_from_slice(b"\r\n");
    }
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        for _ in 0..PUTS / BATCH as u64 {
            sock.write_all(&chunk).unwrap();
        }
    });
    // Count answer lines in large reads; every answer must be INSERTED.
    let (mut answers, mut buf) = (0u64, vec![0u8; 1 << 20]);
    let mut inner = reader.into_inner();
    let mut carry = 0usize;
    while answers < PUTS {
        use std::io::Read;
        let n = inner.read(&mut buf[carry..]).unwrap();
        assert!(n > 0, "server closed");
        let data = &buf[..carry + n];
        let mut start_of_line = 0;
        for i in 1..data.len() {
            if data[i - 1] == b'\r' && data[i] == b'\n' {
                assert!(data[start_of_line..].starts_with(b"INSERTED"));
                answers += 1;
                start_of_line = i + 1;
            }
        }
        let rest = data.len() - start_of_line;
        buf.copy_within(start_of_line..start_of_line + rest, 0);
        carry = rest;
    }
    let elapsed = start.elapsed();
    writer.join().unwrap();
    rate(PUTS, elapsed)
}

fn best(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(0.0, f64::max)
}

fn greenstalk(python: &str, addr: &str, mode: &str, count: u64, tube: &str) -> f64 {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/greenstalk_bench.py");
    let out = Command::new(python)
        .args([script, addr, mode, &count.to_string(), tube])
        .output()
        .expect("run python");
    if !out.status.success() {
        panic!(
            "greenstalk benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("greenstalk_bench.py prints a rate")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let python = flag("--python").unwrap_or_else(|| "python3".into());
    let _server;
    let addr = match flag("--addr") {
        Some(a) => a,
        None => {
            let s = beanstalk::testing::Beanstalkd::start().expect("start beanstalkd");
            let a = s.addr();
            _server = s;
            a
        }
    };
    // One thread: a single connection gains nothing from a work-stealing pool, and the
    // other core is left to beanstalkd.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut cyc, mut pcyc, mut seq, mut pipe, mut raw) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut g_cyc, mut g_puts) = (vec![], vec![]);
    // Rounds interleave the two clients so both meet the same server state and machine load.
    for round in 0..ROUNDS {
        rt.block_on(async {
            cyc.push(cycles(&addr, &format!("bench.cycles.{round}")).await);
            pcyc.push(pipelined_cycles(&addr, &format!("bench.pcycles.{round}")).await);
        });
        g_cyc.push(greenstalk(
            &python,
            &addr,
            "cycles",
            CYCLES,
            &format!("gs.cycles.{round}"),
        ));
        rt.block_on(async {
            seq.push(sequential_puts(&addr, &format!("bench.seq.{round}")).await);
        });
        g_puts.push(greenstalk(
            &python,
            &addr,
            "puts",
            SEQ_PUTS,
            &format!("gs.puts.{round}"),
        ));
        rt.block_on(async {
            pipe.push(pipelined_puts(&addr, &format!("bench.pipe.{round}")).await);
        });
        raw.push(raw_socket_puts(&addr, &format!("bench.raw.{round}")));
    }
    let (g_cyc, g_puts) = (best(&g_cyc), best(&g_puts));
    let (cyc, pcyc, seq, pipe, raw) =
        (best(&cyc), best(&pcyc), best(&seq), best(&pipe), best(&raw));
    let row = |what: &str, ours: f64, theirs: f64| {
        println!(
            "{what:<52} {ours:>10.0} {theirs:>11.0} {:>7.2}x",
            ours / theirs
        );
    };
    println!("beanstalkd at {addr}; 1 KiB bodies; best of {ROUNDS} rounds");
    println!(
        "{:<52} {:>10} {:>11} {:>8}",
        "measure (per second)", "beanstalk", "greenstalk", "ratio"
    );
    row(
        "(a) put+reserve+delete cycles, each call awaited",
        cyc,
        g_cyc,
    );
    row(
        "(a) the same cycles, delete pipelined with next put",
        pcyc,
        g_cyc,
    );
    row(
        "(b) puts, pipelined (put_many) vs greenstalk's puts",
        pipe,
        g_puts,
    );
    row("    puts, both one at a time", seq, g_puts);
    println!(
        "{:<52} {raw:>10.0} {:>11} {:>7.0}% of it",
        "    ceiling: beanstalkd fed pre-encoded puts",
        "-",
        100.0 * pipe / raw
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "targets: (a) >= 2x greenstalk: {} awaited, {} pipelined; (b) >= 5x greenstalk: {} (ceiling allows {:.2}x)",
        verdict(cyc >= 2.0 * g_cyc),
        verdict(pcyc >= 2.0 * g_cyc),
        verdict(pipe >= 5.0 * g_puts),
        raw / g_puts
    );
}
