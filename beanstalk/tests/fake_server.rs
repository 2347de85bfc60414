//! Answers a real beanstalkd rarely or never gives, from a scripted fake server: each
//! must end in a clear error, never a hang or a panic.

use std::time::Duration;

use beanstalk::proto::ProtocolError;
use beanstalk::{Client, Error, Options, PutParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STATS: &[u8] = b"OK 24\r\n---\nmax-job-size: 65535\n\r\n";

/// Serves one connection: answers the client's opening `stats`, then writes `reply` to
/// the first command and closes (or keeps the socket open when `hold` is set).
async fn fake(reply: &'static [u8], hold: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = sock.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"stats\r\n");
        sock.write_all(STATS).await.unwrap();
        let _ = sock.read(&mut buf).await.unwrap();
        sock.write_all(reply).await.unwrap();
        if hold {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    addr
}

fn quick() -> Options {
    Options {
        call_timeout: Some(Duration::from_millis(500)),
        connect_timeout: Duration::from_secs(1),
    }
}

async fn put_against(reply: &'static [u8], hold: bool) -> Error {
    let addr = fake(reply, hold).await;
    let mut c = Client::connect_with(addr, quick()).await.unwrap();
    let err = c.put(b"x", PutParams::default()).await.unwrap_err();
    assert!(err.is_disconnect(), "{err:?} must drop the connection");
    err
}

async fn reserve_against(reply: &'static [u8], hold: bool) -> Error {
    let addr = fake(reply, hold).await;
    let mut c = Client::connect_with(addr, quick()).await.unwrap();
    let err = c.reserve_with_timeout(Duration::ZERO).await.unwrap_err();
    assert!(err.is_disconnect(), "{err:?} must drop the connection");
    err
}

#[tokio::test]
async fn truncated_body_then_silence_times_out() {
    let err = reserve_against(b"RESERVED 1 10\r\nabc", true).await;
    assert!(
        matches!(
            err,
            Error::Timeout {
                command: "reserve-with-timeout",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn truncated_body_then_close_says_mid_answer() {
    let err = reserve_against(b"RESERVED 1 10\r\nabc", false).await;
    assert!(
        matches!(
            err,
            Error::Closed {
                mid_answer: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("in the middle of an answer"));
}

#[tokio::test]
async fn garbage_line_is_a_protocol_error() {
    let err = put_against(b"HTTP/1.1 400 Bad Request\r\n", true).await;
    assert!(
        matches!(err, Error::Protocol { command: "put", source: ProtocolError::Garbage(ref l) } if l == "HTTP/1.1 400 Bad Request"),
        "{err:?}"
    );
}

#[tokio::test]
async fn endless_line_without_crlf_is_refused() {
    static LONG: [u8; 4096] = [b'A'; 4096];
    let err = put_against(&LONG, true).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::LineTooLong,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn connection_closed_before_any_answer() {
    let err = put_against(b"", false).await;
    assert!(
        matches!(
            err,
            Error::Closed {
                mid_answer: false,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn oversized_count_is_refused_without_waiting_for_it() {
    let err = reserve_against(b"RESERVED 1 99999999999\r\n", true).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::BodyTooLarge(99999999999),
                ..
            }
        ),
        "{err:?}"
    );
    let err = reserve_against(b"RESERVED 1 999999999999999999999999\r\n", true).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::Garbage(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn body_without_crlf_after_it() {
    let err = reserve_against(b"RESERVED 1 3\r\nabcXY", true).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::MissingBodyCrlf(3),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn answer_of_another_command_is_unexpected() {
    let err = put_against(b"DELETED\r\n", true).await;
    assert!(
        matches!(err, Error::Unexpected { command: "put", ref answer } if answer == "DELETED"),
        "{err:?}"
    );
}

#[tokio::test]
async fn rare_server_answers_have_their_own_errors() {
    for (reply, check) in [
        (
            &b"OUT_OF_MEMORY\r\n"[..],
            (|e: &Error| matches!(e, Error::OutOfMemory)) as fn(&Error) -> bool,
        ),
        (b"INTERNAL_ERROR\r\n", |e| matches!(e, Error::InternalError)),
        (b"JOB_TOO_BIG\r\n", |e| matches!(e, Error::JobTooBig)),
        (b"BURIED 7\r\n", |e| {
            matches!(e, Error::Buried { id: Some(7) })
        }),
        (b"EXPECTED_CRLF\r\n", |e| matches!(e, Error::ExpectedCrlf)),
        (b"BAD_FORMAT\r\n", |e| matches!(e, Error::BadFormat)),
        (b"UNKNOWN_COMMAND\r\n", |e| {
            matches!(e, Error::UnknownCommand)
        }),
    ] {
        let addr = fake(reply, true).await;
        let mut c = Client::connect_with(addr, quick()).await.unwrap();
        let err = c.put(b"x", PutParams::default()).await.unwrap_err();
        assert!(
            check(&err),
            "{:?} gave {err:?}",
            String::from_utf8_lossy(reply)
        );
    }
}

#[tokio::test]
async fn a_server_that_never_answers_is_bounded_by_the_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let _keep = tokio::spawn(async move {
        let (_sock, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let started = std::time::Instant::now();
    let err = Client::connect_with(addr, quick()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                command: "stats",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
