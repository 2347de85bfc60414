//! The same tests against a real beanstalkd (`beanstalk::testing`, real time) and against
//! `beanstalk::mem::MemServer` (a paused tokio clock): the in-memory server earns its
//! place in the simulation by answering as the real one does.
//!
//! Guards issue 13, part 2: the queue stand-in has beanstalkd's semantics (reserve order,
//! TTR expiry, release/bury/delete by the wrong connection, peek, restart with and
//! without binlog).
//!
//! Where the real server acts on its own tick (a TTR that ran out, a delay that ended), the
//! tests poll with a bound instead of assuming the exact moment; the in-memory server
//! passes them at the exact moment.

use std::time::Duration;

use beanstalk::mem::{MemClient, MemConfig, MemServer};
use beanstalk::testing::{Beanstalkd, Config};
use beanstalk::{Client, Error, Job, JobStats, PutParams, TubeStats};
use tokio::time::{sleep, Instant};

/// The client calls the tests use, implemented by both clients.
#[allow(async_fn_in_trait)]
trait Conn {
    async fn use_tube(&mut self, t: &str) -> Result<(), Error>;
    async fn watch(&mut self, t: &str) -> Result<u64, Error>;
    async fn ignore(&mut self, t: &str) -> Result<u64, Error>;
    async fn put(&mut self, body: &[u8], p: PutParams) -> Result<u64, Error>;
    async fn reserve(&mut self) -> Result<Job, Error>;
    async fn reserve_with_timeout(&mut self, t: Duration) -> Result<Option<Job>, Error>;
    async fn reserve_job(&mut self, id: u64) -> Result<Job, Error>;
    async fn delete(&mut self, id: u64) -> Result<(), Error>;
    async fn release(&mut self, id: u64, pri: u32, delay: u32) -> Result<(), Error>;
    async fn bury(&mut self, id: u64, pri: u32) -> Result<(), Error>;
    async fn touch(&mut self, id: u64) -> Result<(), Error>;
    async fn peek(&mut self, id: u64) -> Result<Option<Job>, Error>;
    async fn peek_ready(&mut self) -> Result<Option<Job>, Error>;
    async fn peek_delayed(&mut self) -> Result<Option<Job>, Error>;
    async fn peek_buried(&mut self) -> Result<Option<Job>, Error>;
    async fn kick(&mut self, bound: u32) -> Result<u64, Error>;
    async fn kick_job(&mut self, id: u64) -> Result<(), Error>;
    async fn stats_job(&mut self, id: u64) -> Result<JobStats, Error>;
    async fn stats_tube(&mut self, t: &str) -> Result<TubeStats, Error>;
    async fn list_tubes(&mut self) -> Result<Vec<String>, Error>;
    async fn list_tube_used(&mut self) -> Result<String, Error>;
    async fn list_tubes_watched(&mut self) -> Result<Vec<String>, Error>;
    async fn pause_tube(&mut self, t: &str, delay: u32) -> Result<(), Error>;
    fn connects(&self) -> u64;
}

macro_rules! delegate {
    ($ty:ty) => {
        impl Conn for $ty {
            async fn use_tube(&mut self, t: &str) -> Result<(), Error> {
                <$ty>::use_tube(self, t).await
            }
            async fn watch(&mut self, t: &str) -> Result<u64, Error> {
                <$ty>::watch(self, t).await
            }
            async fn ignore(&mut self, t: &str) -> Result<u64, Error> {
                <$ty>::ignore(self, t).await
            }
            async fn put(&mut self, body: &[u8], p: PutParams) -> Result<u64, Error> {
                <$ty>::put(self, body, p).await
            }
            async fn reserve(&mut self) -> Result<Job, Error> {
                <$ty>::reserve(self).await
            }
            async fn reserve_with_timeout(&mut self, t: Duration) -> Result<Option<Job>, Error> {
                <$ty>::reserve_with_timeout(self, t).await
            }
            async fn reserve_job(&mut self, id: u64) -> Result<Job, Error> {
                <$ty>::reserve_job(self, id).await
            }
            async fn delete(&mut self, id: u64) -> Result<(), Error> {
                <$ty>::delete(self, id).await
            }
            async fn release(&mut self, id: u64, pri: u32, delay: u32) -> Result<(), Error> {
                <$ty>::release(self, id, pri, delay).await
            }
            async fn bury(&mut self, id: u64, pri: u32) -> Result<(), Error> {
                <$ty>::bury(self, id, pri).await
            }
            async fn touch(&mut self, id: u64) -> Result<(), Error> {
                <$ty>::touch(self, id).await
            }
            async fn peek(&mut self, id: u64) -> Result<Option<Job>, Error> {
                <$ty>::peek(self, id).await
            }
            async fn peek_ready(&mut self) -> Result<Option<Job>, Error> {
                <$ty>::peek_ready(self).await
            }
            async fn peek_delayed(&mut self) -> Result<Option<Job>, Error> {
                <$ty>::peek_delayed(self).await
            }
            async fn peek_buried(&mut self) -> Result<Option<Job>, Error> {
                <$ty>::peek_buried(self).await
            }
            async fn kick(&mut self, bound: u32) -> Result<u64, Error> {
                <$ty>::kick(self, bound).await
            }
            async fn kick_job(&mut self, id: u64) -> Result<(), Error> {
                <$ty>::kick_job(self, id).await
            }
            async fn stats_job(&mut self, id: u64) -> Result<JobStats, Error> {
                <$ty>::stats_job(self, id).await
            }
            async fn stats_tube(&mut self, t: &str) -> Result<TubeStats, Error> {
                <$ty>::stats_tube(self, t).await
            }
            async fn list_tubes(&mut self) -> Result<Vec<String>, Error> {
                <$ty>::list_tubes(self).await
            }
            async fn list_tube_used(&mut self) -> Result<String, Error> {
                <$ty>::list_tube_used(self).await
            }
            async fn list_tubes_watched(&mut self) -> Result<Vec<String>, Error> {
                <$ty>::list_tubes_watched(self).await
            }
            async fn pause_tube(&mut self, t: &str, delay: u32) -> Result<(), Error> {
                <$ty>::pause_tube(self, t, delay).await
            }
            fn connects(&self) -> u64 {
                <$ty>::connects(self)
            }
        }
    };
}
delegate!(Client);
delegate!(MemClient);

/// A server the tests can connect to, stop and start.
#[allow(async_fn_in_trait)]
trait Harness {
    type C: Conn;
    fn start(binlog: bool) -> Self;
    async fn connect(&self) -> Self::C;
    fn stop(&mut self);
    fn start_again(&mut self);
}

struct Real(Beanstalkd);

impl Harness for Real {
    type C = Client;
    fn start(binlog: bool) -> Real {
        Real(
            Beanstalkd::start_with(Config {
                binlog,
                ..Config::default()
            })
            .expect("start beanstalkd (Debian package `beanstalkd`)"),
        )
    }
    async fn connect(&self) -> Client {
        Client::connect(self.0.addr()).await.expect("connect")
    }
    fn stop(&mut self) {
        self.0.stop();
    }
    fn start_again(&mut self) {
        self.0.restart().expect("restart beanstalkd");
    }
}

struct Mem(MemServer);

impl Harness for Mem {
    type C = MemClient;
    fn start(binlog: bool) -> Mem {
        Mem(MemServer::new(
            "mem:11300",
            MemConfig {
                binlog,
                ..MemConfig::default()
            },
        ))
    }
    async fn connect(&self) -> MemClient {
        self.0.connect().await.expect("connect")
    }
    fn stop(&mut self) {
        self.0.stop();
    }
    fn start_again(&mut self) {
        self.0.start();
    }
}

const P: PutParams = PutParams {
    pri: 100,
    delay: 0,
    ttr: 60,
};

fn body(j: &Job) -> &[u8] {
    &j.body
}

/// Reserves with 1 s timeouts until a job comes, for at most `within` (the real server
/// releases expired and delayed jobs on its own tick, a moment late).
async fn reserve_within<C: Conn>(c: &mut C, within: Duration) -> Job {
    let deadline = Instant::now() + within;
    loop {
        match c.reserve_with_timeout(Duration::from_secs(1)).await {
            Ok(Some(j)) => return j,
            Ok(None) | Err(Error::DeadlineSoon) if Instant::now() < deadline => {
                sleep(Duration::from_millis(50)).await
            }
            other => panic!("no job within {within:?}: {other:?}"),
        }
    }
}

/// Priorities first, then FIFO (by id) within one priority; ids increase; a deleted job
/// is gone.
async fn priority_then_fifo<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let a = c.put(b"a", PutParams { pri: 10, ..P }).await.unwrap();
    let b = c.put(b"b", PutParams { pri: 5, ..P }).await.unwrap();
    let d = c.put(b"c", PutParams { pri: 10, ..P }).await.unwrap();
    assert!(a < b && b < d, "ids increase: {a} {b} {d}");
    assert_eq!(a, 1, "a fresh server's first id");
    let order: Vec<u64> = [
        c.reserve().await.unwrap(),
        c.reserve().await.unwrap(),
        c.reserve().await.unwrap(),
    ]
    .iter()
    .map(|j| j.id)
    .collect();
    assert_eq!(order, vec![b, a, d]);
    for id in order {
        c.delete(id).await.unwrap();
    }
    assert!(matches!(c.delete(a).await, Err(Error::NotFound)));
    assert!(matches!(c.stats_job(a).await, Err(Error::NotFound)));
    assert_eq!(c.peek(a).await.unwrap(), None);
}

/// `reserve-with-timeout 0` answers at once; a longer one waits its timeout.
async fn reserve_timeout<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    assert_eq!(c.reserve_with_timeout(Duration::ZERO).await.unwrap(), None);
    let t0 = Instant::now();
    assert_eq!(
        c.reserve_with_timeout(Duration::from_secs(1))
            .await
            .unwrap(),
        None
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
}

/// A job put while a connection waits in `reserve` goes to it.
async fn waiting_reserve_gets_a_put<H: Harness>() {
    let h = H::start(false);
    let mut worker = h.connect().await;
    let mut producer = h.connect().await;
    worker.watch("w").await.unwrap();
    producer.use_tube("w").await.unwrap();
    let (job, id) = tokio::join!(worker.reserve(), async {
        sleep(Duration::from_millis(100)).await;
        producer.put(b"late", P).await.unwrap()
    });
    assert_eq!(job.unwrap().id, id);
}

/// Watch lists, tubes appearing and disappearing, the last tube not ignorable, reserve
/// across tubes by priority.
async fn tubes_watch_ignore<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let mut p = h.connect().await;
    assert!(matches!(c.stats_tube("nope").await, Err(Error::NotFound)));
    assert_eq!(c.watch("x").await.unwrap(), 2);
    assert_eq!(c.watch("x").await.unwrap(), 2);
    assert_eq!(c.ignore("default").await.unwrap(), 1);
    assert!(matches!(c.ignore("x").await, Err(Error::NotIgnored)));
    assert_eq!(c.list_tubes_watched().await.unwrap(), vec!["x"]);
    c.watch("y").await.unwrap();
    p.use_tube("x").await.unwrap();
    let low = p.put(b"x-low", PutParams { pri: 50, ..P }).await.unwrap();
    p.use_tube("y").await.unwrap();
    let high = p.put(b"y-high", PutParams { pri: 1, ..P }).await.unwrap();
    p.use_tube("default").await.unwrap();
    p.put(b"not watched", PutParams { pri: 0, ..P })
        .await
        .unwrap();
    assert_eq!(c.reserve().await.unwrap().id, high);
    assert_eq!(c.reserve().await.unwrap().id, low);
    let mut tubes = c.list_tubes().await.unwrap();
    tubes.sort();
    assert_eq!(tubes, vec!["default", "x", "y"]);
    let st = c.stats_tube("y").await.unwrap();
    assert_eq!(
        (st.total_jobs, st.current_jobs_reserved, st.current_watching),
        (1, 1, 1)
    );
    // A tube nobody watches or uses and that holds no job is gone, with its counters.
    c.delete(high).await.unwrap();
    c.ignore("y").await.unwrap();
    assert!(matches!(c.stats_tube("y").await, Err(Error::NotFound)));
    assert_eq!(p.list_tube_used().await.unwrap(), "default");
    let st = c.stats_tube("default").await.unwrap();
    // Both connections still use `default`.
    assert_eq!(
        (
            st.current_jobs_ready,
            st.current_jobs_urgent,
            st.current_using
        ),
        (1, 1, 2)
    );
}

/// Within the last second of its TTR a reserve on the holding connection gets
/// DEADLINE_SOON; after the TTR the job is ready again, with one timeout counted.
async fn ttr_expiry<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let id = c.put(b"slow", PutParams { ttr: 2, ..P }).await.unwrap();
    assert_eq!(c.reserve().await.unwrap().id, id);
    let t0 = Instant::now();
    assert!(matches!(c.reserve().await, Err(Error::DeadlineSoon)));
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let mut other = h.connect().await;
    assert_eq!(
        reserve_within(&mut other, Duration::from_secs(5)).await.id,
        id
    );
    let st = other.stats_job(id).await.unwrap();
    assert_eq!(
        (st.timeouts, st.reserves, st.state.as_str()),
        (1, 2, "reserved")
    );
    // A TTR of 0 is raised to 1 s.
    let z = c.put(b"z", PutParams { ttr: 0, ..P }).await.unwrap();
    assert_eq!(c.stats_job(z).await.unwrap().ttr, 1);
}

/// Release with a delay: delayed, seen by peek-delayed, ready again after the delay with
/// the new priority; touch restarts the TTR.
async fn release_with_delay<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let id = c.put(b"r", PutParams { ttr: 5, ..P }).await.unwrap();
    c.reserve().await.unwrap();
    c.touch(id).await.unwrap();
    c.release(id, 7, 1).await.unwrap();
    let st = c.stats_job(id).await.unwrap();
    assert_eq!(
        (st.state.as_str(), st.pri, st.delay, st.releases),
        ("delayed", 7, 1, 1)
    );
    assert_eq!(c.peek_delayed().await.unwrap().map(|j| j.id), Some(id));
    assert_eq!(c.peek_ready().await.unwrap(), None);
    assert_eq!(c.reserve_with_timeout(Duration::ZERO).await.unwrap(), None);
    let t0 = Instant::now();
    let j = reserve_within(&mut c, Duration::from_secs(5)).await;
    assert_eq!(j.id, id);
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    c.release(id, 7, 0).await.unwrap();
    assert_eq!(c.stats_job(id).await.unwrap().state, "ready");
}

/// Bury, peek-buried, kick (buried first, then delayed), kick-job, reserve-job.
async fn bury_and_kick<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let a = c.put(b"a", P).await.unwrap();
    let b = c.put(b"b", P).await.unwrap();
    let d = c.put(b"d", PutParams { delay: 100, ..P }).await.unwrap();
    assert_eq!(c.reserve().await.unwrap().id, a);
    assert_eq!(c.reserve().await.unwrap().id, b);
    c.bury(b, 3).await.unwrap();
    c.bury(a, 4).await.unwrap();
    // The oldest buried comes first, whatever its id or priority.
    assert_eq!(c.peek_buried().await.unwrap().map(|j| j.id), Some(b));
    let st = c.stats_job(a).await.unwrap();
    assert_eq!((st.state.as_str(), st.pri, st.buries), ("buried", 4, 1));
    assert_eq!(c.kick(1).await.unwrap(), 1);
    assert_eq!(c.stats_job(b).await.unwrap().state, "ready");
    assert_eq!(c.kick(10).await.unwrap(), 1);
    assert_eq!(c.stats_job(a).await.unwrap().kicks, 1);
    // No buried job left: kick takes delayed ones.
    assert_eq!(c.kick(10).await.unwrap(), 1);
    assert_eq!(c.stats_job(d).await.unwrap().state, "ready");
    assert_eq!(c.kick(10).await.unwrap(), 0);
    assert!(matches!(c.kick_job(d).await, Err(Error::NotFound)));
    // reserve-job takes a ready, delayed or buried job.
    let j = c.reserve_job(d).await.unwrap();
    assert_eq!(body(&j), b"d");
    c.bury(d, 1).await.unwrap();
    c.kick_job(d).await.unwrap();
    let e = c.put(b"e", PutParams { delay: 100, ..P }).await.unwrap();
    assert_eq!(c.reserve_job(e).await.unwrap().id, e);
    assert!(matches!(c.reserve_job(e).await, Err(Error::NotFound)));
    assert!(matches!(c.reserve_job(9999).await, Err(Error::NotFound)));
}

/// Release, bury and touch only by the reserving connection; delete by any connection
/// unless another one holds the job; a dropped connection's jobs are ready again.
async fn other_connection<H: Harness>() {
    let h = H::start(false);
    let mut a = h.connect().await;
    let mut b = h.connect().await;
    let id = a.put(b"held", P).await.unwrap();
    assert_eq!(a.reserve().await.unwrap().id, id);
    assert!(matches!(b.release(id, 1, 0).await, Err(Error::NotFound)));
    assert!(matches!(b.bury(id, 1).await, Err(Error::NotFound)));
    assert!(matches!(b.touch(id).await, Err(Error::NotFound)));
    assert!(matches!(b.delete(id).await, Err(Error::NotFound)));
    assert!(matches!(b.reserve_job(id).await, Err(Error::NotFound)));
    assert_eq!(b.peek(id).await.unwrap().map(|j| j.id), Some(id));
    assert_eq!(b.stats_job(id).await.unwrap().state, "reserved");
    assert_eq!(b.reserve_with_timeout(Duration::ZERO).await.unwrap(), None);
    // A release of a job that is not reserved at all is NOT_FOUND too.
    let free = b.put(b"free", P).await.unwrap();
    assert!(matches!(a.release(free, 1, 0).await, Err(Error::NotFound)));
    // Any connection deletes a ready or buried job.
    a.delete(free).await.unwrap();
    drop(a);
    assert_eq!(reserve_within(&mut b, Duration::from_secs(5)).await.id, id);
    b.bury(id, 1).await.unwrap();
    let mut c = h.connect().await;
    c.delete(id).await.unwrap();
}

/// A paused tube gives no job until the pause ends; pausing an unknown tube is
/// NOT_FOUND.
async fn pause_tube<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    assert!(matches!(
        c.pause_tube("nope", 1).await,
        Err(Error::NotFound)
    ));
    let id = c.put(b"p", P).await.unwrap();
    c.pause_tube("default", 1).await.unwrap();
    assert_eq!(c.reserve_with_timeout(Duration::ZERO).await.unwrap(), None);
    assert_eq!(c.stats_tube("default").await.unwrap().pause, 1);
    assert_eq!(reserve_within(&mut c, Duration::from_secs(5)).await.id, id);
}

/// With a binlog, a restart keeps the jobs: reserved ones are ready again, buried and
/// delayed ones keep their state, ids continue; clients reconnect on their next call with
/// their tubes restored; the tubes' counters start again.
async fn restart_with_binlog<H: Harness>() {
    let mut h = H::start(true);
    let mut c = h.connect().await;
    c.use_tube("t").await.unwrap();
    c.watch("t").await.unwrap();
    c.ignore("default").await.unwrap();
    let reserved = c.put(b"reserved", P).await.unwrap();
    let buried = c.put(b"buried", P).await.unwrap();
    let delayed = c
        .put(b"delayed", PutParams { delay: 100, ..P })
        .await
        .unwrap();
    assert_eq!(c.reserve().await.unwrap().id, reserved);
    assert_eq!(c.reserve().await.unwrap().id, buried);
    c.bury(buried, 1).await.unwrap();
    assert!(matches!(
        c.reserve_job(reserved).await,
        Err(Error::NotFound)
    ));
    h.stop();
    h.start_again();
    // A read-only call is retried on a new connection, so this passes however soon the
    // old connection's close is seen.
    assert_eq!(c.list_tube_used().await.unwrap(), "t");
    assert!(c.connects() >= 2);
    assert_eq!(c.list_tubes_watched().await.unwrap(), vec!["t"]);
    let state = |s: JobStats| s.state;
    assert_eq!(state(c.stats_job(reserved).await.unwrap()), "ready");
    assert_eq!(state(c.stats_job(buried).await.unwrap()), "buried");
    assert_eq!(state(c.stats_job(delayed).await.unwrap()), "delayed");
    // A reserve writes no binlog record: the restored job has the counts of its put; a
    // bury does write one, and replaying it counts a second bury.
    assert_eq!(c.stats_job(reserved).await.unwrap().reserves, 0);
    let b = c.stats_job(buried).await.unwrap();
    assert_eq!((b.reserves, b.buries, b.pri), (1, 2, 1));
    let next = c.put(b"after", P).await.unwrap();
    assert!(next > delayed, "ids continue: {next} after {delayed}");
    assert_eq!(c.reserve().await.unwrap().id, reserved);
    let st = c.stats_tube("t").await.unwrap();
    assert_eq!((st.current_jobs_ready, st.current_jobs_buried), (1, 1));
}

/// Without a binlog, a restart loses everything and ids start again at 1.
async fn restart_without_binlog<H: Harness>() {
    let mut h = H::start(false);
    let mut c = h.connect().await;
    let a = c.put(b"a", P).await.unwrap();
    c.put(b"b", P).await.unwrap();
    h.stop();
    h.start_again();
    assert_eq!(c.peek(a).await.unwrap(), None);
    assert_eq!(c.stats_tube("default").await.unwrap().total_jobs, 0);
    assert_eq!(c.put(b"new", P).await.unwrap(), 1);
}

/// A stopped server refuses: calls fail with the connect error (naming the address), and
/// work again once it is back.
async fn stopped_server<H: Harness>() {
    let mut h = H::start(false);
    let mut c = h.connect().await;
    c.use_tube("u").await.unwrap();
    h.stop();
    let err = c.peek(1).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_disconnect());
    h.start_again();
    assert_eq!(c.list_tube_used().await.unwrap(), "u");
}

/// A body over the server's max-job-size is refused before sending.
async fn body_too_big<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let big = vec![b'x'; 65536];
    assert!(matches!(
        c.put(&big, P).await,
        Err(Error::BodyTooBig {
            size: 65536,
            max: 65535
        })
    ));
    c.put(&big[..65535], P).await.unwrap();
}

/// A reserve abandoned by its caller costs the connection, so a job that arrives later
/// is not held by a connection nobody reads.
async fn cancelled_reserve<H: Harness>() {
    let h = H::start(false);
    let mut c = h.connect().await;
    let _ = tokio::time::timeout(Duration::from_millis(50), c.reserve()).await;
    let mut p = h.connect().await;
    let id = p.put(b"x", P).await.unwrap();
    assert_eq!(c.stats_job(id).await.unwrap().state, "ready");
    assert_eq!(c.connects(), 2);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod real {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<super::Real>().await
                }
            )*
        }
        mod mem {
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    super::$name::<super::Mem>().await
                }
            )*
        }
    };
}

conformance!(
    priority_then_fifo,
    reserve_timeout,
    waiting_reserve_gets_a_put,
    tubes_watch_ignore,
    ttr_expiry,
    release_with_delay,
    bury_and_kick,
    other_connection,
    pause_tube,
    restart_with_binlog,
    restart_without_binlog,
    stopped_server,
    body_too_big,
    cancelled_reserve,
);

/// The in-memory server's own behaviours and fault hooks, which a real server cannot show
/// on demand.
mod mem_only {
    use super::*;
    use beanstalk::mem::PutFault;

    fn server(binlog: bool) -> MemServer {
        MemServer::new(
            "mem:1",
            MemConfig {
                binlog,
                ..MemConfig::default()
            },
        )
    }

    /// The connection that has waited longest gets the job, as in beanstalkd.
    #[tokio::test(start_paused = true)]
    async fn longest_waiter_first() {
        let s = server(false);
        let mut a = s.connect().await.unwrap();
        let mut b = s.connect().await.unwrap();
        let mut p = s.connect().await.unwrap();
        let (ja, jb, ids) = tokio::join!(
            a.reserve(),
            async {
                sleep(Duration::from_millis(10)).await;
                b.reserve().await
            },
            async {
                sleep(Duration::from_millis(20)).await;
                (p.put(b"1", P).await.unwrap(), p.put(b"2", P).await.unwrap())
            }
        );
        assert_eq!((ja.unwrap().id, jb.unwrap().id), ids);
    }

    /// A dropped connection releases its jobs at once; a reserve waiting on it goes on
    /// on a new connection (it is safe to repeat), as the real client's does.
    #[tokio::test(start_paused = true)]
    async fn dropped_connection() {
        let s = server(false);
        let mut a = s.connect().await.unwrap();
        let mut p = s.connect().await.unwrap();
        let id = p.put(b"held", P).await.unwrap();
        assert_eq!(a.reserve().await.unwrap().id, id);
        s.drop_connection(a.conn_id().unwrap());
        assert_eq!(p.stats_job(id).await.unwrap().state, "ready");
        p.delete(id).await.unwrap();
        let conn = a.conn_id();
        let (job, id2) = tokio::join!(a.reserve(), async {
            sleep(Duration::from_millis(10)).await;
            s.drop_all_connections();
            sleep(Duration::from_millis(10)).await;
            p.put(b"later", P).await.unwrap()
        });
        assert_eq!(job.unwrap().id, id2);
        assert_ne!(a.conn_id(), conn);
        assert_eq!(a.connects(), 3);
    }

    /// A server going down under a waiting reserve: the reserve fails with the connect
    /// error, and a restart with the binlog makes the held job ready.
    #[tokio::test(start_paused = true)]
    async fn down_under_a_waiting_reserve() {
        let s = server(true);
        let mut a = s.connect().await.unwrap();
        let id = a.put(b"j", P).await.unwrap();
        a.reserve().await.unwrap();
        let (r, ()) = tokio::join!(a.reserve_with_timeout(Duration::from_secs(10)), async {
            sleep(Duration::from_secs(1)).await;
            s.stop();
        });
        assert!(matches!(r, Err(Error::Connect { .. })), "{r:?}");
        s.start();
        assert_eq!(a.reserve().await.unwrap().id, id);
    }

    /// Fault hooks: a put stored twice, a put seen late.
    #[tokio::test(start_paused = true)]
    async fn duplicated_and_delayed_puts() {
        let s = server(false);
        let mut c = s.connect().await.unwrap();
        s.on_put(Some(Box::new(|_tube: &str, body: &[u8]| match body {
            b"twice" => PutFault::Duplicate,
            b"late" => PutFault::Delay(Duration::from_secs(5)),
            _ => PutFault::None,
        })));
        let id = c.put(b"twice", P).await.unwrap();
        assert_eq!(
            c.peek(id + 1).await.unwrap().map(|j| j.body),
            Some(b"twice"[..].into())
        );
        c.delete(id).await.unwrap();
        c.delete(id + 1).await.unwrap();
        let late = c.put(b"late", P).await.unwrap();
        assert_eq!(c.peek(late).await.unwrap(), None);
        assert_eq!(c.stats_tube("default").await.unwrap().current_jobs_ready, 0);
        let t0 = Instant::now();
        assert_eq!(c.reserve().await.unwrap().id, late);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
    }

    /// Latency longer than the call timeout: the call times out unapplied and the next
    /// one opens a new connection.
    #[tokio::test(start_paused = true)]
    async fn latency_and_call_timeout() {
        let s = server(false);
        let mut c = MemClient::connect_with(
            &s,
            beanstalk::Options {
                call_timeout: Some(Duration::from_secs(2)),
                connect_timeout: Duration::from_secs(1),
            },
        )
        .await
        .unwrap();
        s.set_latency(Duration::from_secs(3));
        let err = c.put(b"x", P).await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout { command: "put", .. }),
            "{err:?}"
        );
        s.set_latency(Duration::from_millis(100));
        assert_eq!(c.peek(1).await.unwrap(), None);
        assert_eq!(c.connects(), 2);
    }

    /// Servers are independent: each numbers its jobs from 1.
    #[tokio::test(start_paused = true)]
    async fn servers_are_independent() {
        let (s1, s2) = (server(false), server(false));
        let mut a = s1.connect().await.unwrap();
        let mut b = s2.clone().connect().await.unwrap();
        assert_eq!(a.put(b"a", P).await.unwrap(), 1);
        assert_eq!(b.put(b"b", P).await.unwrap(), 1);
        assert_eq!(a.put(b"a", P).await.unwrap(), 2);
    }
}
