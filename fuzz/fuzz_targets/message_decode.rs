//! The message decoder (`flotilla::message::decode`) on bytes from the queue, where anyone
//! who reaches beanstalkd can put a job: it must never panic; what it accepts must survive
//! encode and decode unchanged, and encode again to the same bytes (signatures are
//! computed over the re-encoded envelope, so a second encoding that differed would turn
//! a good signature bad); and checking its signature and destination must not panic
//! either.
#![no_main]

use flotilla::auth::{Keys, Rejection};
use flotilla::message::{decode, encode, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = decode(data) else {
        return;
    };
    let bytes = encode(&envelope);
    let Ok(again) = decode(&bytes) else {
        // Re-encoding writes defaults the input left out, so a job near the size limit
        // may grow past it; anything else that stops it decoding is a bug.
        assert!(bytes.len() > MAX_MESSAGE, "a decoded envelope, encoded, does not decode");
        return;
    };
    assert_eq!(envelope, again);
    assert_eq!(bytes, encode(&again), "encoding is not stable");

    let keys = Keys::parse(KEY).expect("a valid key");
    // Checked where it says it belongs, and on another host.
    let host = envelope.to.host.clone().unwrap_or_default();
    let tube = envelope.to.tube.clone();
    let _ = keys.verify(&envelope, &host, &tube, envelope.sent_at, 60);
    let _ = keys.verify(&envelope, "elsewhere", &tube, envelope.sent_at, 60);
    let mut sealed = envelope;
    keys.seal(&mut sealed);
    let sealed_bytes = encode(&sealed);
    let Ok(sealed) = decode(&sealed_bytes) else {
        assert!(sealed_bytes.len() > MAX_MESSAGE, "a sealed envelope does not decode");
        return;
    };
    // The seal verifies; the message may still be misaddressed (a fuzzed destination
    // need not fit its kind), never anything else.
    let r = keys.verify(&sealed, &host, &tube, sealed.sent_at, 0);
    assert!(
        matches!(r, Ok(()) | Err(Rejection::Misaddressed { .. })),
        "own seal does not verify: {r:?}"
    );
});
