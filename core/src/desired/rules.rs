//! What names and values the desired repo may hold, and why.

pub(crate) use crate::names::{is_vm_name, VM_NAME_HINT};

/// Host names become part of VM names (`every_host`) and of tube addresses, so they
/// follow the same rule as VM names, but shorter, leaving room for the VM's part.
pub(crate) fn is_host_name(s: &str) -> bool {
    is_vm_name(s) && s.len() <= 63
}

pub(crate) const HOST_NAME_HINT: &str = "use 2 to 63 characters: letters, digits and `.`, `_`, `-`, starting and ending with a letter or digit";

/// Profile and template names are file stems and vm-bhyve template names.
pub(crate) fn is_class_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A vm-bhyve config key: vm-bhyve only reads lines that start with a lower-case letter,
/// and `sysrc` only writes shell variable names.
pub(crate) fn is_config_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// Characters vm-bhyve's config reader would silently mangle (`"` removed, `#` starts a
/// comment even inside quotes) or that break the one-line format.
pub(crate) fn bad_config_char(v: &str) -> Option<char> {
    v.chars()
        .find(|c| matches!(c, '"' | '#' | '\\' | '`' | '$') || c.is_control())
}

/// Hook option keys become `key=value` arguments and environment variable suffixes.
pub(crate) fn is_hook_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

/// Secret names are file names under a host's secrets directory: never a path.
pub(crate) fn is_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !s.contains("..")
}

/// Tags are matched exactly, as whole words.
pub(crate) fn is_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
}

/// `xx:xx:xx:xx:xx:xx` in hex.
pub(crate) fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// `host:port` (or `[v6]:port`) of a beanstalkd.
pub(crate) fn is_address(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// The index `N` of a `diskN_…` or `networkN_…` key, and the key's suffix.
pub(crate) fn indexed_key<'a>(key: &'a str, prefix: &str) -> Option<(u32, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n = rest[..digits].parse().ok()?;
    let suffix = rest[digits..].strip_prefix('_')?;
    Some((n, suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_follow_vm_bhyve() {
        for ok in ["ab", "web1", "Web.1", "a-b_c.d", &"a".repeat(231)] {
            assert!(is_vm_name(ok), "{ok}");
        }
        for bad in ["a", "-bad", "bad_", "bad name", "", "wéb", &"a".repeat(232)] {
            assert!(!is_vm_name(bad), "{bad}");
        }
    }

    #[test]
    fn secrets_are_never_paths() {
        assert!(is_secret_name("tailscale-authkey"));
        assert!(is_secret_name("wg.key"));
        for bad in ["a/b", "/etc/passwd", "..", "a..b", ".hidden", ""] {
            assert!(!is_secret_name(bad), "{bad}");
        }
    }

    #[test]
    fn addresses() {
        assert!(is_address("10.0.0.1:11300"));
        assert!(is_address("host1.lan:11300"));
        assert!(is_address("[::1]:11300"));
        assert!(!is_address("10.0.0.1"));
        assert!(!is_address("10.0.0.1:0"));
        assert!(!is_address(":11300"));
    }

    #[test]
    fn indexed_keys() {
        assert_eq!(indexed_key("disk12_name", "disk"), Some((12, "name")));
        assert_eq!(indexed_key("network0_mac", "network"), Some((0, "mac")));
        assert_eq!(indexed_key("disk_name", "disk"), None);
        assert_eq!(indexed_key("diskx", "disk"), None);
    }
}
