//! A seeded random sequence of commits (adds, removes, resizes, state changes, host
//! pins) mixed with agent restarts, for a bounded time. Afterwards actual equals desired
//! on every host, no VM exists twice, the unmanaged bystander is untouched, and every
//! job is accounted for (no job left waiting, reserved or buried). The seed is printed;
//! `FLOTILLA_CHURN_SEED=N` replays a run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla::actual::RunState;
use flotilla_e2e::{Cluster, HostSpec, Options};

/// splitmix64: small, seedable, good enough to pick test steps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Want {
    memory: &'static str,
    running: bool,
    pin: Option<&'static str>,
}

fn yaml(name: &str, w: &Want) -> String {
    let mut s = format!(
        "name: {name}\nprofile: CS0\nmemory: {}\nreplace: allow\n",
        w.memory
    );
    if !w.running {
        s += "state: stopped\n";
    }
    if let Some(h) = w.pin {
        s += &format!("host: {h}\n");
    }
    s
}

const HOSTS: [&str; 3] = ["host1", "host2", "host3"];
const SIZES: [&str; 3] = ["256M", "512M", "1G"];

/// What differs between the hosts and `desired`, if anything.
fn mismatch(c: &Cluster, desired: &BTreeMap<String, Want>) -> Option<String> {
    let mut seen: BTreeMap<String, Vec<(usize, flotilla::actual::ActualVm)>> = BTreeMap::new();
    for i in 0..3 {
        for v in c.vms(i) {
            if v.name != "bystander" {
                seen.entry(v.name.clone()).or_default().push((i, v));
            }
        }
    }
    for name in seen.keys() {
        if !desired.contains_key(name) {
            return Some(format!("{name} exists but is not desired"));
        }
    }
    for (name, w) in desired {
        let found = seen.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let [(i, v)] = found else {
            return Some(format!("{name} exists {} times", found.len()));
        };
        let want_state = if w.running {
            RunState::Running
        } else {
            RunState::Stopped
        };
        if v.memory.to_string() != w.memory
            || v.state != want_state
            || !v.marker.as_ref().is_some_and(|m| m.complete)
            || w.pin.is_some_and(|h| HOSTS[*i] != h)
        {
            return Some(format!(
                "{name} on {}: memory {} state {:?} complete {:?}; want {w:?}",
                HOSTS[*i],
                v.memory,
                v.state,
                v.marker.as_ref().map(|m| m.complete)
            ));
        }
    }
    None
}

#[test]
fn churn_converges_to_the_last_commit() {
    let seed: u64 = std::env::var("FLOTILLA_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("churn seed: {seed} (replay with FLOTILLA_CHURN_SEED={seed})");
    let mut rng = Rng(seed);
    let mut c = Cluster::start(
        &[
            HostSpec::new("host1", Some("host2")),
            HostSpec::new("host2", Some("host3")),
            HostSpec::new("host3", None),
        ],
        Options::default(),
    );
    // An operator's own VM: it must come out of the churn untouched.
    let bystander_conf = c.make_by_hand(1, "bystander");
    let before = std::fs::read_to_string(&bystander_conf).unwrap();
    c.start_agents();

    let mut desired: BTreeMap<String, Want> = BTreeMap::new();
    let started = Instant::now();
    let mut commits = 0;
    while commits < 12 && started.elapsed() < Duration::from_secs(40) {
        let mut files: Vec<(String, Option<String>)> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let name = format!("churn{}", rng.below(12));
            let op = rng.below(5);
            match (desired.get(&name).cloned(), op) {
                (None, _) => {
                    let w = Want {
                        memory: SIZES[rng.below(3) as usize],
                        running: rng.below(4) != 0,
                        pin: (rng.below(3) == 0).then(|| HOSTS[rng.below(3) as usize]),
                    };
                    desired.insert(name.clone(), w);
                }
                (Some(_), 0) if desired.len() > 1 => {
                    desired.remove(&name);
                }
                (Some(mut w), 1) => {
                    w.memory = SIZES[rng.below(3) as usize];
                    desired.insert(name.clone(), w);
                }
                (Some(mut w), 2) => {
                    w.running = !w.running;
                    desired.insert(name.clone(), w);
                }
                (Some(mut w), _) => {
                    w.pin = (rng.below(2) == 0).then(|| HOSTS[rng.below(3) as usize]);
                    desired.insert(name.clone(), w);
                }
            }
            let path = format!("vms/{name}.yaml");
            files.push((path, desired.get(&name).map(|w| yaml(&name, w))));
        }
        let refs: Vec<(&str, Option<&str>)> = files
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_deref()))
            .collect();
        c.commit(&refs, &format!("churn step {commits}"));
        commits += 1;
        if rng.below(4) == 0 {
            let i = rng.below(3) as usize;
            println!("step {commits}: restarting host{}'s agent", i + 1);
            c.stop_agent(i);
            c.start_agent(i);
        }
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
    }
    println!("{commits} commits; desired at the end: {desired:?}");

    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(why) = mismatch(&c, &desired) {
        if Instant::now() > deadline {
            panic!("not converged: {why}\n{}", c.logs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let after = std::fs::read_to_string(&bystander_conf).unwrap();
    assert_eq!(before, after, "the unmanaged VM's config is untouched");
    let by = c
        .vms(1)
        .into_iter()
        .find(|v| v.name == "bystander")
        .expect("bystander exists");
    assert_eq!(by.state, RunState::Running);
    assert!(by.marker.is_none());

    // Every job accounted for: nothing waiting, held or buried on any host.
    c.wait_until("every queue drained", Duration::from_secs(30), |c| {
        (0..c.hosts.len()).all(|i| {
            [
                flotilla::message::tubes::CREATE,
                flotilla::message::tubes::OPS,
            ]
            .iter()
            .all(|tube| {
                c.tube_stats(i, tube).is_none_or(|s| {
                    s.current_jobs_ready
                        + s.current_jobs_reserved
                        + s.current_jobs_delayed
                        + s.current_jobs_buried
                        == 0
                })
            })
        })
    });
}
