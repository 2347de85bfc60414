//! The names flotilla hands to vm-bhyve, checked by one rule wherever a name comes in:
//! the desired repo's loader, the backend before a name reaches a command line, and the
//! simulator that stands in for vm-bhyve.

/// vm-bhyve's `util::check_name` on FreeBSD 13 and later:
/// `^[a-z0-9][.a-z0-9_-]{0,229}[a-z0-9]$`, case-insensitive. A name that passes can
/// neither be mistaken for an option (`-f`) nor for a path (`../etc`).
pub fn is_vm_name(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=231).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// How to write a name that [`is_vm_name`] accepts.
pub const VM_NAME_HINT: &str = "vm-bhyve accepts 2 to 231 characters: letters, digits and `.`, `_`, `-`, starting and ending with a letter or digit";
