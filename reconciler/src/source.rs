//! Where the desired repo's files come from: a git remote, through a bare clone, or a
//! plain directory.
//!
//! A remote (a local path, `file://`, `git://`, `ssh://`, `user@host:path` or
//! `https://`) is fetched into a bare clone, and the files are read straight from the
//! tree of the chosen commit: no work tree to go stale or be seen half-written, and the
//! commit id labels exactly what was read. ssh uses the ssh agent; https uses git's
//! credential helpers.
//!
//! A plain directory is read as it is on disk, for checks before a commit or a push; its
//! snapshot has no commit id.

use std::path::{Path, PathBuf};

use git2::{
    FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository, TreeWalkMode, TreeWalkResult,
};

use crate::desired::{FileSet, Special, MAX_FILE_SIZE};

/// Why the desired repo could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A git operation failed.
    #[error("{what}: {source}")]
    Git {
        /// What was being done.
        what: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// The ref names nothing in the fetched repo.
    #[error("ref `{0}` not found (tried a branch, a tag, a full ref and a commit id)")]
    RefNotFound(String),
    /// Reading a directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn git(what: impl Into<String>) -> impl FnOnce(git2::Error) -> SourceError {
    let what = what.into();
    move |source| SourceError::Git { what, source }
}

/// A bare clone of a desired repo's remote.
pub struct GitSource {
    url: String,
    repo: Repository,
}

impl std::fmt::Debug for GitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitSource")
            .field("url", &self.url)
            .field("path", &self.repo.path())
            .finish()
    }
}

/// A directory name under a cache root for `url`: readable, and unique per URL.
pub fn cache_dir(root: &Path, url: &str) -> PathBuf {
    let readable: String = url
        .chars()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = crate::owner::weight(url, "cache");
    root.join(format!(
        "{}-{hash:016x}",
        readable.trim_start_matches(['_', '.'])
    ))
}

/// A remote given as an existing local path becomes an absolute path, so the clone
/// finds it whatever the working directory of later runs.
fn normalize_url(url: &str) -> String {
    let looks_remote = url.contains("://")
        || (url.contains(':') && !url.starts_with('/') && !url.starts_with('.'));
    if !looks_remote {
        if let Ok(abs) = std::fs::canonicalize(url) {
            return abs.to_string_lossy().into_owned();
        }
    }
    url.to_string()
}

impl GitSource {
    /// Opens the bare clone at `dir`, creating it if needed, with `url` as its remote.
    pub fn open(url: &str, dir: &Path) -> Result<GitSource, SourceError> {
        let url = normalize_url(url);
        let repo = match Repository::open_bare(dir) {
            Ok(r) => r,
            Err(_) => {
                std::fs::create_dir_all(dir).map_err(|source| SourceError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                Repository::init_bare(dir).map_err(git(format!("creating {}", dir.display())))?
            }
        };
        match repo.find_remote("origin") {
            Ok(r) if r.url().ok() == Some(url.as_str()) => {}
            Ok(_) => repo
                .remote_set_url("origin", &url)
                .map_err(git("setting the remote's url"))?,
            Err(_) => {
                repo.remote("origin", &url)
                    .map_err(git("adding the remote"))?;
            }
        }
        Ok(GitSource { url, repo })
    }

    /// The remote's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches every branch and tag, and the remote's HEAD.
    pub fn fetch(&self) -> Result<(), SourceError> {
        let mut remote = self
            .repo
            .find_remote("origin")
            .map_err(git("finding the remote"))?;
        let mut tries = 0;
        let mut callbacks = RemoteCallbacks::new();
        callbacks.credentials(move |url, username, allowed| {
            // libgit2 calls again after each refusal; stop instead of looping forever.
            tries += 1;
            if tries > 3 {
                return Err(git2::Error::from_str("authentication failed"));
            }
            if allowed.contains(git2::CredentialType::SSH_KEY) {
                return git2::Cred::ssh_key_from_agent(username.unwrap_or("git"));
            }
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                let config = git2::Config::open_default()?;
                return git2::Cred::credential_helper(&config, url, username);
            }
            git2::Cred::default()
        });
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(callbacks);
        opts.download_tags(git2::AutotagOption::None);
        remote
            .fetch(
                &[
                    "+refs/heads/*:refs/remotes/origin/*",
                    "+refs/tags/*:refs/tags/*",
                    "+HEAD:refs/remotes/origin/HEAD",
                ],
                Some(&mut opts),
                None,
            )
            .map_err(git(format!("fetching {}", self.url)))
    }

    /// The commit `reference` names: a branch, a tag, a full ref or a commit id; `HEAD`
    /// (or an empty string) is the remote's HEAD.
    pub fn resolve(&self, reference: &str) -> Result<Oid, SourceError> {
        let r = if reference.is_empty() {
            "HEAD"
        } else {
            reference
        };
        let mut candidates = vec![format!("refs/remotes/origin/{r}"), format!("refs/tags/{r}")];
        if let Some(branch) = r.strip_prefix("refs/heads/") {
            candidates.push(format!("refs/remotes/origin/{branch}"));
        }
        candidates.push(r.to_string());
        for name in &candidates {
            if let Ok(obj) = self.repo.revparse_single(name) {
                if let Ok(c) = obj.peel_to_commit() {
                    return Ok(c.id());
                }
            }
        }
        Err(SourceError::RefNotFound(r.to_string()))
    }

    /// Whether `commit` is a descendant of `ancestor` (not equal to it); an error when
    /// this clone lacks either.
    pub fn is_descendant(&self, commit: Oid, ancestor: Oid) -> Result<bool, SourceError> {
        self.repo
            .graph_descendant_of(commit, ancestor)
            .map_err(git(format!("walking from {commit} to {ancestor}")))
    }

    /// The desired repo's files in `commit`'s tree.
    pub fn read(&self, commit: Oid) -> Result<FileSet, SourceError> {
        let commit = self
            .repo
            .find_commit(commit)
            .map_err(git(format!("reading commit {commit}")))?;
        let tree = commit.tree().map_err(git("reading the commit's tree"))?;
        let odb = self
            .repo
            .odb()
            .map_err(git("opening the object database"))?;
        let mut files = FileSet::new();
        let mut failure = None;
        tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
            let path = format!("{dir}{}", entry.name().unwrap_or(""));
            if entry.kind() == Some(ObjectType::Tree) {
                // Descend only where the loader looks.
                let wanted = ["profiles/", "templates/", "vms/"]
                    .iter()
                    .any(|top| format!("{path}/").starts_with(top));
                return if wanted {
                    TreeWalkResult::Ok
                } else {
                    TreeWalkResult::Skip
                };
            }
            if !FileSet::wanted(&path) {
                return TreeWalkResult::Ok;
            }
            // Anything but a regular file is handed over as such, to be an error: skipped,
            // a VM file replaced by a symlink would read as that VM's removal.
            let special = match (entry.kind(), entry.filemode()) {
                (Some(ObjectType::Blob), 0o100644 | 0o100755) => None,
                (Some(ObjectType::Blob), 0o120000) => Some(Special::Symlink),
                (Some(ObjectType::Commit), _) => Some(Special::Submodule),
                _ => Some(Special::Other),
            };
            if let Some(kind) = special {
                files.insert_not_regular(path, kind);
                return TreeWalkResult::Ok;
            }
            match odb.read_header(entry.id()) {
                Ok((size, _)) if size as u64 > MAX_FILE_SIZE => {
                    files.insert_too_large(path, size as u64);
                }
                Ok(_) => match self.repo.find_blob(entry.id()) {
                    Ok(blob) => files.insert(path, blob.content()),
                    Err(e) => {
                        failure = Some(git(format!("reading {path}"))(e));
                        return TreeWalkResult::Abort;
                    }
                },
                Err(e) => {
                    failure = Some(git(format!("reading {path}"))(e));
                    return TreeWalkResult::Abort;
                }
            }
            TreeWalkResult::Ok
        })
        .or_else(|e| if failure.is_some() { Ok(()) } else { Err(e) })
        .map_err(git("walking the tree"))?;
        match failure {
            Some(e) => Err(e),
            None => Ok(files),
        }
    }
}

/// Reads the desired repo's files from a plain directory (a work tree, uncommitted
/// changes included). A symlink is not followed, and it and any other entry that is
/// neither a regular file nor a directory is handed over as such, to be an error.
pub fn read_dir(root: &Path) -> Result<FileSet, SourceError> {
    use std::os::unix::fs::FileTypeExt;

    let mut files = FileSet::new();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceError::Io { path, source }
    };
    let meta = std::fs::metadata(root).map_err(io(root))?;
    if !meta.is_dir() {
        return Err(SourceError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut stack: Vec<(PathBuf, String)> = Vec::new();
    stack.push((root.join("cluster.yaml"), "cluster.yaml".to_string()));
    for top in crate::desired::TREE_DIRS {
        stack.push((root.join(top), top.to_string()));
    }
    while let Some((path, rel)) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io(&path))? {
                let entry = entry.map_err(io(&path))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                stack.push((entry.path(), format!("{rel}/{name}")));
            }
        } else if kind.is_file() {
            match read_regular(&path).map_err(io(&path))? {
                Some(data) => files.insert(rel, data),
                None => files.insert_too_large(rel, meta.len().max(MAX_FILE_SIZE + 1)),
            }
        } else {
            let special = if kind.is_symlink() {
                Special::Symlink
            } else if kind.is_fifo() {
                Special::Fifo
            } else if kind.is_socket() {
                Special::Socket
            } else if kind.is_block_device() || kind.is_char_device() {
                Special::Device
            } else {
                Special::Other
            };
            files.insert_not_regular(rel, special);
        }
    }
    Ok(files)
}

/// A regular file's contents, or None when it is larger than [`MAX_FILE_SIZE`]. Opened
/// without following a symlink and without blocking, and checked again once open, so a
/// file swapped for a symlink or a FIFO after it was listed is refused, not read.
fn read_regular(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "changed into something other than a regular file while being read",
        ));
    }
    let mut data = Vec::new();
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut data)?;
    Ok((data.len() as u64 <= MAX_FILE_SIZE).then_some(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(dir: &Path, args: &[&str]) {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    const CLUSTER: &str = "cluster: lab\nhosts:\n  host1:\n    beanstalkd: 127.0.0.1:11301\n    limits: { memory: 16G, storage: 400G, vms: 16 }\n";

    /// A work tree with a valid desired repo of two VMs, L023 and L024, not yet committed.
    fn two_vms(root: &Path) -> PathBuf {
        let work = root.join("work");
        std::fs::create_dir_all(work.join("vms")).unwrap();
        std::fs::write(work.join("cluster.yaml"), CLUSTER).unwrap();
        std::fs::write(work.join("vms/L023.yaml"), "name: L023\nprofile: CS0\n").unwrap();
        std::fs::write(work.join("vms/L024.yaml"), "name: L024\nprofile: CS0\n").unwrap();
        sh(&work, &["init", "-q", "-b", "main"]);
        work
    }

    fn commit_and_read(root: &Path, work: &Path) -> FileSet {
        sh(work, &["add", "-A"]);
        read_main(root, work)
    }

    /// Commits what is staged and reads the commit through a bare clone.
    fn read_main(root: &Path, work: &Path) -> FileSet {
        sh(work, &["commit", "-q", "-m", "c"]);
        let src = GitSource::open(work.to_str().unwrap(), &root.join("cache")).unwrap();
        src.fetch().unwrap();
        src.read(src.resolve("main").unwrap()).unwrap()
    }

    /// The `file:line:col: message` of each error `load` finds, or nothing when valid.
    fn errors(files: &FileSet) -> Vec<String> {
        match crate::desired::load(files, None) {
            Ok(_) => Vec::new(),
            Err(crate::desired::Invalid(d)) => d
                .iter()
                .map(|d| format!("{}:{}:{}: {}", d.file, d.line, d.column, d.message))
                .collect(),
        }
    }

    /// Guards issue 11, hole 4: a VM file replaced by a symlink to a copy outside the repo
    /// was skipped, so the commit validated with one VM fewer and that VM was destroyed.
    #[test]
    fn a_symlinked_vm_file_in_a_commit_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let work = two_vms(tmp.path());
        let outside = tmp.path().join("outside.yaml");
        std::fs::rename(work.join("vms/L024.yaml"), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("vms/L024.yaml")).unwrap();
        // A symlinked directory, and a symlinked README outside the desired tree.
        std::os::unix::fs::symlink(tmp.path(), work.join("vms/team")).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("README.md")).unwrap();
        let files = commit_and_read(tmp.path(), &work);
        assert_eq!(
            errors(&files),
            [
                "vms/L024.yaml:1:1: a symlink, not a regular file",
                "vms/team:1:1: a symlink, not a regular file",
            ]
        );
    }

    /// Guards issue 11, hole 4: a submodule (gitlink) under the desired tree was skipped.
    #[test]
    fn a_submodule_in_a_commit_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let work = two_vms(tmp.path());
        sh(&work, &["add", "-A"]);
        sh(&work, &["commit", "-q", "-m", "one"]);
        let head = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&work)
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        // A gitlink entry, as `git submodule add` leaves it, without fetching anything.
        sh(
            &work,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{head},vms/more"),
            ],
        );
        let files = read_main(tmp.path(), &work);
        assert_eq!(
            errors(&files),
            ["vms/more:1:1: a submodule, not a regular file"]
        );
    }

    /// Guards issue 11, hole 4: `flotilla validate DIR` skipped symlinks and other
    /// non-regular files (a FIFO would have blocked the read had it been opened).
    #[test]
    fn a_symlink_in_a_plain_directory_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let work = two_vms(tmp.path());
        let outside = tmp.path().join("outside.yaml");
        std::fs::rename(work.join("vms/L024.yaml"), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("vms/L024.yaml")).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("README.md")).unwrap();
        let fifo = Command::new("mkfifo")
            .arg(work.join("vms/pipe.yaml"))
            .status()
            .unwrap();
        assert!(fifo.success());
        let files = read_dir(&work).unwrap();
        assert_eq!(
            errors(&files),
            [
                "vms/L024.yaml:1:1: a symlink, not a regular file",
                "vms/pipe.yaml:1:1: a FIFO, not a regular file",
            ]
        );
        // The desired tree's own directories, too.
        std::fs::remove_file(work.join("vms/pipe.yaml")).unwrap();
        std::fs::rename(work.join("vms"), tmp.path().join("vms")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("vms"), work.join("vms")).unwrap();
        assert_eq!(
            errors(&read_dir(&work).unwrap()),
            ["vms:1:1: a symlink, not a regular file"]
        );
    }

    #[test]
    fn fetches_and_reads_a_commit_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(work.join("vms/team")).unwrap();
        std::fs::create_dir_all(work.join("docs")).unwrap();
        std::fs::write(work.join("cluster.yaml"), "cluster: lab\n").unwrap();
        std::fs::write(work.join("vms/team/a.yaml"), "name: ab\n").unwrap();
        std::fs::write(work.join("docs/readme.md"), "not read\n").unwrap();
        sh(&work, &["init", "-q", "-b", "main"]);
        sh(&work, &["add", "."]);
        sh(&work, &["commit", "-q", "-m", "one"]);
        sh(&work, &["tag", "v1"]);
        std::fs::write(work.join("vms/b.yaml"), "name: bc\n").unwrap();
        sh(&work, &["add", "."]);
        sh(&work, &["commit", "-q", "-m", "two"]);

        let src = GitSource::open(
            work.to_str().unwrap(),
            &cache_dir(&tmp.path().join("cache"), "x"),
        )
        .unwrap();
        src.fetch().unwrap();
        let head = src.resolve("HEAD").unwrap();
        assert_eq!(src.resolve("main").unwrap(), head);
        assert_eq!(src.resolve("refs/heads/main").unwrap(), head);
        assert_eq!(src.resolve(&head.to_string()).unwrap(), head);
        let v1 = src.resolve("v1").unwrap();
        assert_ne!(v1, head);
        assert!(matches!(
            src.resolve("nope"),
            Err(SourceError::RefNotFound(_))
        ));

        let files = src.read(head).unwrap();
        assert_eq!(files.len(), 3);
        assert!(files.get("vms/team/a.yaml").is_some());
        assert!(files.get("docs/readme.md").is_none());
        assert_eq!(src.read(v1).unwrap().len(), 2);

        // A second fetch into the same clone picks up new commits.
        std::fs::write(work.join("vms/c.yaml"), "name: cd\n").unwrap();
        sh(&work, &["add", "."]);
        sh(&work, &["commit", "-q", "-m", "three"]);
        let again = GitSource::open(
            &format!("file://{}", work.display()),
            &cache_dir(&tmp.path().join("cache"), "x"),
        )
        .unwrap();
        again.fetch().unwrap();
        assert_eq!(again.read(again.resolve("main").unwrap()).unwrap().len(), 4);

        let plain = read_dir(&work).unwrap();
        assert_eq!(plain.len(), 4);
    }
}
