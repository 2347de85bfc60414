//! One TCP connection: writes encoded requests and reads whole answers.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::proto::{parse_answer, Answer, Request};

/// A connection to one beanstalkd: a socket, a read buffer and a write buffer.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Set while a command is on the wire; still set afterwards means the caller's future
    /// was dropped halfway (a timeout or a `select!`), so the stream's position is unknown.
    pub(crate) busy: bool,
}

impl Connection {
    pub(crate) async fn open(addr: &str) -> Result<Connection, Error> {
        let connect_err = |source| Error::Connect {
            addr: addr.to_string(),
            source,
        };
        let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
        // Each command waits for its answer; Nagle would hold small writes back for the
        // ACK of the previous one and add a delay to every call.
        stream.set_nodelay(true).map_err(connect_err)?;
        Ok(Connection {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            busy: false,
        })
    }

    /// True when the socket is known to be unusable before anything is sent: the peer has
    /// closed it (a restarted server), it has failed, or bytes arrived that no command
    /// asked for. Checking first lets a `put` go to a fresh connection instead of failing
    /// with "may or may not be stored".
    pub(crate) fn is_stale(&mut self) -> bool {
        if self.busy || !self.rbuf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Sends the requests in one write, then reads one answer for each, in order.
    pub(crate) async fn round_trip(
        &mut self,
        requests: &[Request<'_>],
    ) -> Result<Vec<Answer>, Error> {
        let command = requests.first().map(Request::name).unwrap_or("none");
        self.busy = true;
        self.wbuf.clear();
        for r in requests {
            r.encode(&mut self.wbuf);
        }
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|source| Error::Io { command, source })?;
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(self.read_answer(r.name()).await?);
        }
        self.busy = false;
        Ok(answers)
    }

    /// Sends one request and reads its answer.
    pub(crate) async fn call(&mut self, request: Request<'_>) -> Result<Answer, Error> {
        self.busy = true;
        self.wbuf.clear();
        request.encode(&mut self.wbuf);
        let command = request.name();
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|source| Error::Io { command, source })?;
        let answer = self.read_answer(command).await?;
        self.busy = false;
        Ok(answer)
    }

    /// Reads until one whole answer is buffered, and takes it.
    pub(crate) async fn read_answer(&mut self, command: &'static str) -> Result<Answer, Error> {
        loop {
            if let Some((answer, used)) =
                parse_answer(&self.rbuf).map_err(|source| Error::Protocol { command, source })?
            {
                self.rbuf.advance(used);
                return Ok(answer);
            }
            self.fill(command).await?;
        }
    }

    async fn fill(&mut self, command: &'static str) -> Result<(), Error> {
        self.rbuf.reserve(8 * 1024);
        let n = self
            .stream
            .read_buf(&mut self.rbuf)
            .await
            .map_err(|source| Error::Io { command, source })?;
        if n == 0 {
            return Err(Error::Closed {
                command,
                mid_answer: !self.rbuf.is_empty(),
            });
        }
        Ok(())
    }

    /// Pipelines many puts: a writer encodes and sends them in chunks while a reader takes
    /// the answers as they come, so neither side's socket buffer can fill up and stall the
    /// other. Returns one answer per job; jobs whose answer never came get `None`.
    pub(crate) async fn pipeline_puts(
        &mut self,
        jobs: &[crate::PutJob<'_>],
    ) -> (Vec<Answer>, Option<Error>) {
        const CHUNK: usize = 64 * 1024;
        self.busy = true;
        let command = "put";
        let (mut rd, mut wr) = self.stream.split();
        let wbuf = &mut self.wbuf;
        let rbuf = &mut self.rbuf;
        let write = async move {
            wbuf.clear();
            for job in jobs {
                Request::Put {
                    pri: job.pri,
                    delay: job.delay,
                    ttr: job.ttr,
                    body: job.body,
                }
                .encode(wbuf);
                if wbuf.len() >= CHUNK {
                    wr.write_all(wbuf).await?;
                    wbuf.clear();
                }
            }
            if !wbuf.is_empty() {
                wr.write_all(wbuf).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let read = async move {
            let mut answers = Vec::with_capacity(jobs.len());
            while answers.len() < jobs.len() {
                match parse_answer(rbuf) {
                    Ok(Some((a, used))) => {
                        rbuf.advance(used);
                        answers.push(a);
                        continue;
                    }
                    Ok(None) => {}
                    Err(source) => return (answers, Some(Error::Protocol { command, source })),
                }
                rbuf.reserve(64 * 1024);
                match rd.read_buf(rbuf).await {
                    Ok(0) => {
                        let mid_answer = !rbuf.is_empty();
                        return (
                            answers,
                            Some(Error::Closed {
                                command,
                                mid_answer,
                            }),
                        );
                    }
                    Ok(_) => {}
                    Err(source) => return (answers, Some(Error::Io { command, source })),
                }
            }
            (answers, None)
        };
        let (written, (answers, read_err)) = tokio::join!(write, read);
        let err = read_err.or(written.err().map(|source| Error::Io { command, source }));
        if err.is_none() {
            self.busy = false;
        }
        (answers, err)
    }
}
