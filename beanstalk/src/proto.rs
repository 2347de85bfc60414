//! The wire format: requests encoded into bytes, answers parsed from bytes.
//!
//! Nothing here does I/O. [`Request::encode`] appends one command to a buffer, and
//! [`parse_answer`] takes the bytes received so far and returns either a complete
//! [`Answer`] and how many bytes it used, `Ok(None)` while more bytes are needed, or a
//! [`ProtocolError`] when the bytes cannot be a beanstalkd answer at all. The parser
//! never panics, whatever the bytes.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest answer line accepted before the CRLF (beanstalkd's own lines are far shorter:
/// the longest is `USING <200-byte tube>`).
pub const MAX_LINE: usize = 256;

/// Largest body the server can ever send: beanstalkd's `JOB_DATA_SIZE_LIMIT_MAX` (1 GiB).
/// A data answer announcing more is garbage, not a job.
pub const MAX_BODY: u64 = 1 << 30;

/// One command, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// `put <pri> <delay> <ttr> <bytes>` followed by the body.
    Put {
        /// Priority (lower is more urgent).
        pri: u32,
        /// Seconds before the job becomes ready.
        delay: u32,
        /// Seconds a worker may hold the job.
        ttr: u32,
        /// The job body.
        body: &'a [u8],
    },
    /// `use <tube>`.
    Use(&'a str),
    /// `reserve`.
    Reserve,
    /// `reserve-with-timeout <seconds>`.
    ReserveWithTimeout(u32),
    /// `reserve-job <id>`.
    ReserveJob(u64),
    /// `delete <id>`.
    Delete(u64),
    /// `release <id> <pri> <delay>`.
    Release {
        /// The job.
        id: u64,
        /// Its new priority.
        pri: u32,
        /// Seconds before it is ready again.
        delay: u32,
    },
    /// `bury <id> <pri>`.
    Bury {
        /// The job.
        id: u64,
        /// Its new priority.
        pri: u32,
    },
    /// `touch <id>`.
    Touch(u64),
    /// `watch <tube>`.
    Watch(&'a str),
    /// `ignore <tube>`.
    Ignore(&'a str),
    /// `peek <id>`.
    Peek(u64),
    /// `peek-ready`.
    PeekReady,
    /// `peek-delayed`.
    PeekDelayed,
    /// `peek-buried`.
    PeekBuried,
    /// `kick <bound>`.
    Kick(u32),
    /// `kick-job <id>`.
    KickJob(u64),
    /// `stats-job <id>`.
    StatsJob(u64),
    /// `stats-tube <tube>`.
    StatsTube(&'a str),
    /// `stats`.
    Stats,
    /// `list-tubes`.
    ListTubes,
    /// `list-tube-used`.
    ListTubeUsed,
    /// `list-tubes-watched`.
    ListTubesWatched,
    /// `pause-tube <tube> <delay>`.
    PauseTube(&'a str, u32),
    /// `quit`.
    Quit,
}

impl Request<'_> {
    /// The command word, as it appears on the wire (used in error messages).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Put { .. } => "put",
            Request::Use(_) => "use",
            Request::Reserve => "reserve",
            Request::ReserveWithTimeout(_) => "reserve-with-timeout",
            Request::ReserveJob(_) => "reserve-job",
            Request::Delete(_) => "delete",
            Request::Release { .. } => "release",
            Request::Bury { .. } => "bury",
            Request::Touch(_) => "touch",
            Request::Watch(_) => "watch",
            Request::Ignore(_) => "ignore",
            Request::Peek(_) => "peek",
            Request::PeekReady => "peek-ready",
            Request::PeekDelayed => "peek-delayed",
            Request::PeekBuried => "peek-buried",
            Request::Kick(_) => "kick",
            Request::KickJob(_) => "kick-job",
            Request::StatsJob(_) => "stats-job",
            Request::StatsTube(_) => "stats-tube",
            Request::Stats => "stats",
            Request::ListTubes => "list-tubes",
            Request::ListTubeUsed => "list-tube-used",
            Request::ListTubesWatched => "list-tubes-watched",
            Request::PauseTube(..) => "pause-tube",
            Request::Quit => "quit",
        }
    }

    /// Appends the command, CRLF-terminated (and the body for `put`), to `buf`.
    ///
    /// Tube names must already be valid (see [`crate::check_tube`]); this function does not
    /// check them, because a client checks a name once, not on every encode.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut nums = itoa_buf::Buffer::new();
        buf.put_slice(self.name().as_bytes());
        let arg = |buf: &mut BytesMut, s: &[u8]| {
            buf.put_u8(b' ');
            buf.put_slice(s);
        };
        match *self {
            Request::Put {
                pri,
                delay,
                ttr,
                body,
            } => {
                arg(buf, nums.format(pri as u64));
                arg(buf, nums.format(delay as u64));
                arg(buf, nums.format(ttr as u64));
                arg(buf, nums.format(body.len() as u64));
                buf.put_slice(b"\r\n");
                buf.put_slice(body);
            }
            Request::Use(t) | Request::Watch(t) | Request::Ignore(t) | Request::StatsTube(t) => {
                arg(buf, t.as_bytes())
            }
            Request::ReserveWithTimeout(n) | Request::Kick(n) => arg(buf, nums.format(n as u64)),
            Request::ReserveJob(id)
            | Request::Delete(id)
            | Request::Touch(id)
            | Request::Peek(id)
            | Request::KickJob(id)
            | Request::StatsJob(id) => arg(buf, nums.format(id)),
            Request::Release { id, pri, delay } => {
                arg(buf, nums.format(id));
                arg(buf, nums.format(pri as u64));
                arg(buf, nums.format(delay as u64));
            }
            Request::Bury { id, pri } => {
                arg(buf, nums.format(id));
                arg(buf, nums.format(pri as u64));
            }
            Request::PauseTube(t, d) => {
                arg(buf, t.as_bytes());
                arg(buf, nums.format(d as u64));
            }
            Request::Reserve
            | Request::PeekReady
            | Request::PeekDelayed
            | Request::PeekBuried
            | Request::Stats
            | Request::ListTubes
            | Request::ListTubeUsed
            | Request::ListTubesWatched
            | Request::Quit => {}
        }
        buf.put_slice(b"\r\n");
    }
}

/// Formats integers without allocating; a put is encoded millions of times in a benchmark.
mod itoa_buf {
    pub struct Buffer([u8; 20]);

    impl Buffer {
        pub fn new() -> Buffer {
            Buffer([0; 20])
        }

        pub fn format(&mut self, mut n: u64) -> &[u8] {
            let mut i = self.0.len();
            loop {
                i -= 1;
                self.0[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    return &self.0[i..];
                }
            }
        }
    }
}

/// One answer from the server, as it was on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `INSERTED <id>`.
    Inserted(u64),
    /// `BURIED <id>` (put, when the server could not grow its priority queue).
    BuriedId(u64),
    /// `BURIED` (release or bury).
    Buried,
    /// `EXPECTED_CRLF`.
    ExpectedCrlf,
    /// `JOB_TOO_BIG`.
    JobTooBig,
    /// `DRAINING`.
    Draining,
    /// `USING <tube>`.
    Using(String),
    /// `RESERVED <id> <bytes>` and the body.
    Reserved(u64, Bytes),
    /// `DEADLINE_SOON`.
    DeadlineSoon,
    /// `TIMED_OUT`.
    TimedOut,
    /// `DELETED`.
    Deleted,
    /// `NOT_FOUND`.
    NotFound,
    /// `RELEASED`.
    Released,
    /// `TOUCHED`.
    Touched,
    /// `WATCHING <count>`.
    Watching(u64),
    /// `NOT_IGNORED`.
    NotIgnored,
    /// `FOUND <id> <bytes>` and the body.
    Found(u64, Bytes),
    /// `KICKED <count>` (kick).
    KickedCount(u64),
    /// `KICKED` (kick-job).
    Kicked,
    /// `OK <bytes>` and the YAML body.
    Ok(Bytes),
    /// `PAUSED`.
    Paused,
    /// `OUT_OF_MEMORY`.
    OutOfMemory,
    /// `INTERNAL_ERROR`.
    InternalError,
    /// `BAD_FORMAT`.
    BadFormat,
    /// `UNKNOWN_COMMAND`.
    UnknownCommand,
}

/// Bytes that cannot be a beanstalkd answer. After one of these the stream is out of
/// sync and the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// No CRLF within [`MAX_LINE`] bytes.
    #[error("answer line longer than {MAX_LINE} bytes without CRLF")]
    LineTooLong,
    /// A line that is not one of beanstalkd's answers.
    #[error("unrecognised answer line {0:?}")]
    Garbage(String),
    /// A body length that cannot be right.
    #[error("answer announces a {0}-byte body, more than the protocol's 1 GiB maximum")]
    BodyTooLarge(u64),
    /// The body was not followed by CRLF.
    #[error("body of {0} bytes not followed by CRLF")]
    MissingBodyCrlf(u64),
}

/// Parses one answer from the front of `buf`.
///
/// Returns `Ok(Some((answer, used)))` when a whole answer is there, `Ok(None)` when more
/// bytes are needed, and an error when the bytes are not an answer.
pub fn parse_answer(buf: &[u8]) -> Result<Option<(Answer, usize)>, ProtocolError> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > MAX_LINE + 1 {
            Err(ProtocolError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    let line = &buf[..end];
    let after_line = end + 2;
    let garbage = || ProtocolError::Garbage(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| garbage())?;
    let mut words = text.split(' ');
    let word = words.next().unwrap_or("");
    let args: Vec<&str> = words.collect();
    let num = |i: usize| -> Result<u64, ProtocolError> {
        let s = args.get(i).ok_or_else(garbage)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(garbage());
        }
        s.parse().map_err(|_| garbage())
    };
    let want = |n: usize| -> Result<(), ProtocolError> {
        if args.len() == n {
            Ok(())
        } else {
            Err(garbage())
        }
    };
    let simple = |a: Answer| -> Result<Option<(Answer, usize)>, ProtocolError> {
        want(0)?;
        Ok(Some((a, after_line)))
    };
    match word {
        "INSERTED" => {
            want(1)?;
            Ok(Some((Answer::Inserted(num(0)?), after_line)))
        }
        "BURIED" if args.is_empty() => Ok(Some((Answer::Buried, after_line))),
        "BURIED" => {
            want(1)?;
            Ok(Some((Answer::BuriedId(num(0)?), after_line)))
        }
        "USING" => {
            want(1)?;
            Ok(Some((Answer::Using(args[0].to_string()), after_line)))
        }
        "WATCHING" => {
            want(1)?;
            Ok(Some((Answer::Watching(num(0)?), after_line)))
        }
        "KICKED" if args.is_empty() => Ok(Some((Answer::Kicked, after_line))),
        "KICKED" => {
            want(1)?;
            Ok(Some((Answer::KickedCount(num(0)?), after_line)))
        }
        "RESERVED" | "FOUND" => {
            want(2)?;
            let id = num(0)?;
            body(buf, after_line, num(1)?).map(|o| {
                o.map(|(b, used)| {
                    let a = if word == "FOUND" {
                        Answer::Found(id, b)
                    } else {
                        Answer::Reserved(id, b)
                    };
                    (a, used)
                })
            })
        }
        "OK" => {
            want(1)?;
            body(buf, after_line, num(0)?).map(|o| o.map(|(b, used)| (Answer::Ok(b), used)))
        }
        "EXPECTED_CRLF" => simple(Answer::ExpectedCrlf),
        "JOB_TOO_BIG" => simple(Answer::JobTooBig),
        "DRAINING" => simple(Answer::Draining),
        "DEADLINE_SOON" => simple(Answer::DeadlineSoon),
        "TIMED_OUT" => simple(Answer::TimedOut),
        "DELETED" => simple(Answer::Deleted),
        "NOT_FOUND" => simple(Answer::NotFound),
        "RELEASED" => simple(Answer::Released),
        "TOUCHED" => simple(Answer::Touched),
        "NOT_IGNORED" => simple(Answer::NotIgnored),
        "PAUSED" => simple(Answer::Paused),
        "OUT_OF_MEMORY" => simple(Answer::OutOfMemory),
        "INTERNAL_ERROR" => simple(Answer::InternalError),
        "BAD_FORMAT" => simple(Answer::BadFormat),
        "UNKNOWN_COMMAND" => simple(Answer::UnknownCommand),
        _ => Err(garbage()),
    }
}

/// Cuts a `len`-byte body plus CRLF starting at `start`.
fn body(buf: &[u8], start: usize, len: u64) -> Result<Option<(Bytes, usize)>, ProtocolError> {
    if len > MAX_BODY {
        return Err(ProtocolError::BodyTooLarge(len));
    }
    // len <= 1 GiB, so this fits in usize on every platform tokio supports.
    let n = len as usize;
    let end = start + n;
    if buf.len() < end + 2 {
        // A CRLF that should come after the body but does not is caught as soon as
        // those two bytes are here, without waiting for more.
        if buf.len() > end && buf[end] != b'\r' {
            return Err(ProtocolError::MissingBodyCrlf(len));
        }
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ProtocolError::MissingBodyCrlf(len));
    }
    Ok(Some((Bytes::copy_from_slice(&buf[start..end]), end + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: Request<'_>) -> Vec<u8> {
        let mut b = BytesMut::new();
        r.encode(&mut b);
        b.to_vec()
    }

    #[test]
    fn encodes_every_command_as_protocol_txt_spells_it() {
        let body = b"hello";
        let cases: Vec<(Request<'_>, &[u8])> = vec![
            (
                Request::Put {
                    pri: 1024,
                    delay: 0,
                    ttr: 60,
                    body,
                },
                b"put 1024 0 60 5\r\nhello\r\n",
            ),
            (Request::Use("flotilla.create"), b"use flotilla.create\r\n"),
            (Request::Reserve, b"reserve\r\n"),
            (
                Request::ReserveWithTimeout(5),
                b"reserve-with-timeout 5\r\n",
            ),
            (Request::ReserveJob(7), b"reserve-job 7\r\n"),
            (
                Request::Delete(18446744073709551615),
                b"delete 18446744073709551615\r\n",
            ),
            (
                Request::Release {
                    id: 3,
                    pri: 10,
                    delay: 2,
                },
                b"release 3 10 2\r\n",
            ),
            (Request::Bury { id: 3, pri: 0 }, b"bury 3 0\r\n"),
            (Request::Touch(9), b"touch 9\r\n"),
            (Request::Watch("a"), b"watch a\r\n"),
            (Request::Ignore("default"), b"ignore default\r\n"),
            (Request::Peek(1), b"peek 1\r\n"),
            (Request::PeekReady, b"peek-ready\r\n"),
            (Request::PeekDelayed, b"peek-delayed\r\n"),
            (Request::PeekBuried, b"peek-buried\r\n"),
            (Request::Kick(100), b"kick 100\r\n"),
            (Request::KickJob(4), b"kick-job 4\r\n"),
            (Request::StatsJob(4), b"stats-job 4\r\n"),
            (Request::StatsTube("t"), b"stats-tube t\r\n"),
            (Request::Stats, b"stats\r\n"),
            (Request::ListTubes, b"list-tubes\r\n"),
            (Request::ListTubeUsed, b"list-tube-used\r\n"),
            (Request::ListTubesWatched, b"list-tubes-watched\r\n"),
            (Request::PauseTube("t", 30), b"pause-tube t 30\r\n"),
            (Request::Quit, b"quit\r\n"),
        ];
        for (req, want) in cases {
            assert_eq!(enc(req), want, "{}", req.name());
        }
    }

    #[test]
    fn parses_line_answers() {
        let p = |s: &[u8]| parse_answer(s).unwrap().unwrap();
        assert_eq!(p(b"INSERTED 12\r\n"), (Answer::Inserted(12), 13));
        assert_eq!(p(b"BURIED 12\r\n").0, Answer::BuriedId(12));
        assert_eq!(p(b"BURIED\r\n").0, Answer::Buried);
        assert_eq!(p(b"USING foo\r\n").0, Answer::Using("foo".into()));
        assert_eq!(p(b"WATCHING 2\r\n").0, Answer::Watching(2));
        assert_eq!(p(b"KICKED 3\r\n").0, Answer::KickedCount(3));
        assert_eq!(p(b"KICKED\r\n").0, Answer::Kicked);
        assert_eq!(p(b"NOT_IGNORED\r\n").0, Answer::NotIgnored);
        assert_eq!(p(b"OUT_OF_MEMORY\r\n").0, Answer::OutOfMemory);
    }

    #[test]
    fn parses_data_answers_only_when_complete() {
        assert_eq!(parse_answer(b"RESERVED 5 3\r\nab"), Ok(None));
        assert_eq!(parse_answer(b"RESERVED 5 3\r\nabc"), Ok(None));
        assert_eq!(parse_answer(b"RESERVED 5 3\r\nabc\r"), Ok(None));
        let (a, used) = parse_answer(b"RESERVED 5 3\r\nabc\r\nINSERTED 1\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(a, Answer::Reserved(5, Bytes::from_static(b"abc")));
        assert_eq!(used, 19);
        assert_eq!(
            parse_answer(b"OK 4\r\n---\n\r\n").unwrap().unwrap().0,
            Answer::Ok(Bytes::from_static(b"---\n"))
        );
    }

    #[test]
    fn refuses_what_no_server_sends() {
        assert!(matches!(
            parse_answer(b"HELLO\r\n"),
            Err(ProtocolError::Garbage(_))
        ));
        assert!(matches!(
            parse_answer(b"INSERTED\r\n"),
            Err(ProtocolError::Garbage(_))
        ));
        assert!(matches!(
            parse_answer(b"INSERTED -1\r\n"),
            Err(ProtocolError::Garbage(_))
        ));
        assert!(matches!(
            parse_answer(b"INSERTED 1 2\r\n"),
            Err(ProtocolError::Garbage(_))
        ));
        assert!(matches!(
            parse_answer(b"INSERTED 99999999999999999999999\r\n"),
            Err(ProtocolError::Garbage(_))
        ));
        assert!(matches!(
            parse_answer(b"\xff\xfe\r\n"),
            Err(ProtocolError::Garbage(_))
        ));
        assert_eq!(
            parse_answer(b"RESERVED 1 2000000000\r\n"),
            Err(ProtocolError::BodyTooLarge(2_000_000_000))
        );
        assert_eq!(
            parse_answer(b"RESERVED 1 3\r\nabcde"),
            Err(ProtocolError::MissingBodyCrlf(3))
        );
        assert_eq!(parse_answer(&[b'A'; 300]), Err(ProtocolError::LineTooLong));
        assert_eq!(parse_answer(&[b'A'; 100]), Ok(None));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse_answer(&bytes);
        }

        #[test]
        fn never_panics_on_answer_like_bytes(s in "(INSERTED|RESERVED|FOUND|OK|BURIED|KICKED|USING|WATCHING)( [0-9]{0,22}){0,3}\r\n[a-z\r\n]{0,20}") {
            let _ = parse_answer(s.as_bytes());
        }
    }
}
