//! Desired state: the YAML of the desired repo, parsed and validated into a [`Snapshot`].
//!
//! # The desired repo
//!
//! ```text
//! cluster.yaml        cluster id, hosts, policies
//! profiles/*.yaml     resource classes (optional: CS0..CS5 are built in)
//! templates/*.conf    vm-bhyve templates (optional: CS0..CS5 are built in)
//! vms/**/*.yaml       one VM per file
//! ```
//!
//! `cluster.yaml`:
//!
//! ```yaml
//! cluster: lab                 # the cluster id, recorded in every VM's marker
//! hosts:
//!   host1:
//!     beanstalkd: 10.0.0.1:11300
//!     next: host2              # the hop chain; null (or absent) ends it
//!     limits: { memory: 64G, storage: 2T, vms: 40 }
//! policies:                    # every key optional
//!   reconcile_interval: 60s    # 90, 30s, 5m, 1h30m, 2d (plain numbers are seconds)
//!   prune_guard: 0.5           # share of a host's managed VMs one plan may destroy
//!   hop_limit: 8               # how often a create may be forwarded
//!   ttr: 1h                    # beanstalkd time-to-run of a job
//! ```
//!
//! `profiles/NAME.yaml` (the profile's name is the file's stem): `cpu`, `memory`, `disk`,
//! `swap`, `template`, and an optional `description`.
//!
//! `templates/NAME.conf`: a vm-bhyve template, read the way vm-bhyve reads it. It must
//! name `disk0_name`, as `vm create` insists.
//!
//! `vms/**/*.yaml`, one VM per file:
//!
//! ```yaml
//! name: web1              # the vm-bhyve name
//! profile: CS2
//! cpu: 4                  # optional overrides of the profile
//! memory: 2G
//! disk: 60G
//! host: host1             # optional pin; otherwise the owner is chosen by hashing
//! every_host: false       # true: one VM per host, named <name>-<host>
//! tags: [web, prod]
//! state: running          # or stopped
//! protect: false          # recorded in the marker; a protected VM is never destroyed
//! replace: deny           # allow: drift that needs a rebuild may destroy and recreate
//! config:                 # extra vm-bhyve keys, layered over the template
//!   network0_switch: lan
//! hooks:                  # options handed to the pre/local/post hooks
//!   timezone: Europe/Berlin
//! secrets: [tailscale-authkey]   # names only; each host keeps the files
//! ```
//!
//! # Where the defaults come from
//!
//! The binary embeds the repository's top-level `profiles/` and `templates/` (CS0..CS5,
//! with cloud-machine's values). A desired repo may add its own profiles and templates,
//! and one with the same name as a built-in replaces it. So a repo that is happy with
//! the defaults holds only `cluster.yaml` and `vms/`, and an operator who changes a
//! default does so in the open, in the desired repo, where review sees it.
//!
//! # Strictness
//!
//! Unknown keys, duplicates, dangling references, bad sizes, names vm-bhyve would refuse,
//! clashing MAC addresses or disk paths and secret names with a path are all errors.
//! Every error of a snapshot is collected, each with file, line, column and a hint, and
//! reported together in file order ([`Invalid`]). A file is at most [`MAX_FILE_SIZE`]
//! bytes, and YAML nested deeper than [`MAX_FLOW_DEPTH`] is refused before it is parsed,
//! because the YAML parser takes time quadratic in the nesting depth.
//!
//! Everything at `cluster.yaml`, `profiles`, `templates` and `vms`, and under them
//! (hidden files too), must be a regular file or a directory: a symlink, a submodule or
//! any other kind of entry is an error naming its path, never skipped, because skipping
//! a VM file would read as that VM's removal. Files elsewhere in the repo (a README,
//! docs/) are never read, so what they are does not matter.

mod check;
mod defaults;
mod diag;
mod expand;
mod files;
mod load;
mod locate;
mod rules;
mod schema;
mod spec;
mod yaml;

pub use diag::{Diagnostic, Invalid, MAX_QUOTE};
pub use expand::{EXPANSION_FACTOR, EXPANSION_SLACK, MAX_REPO_EXPANSION};
pub use files::{Entry, FileSet, Special, TREE_DIRS};
pub use load::load;
pub use schema::parse_duration;
pub use spec::{
    Cluster, DesiredState, Host, HostLimits, Policies, Profile, ReplacePolicy, Snapshot, Template,
    VmSpec,
};
pub use yaml::{strip_marks, MAX_FILE_SIZE, MAX_FLOW_DEPTH};

#[cfg(test)]
mod tests;
