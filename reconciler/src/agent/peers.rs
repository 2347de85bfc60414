//! Connections to the cluster's beanstalkd servers, this host's and the others'.
//!
//! One lazily opened connection per address, shared behind a lock (puts and peeks are
//! short). A connection that fails is dropped and opened again on the next call, so a
//! host whose beanstalkd is down costs one quick refusal per call, never a hang: every
//! call has a time limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beanstalk::{Client, Options, PutParams};
use tokio::sync::Mutex;

use crate::message::{self, tubes, Envelope, Message};

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// beanstalkd failed or could not be reached.
    #[error("beanstalkd at {addr}: {source}")]
    Queue {
        /// The server.
        addr: String,
        /// Why.
        #[source]
        source: beanstalk::Error,
    },
    /// The inventory there is not one this host can read.
    #[error("the inventory at {addr} cannot be read: {reason}")]
    BadInventory {
        /// The server.
        addr: String,
        /// Why.
        reason: String,
    },
}

impl PeerError {
    /// True when nothing was sent: the connection could not even be opened, so a put
    /// certainly did not happen.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            PeerError::Queue {
                source: beanstalk::Error::Connect { .. },
                ..
            }
        )
    }
}

/// This host's inventories in one beanstalkd.
#[derive(Debug, Default)]
struct Published {
    /// The id of the last one put.
    last: Option<u64>,
    /// Those retired (buried), and when.
    buried: Vec<(u64, Instant)>,
}

/// Reserves and buries job `id`: it is no longer ready, nor deleted. False when it is
/// gone or reserved elsewhere (another publisher retired it).
async fn retire(c: &mut Client, id: u64) -> Result<bool, beanstalk::Error> {
    match c.reserve_job(id).await {
        Ok(_) => c.bury(id, 0).await.map(|()| true),
        Err(beanstalk::Error::NotFound) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The last inventory read at one address for one host.
#[derive(Debug, Clone)]
struct LastRead {
    /// The inventory tube's `total-jobs` (its puts) just before the peek; `None` when a
    /// publication was under way (more than one ready), so the peek may have found the
    /// one it retires.
    puts: Option<u64>,
    /// When it was read.
    at: Instant,
    /// Whether its signature, address and age were checked.
    verified: bool,
    /// When it was sent (seconds since the Unix epoch), to check its age again.
    sent_at: u64,
    inventory: Option<message::Inventory>,
}

/// The connections.
#[derive(Debug)]
pub struct Peers {
    conns: Mutex<HashMap<String, Arc<Mutex<Option<Client>>>>>,
    /// Per address, what this host published there.
    published: std::sync::Mutex<HashMap<String, Published>>,
    /// How long a retired inventory stays buried before it is deleted.
    retire_grace: Duration,
    /// Per address and host, the inventory last read there (issue 13: each pass read
    /// every peer's inventory again, changed or not).
    reads: std::sync::Mutex<HashMap<(String, String), LastRead>>,
    /// How long a read inventory is used without a peek while the put count stays the
    /// same: a bound against a counter that came back to the same value (a server
    /// restarted without its binlog).
    reread_after: Duration,
    /// `peek-ready` commands this client sent, for benchmarks.
    peeks: std::sync::atomic::AtomicU64,
}

impl Default for Peers {
    fn default() -> Peers {
        Peers {
            conns: Mutex::default(),
            published: std::sync::Mutex::default(),
            // A peek answered this long after it was asked has long been given up: the
            // reader's call times out after `call_timeout` and drops the connection.
            retire_grace: 2 * options().call_timeout.unwrap_or(Duration::from_secs(5)),
            reads: std::sync::Mutex::default(),
            reread_after: Duration::from_secs(30),
            peeks: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

fn options() -> Options {
    Options {
        call_timeout: Some(Duration::from_secs(5)),
        connect_timeout: Duration::from_secs(2),
    }
}

impl Peers {
    /// No connections yet.
    pub fn new() -> Peers {
        Peers::default()
    }

    async fn slot(&self, addr: &str) -> Arc<Mutex<Option<Client>>> {
        let mut conns = self.conns.lock().await;
        conns.entry(addr.to_string()).or_default().clone()
    }

    /// Runs `f` on the connection to `addr`, opening it if needed and dropping it after
    /// a failure.
    async fn with<T, F>(&self, addr: &str, f: F) -> Result<T, PeerError>
    where
        F: for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, beanstalk::Error>> + Send + 'c>,
        >,
    {
        let slot = self.slot(addr).await;
        let mut guard = slot.lock().await;
        let queue = |source| PeerError::Queue {
            addr: addr.to_string(),
            source,
        };
        if guard.is_none() {
            *guard = Some(Client::connect_with(addr, options()).await.map_err(queue)?);
        }
        let client = guard.as_mut().expect("connected above");
        let result = f(client).await;
        if result.as_ref().is_err_and(|e| e.is_disconnect()) {
            *guard = None;
        }
        result.map_err(queue)
    }

    /// Puts `envelope` on `tube` at `addr`.
    pub async fn put(
        &self,
        addr: &str,
        tube: &'static str,
        envelope: &Envelope,
        params: PutParams,
    ) -> Result<u64, PeerError> {
        let body = message::encode(envelope);
        self.with(addr, move |c| {
            Box::pin(async move {
                c.use_tube(tube).await?;
                c.put(&body, params).await
            })
        })
        .await
    }

    /// `peek-ready` commands this client has sent.
    pub fn peeks(&self) -> u64 {
        self.peeks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the inventory published at `addr`, host `host`'s beanstalkd (the oldest
    /// ready one if several are there for a moment), and how long the server took to
    /// answer. With `verify`, an inventory whose signature does not verify under the keys,
    /// that is not addressed as `host`'s inventory, or that is older than the window
    /// (seconds), is an error.
    ///
    /// The inventory is peeked only when the tube's put count moved since the last read
    /// (any change, smaller too: a server restarted without its binlog counts from zero),
    /// or that read is older than `reread_after`; otherwise the last one read is
    /// answered again, its age checked anew.
    pub async fn inventory(
        &self,
        addr: &str,
        host: &str,
        verify: Option<(&crate::auth::Keys, u64)>,
    ) -> Result<(Option<message::Inventory>, Duration), PeerError> {
        self.inventory_read(addr, host, verify)
            .await
            .map(|(inv, took, _)| (inv, took))
    }

    /// [`Peers::inventory`], and whether it was peeked (true) or the last one read was
    /// still current (false).
    pub async fn inventory_read(
        &self,
        addr: &str,
        host: &str,
        verify: Option<(&crate::auth::Keys, u64)>,
    ) -> Result<(Option<message::Inventory>, Duration, bool), PeerError> {
        let started = Instant::now();
        let key = (addr.to_string(), host.to_string());
        let now = message::now();
        let last = {
            let reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            reads.get(&key).cloned().filter(|r| {
                r.at.elapsed() < self.reread_after
                    && (r.verified || verify.is_none())
                    && verify.is_none_or(|(_, window)| r.sent_at.abs_diff(now) <= window)
            })
        };
        let known = last.as_ref().and_then(|r| r.puts);
        let (puts, job) = self
            .with(addr, move |c| {
                Box::pin(async move {
                    c.use_tube(tubes::INVENTORY).await?;
                    // Counted before the peek: a put after it moves the count again, so
                    // the next read peeks whatever this one found.
                    let st = c.stats_tube(tubes::INVENTORY).await?;
                    let puts = (st.current_jobs_ready <= 1).then_some(st.total_jobs);
                    if known.is_some() && puts == known {
                        return Ok((puts, None));
                    }
                    c.peek_ready().await.map(|j| (puts, Some(j)))
                })
            })
            .await?;
        let took = started.elapsed();
        let Some(job) = job else {
            return Ok((last.and_then(|r| r.inventory), took, false));
        };
        self.peeks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let remember = |inventory: Option<message::Inventory>, sent_at: u64| {
            self.reads.lock().unwrap_or_else(|p| p.into_inner()).insert(
                key.clone(),
                LastRead {
                    puts,
                    at: Instant::now(),
                    verified: verify.is_some(),
                    sent_at,
                    inventory,
                },
            );
        };
        // What fails below is read again next time.
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let Some(job) = job else {
            remember(None, now);
            return Ok((None, took, true));
        };
        let decoded = message::decode(&job.body);
        if let (Ok(env), Some((keys, window))) = (&decoded, verify) {
            if let Err(e) = keys.verify(env, host, tubes::INVENTORY, now, window) {
                return Err(PeerError::BadInventory {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                });
            }
        }
        match decoded {
            Ok(Envelope {
                body: Message::Inventory(inv),
                sent_at,
                ..
            }) => {
                remember(Some((*inv).clone()), sent_at);
                Ok((Some(*inv), took, true))
            }
            Ok(other) => Err(PeerError::BadInventory {
                addr: addr.to_string(),
                reason: format!("a `{}` message in the inventory tube", other.body.kind()),
            }),
            Err(e) => Err(PeerError::BadInventory {
                addr: addr.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// `stats-tube` of `tube` at `addr`; `None` for a tube nobody has used yet.
    pub async fn tube_stats(
        &self,
        addr: &str,
        tube: &'static str,
    ) -> Result<Option<beanstalk::TubeStats>, PeerError> {
        self.with(addr, move |c| {
            Box::pin(async move {
                match c.stats_tube(tube).await {
                    Err(beanstalk::Error::NotFound) => Ok(None),
                    other => other.map(Some),
                }
            })
        })
        .await
    }

    /// Replaces the inventory published at `addr` with `envelope`: puts the new one,
    /// then retires every older one, so a reader always finds one.
    ///
    /// Retired inventories are buried (reserved, then buried: no longer ready, so no new
    /// `peek-ready` returns them), never deleted at once: beanstalkd 1.12 can send freed
    /// memory to a peer whose peek of a job is still being answered when the job is
    /// deleted. A buried one is deleted by a later publication, once `retire_grace` has
    /// passed and no peek of it can still be under way; so the tube holds the current
    /// inventory and those retired within the grace.
    pub async fn publish_inventory(
        &self,
        addr: &str,
        envelope: &Envelope,
    ) -> Result<(), PeerError> {
        let body = message::encode(envelope);
        let now = Instant::now();
        let (expired, known, last) = {
            let published = self.published.lock().unwrap_or_else(|p| p.into_inner());
            let mine = published.get(addr);
            let buried = mine.map(|m| m.buried.as_slice()).unwrap_or_default();
            let expired: Vec<u64> = buried
                .iter()
                .filter(|(_, at)| now.duration_since(*at) >= self.retire_grace)
                .map(|(id, _)| *id)
                .collect();
            (expired, buried.len() as u64, mine.and_then(|m| m.last))
        };
        let to_delete = expired.clone();
        let (id, buried, stray) = self
            .with(addr, move |c| {
                Box::pin(async move {
                    c.use_tube(tubes::INVENTORY).await?;
                    for id in &to_delete {
                        match c.delete(*id).await {
                            Ok(()) | Err(beanstalk::Error::NotFound) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    let id = c
                        .put(
                            &body,
                            PutParams {
                                pri: 0,
                                delay: 0,
                                ttr: 60,
                            },
                        )
                        .await?;
                    let mut buried = Vec::new();
                    if let Some(last) = last {
                        if retire(c, last).await? {
                            buried.push(last);
                        }
                    }
                    let mut st = c.stats_tube(tubes::INVENTORY).await?;
                    if st.current_jobs_ready > 1 {
                        // Others than ours (an earlier run's, another publisher's):
                        // peek-ready answers the oldest of equal priority, retire until ours.
                        while let Some(old) = c.peek_ready().await? {
                            if old.id == id {
                                break;
                            }
                            if retire(c, old.id).await? {
                                buried.push(old.id);
                            }
                        }
                        st = c.stats_tube(tubes::INVENTORY).await?;
                    }
                    // More buried than this host knows of: left by an earlier run (or by
                    // a call that failed half-way). Adopt the oldest, one a publication.
                    let expect = known - to_delete.len() as u64 + buried.len() as u64;
                    let stray = if st.current_jobs_buried > expect {
                        c.peek_buried().await?.map(|j| j.id)
                    } else {
                        None
                    };
                    Ok((id, buried, stray))
                })
            })
            .await?;
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let mine = published.entry(addr.to_string()).or_default();
        mine.last = Some(id);
        mine.buried.retain(|(id, _)| !expired.contains(id));
        mine.buried.extend(buried.into_iter().map(|id| (id, now)));
        if let Some(id) = stray.filter(|id| mine.buried.iter().all(|(m, _)| m != id)) {
            // Buried some time ago, but when is unknown: the grace starts now.
            mine.buried.push((id, now));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actual::{ActualVm, RunState};
    use crate::capacity::{Limits, Usage};
    use crate::message::Inventory;
    use crate::size::Size;
    use beanstalk::testing::{Beanstalkd, Config};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// An inventory of `host` numbered `seq`, about 200 KB encoded: large enough that
    /// beanstalkd answers a peek of it in several writes.
    fn inventory(host: &str, seq: u64) -> Envelope {
        let padding = "x".repeat(1000);
        let vms = (0..200)
            .map(|i| ActualVm {
                name: format!("vm{i}"),
                datastore: "default".into(),
                config: BTreeMap::from([("comment".to_string(), padding.clone())]),
                cpu: 1,
                memory: Size::mib(512),
                disks: vec![],
                state: RunState::Running,
                autostart: None,
                marker: None,
            })
            .collect();
        let inv = Inventory {
            host: host.into(),
            applied_commit: None,
            commit: None,
            listed_at: seq,
            seq,
            clock_skew: None,
            used: Usage::default(),
            reserved: Usage::default(),
            limits: Limits::default(),
            overload: None,
            vms,
            in_flight: vec![],
            failures: vec![],
            waiting: vec![],
            left_cluster: None,
            agent: None,
            reconciled_at: 0,
            blocked: vec![],
            ops: vec![],
            desired_error: None,
            switches: Default::default(),
            recent_events: vec![],
            built: vec![],
        };
        Envelope::new("c", host, host, Message::Inventory(Box::new(inv)))
    }

    /// Guards issue 13 (corrupt inventory reads at 20 hosts and more): beanstalkd 1.12 may
    /// send freed memory when a job is deleted while another connection's peek of it is
    /// being answered, and publishing used to delete the old inventory while peers peeked.
    /// Readers peek in a loop while one publisher replaces the inventory many times:
    /// every read decodes, no reader ever finds the tube empty or sees an older inventory
    /// after a newer one, and retired inventories do not pile up in the tube.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inventories_read_while_publishing_always_decode() {
        const READERS: usize = 8;
        const PUBLISHES: u64 = 100;
        // Shorter than in production, so the test can wait it out; still far longer than
        // a peek takes on this machine.
        let grace = Duration::from_secs(2);
        let server = Beanstalkd::start_with(Config {
            max_job_size: Some(2 * 1024 * 1024),
            ..Config::default()
        })
        .expect("beanstalkd");
        let addr = server.addr();
        let publisher = Peers {
            retire_grace: grace,
            ..Peers::default()
        };
        publisher
            .publish_inventory(&addr, &inventory("h1", 0))
            .await
            .unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let (addr, stop, started) = (addr.clone(), stop.clone(), started.clone());
            readers.push(tokio::spawn(async move {
                let peers = Peers::new();
                let (mut reads, mut last_seq, mut failures) = (0u64, 0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match peers.inventory(&addr, "h1", None).await {
                        Ok((Some(inv), _)) => {
                            if inv.seq < last_seq {
                                failures.push(format!("seq {} after {last_seq}", inv.seq));
                            }
                            last_seq = inv.seq;
                        }
                        Ok((None, _)) => failures.push("no inventory in the tube".into()),
                        Err(e) => failures.push(e.to_string()),
                    }
                    reads += 1;
                    if reads == 1 {
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                }
                (reads, failures)
            }));
        }
        // Every reader is peeking before the publications start.
        while started.load(Ordering::SeqCst) < READERS {
            tokio::task::yield_now().await;
        }
        let mut most = 0;
        for seq in 1..=PUBLISHES {
            publisher
                .publish_inventory(&addr, &inventory("h1", seq))
                .await
                .unwrap();
            let st = publisher
                .tube_stats(&addr, tubes::INVENTORY)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                st.current_jobs_ready, 1,
                "one inventory ready after a publication"
            );
            most = most.max(st.current_jobs_buried);
        }
        stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        let mut reads = 0;
        for r in readers {
            let (n, f) = r.await.unwrap();
            reads += n;
            failures.extend(f);
        }
        eprintln!(
            "{reads} reads during {PUBLISHES} publications; at most {most} retired inventories kept"
        );
        // Once the grace has passed, the next publication deletes every retired one but
        // those it retires itself: the tube does not grow with the publications.
        tokio::time::sleep(grace).await;
        publisher
            .publish_inventory(&addr, &inventory("h1", PUBLISHES + 1))
            .await
            .unwrap();
        let st = publisher
            .tube_stats(&addr, tubes::INVENTORY)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                st.current_jobs_ready,
                st.current_jobs_reserved,
                st.current_jobs_delayed
            ),
            (1, 0, 0)
        );
        assert!(st.current_jobs_buried <= 1, "{st:?}");
        assert!(
            failures.is_empty(),
            "{} of {reads} reads failed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }

    /// `peek-ready` commands the server at `addr` has answered.
    async fn peeks(addr: &str) -> u64 {
        let mut c = Client::connect(addr).await.unwrap();
        c.stats().await.unwrap().cmd_peek_ready
    }

    /// Guards issue 13, scale for real (read an inventory only when it changed): each
    /// pass read every peer's inventory again, changed or not, so an idle cluster of H
    /// hosts peeked H² times a pass. A reader asks for an unchanged inventory many times
    /// and the server answers one peek; a new publication is read at the next ask; a
    /// server restarted without its binlog (its put count starts again, smaller) is read
    /// again too.
    #[tokio::test]
    async fn an_inventory_is_peeked_only_when_it_changed() {
        let mut server = Beanstalkd::start_with(Config {
            max_job_size: Some(2 * 1024 * 1024),
            ..Config::default()
        })
        .expect("beanstalkd");
        let addr = server.addr();
        let publisher = Peers::new();
        for seq in 0..3 {
            publisher
                .publish_inventory(&addr, &inventory("h1", seq))
                .await
                .unwrap();
        }
        let reader = Peers::new();
        let before = peeks(&addr).await;
        for _ in 0..5 {
            let (inv, _) = reader.inventory(&addr, "h1", None).await.unwrap();
            assert_eq!(inv.map(|i| i.seq), Some(2));
        }
        assert_eq!(peeks(&addr).await - before, 1, "five reads, one peek");

        publisher
            .publish_inventory(&addr, &inventory("h1", 3))
            .await
            .unwrap();
        let (inv, _) = reader.inventory(&addr, "h1", None).await.unwrap();
        assert_eq!(inv.map(|i| i.seq), Some(3), "a new publication is read");
        assert_eq!(peeks(&addr).await - before, 2);

        // No binlog: the restarted server has no jobs and counts puts from zero.
        server.restart().unwrap();
        let publisher = Peers::new();
        publisher
            .publish_inventory(&addr, &inventory("h1", 10))
            .await
            .unwrap();
        // The first call finds its connection closed (and drops it); the next reconnects.
        let _ = reader.inventory(&addr, "h1", None).await;
        let (inv, _) = reader.inventory(&addr, "h1", None).await.unwrap();
        assert_eq!(inv.map(|i| i.seq), Some(10), "read again after a restart");
    }

    /// Ready and buried inventories at `addr`.
    async fn counts(p: &Peers, addr: &str) -> (u64, u64) {
        let st = p.tube_stats(addr, tubes::INVENTORY).await.unwrap().unwrap();
        (st.current_jobs_ready, st.current_jobs_buried)
    }

    /// Guards issue 13 (retired inventories must not pile up): what an earlier run of
    /// the agent left in the tube, ready and buried, is retired and deleted by the next
    /// run's publications, though that run never saw those ids.
    #[tokio::test]
    async fn a_restarted_publisher_clears_what_the_earlier_run_left() {
        let server = Beanstalkd::start_with(Config {
            max_job_size: Some(2 * 1024 * 1024),
            ..Config::default()
        })
        .expect("beanstalkd");
        let addr = server.addr();
        let earlier = Peers::new();
        for seq in 0..4 {
            earlier
                .publish_inventory(&addr, &inventory("h1", seq))
                .await
                .unwrap();
        }
        assert_eq!(
            counts(&earlier, &addr).await,
            (1, 3),
            "the grace keeps the retired ones"
        );
        // The restarted agent: no grace, so each publication deletes what it may.
        let later = Peers {
            retire_grace: Duration::ZERO,
            ..Peers::default()
        };
        for seq in 4..9 {
            later
                .publish_inventory(&addr, &inventory("h1", seq))
                .await
                .unwrap();
            assert_eq!(counts(&later, &addr).await.0, 1, "one inventory ready");
        }
        assert_eq!(counts(&later, &addr).await, (1, 1));
        let (inv, _) = later.inventory(&addr, "h1", None).await.unwrap();
        assert_eq!(inv.map(|i| i.seq), Some(8));
    }
}
