//! Replacing a file so that a reader sees the old contents or the new, never a part,
//! and a crash keeps one of them: a temporary file in the same directory, synced, then
//! renamed over the old one, and the directory synced.
//!
//! The temporary file's name is unique (tempfile's), so threads that replace the same
//! file at once do not take each other's: a name made of the pid alone once made
//! concurrent builds fail with "No such file or directory" on a shared template.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`, durably.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".flotilla-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    // tempfile makes its files 0600; what is replaced here (templates, markers, state
    // files) is read by vm-bhyve, operators and `flotilla status` as vm-bhyve's own
    // files are: 0644.
    tmp.as_file().set_permissions(
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644),
    )?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: eight builds installing the same template at once; each must succeed
    /// and the file must hold one writer's whole contents.
    #[test]
    fn concurrent_writers_of_one_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("CS0.conf");
        std::thread::scope(|s| {
            for i in 0..8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        write(path, format!("writer {i}\n").repeat(100).as_bytes()).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert!(text.lines().all(|l| l == first), "torn file");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "CS0.conf")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// Guards issue 12, item 5: templates and markers were written 0600 (tempfile's
    /// mode), where vm-bhyve's own files are 0644.
    #[test]
    fn replaced_files_are_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.conf");
        write(&path, b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(format!("{mode:o}"), "644");
    }
}
