//! Where `validate` and `plan` read the desired repo from.

use std::path::PathBuf;

use anyhow::{bail, Context};

use flotilla::desired::{self, FileSet, Invalid, Snapshot};
use flotilla::source::{self, GitSource};

/// The desired repo: a plain directory, or a git remote and a ref.
#[derive(Debug, clap::Args)]
pub struct DesiredArgs {
    /// A plain directory (a work tree, uncommitted changes included). Default: `.`
    /// unless --repo is given.
    #[arg(value_name = "PATH", conflicts_with = "repo")]
    pub path: Option<PathBuf>,

    /// A git remote: a local path, file://, git://, ssh:// (ssh agent) or https://
    /// (git credential helpers). Fetched into a bare clone under --cache-dir.
    #[arg(long, value_name = "URL")]
    pub repo: Option<String>,

    /// The branch, tag, full ref or commit id to read from --repo.
    #[arg(
        long = "ref",
        value_name = "REF",
        default_value = "HEAD",
        requires = "repo"
    )]
    pub reference: String,

    /// Where bare clones are kept between runs. Default: $XDG_CACHE_HOME/flotilla or
    /// ~/.cache/flotilla.
    #[arg(long, value_name = "DIR", env = "FLOTILLA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("flotilla");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache/flotilla");
    }
    std::env::temp_dir().join("flotilla-cache")
}

/// The repo's files and the commit they were read from.
pub struct Read {
    pub files: FileSet,
    pub commit: Option<String>,
    /// What was read, for messages.
    pub label: String,
}

impl DesiredArgs {
    /// Fetches or reads the files.
    pub fn read(&self) -> anyhow::Result<Read> {
        match &self.repo {
            Some(url) => {
                let cache = self.cache_dir.clone().unwrap_or_else(default_cache);
                let dir = source::cache_dir(&cache.join("git"), url);
                let src = GitSource::open(url, &dir)
                    .with_context(|| format!("opening the clone of {url} in {}", dir.display()))?;
                src.fetch()?;
                let oid = src.resolve(&self.reference)?;
                let files = src.read(oid)?;
                Ok(Read {
                    files,
                    commit: Some(oid.to_string()),
                    label: format!("{url} {}", self.reference),
                })
            }
            None => {
                let path = self.path.clone().unwrap_or_else(|| PathBuf::from("."));
                let files = source::read_dir(&path)?;
                if files.is_empty() {
                    bail!(
                        "{} holds no desired repo (no cluster.yaml, profiles/, templates/ or vms/)",
                        path.display()
                    );
                }
                Ok(Read {
                    files,
                    commit: None,
                    label: path.display().to_string(),
                })
            }
        }
    }
}

/// Reads and validates.
pub fn load(args: &DesiredArgs) -> anyhow::Result<(Result<Snapshot, Invalid>, Read)> {
    let read = args.read()?;
    let result = desired::load(&read.files, read.commit.clone());
    Ok((result, read))
}
