//! The files of a desired repo, in memory, whatever they were read from.

use std::collections::BTreeMap;

/// One file as a source handed it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The contents.
    Data(Vec<u8>),
    /// A file larger than the loader accepts; only its size was read, so that a huge
    /// file costs nothing but an error.
    TooLarge(u64),
    /// Something other than a regular file (a symlink, a submodule, a FIFO): never read,
    /// and an error, because skipping it would silently drop what it stands for.
    NotRegular(Special),
}

/// What a source found where the desired tree needs a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// A symbolic link (git mode 120000, or a symlink on disk); its target is not followed.
    Symlink,
    /// A git submodule (a gitlink, mode 160000); its commit is not fetched.
    Submodule,
    /// A named pipe on disk.
    Fifo,
    /// A Unix socket on disk.
    Socket,
    /// A block or character device on disk.
    Device,
    /// Anything else that is neither a regular file nor a directory.
    Other,
}

impl Special {
    /// How to make the entry readable.
    pub fn hint(self) -> &'static str {
        match self {
            Special::Symlink => {
                "the desired state is read only from regular files in the repo and a symlink is not followed; replace it with the file itself"
            }
            Special::Submodule => {
                "submodules are not fetched; commit the files themselves into the desired repo"
            }
            _ => "the desired state is read only from regular files; replace it with one",
        }
    }
}

impl std::fmt::Display for Special {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Special::Symlink => "a symlink",
            Special::Submodule => "a submodule",
            Special::Fifo => "a FIFO",
            Special::Socket => "a socket",
            Special::Device => "a device",
            Special::Other => "an entry of an unknown kind",
        })
    }
}

/// The directories of the desired tree; `cluster.yaml` is its one file outside them.
pub const TREE_DIRS: [&str; 3] = ["profiles", "templates", "vms"];

/// The files of a desired repo that the loader reads (`cluster.yaml`, `profiles/`,
/// `templates/`, `vms/`), keyed by their path relative to the repo's root with `/`
/// separators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSet {
    files: BTreeMap<String, Entry>,
}

impl FileSet {
    /// An empty set.
    pub fn new() -> FileSet {
        FileSet::default()
    }

    /// Adds a file with its contents.
    pub fn insert(&mut self, path: impl Into<String>, data: impl Into<Vec<u8>>) {
        self.files.insert(path.into(), Entry::Data(data.into()));
    }

    /// Adds a file that was too large to read.
    pub fn insert_too_large(&mut self, path: impl Into<String>, size: u64) {
        self.files.insert(path.into(), Entry::TooLarge(size));
    }

    /// Adds something found at `path` that is not a regular file.
    pub fn insert_not_regular(&mut self, path: impl Into<String>, kind: Special) {
        self.files.insert(path.into(), Entry::NotRegular(kind));
    }

    /// Every entry, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.files.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// The file at `path`.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.files.get(path)
    }

    /// Files under `dir` (e.g. `vms/`), in path order.
    pub fn under<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.files
            .range::<str, _>((std::ops::Bound::Included(dir), std::ops::Bound::Unbounded))
            .take_while(move |(p, _)| p.starts_with(dir))
            .map(|(p, e)| (p.as_str(), e))
    }

    /// The number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when there are no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// True for the paths of the desired tree: `cluster.yaml`, the directories
    /// `profiles`, `templates` and `vms`, and everything under them, hidden files
    /// included. Sources hand over every entry at these paths (a directory by its
    /// contents), and one that is not a regular file is an error; they skip everything
    /// else (a README, docs/), which the loader never reads.
    pub fn wanted(path: &str) -> bool {
        path == "cluster.yaml"
            || TREE_DIRS.iter().any(|d| {
                path.strip_prefix(d)
                    .is_some_and(|r| r.is_empty() || r.starts_with('/'))
            })
    }
}
