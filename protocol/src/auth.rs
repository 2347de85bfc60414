//! Signed messages: beanstalkd has no authentication, so every message carries an
//! HMAC-SHA256 under the cluster key, and a host acts only on messages that verify.
//!
//! The key file holds one key per line (at least 32 characters each, e.g. `openssl rand
//! -hex 32`): the first signs and verifies, a second one is still accepted, which is how
//! a key is rotated without a flag day (add the new key as the first line everywhere,
//! keep the old one second until no message signed with it can still be queued, then
//! drop it). The file must belong to the user the agent runs as and be unreadable by
//! others, or the agent refuses to start.
//!
//! A message is refused (and its job buried with the reason) when it is unsigned, its
//! signature does not verify, it is misaddressed (the signed destination is not the host
//! and tube it was read from, or its kind does not belong on that tube), it was sent
//! outside the accepted time window, or its id was already acted on (a replay).
//!
//! The destination is what makes the per-host replay cache enough: a copy of a message
//! can only be acted on where it was addressed, and there its id is already known.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::message::{self, Envelope, Message};

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// It cannot be read.
    #[error("cluster key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Others may read or write it.
    #[error("cluster key file {path} has mode {mode:o}; it must not be readable or writable by group or others (chmod 600)")]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another user owns it.
    #[error("cluster key file {path} belongs to uid {owner}, not to the agent's user (uid {me})")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The agent's effective uid.
        me: u32,
    },
    /// No usable key in it.
    #[error("cluster key file {path}: {reason}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why a message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No signature.
    #[error("unsigned message")]
    Unsigned,
    /// The signature does not verify under any accepted key (forged or tampered).
    #[error("signature does not verify (forged or tampered)")]
    BadSignature,
    /// Sent too long ago, or in the future.
    #[error("sent at {sent_at}, outside the accepted window of {window}s around now ({now})")]
    Expired {
        /// Its `sent_at`.
        sent_at: u64,
        /// Now.
        now: u64,
        /// The window.
        window: u64,
    },
    /// Its id was already acted on.
    #[error("message {0} was already acted on (replayed)")]
    Replayed(String),
    /// Addressed to another host or tube, or of a kind that does not belong on the tube.
    #[error("a `{kind}` message addressed to {to} was read by {host} from {tube} (misaddressed)")]
    Misaddressed {
        /// The message kind.
        kind: String,
        /// Where it is addressed.
        to: String,
        /// The host that read it.
        host: String,
        /// The tube it was read from.
        tube: String,
    },
}

impl Rejection {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired { .. } => "expired",
            Rejection::Replayed(_) => "replayed",
            Rejection::Misaddressed { .. } => "misaddressed",
        }
    }
}

/// The cluster keys: the first signs, all verify.
#[derive(Clone)]
pub struct Keys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        write!(f, "Keys({} keys)", self.keys.len())
    }
}

/// The effective uid of this process, without `unsafe`: the owner of a file it creates.
fn effective_uid(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let f = tempfile::tempfile_in(dir)?;
    Ok(f.metadata()?.uid())
}

impl Keys {
    /// Keys from text: one per line, blank lines and `#` comments ignored.
    pub fn parse(text: &str) -> Result<Keys, String> {
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err("no key in it".into());
        }
        if keys.len() > 2 {
            return Err(format!(
                "{} keys; at most two (the current one and, during a rotation, the previous one)",
                keys.len()
            ));
        }
        if let Some(k) = keys.iter().find(|k| k.len() < MIN_KEY_LEN) {
            return Err(format!(
                "a key of {} characters; at least {MIN_KEY_LEN} (openssl rand -hex 32)",
                k.len()
            ));
        }
        Ok(Keys { keys })
    }

    /// Reads the key file, refusing one others may read or another user owns.
    pub fn load(path: &Path) -> Result<Keys, KeyError> {
        use std::os::unix::fs::MetadataExt;
        let read = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Mode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let me = effective_uid(dir)
            .or_else(|_| effective_uid(&std::env::temp_dir()))
            .map_err(read)?;
        if meta.uid() != me {
            return Err(KeyError::Owner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Keys::parse(&text).map_err(|reason| KeyError::Content {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn mac(key: &[u8], bytes: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(bytes);
        mac
    }

    /// Signs `env` (replacing any signature) with the current key.
    pub fn seal(&self, env: &mut Envelope) {
        env.sig = None;
        let bytes = message::encode(env);
        let tag = Keys::mac(&self.keys[0], &bytes).finalize().into_bytes();
        env.sig = Some(tag.iter().map(|b| format!("{b:02x}")).collect());
    }

    /// Checks `env`'s signature under every accepted key, that it is addressed to `host`
    /// on `tube` (where it was read), and its age against `window` seconds around `now`.
    pub fn verify(
        &self,
        env: &Envelope,
        host: &str,
        tube: &str,
        now: u64,
        window: u64,
    ) -> Result<(), Rejection> {
        let Some(sig) = &env.sig else {
            return Err(Rejection::Unsigned);
        };
        let tag = decode_hex(sig).ok_or(Rejection::BadSignature)?;
        let mut unsigned = env.clone();
        unsigned.sig = None;
        let bytes = message::encode(&unsigned);
        let ok = self
            .keys
            .iter()
            .any(|k| Keys::mac(k, &bytes).verify_slice(&tag).is_ok());
        if !ok {
            return Err(Rejection::BadSignature);
        }
        addressed(env, host, tube)?;
        if env.sent_at.abs_diff(now) > window {
            return Err(Rejection::Expired {
                sent_at: env.sent_at,
                now,
                window,
            });
        }
        Ok(())
    }
}

/// Checks that `env` belongs where it was read: on `tube` of `host`. Only a trigger may
/// be addressed to any host (it only asks for a fetch, and the post-receive hook that
/// sends it knows addresses, not host names).
fn addressed(env: &Envelope, host: &str, tube: &str) -> Result<(), Rejection> {
    let to = &env.to;
    let host_ok = match &to.host {
        Some(h) => h == host,
        None => matches!(env.body, Message::Trigger(_)),
    };
    if host_ok && to.tube == tube && env.body.tube() == tube {
        return Ok(());
    }
    let mut shown = to.to_string();
    if to.tube != env.body.tube() {
        shown += &format!(" (a `{}` belongs on {})", env.body.kind(), env.body.tube());
    }
    Err(Rejection::Misaddressed {
        kind: env.body.kind().to_string(),
        to: shown,
        host: host.to_string(),
        tube: tube.to_string(),
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{tubes, Trigger};

    const K1: &str = "0123456789abcdef0123456789abcdef-one";
    const K2: &str = "0123456789abcdef0123456789abcdef-two";
    const H1: &str = "host1";
    const C: &str = tubes::CONTROL;

    fn env() -> Envelope {
        let mut e = Envelope::new(
            "lab",
            "host1",
            "host1",
            Message::Trigger(Trigger {
                reason: "push".into(),
            }),
        );
        e.sent_at = 1000;
        e
    }

    #[test]
    fn signed_messages_verify_and_tampered_or_forged_ones_do_not() {
        let keys = Keys::parse(K1).unwrap();
        let mut e = env();
        assert_eq!(keys.verify(&e, H1, C, 1000, 60), Err(Rejection::Unsigned));
        keys.seal(&mut e);
        assert_eq!(keys.verify(&e, H1, C, 1000, 60), Ok(()));
        // Survives the trip through JSON.
        let back = message::decode(&message::encode(&e)).unwrap();
        assert_eq!(keys.verify(&back, H1, C, 1000, 60), Ok(()));
        let mut tampered = e.clone();
        tampered.from = "host2".into();
        assert_eq!(
            keys.verify(&tampered, H1, C, 1000, 60),
            Err(Rejection::BadSignature)
        );
        let mut forged = env();
        Keys::parse(K2).unwrap().seal(&mut forged);
        assert_eq!(
            keys.verify(&forged, H1, C, 1000, 60),
            Err(Rejection::BadSignature)
        );
        assert!(matches!(
            keys.verify(&e, H1, C, 2000, 60),
            Err(Rejection::Expired { .. })
        ));
    }

    /// Guards issue 11, hole 2: a signed create sent to host3, copied onto host2's create
    /// tube, verified there, and host2 built the VM too. The destination is signed: host2
    /// refuses it as misaddressed, and so does any tube it does not belong on; changing
    /// the destination breaks the signature.
    #[test]
    fn a_message_addressed_to_host3_is_refused_by_host2() {
        let keys = Keys::parse(K1).unwrap();
        let mut create = Envelope::new(
            "lab",
            "host1",
            "host3",
            Message::Create(crate::message::sample_create()),
        );
        create.sent_at = 1000;
        keys.seal(&mut create);
        assert_eq!(
            keys.verify(&create, "host3", tubes::CREATE, 1000, 60),
            Ok(())
        );
        let refused = keys.verify(&create, "host2", tubes::CREATE, 1000, 60);
        assert!(
            matches!(&refused, Err(r @ Rejection::Misaddressed { .. }) if r.label() == "misaddressed"),
            "{refused:?}"
        );
        let text = refused.unwrap_err().to_string();
        assert!(
            text.contains("addressed to host3 on flotilla.create")
                && text.contains("read by host2"),
            "{text}"
        );
        // On the right host but the wrong tube.
        assert!(matches!(
            keys.verify(&create, "host3", tubes::OPS, 1000, 60),
            Err(Rejection::Misaddressed { .. })
        ));
        // Readdressed by whoever copied it: the signature no longer verifies.
        let mut readdressed = create.clone();
        readdressed.to.host = Some("host2".into());
        assert_eq!(
            keys.verify(&readdressed, "host2", tubes::CREATE, 1000, 60),
            Err(Rejection::BadSignature)
        );
        // Signed for the wrong tube (a create meant for the ops tube): refused on both.
        let mut wrong_tube = create.clone();
        wrong_tube.to.tube = tubes::OPS.into();
        keys.seal(&mut wrong_tube);
        for tube in [tubes::OPS, tubes::CREATE] {
            let r = keys.verify(&wrong_tube, "host3", tube, 1000, 60);
            assert!(
                matches!(&r, Err(Rejection::Misaddressed { to, .. }) if to.contains("belongs on flotilla.create")),
                "{r:?}"
            );
        }
        // Only a trigger may be addressed to any host.
        let mut any = create.clone();
        any.to.host = None;
        keys.seal(&mut any);
        assert!(matches!(
            keys.verify(&any, "host3", tubes::CREATE, 1000, 60),
            Err(Rejection::Misaddressed { .. })
        ));
        let mut trigger = env();
        trigger.to.host = None;
        keys.seal(&mut trigger);
        for host in ["host1", "host2"] {
            assert_eq!(keys.verify(&trigger, host, C, 1000, 60), Ok(()));
        }
        assert!(keys
            .verify(&trigger, "host2", tubes::CREATE, 1000, 60)
            .is_err());
    }

    #[test]
    fn during_a_rotation_the_previous_key_still_verifies() {
        let old = Keys::parse(K1).unwrap();
        let rotating = Keys::parse(&format!("{K2}\n{K1}\n")).unwrap();
        let mut e = env();
        old.seal(&mut e);
        assert_eq!(rotating.verify(&e, H1, C, 1000, 60), Ok(()));
        let mut new = env();
        rotating.seal(&mut new);
        assert_eq!(
            old.verify(&new, H1, C, 1000, 60),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn key_files_readable_by_others_short_or_empty_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("cluster.key");
        std::fs::write(&p, format!("{K1}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Keys::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Keys::load(&p).is_ok());
        std::fs::write(&p, "short\n").unwrap();
        assert!(Keys::load(&p)
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(Keys::load(&p).unwrap_err().to_string().contains("no key"));
        assert_eq!(format!("{:?}", Keys::parse(K1).unwrap()), "Keys(1 keys)");
    }
}
