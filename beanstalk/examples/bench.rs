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
    let (mut cyc, mut seq, mut pipe, mut g_cyc, mut g_puts) =
        (vec![], vec![], vec![], vec![], vec![]);
    // Rounds interleave the two clients so both meet the same server state and machine load.
    for round in 0..ROUNDS {
        rt.block_on(async {
            cyc.push(cycles(&addr, &format!("bench.cycles.{round}")).await);
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
    }
    let (g_cyc, g_puts) = (best(&g_cyc), best(&g_puts));
    let (cyc, seq, pipe) = (best(&cyc), best(&seq), best(&pipe));
    println!("beanstalkd at {addr}; 1 KiB bodies; best of {ROUNDS} rounds");
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "measure", "flotilla", "greenstalk", "ratio"
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}x",
        "(a) put+reserve+delete cycles/s (sequential)",
        cyc,
        g_cyc,
        cyc / g_cyc
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}x",
        "(b) puts/s, pipelined vs greenstalk's puts",
        pipe,
        g_puts,
        pipe / g_puts
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}x",
        "    puts/s, both sequential (reference)",
        seq,
        g_puts,
        seq / g_puts
    );
    let ok_a = cyc >= 2.0 * g_cyc;
    let ok_b = pipe >= 5.0 * g_puts;
    println!(
        "targets: (a) >= 2x: {}; (b) >= 5x: {}",
        if ok_a { "met" } else { "MISSED" },
        if ok_b { "met" } else { "MISSED" }
    );
}
