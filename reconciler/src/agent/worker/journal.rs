//! The build journal of this host's worker.

use super::super::Shared;

/// The build journal: `<state_dir>/building/<vm>` holds the id of the job building it,
/// written (and synced) before `vm create`. It is how a VM that a crash left without a
/// marker is still known as this host's own half-made VM.
fn journal_path(shared: &Shared, vm: &str) -> std::path::PathBuf {
    shared.cfg.state_dir.join("building").join(vm)
}

/// The id of the job that began building `vm`, if the journal holds one.
pub(super) fn journaled(shared: &Shared, vm: &str) -> Option<String> {
    std::fs::read_to_string(journal_path(shared, vm)).ok()
}

/// Records (`Some(job)`, synced before `vm create`) or clears (`None`) the journal
/// entry of `vm`.
pub(super) fn journal(shared: &Shared, vm: &str, job: Option<&str>) -> std::io::Result<()> {
    let path = journal_path(shared, vm);
    match job {
        Some(id) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, id.as_bytes())?;
            f.sync_all()
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}
