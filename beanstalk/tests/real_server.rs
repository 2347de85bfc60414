//! The client against a real beanstalkd, started on a free loopback port per test.

use std::time::Duration;

use beanstalk::testing::{Beanstalkd, Config};
use beanstalk::{Client, Error, Options, PutJob, PutParams};

fn server() -> Beanstalkd {
    Beanstalkd::start().expect("start beanstalkd (Debian package `beanstalkd`)")
}

const P: PutParams = PutParams {
    pri: 100,
    delay: 0,
    ttr: 60,
};

#[tokio::test]
async fn producer_and_worker_round_trip() {
    let s = server();
    let mut producer = Client::connect(s.addr()).await.unwrap();
    producer.use_tube("flotilla.create").await.unwrap();
    assert_eq!(producer.list_tube_used().await.unwrap(), "flotilla.create");
    let id = producer.put(b"create web01", P).await.unwrap();

    let mut worker = Client::connect(s.addr()).await.unwrap();
    assert_eq!(worker.watch("flotilla.create").await.unwrap(), 2);
    assert_eq!(worker.ignore("default").await.unwrap(), 1);
    assert_eq!(
        worker.list_tubes_watched().await.unwrap(),
        vec!["flotilla.create"]
    );
    let job = worker.reserve().await.unwrap();
    assert_eq!(job.id, id);
    assert_eq!(&job.body[..], b"create web01");
    let st = worker.stats_job(id).await.unwrap();
    assert_eq!(st.state, "reserved");
    assert_eq!(st.tube, "flotilla.create");
    assert_eq!(st.pri, 100);
    worker.touch(id).await.unwrap();
    worker.delete(id).await.unwrap();
    assert!(matches!(worker.delete(id).await, Err(Error::NotFound)));
    assert!(matches!(worker.stats_job(id).await, Err(Error::NotFound)));
}

#[tokio::test]
async fn reserve_with_timeout_times_out_and_reserve_job_takes_a_given_job() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    assert_eq!(c.reserve_with_timeout(Duration::ZERO).await.unwrap(), None);
    let a = c.put(b"a", P).await.unwrap();
    let b = c.put(b"b", P).await.unwrap();
    let job = c.reserve_job(b).await.unwrap();
    assert_eq!(job.id, b);
    let next = c
        .reserve_with_timeout(Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.id, a);
    assert!(matches!(c.reserve_job(999_999).await, Err(Error::NotFound)));
}

#[tokio::test]
async fn release_bury_kick_and_peeks() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    c.use_tube("t").await.unwrap();
    c.watch("t").await.unwrap();
    c.ignore("default").await.unwrap();
    assert_eq!(c.peek_ready().await.unwrap(), None);
    assert_eq!(c.peek_delayed().await.unwrap(), None);
    assert_eq!(c.peek_buried().await.unwrap(), None);

    let id = c.put(b"x", P).await.unwrap();
    let delayed = c
        .put(b"later", PutParams { delay: 100, ..P })
        .await
        .unwrap();
    assert_eq!(c.peek_ready().await.unwrap().unwrap().id, id);
    assert_eq!(c.peek_delayed().await.unwrap().unwrap().id, delayed);
    assert_eq!(&c.peek(id).await.unwrap().unwrap().body[..], b"x");
    assert_eq!(c.peek(123_456).await.unwrap(), None);

    let job = c.reserve().await.unwrap();
    c.release(job.id, 5, 0).await.unwrap();
    assert_eq!(c.stats_job(id).await.unwrap().releases, 1);
    let job = c.reserve().await.unwrap();
    c.bury(job.id, 7).await.unwrap();
    assert_eq!(c.peek_buried().await.unwrap().unwrap().id, id);
    assert!(matches!(c.release(id, 0, 0).await, Err(Error::NotFound)));
    assert!(matches!(c.touch(id).await, Err(Error::NotFound)));
    assert!(matches!(c.bury(id, 0).await, Err(Error::NotFound)));

    assert_eq!(c.kick(10).await.unwrap(), 1);
    assert_eq!(c.stats_job(id).await.unwrap().state, "ready");
    // With nothing buried, kick moves delayed jobs.
    c.kick_job(delayed).await.unwrap();
    assert_eq!(c.stats_job(delayed).await.unwrap().state, "ready");
    assert!(matches!(c.kick_job(delayed).await, Err(Error::NotFound)));
}

#[tokio::test]
async fn stats_tubes_and_pause() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    c.use_tube("alpha").await.unwrap();
    c.put(b"1", P).await.unwrap();
    let st = c.stats().await.unwrap();
    assert_eq!(st.max_job_size, 65535);
    assert_eq!(st.version, "1.12");
    assert_eq!(st.current_jobs_ready, 1);
    assert!(!st.draining);
    let mut tubes = c.list_tubes().await.unwrap();
    tubes.sort();
    assert_eq!(tubes, vec!["alpha", "default"]);
    let ts = c.stats_tube("alpha").await.unwrap();
    assert_eq!(ts.name, "alpha");
    assert_eq!(ts.current_jobs_ready, 1);
    assert_eq!(ts.current_using, 1);
    assert!(matches!(c.stats_tube("nope").await, Err(Error::NotFound)));
    c.pause_tube("alpha", 60).await.unwrap();
    assert_eq!(c.stats_tube("alpha").await.unwrap().pause, 60);
    assert!(matches!(
        c.pause_tube("nope", 1).await,
        Err(Error::NotFound)
    ));
}

#[tokio::test]
async fn ignoring_the_last_tube_is_not_ignored() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    assert!(matches!(c.ignore("default").await, Err(Error::NotIgnored)));
    // The connection is still good.
    assert_eq!(c.list_tubes_watched().await.unwrap(), vec!["default"]);
    assert_eq!(c.connects(), 1);
}

#[tokio::test]
async fn bad_tube_names_are_refused_before_sending() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    for bad in ["", "-x", "a b", &"t".repeat(201)] {
        assert!(
            matches!(c.use_tube(bad).await, Err(Error::InvalidTube(_))),
            "{bad:?}"
        );
        assert!(matches!(c.watch(bad).await, Err(Error::InvalidTube(_))));
    }
    assert_eq!(c.connects(), 1, "a refused name never costs the connection");
    c.use_tube(&"t".repeat(200)).await.unwrap();
}

#[tokio::test]
async fn body_over_max_job_size_is_refused_locally_at_the_limit_accepted() {
    let s = Beanstalkd::start_with(Config {
        max_job_size: Some(1000),
        ..Config::default()
    })
    .unwrap();
    let mut c = Client::connect(s.addr()).await.unwrap();
    assert_eq!(c.max_job_size(), 1000);
    c.put(&[b'x'; 1000], P).await.unwrap();
    let err = c.put(&[b'x'; 1001], P).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::BodyTooBig {
                size: 1001,
                max: 1000
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max-job-size of 1000"));
    let jobs = [PutJob::new(&[1u8; 10], P), PutJob::new(&[1u8; 2000], P)];
    assert!(matches!(
        c.put_many(&jobs).await,
        Err(Error::BodyTooBig { size: 2000, .. })
    ));
    assert_eq!(
        c.stats().await.unwrap().current_jobs_ready,
        1,
        "nothing of the batch was sent"
    );
}

#[tokio::test]
async fn pipelined_puts_return_ids_in_order() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    c.use_tube("bulk").await.unwrap();
    let body = vec![b'b'; 1024];
    let jobs: Vec<PutJob<'_>> = (0..5000).map(|_| PutJob::new(&body, P)).collect();
    let ids: Vec<u64> = c
        .put_many(&jobs)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids.len(), 5000);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(c.stats_tube("bulk").await.unwrap().current_jobs_ready, 5000);
    // The connection is in sync afterwards.
    assert_eq!(c.put(b"one more", P).await.unwrap(), ids[4999] + 1);
}

#[tokio::test]
async fn ttr_expiry_gives_deadline_soon_and_releases_the_job() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    let id = c.put(b"slow", PutParams { ttr: 1, ..P }).await.unwrap();
    let job = c.reserve().await.unwrap();
    assert_eq!(job.id, id);
    // Within the last second of the TTR, a reserve on the same connection is told.
    assert!(matches!(c.reserve().await, Err(Error::DeadlineSoon)));
    // The server releases an expired job on its own tick, so DEADLINE_SOON can still come
    // for a moment after the TTR has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let again = loop {
        match c.reserve_with_timeout(Duration::from_secs(1)).await {
            Ok(Some(job)) => break job,
            Err(Error::DeadlineSoon) | Ok(None) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("the expired job never came back: {other:?}"),
        }
    };
    assert_eq!(again.id, id);
    assert_eq!(c.stats_job(id).await.unwrap().timeouts, 1);
}

#[tokio::test]
async fn draining_server_refuses_puts() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    let pid = s.pid().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut tries = 0;
    loop {
        match c.put(b"x", P).await {
            Err(Error::Draining) => break,
            Ok(_) if tries < 100 => tries += 1,
            other => panic!("expected DRAINING, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(c.stats().await.unwrap().draining);
}

#[tokio::test]
async fn reconnects_after_server_restart_and_restores_tubes() {
    let mut s = Beanstalkd::start_with(Config {
        binlog: true,
        ..Config::default()
    })
    .unwrap();
    let mut producer = Client::connect(s.addr()).await.unwrap();
    producer.use_tube("flotilla.ops").await.unwrap();
    let kept = producer.put(b"survives", P).await.unwrap();
    let mut worker = Client::connect(s.addr()).await.unwrap();
    worker.watch("flotilla.ops").await.unwrap();
    worker.ignore("default").await.unwrap();

    s.restart().unwrap();
    // Give the old sockets' EOF time to arrive, as it would on a real host.
    tokio::time::sleep(Duration::from_millis(50)).await;

    // A put after the restart goes to a fresh connection, in the restored tube.
    let id = producer.put(b"after restart", P).await.unwrap();
    assert!(producer.connects() >= 2);
    assert_eq!(producer.list_tube_used().await.unwrap(), "flotilla.ops");
    assert_eq!(producer.stats_job(id).await.unwrap().tube, "flotilla.ops");

    // The worker's watch list is restored: it gets the binlogged job, then the new one.
    assert_eq!(
        worker.list_tubes_watched().await.unwrap(),
        vec!["flotilla.ops"]
    );
    let a = worker.reserve().await.unwrap();
    let b = worker.reserve().await.unwrap();
    assert_eq!((a.id, b.id), (kept, id));
    assert_eq!(&a.body[..], b"survives");
}

#[tokio::test]
async fn a_call_during_an_outage_fails_clearly_and_the_next_one_recovers() {
    let mut s = server();
    let mut c = Client::connect_with(
        s.addr(),
        Options {
            call_timeout: Some(Duration::from_secs(2)),
            connect_timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    c.use_tube("x").await.unwrap();
    s.stop();
    let err = c.stats().await.unwrap_err();
    assert!(err.is_disconnect(), "{err:?}");
    assert!(
        err.to_string().contains(&s.addr()),
        "the error names the server: {err}"
    );
    s.restart().unwrap();
    assert_eq!(c.list_tube_used().await.unwrap(), "x");
}

#[tokio::test]
async fn a_cancelled_call_does_not_desync_the_next_one() {
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    // A reserve abandoned by the caller leaves the connection mid-command.
    let _ = tokio::time::timeout(Duration::from_millis(50), c.reserve()).await;
    let mut p = Client::connect(s.addr()).await.unwrap();
    let id = p.put(b"x", P).await.unwrap();
    // Without the stale check, this would read the abandoned reserve's RESERVED answer.
    let st = c.stats_job(id).await.unwrap();
    assert_eq!(st.id, id, "the answer is the stats of the job asked about");
    assert_eq!(c.connects(), 2);
    // The abandoned reserve, still waiting on the old socket, may have been handed the
    // job before beanstalkd saw that socket close (the server orders the close and the
    // new connection's command as it likes): then the job is ready again once it has.
    let mut st = st;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while st.state == "reserved" && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        st = c.stats_job(id).await.unwrap();
    }
    assert_eq!(st.state, "ready");
    assert_eq!(
        c.connects(),
        2,
        "no further reconnect: the connection stays in step"
    );
}

#[tokio::test]
async fn pipeline_sends_mixed_commands_and_tracks_tubes() {
    use beanstalk::proto::{Answer, Request};
    let s = server();
    let mut c = Client::connect(s.addr()).await.unwrap();
    let answers = c
        .pipeline(&[
            Request::Use("pipe"),
            Request::Watch("pipe"),
            Request::Ignore("default"),
            Request::Put {
                pri: 1,
                delay: 0,
                ttr: 60,
                body: b"p1",
            },
            Request::Reserve,
            Request::Delete(999_999),
        ])
        .await
        .unwrap();
    assert_eq!(answers[0], Answer::Using("pipe".into()));
    assert_eq!(answers[2], Answer::Watching(1));
    let Answer::Inserted(id) = answers[3] else {
        panic!("{answers:?}")
    };
    assert!(matches!(&answers[4], Answer::Reserved(rid, body) if *rid == id && &body[..] == b"p1"));
    assert!(matches!(
        Error::from_answer("delete", answers[5].clone()),
        Error::NotFound
    ));
    assert_eq!(c.used_tube(), "pipe");
    assert_eq!(c.watched_tubes(), ["pipe"]);
    assert!(matches!(
        c.pipeline(&[Request::Use("-bad")]).await,
        Err(Error::InvalidTube(_))
    ));
}
