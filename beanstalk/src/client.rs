//! The client: one typed method per beanstalkd command, over a connection that heals
//! itself.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::conn::Connection;
use crate::error::Error;
use crate::proto::{Answer, Request};
use crate::stats::{parse_list, JobStats, ServerStats, TubeStats};
use crate::tube::check_tube;

/// A job as reserved or peeked: its id and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The server-assigned id.
    pub id: u64,
    /// The body, as put.
    pub body: Bytes,
}

/// Priority, delay and time-to-run of a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutParams {
    /// Priority: lower is more urgent; below 1024 counts as urgent.
    pub pri: u32,
    /// Seconds before the job becomes ready.
    pub delay: u32,
    /// Seconds a worker may hold the job before the server releases it (0 is raised to 1
    /// by the server).
    pub ttr: u32,
}

impl Default for PutParams {
    /// Priority 1024, no delay, 60 s to run.
    fn default() -> PutParams {
        PutParams {
            pri: 1024,
            delay: 0,
            ttr: 60,
        }
    }
}

/// One job of a pipelined batch (see [`Client::put_many`]).
#[derive(Debug, Clone, Copy)]
pub struct PutJob<'a> {
    /// Priority.
    pub pri: u32,
    /// Delay in seconds.
    pub delay: u32,
    /// Time to run in seconds.
    pub ttr: u32,
    /// The body.
    pub body: &'a [u8],
}

impl<'a> PutJob<'a> {
    /// A job with `params` and `body`.
    pub fn new(body: &'a [u8], params: PutParams) -> PutJob<'a> {
        PutJob {
            pri: params.pri,
            delay: params.delay,
            ttr: params.ttr,
            body,
        }
    }
}

/// How a [`Client`] behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bound on each call, from sending to the whole answer (for `reserve-with-timeout`,
    /// added to the server-side timeout). `None` waits as long as the server takes.
    /// A plain [`Client::reserve`] is never bounded: waiting is what it is for.
    pub call_timeout: Option<Duration>,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
}

impl Default for Options {
    /// 30 s per call, 5 s per connect.
    fn default() -> Options {
        Options {
            call_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// An async client for one beanstalkd server.
///
/// The client remembers the tube it uses and the tubes it watches. When its connection
/// drops, times out, or loses sync with the server (an unparsable answer, `BAD_FORMAT`,
/// `EXPECTED_CRLF`, `UNKNOWN_COMMAND`), the failing call returns the error and the
/// connection is dropped; the next call opens a new one and restores those tubes before
/// it runs. Calls that are safe to repeat (everything but `put`, `delete`, `release`,
/// `bury`, `touch`, `kick` and `kick-job`) are retried once on the new connection when the
/// old one broke before answering, so a server restart costs a read-only caller nothing.
///
/// A connection that sits in `reserve` cannot do anything else, so producers and workers
/// use separate clients.
///
/// ```no_run
/// # async fn demo() -> Result<(), beanstalk::Error> {
/// use beanstalk::{Client, PutParams};
///
/// let mut producer = Client::connect("127.0.0.1:11300").await?;
/// producer.use_tube("jobs").await?;
/// let id = producer.put(b"hello", PutParams::default()).await?;
///
/// let mut worker = Client::connect("127.0.0.1:11300").await?;
/// worker.watch("jobs").await?;
/// let job = worker.reserve().await?;
/// assert_eq!(job.id, id);
/// worker.delete(job.id).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Client {
    addr: String,
    options: Options,
    conn: Option<Connection>,
    used: String,
    watched: Vec<String>,
    max_job_size: u64,
    connects: u64,
}

/// Whether a command may be sent again after its connection broke before it was answered.
fn repeatable(r: &Request<'_>) -> bool {
    !matches!(
        r,
        Request::Put { .. }
            | Request::Delete(_)
            | Request::Release { .. }
            | Request::Bury { .. }
            | Request::Touch(_)
            | Request::Kick(_)
            | Request::KickJob(_)
    )
}

impl Client {
    /// Connects with default [`Options`].
    pub async fn connect(addr: impl Into<String>) -> Result<Client, Error> {
        Client::connect_with(addr, Options::default()).await
    }

    /// Connects with the given options. The address is resolved again on every reconnect.
    pub async fn connect_with(addr: impl Into<String>, options: Options) -> Result<Client, Error> {
        let mut client = Client {
            addr: addr.into(),
            options,
            conn: None,
            used: "default".to_string(),
            watched: vec!["default".to_string()],
            max_job_size: u64::MAX,
            connects: 0,
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many connections this client has opened (1 plus its reconnects).
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// The server's `max-job-size`, read when the connection was opened.
    pub fn max_job_size(&self) -> u64 {
        self.max_job_size
    }

    /// The tube `put` goes to.
    pub fn used_tube(&self) -> &str {
        &self.used
    }

    /// The tubes `reserve` takes from.
    pub fn watched_tubes(&self) -> &[String] {
        &self.watched
    }

    /// Drops the current connection (if any) and opens a new one, restoring the used and
    /// watched tubes and reading the server's `max-job-size`.
    pub async fn reconnect(&mut self) -> Result<(), Error> {
        self.conn = None;
        let connect = Connection::open(&self.addr);
        let mut conn = match tokio::time::timeout(self.options.connect_timeout, connect).await {
            Ok(c) => c?,
            Err(_) => {
                return Err(Error::Connect {
                    addr: self.addr.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.options.connect_timeout),
                    ),
                })
            }
        };
        self.connects += 1;
        let mut setup: Vec<Request<'_>> = Vec::new();
        if self.used != "default" {
            setup.push(Request::Use(&self.used));
        }
        for t in self.watched.iter().filter(|t| *t != "default") {
            setup.push(Request::Watch(t));
        }
        if !self.watched.iter().any(|t| t == "default") {
            setup.push(Request::Ignore("default"));
        }
        setup.push(Request::Stats);
        let answers = bounded(self.options.call_timeout, "stats", conn.round_trip(&setup)).await?;
        for (req, answer) in setup.iter().zip(answers) {
            match (req, answer) {
                (Request::Use(_), Answer::Using(_))
                | (Request::Watch(_), Answer::Watching(_))
                | (Request::Ignore(_), Answer::Watching(_)) => {}
                (Request::Stats, Answer::Ok(body)) => {
                    // Only the limit matters here; reading just that key keeps a server
                    // with a different set of stats usable.
                    self.max_job_size =
                        crate::stats::max_job_size(&body).map_err(|source| Error::Stats {
                            command: "stats",
                            source,
                        })?;
                }
                (req, other) => return Err(Error::from_answer(req.name(), other)),
            }
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// Runs one request with reconnection and the call bound, and returns its answer.
    async fn request(&mut self, req: Request<'_>, extra: Duration) -> Result<Answer, Error> {
        let timeout = self.options.call_timeout.map(|t| t + extra);
        let mut retried = false;
        loop {
            if self.conn.as_mut().is_none_or(Connection::is_stale) {
                self.reconnect().await?;
            }
            let Some(conn) = self.conn.as_mut() else {
                unreachable!("reconnect either sets a connection or returns an error")
            };
            let result = bounded(timeout, req.name(), conn.call(req)).await;
            match result {
                Ok(answer) => {
                    if matches!(
                        answer,
                        Answer::ExpectedCrlf | Answer::BadFormat | Answer::UnknownCommand
                    ) {
                        // The server and this client no longer agree where a command
                        // starts; nothing more on this stream can be trusted.
                        self.conn = None;
                    }
                    return Ok(answer);
                }
                Err(e) => {
                    self.conn = None;
                    let before_answer = matches!(
                        e,
                        Error::Io { .. }
                            | Error::Closed {
                                mid_answer: false,
                                ..
                            }
                    );
                    if before_answer && repeatable(&req) && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Keeps the used and watched tubes as the server confirmed them, so that a
    /// reconnect restores exactly that.
    fn remember(&mut self, req: &Request<'_>, answer: &Answer) {
        match (req, answer) {
            (Request::Use(t), Answer::Using(_)) => self.used = t.to_string(),
            (Request::Watch(t), Answer::Watching(_)) if !self.watched.iter().any(|w| w == t) => {
                self.watched.push(t.to_string())
            }
            (Request::Ignore(t), Answer::Watching(_)) => self.watched.retain(|w| w != t),
            _ => {}
        }
    }

    /// Sends a `use`, `watch` or `ignore` and remembers what the server confirmed.
    async fn tube_command(&mut self, req: Request<'_>) -> Result<Answer, Error> {
        let answer = self.call(req).await?;
        self.remember(&req, &answer);
        Ok(answer)
    }

    async fn call(&mut self, req: Request<'_>) -> Result<Answer, Error> {
        self.request(req, Duration::ZERO).await
    }

    /// `use <tube>`: later puts go to `tube`.
    pub async fn use_tube(&mut self, tube: &str) -> Result<(), Error> {
        check_tube(tube)?;
        match self.tube_command(Request::Use(tube)).await? {
            Answer::Using(_) => Ok(()),
            other => Err(Error::from_answer("use", other)),
        }
    }

    fn check_body(&self, body: &[u8]) -> Result<(), Error> {
        if body.len() as u64 > self.max_job_size {
            return Err(Error::BodyTooBig {
                size: body.len(),
                max: self.max_job_size,
            });
        }
        Ok(())
    }

    /// `put`: stores a job in the used tube and returns its id.
    ///
    /// A body larger than the server's `max-job-size` is refused here, before sending.
    /// `BURIED <id>` (the server was out of memory) is [`Error::Buried`] with the id.
    pub async fn put(&mut self, body: &[u8], params: PutParams) -> Result<u64, Error> {
        self.check_body(body)?;
        let req = Request::Put {
            pri: params.pri,
            delay: params.delay,
            ttr: params.ttr,
            body,
        };
        match self.call(req).await? {
            Answer::Inserted(id) => Ok(id),
            other => Err(Error::from_answer("put", other)),
        }
    }

    /// Pipelined puts: sends every job on this connection without waiting for answers in
    /// between, then returns one result per job, in order.
    ///
    /// The outer error means nothing was sent (a body too big, no connection). Inside, a
    /// job whose answer never came because the connection broke is [`Error::NoAnswer`]:
    /// the server may or may not have stored it.
    pub async fn put_many(
        &mut self,
        jobs: &[PutJob<'_>],
    ) -> Result<Vec<Result<u64, Error>>, Error> {
        for job in jobs {
            self.check_body(job.body)?;
        }
        if self.conn.as_mut().is_none_or(Connection::is_stale) {
            self.reconnect().await?;
        }
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("reconnect either sets a connection or returns an error")
        };
        let (answers, err) = match self.options.call_timeout {
            // The bound scales with the batch: a fixed one would fail large batches on a
            // healthy server.
            Some(t) => {
                let t = t + Duration::from_micros(50 * jobs.len() as u64);
                match tokio::time::timeout(t, conn.pipeline_puts(jobs)).await {
                    Ok(r) => r,
                    Err(_) => (
                        Vec::new(),
                        Some(Error::Timeout {
                            command: "put",
                            timeout: t,
                        }),
                    ),
                }
            }
            None => conn.pipeline_puts(jobs).await,
        };
        if err.is_some() {
            self.conn = None;
        }
        let mut out: Vec<Result<u64, Error>> = answers
            .into_iter()
            .map(|a| match a {
                Answer::Inserted(id) => Ok(id),
                other => Err(Error::from_answer("put", other)),
            })
            .collect();
        out.resize_with(jobs.len(), || Err(Error::NoAnswer));
        Ok(out)
    }

    /// Sends several commands in one write and returns their answers in order, as the
    /// wire gave them (see [`Answer`]; map one to its error with [`Error::from_answer`]).
    ///
    /// Any sequence works, e.g. a worker's `delete` of a finished job together with the
    /// `reserve` of the next, saving a round trip. Tube names and bodies are checked
    /// first; `use`, `watch` and `ignore` update the client's remembered tubes as
    /// answered. Nothing is retried: a broken connection is an error for the whole batch.
    ///
    /// ```no_run
    /// # async fn demo(c: &mut beanstalk::Client) -> Result<(), beanstalk::Error> {
    /// use beanstalk::proto::{Answer, Request};
    /// let answers = c
    ///     .pipeline(&[Request::Put { pri: 0, delay: 0, ttr: 60, body: b"x" }, Request::Reserve])
    ///     .await?;
    /// if let Answer::Reserved(id, _) = answers[1] {
    ///     c.delete(id).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn pipeline(&mut self, requests: &[Request<'_>]) -> Result<Vec<Answer>, Error> {
        for r in requests {
            match r {
                Request::Use(t)
                | Request::Watch(t)
                | Request::Ignore(t)
                | Request::StatsTube(t)
                | Request::PauseTube(t, _) => check_tube(t)?,
                Request::Put { body, .. } => self.check_body(body)?,
                _ => {}
            }
        }
        if self.conn.as_mut().is_none_or(Connection::is_stale) {
            self.reconnect().await?;
        }
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("reconnect either sets a connection or returns an error")
        };
        let command = requests.first().map(Request::name).unwrap_or("none");
        let answers = match bounded(
            self.options.call_timeout,
            command,
            conn.round_trip(requests),
        )
        .await
        {
            Ok(a) => a,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        for (r, a) in requests.iter().zip(&answers) {
            self.remember(r, a);
            if matches!(
                a,
                Answer::ExpectedCrlf | Answer::BadFormat | Answer::UnknownCommand
            ) {
                self.conn = None;
            }
        }
        Ok(answers)
    }

    /// `reserve`: waits as long as it takes for a job from the watched tubes.
    ///
    /// [`Error::DeadlineSoon`] when a job this connection holds is about to time out.
    pub async fn reserve(&mut self) -> Result<Job, Error> {
        let saved = self.options.call_timeout.take();
        let result = self.call(Request::Reserve).await;
        self.options.call_timeout = saved;
        reserved("reserve", result?)
    }

    /// `reserve-with-timeout`: a job, or `None` when none came within `timeout` (whole
    /// seconds; `0` polls).
    pub async fn reserve_with_timeout(&mut self, timeout: Duration) -> Result<Option<Job>, Error> {
        let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
        match self
            .request(Request::ReserveWithTimeout(secs), timeout)
            .await?
        {
            Answer::TimedOut => Ok(None),
            other => reserved("reserve-with-timeout", other).map(Some),
        }
    }

    /// `reserve-job <id>`: reserves that job, whatever tube it is in.
    pub async fn reserve_job(&mut self, id: u64) -> Result<Job, Error> {
        reserved("reserve-job", self.call(Request::ReserveJob(id)).await?)
    }

    /// `delete <id>`.
    pub async fn delete(&mut self, id: u64) -> Result<(), Error> {
        expect(
            self.call(Request::Delete(id)).await?,
            "delete",
            Answer::Deleted,
        )
    }

    /// `release <id> <pri> <delay>`: gives a reserved job back.
    pub async fn release(&mut self, id: u64, pri: u32, delay: u32) -> Result<(), Error> {
        expect(
            self.call(Request::Release { id, pri, delay }).await?,
            "release",
            Answer::Released,
        )
    }

    /// `bury <id> <pri>`: puts a reserved job aside until kicked.
    pub async fn bury(&mut self, id: u64, pri: u32) -> Result<(), Error> {
        expect(
            self.call(Request::Bury { id, pri }).await?,
            "bury",
            Answer::Buried,
        )
    }

    /// `touch <id>`: restarts a reserved job's TTR.
    pub async fn touch(&mut self, id: u64) -> Result<(), Error> {
        expect(
            self.call(Request::Touch(id)).await?,
            "touch",
            Answer::Touched,
        )
    }

    /// `watch <tube>`: adds a tube to the watch list; returns how many are watched.
    pub async fn watch(&mut self, tube: &str) -> Result<u64, Error> {
        check_tube(tube)?;
        match self.tube_command(Request::Watch(tube)).await? {
            Answer::Watching(n) => Ok(n),
            other => Err(Error::from_answer("watch", other)),
        }
    }

    /// `ignore <tube>`: removes a tube from the watch list; [`Error::NotIgnored`] for the
    /// last one.
    pub async fn ignore(&mut self, tube: &str) -> Result<u64, Error> {
        check_tube(tube)?;
        match self.tube_command(Request::Ignore(tube)).await? {
            Answer::Watching(n) => Ok(n),
            other => Err(Error::from_answer("ignore", other)),
        }
    }

    /// `peek <id>`: the job, or `None`.
    pub async fn peek(&mut self, id: u64) -> Result<Option<Job>, Error> {
        found("peek", self.call(Request::Peek(id)).await?)
    }

    /// `peek-ready`: the next ready job of the used tube, or `None`.
    pub async fn peek_ready(&mut self) -> Result<Option<Job>, Error> {
        found("peek-ready", self.call(Request::PeekReady).await?)
    }

    /// `peek-delayed`: the delayed job of the used tube that is ready soonest, or `None`.
    pub async fn peek_delayed(&mut self) -> Result<Option<Job>, Error> {
        found("peek-delayed", self.call(Request::PeekDelayed).await?)
    }

    /// `peek-buried`: the next buried job of the used tube, or `None`.
    pub async fn peek_buried(&mut self) -> Result<Option<Job>, Error> {
        found("peek-buried", self.call(Request::PeekBuried).await?)
    }

    /// `kick <bound>`: moves up to `bound` buried (or, if none, delayed) jobs of the used
    /// tube to ready; returns how many.
    pub async fn kick(&mut self, bound: u32) -> Result<u64, Error> {
        match self.call(Request::Kick(bound)).await? {
            Answer::KickedCount(n) => Ok(n),
            other => Err(Error::from_answer("kick", other)),
        }
    }

    /// `kick-job <id>`: moves one buried or delayed job to ready.
    pub async fn kick_job(&mut self, id: u64) -> Result<(), Error> {
        expect(
            self.call(Request::KickJob(id)).await?,
            "kick-job",
            Answer::Kicked,
        )
    }

    /// `stats-job <id>`.
    pub async fn stats_job(&mut self, id: u64) -> Result<JobStats, Error> {
        let body = ok_body("stats-job", self.call(Request::StatsJob(id)).await?)?;
        JobStats::parse(&body).map_err(|source| Error::Stats {
            command: "stats-job",
            source,
        })
    }

    /// `stats-tube <tube>`.
    pub async fn stats_tube(&mut self, tube: &str) -> Result<TubeStats, Error> {
        check_tube(tube)?;
        let body = ok_body("stats-tube", self.call(Request::StatsTube(tube)).await?)?;
        TubeStats::parse(&body).map_err(|source| Error::Stats {
            command: "stats-tube",
            source,
        })
    }

    /// `stats`: the whole server.
    pub async fn stats(&mut self) -> Result<ServerStats, Error> {
        let body = ok_body("stats", self.call(Request::Stats).await?)?;
        ServerStats::parse(&body).map_err(|source| Error::Stats {
            command: "stats",
            source,
        })
    }

    /// `list-tubes`: every tube that exists.
    pub async fn list_tubes(&mut self) -> Result<Vec<String>, Error> {
        let body = ok_body("list-tubes", self.call(Request::ListTubes).await?)?;
        parse_list(&body).map_err(|source| Error::Stats {
            command: "list-tubes",
            source,
        })
    }

    /// `list-tube-used`: the used tube, as the server sees it.
    pub async fn list_tube_used(&mut self) -> Result<String, Error> {
        match self.call(Request::ListTubeUsed).await? {
            Answer::Using(t) => Ok(t),
            other => Err(Error::from_answer("list-tube-used", other)),
        }
    }

    /// `list-tubes-watched`: the watched tubes, as the server sees them.
    pub async fn list_tubes_watched(&mut self) -> Result<Vec<String>, Error> {
        let body = ok_body(
            "list-tubes-watched",
            self.call(Request::ListTubesWatched).await?,
        )?;
        parse_list(&body).map_err(|source| Error::Stats {
            command: "list-tubes-watched",
            source,
        })
    }

    /// `pause-tube <tube> <delay>`: no job is reserved from `tube` for `delay` seconds.
    pub async fn pause_tube(&mut self, tube: &str, delay: u32) -> Result<(), Error> {
        check_tube(tube)?;
        expect(
            self.call(Request::PauseTube(tube, delay)).await?,
            "pause-tube",
            Answer::Paused,
        )
    }

    /// `quit`: closes the connection. The client stays usable: the next call reconnects.
    pub async fn quit(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // The server closes without answering; nothing useful can come back.
            let _ = bounded(Some(Duration::from_secs(1)), "quit", async {
                conn.call(Request::Quit).await
            })
            .await;
        }
    }
}

async fn bounded<T>(
    timeout: Option<Duration>,
    command: &'static str,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or(Err(Error::Timeout {
                command,
                timeout: t,
            })),
    }
}

fn expect(answer: Answer, command: &'static str, want: Answer) -> Result<(), Error> {
    if answer == want {
        Ok(())
    } else {
        Err(Error::from_answer(command, answer))
    }
}

fn reserved(command: &'static str, answer: Answer) -> Result<Job, Error> {
    match answer {
        Answer::Reserved(id, body) => Ok(Job { id, body }),
        other => Err(Error::from_answer(command, other)),
    }
}

fn found(command: &'static str, answer: Answer) -> Result<Option<Job>, Error> {
    match answer {
        Answer::Found(id, body) => Ok(Some(Job { id, body })),
        Answer::NotFound => Ok(None),
        other => Err(Error::from_answer(command, other)),
    }
}

fn ok_body(command: &'static str, answer: Answer) -> Result<Bytes, Error> {
    match answer {
        Answer::Ok(body) => Ok(body),
        other => Err(Error::from_answer(command, other)),
    }
}
