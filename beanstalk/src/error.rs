//! Every way a call can fail, each with a typed variant.

use std::io;
use std::time::Duration;

use crate::proto::{Answer, ProtocolError};
use crate::stats::StatsError;
use crate::tube::TubeError;

/// An error from a [`Client`](crate::Client) call.
///
/// Server answers that mean "no" (`NOT_FOUND`, `DEADLINE_SOON`, …) have one variant each;
/// transport failures say which command they interrupted. After any error for which
/// [`Error::is_disconnect`] is true the client has dropped its connection, and the next
/// call opens a new one and restores the used and watched tubes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TCP connection could not be opened.
    #[error("cannot connect to beanstalkd at {addr}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("connection to beanstalkd failed during `{command}`")]
    Io {
        /// The command in progress.
        command: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection.
    #[error("beanstalkd closed the connection during `{command}`{}", if *.mid_answer { " in the middle of an answer" } else { "" })]
    Closed {
        /// The command in progress.
        command: &'static str,
        /// Whether part of an answer had arrived.
        mid_answer: bool,
    },
    /// The call did not finish in time.
    #[error("`{command}` got no complete answer within {timeout:?}")]
    Timeout {
        /// The command in progress.
        command: &'static str,
        /// The bound that ran out.
        timeout: Duration,
    },
    /// The server sent bytes that are not a beanstalkd answer.
    #[error("`{command}`: {source}")]
    Protocol {
        /// The command in progress.
        command: &'static str,
        /// What was wrong with the bytes.
        #[source]
        source: ProtocolError,
    },
    /// A well-formed answer that does not belong to the command sent.
    #[error("`{command}`: the server answered {answer}, which is not an answer to this command")]
    Unexpected {
        /// The command sent.
        command: &'static str,
        /// The answer's first word.
        answer: String,
    },
    /// A stats or list body that could not be read.
    #[error("`{command}`: {source}")]
    Stats {
        /// The command sent.
        command: &'static str,
        /// What was wrong.
        #[source]
        source: StatsError,
    },
    /// A tube name the server would refuse; nothing was sent.
    #[error(transparent)]
    InvalidTube(#[from] TubeError),
    /// A job body larger than the server's `max-job-size`; nothing was sent.
    #[error("job body of {size} bytes is larger than the server's max-job-size of {max} bytes; nothing was sent")]
    BodyTooBig {
        /// The body's size.
        size: usize,
        /// The server's limit.
        max: u64,
    },
    /// In a pipelined batch, the connection was lost before this job's answer came: the
    /// server may or may not have stored it.
    #[error("connection lost before the server answered; the job may or may not be stored")]
    NoAnswer,
    /// `NOT_FOUND`: no such job (or not reserved by this connection), or no such tube.
    #[error("NOT_FOUND: no such job or tube (or the job is not reserved by this connection)")]
    NotFound,
    /// `DEADLINE_SOON`: a job reserved by this connection has less than a second of TTR left.
    #[error("DEADLINE_SOON: a job reserved by this connection is about to time out")]
    DeadlineSoon,
    /// `JOB_TOO_BIG`: the server refused the body.
    #[error("JOB_TOO_BIG: the server refused the job body as too large")]
    JobTooBig,
    /// `DRAINING`: the server is in drain mode and accepts no new jobs.
    #[error("DRAINING: the server is draining and accepts no new jobs")]
    Draining,
    /// `BURIED`: the server ran out of memory growing a priority queue and buried the job
    /// (with its id on `put`).
    #[error("BURIED: the server buried the job{} (out of memory for its priority queue)", .id.map(|i| format!(" {i}")).unwrap_or_default())]
    Buried {
        /// The job id, when the answer carried one (`put`).
        id: Option<u64>,
    },
    /// `EXPECTED_CRLF`: the body was not followed by CRLF (a client bug or a corrupted
    /// stream).
    #[error("EXPECTED_CRLF: the server did not find CRLF after the job body")]
    ExpectedCrlf,
    /// `BAD_FORMAT`.
    #[error("BAD_FORMAT: the server could not parse the command")]
    BadFormat,
    /// `UNKNOWN_COMMAND`.
    #[error("UNKNOWN_COMMAND: the server does not know the command")]
    UnknownCommand,
    /// `OUT_OF_MEMORY`.
    #[error("OUT_OF_MEMORY: the server could not allocate memory for the job")]
    OutOfMemory,
    /// `INTERNAL_ERROR`.
    #[error("INTERNAL_ERROR: the server reported a bug in itself")]
    InternalError,
    /// `NOT_IGNORED`: a connection must watch at least one tube.
    #[error("NOT_IGNORED: cannot ignore the only watched tube")]
    NotIgnored,
}

impl Error {
    /// True when the error cost the connection: the next call reconnects.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Io { .. }
                | Error::Closed { .. }
                | Error::Timeout { .. }
                | Error::Protocol { .. }
                | Error::Unexpected { .. }
                | Error::ExpectedCrlf
                | Error::BadFormat
                | Error::UnknownCommand
                | Error::NoAnswer
        )
    }

    /// Maps an answer that is not the success case of `command` to its error.
    pub fn from_answer(command: &'static str, answer: Answer) -> Error {
        match answer {
            Answer::NotFound => Error::NotFound,
            Answer::DeadlineSoon => Error::DeadlineSoon,
            Answer::JobTooBig => Error::JobTooBig,
            Answer::Draining => Error::Draining,
            Answer::Buried => Error::Buried { id: None },
            Answer::BuriedId(id) => Error::Buried { id: Some(id) },
            Answer::ExpectedCrlf => Error::ExpectedCrlf,
            Answer::BadFormat => Error::BadFormat,
            Answer::UnknownCommand => Error::UnknownCommand,
            Answer::OutOfMemory => Error::OutOfMemory,
            Answer::InternalError => Error::InternalError,
            Answer::NotIgnored => Error::NotIgnored,
            other => Error::Unexpected {
                command,
                answer: answer_word(&other).to_string(),
            },
        }
    }
}

fn answer_word(a: &Answer) -> &'static str {
    match a {
        Answer::Inserted(_) => "INSERTED",
        Answer::BuriedId(_) | Answer::Buried => "BURIED",
        Answer::ExpectedCrlf => "EXPECTED_CRLF",
        Answer::JobTooBig => "JOB_TOO_BIG",
        Answer::Draining => "DRAINING",
        Answer::Using(_) => "USING",
        Answer::Reserved(..) => "RESERVED",
        Answer::DeadlineSoon => "DEADLINE_SOON",
        Answer::TimedOut => "TIMED_OUT",
        Answer::Deleted => "DELETED",
        Answer::NotFound => "NOT_FOUND",
        Answer::Released => "RELEASED",
        Answer::Touched => "TOUCHED",
        Answer::Watching(_) => "WATCHING",
        Answer::NotIgnored => "NOT_IGNORED",
        Answer::Found(..) => "FOUND",
        Answer::KickedCount(_) | Answer::Kicked => "KICKED",
        Answer::Ok(_) => "OK",
        Answer::Paused => "PAUSED",
        Answer::OutOfMemory => "OUT_OF_MEMORY",
        Answer::InternalError => "INTERNAL_ERROR",
        Answer::BadFormat => "BAD_FORMAT",
        Answer::UnknownCommand => "UNKNOWN_COMMAND",
    }
}
