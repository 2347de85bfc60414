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
}

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

    /// True for the paths a loader reads; sources skip everything else.
    pub fn wanted(path: &str) -> bool {
        path == "cluster.yaml"
            || path.starts_with("profiles/")
            || path.starts_with("templates/")
            || path.starts_with("vms/")
    }
}
