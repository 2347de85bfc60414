//! The beanstalkd answer parser (`beanstalk::proto::parse_answer`) on whatever a server,
//! or something posing as one, sends: it must never panic, a whole answer must not claim
//! more bytes than it was given, more bytes after a whole answer must not change it, and
//! a part of a whole answer must read as "need more", never as an error or another answer
//! (the client sees answers arrive in pieces of any size).
#![no_main]

use beanstalk::proto::parse_answer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((answer, used))) = parse_answer(data) else {
        return;
    };
    assert!(used > 0 && used <= data.len(), "used {used} of {} bytes", data.len());

    let mut longer = data[..used].to_vec();
    longer.extend_from_slice(b"NOT_FOUND\r\n");
    assert_eq!(
        parse_answer(&longer),
        Ok(Some((answer.clone(), used))),
        "bytes after a whole answer changed it"
    );
    assert_eq!(parse_answer(&data[..used]), Ok(Some((answer, used))));

    // Every cut for short answers, a few for long ones.
    let step = (used / 64).max(1);
    for cut in (0..used).step_by(step) {
        assert_eq!(
            parse_answer(&data[..cut]),
            Ok(None),
            "the first {cut} of {used} bytes of a whole answer"
        );
    }
});
