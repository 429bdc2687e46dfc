//! Webhook files: one `<id>.json` per endpoint under `<data_dir>/webhooks/` (directory 0700,
//! files 0600 because they hold secrets), each replaced atomically with
//! `quiver_log::write_atomic`: the registration, its position and parked seqs, and its bounded
//! delivery history (so `GET …/deliveries` shows the same after a restart). Owns nothing else;
//! must never write a secret anywhere but here.

use super::{lock, Delivery, Endpoint, Registration, Shared, WebhookError, HISTORY_LIMIT};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

fn file_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// What one file holds. Files written before the history was saved have no `deliveries`.
#[derive(Serialize)]
struct Stored<'a> {
    #[serde(flatten)]
    reg: &'a Registration,
    deliveries: &'a VecDeque<Delivery>,
}

#[derive(Deserialize)]
struct Loaded {
    #[serde(flatten)]
    reg: Registration,
    #[serde(default)]
    deliveries: VecDeque<Delivery>,
}

/// Every registration in `dir` with its saved history (none if `dir` does not exist yet).
pub(crate) fn load_all(
    dir: &Path,
) -> Result<Vec<(Registration, VecDeque<Delivery>)>, WebhookError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WebhookError::Store(format!("{}: {e}", dir.display()))),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| WebhookError::Store(format!("{}: {e}", dir.display())))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Temp files of an interrupted write start with '.'; the target is intact.
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let path = entry.path();
        let bytes = std::fs::read(&path)
            .map_err(|e| WebhookError::Store(format!("{}: {e}", path.display())))?;
        let Loaded {
            reg,
            mut deliveries,
        } = serde_json::from_slice(&bytes)
            .map_err(|e| WebhookError::Store(format!("{}: {e}", path.display())))?;
        while deliveries.len() > HISTORY_LIMIT {
            deliveries.pop_front();
        }
        out.push((reg, deliveries));
    }
    Ok(out)
}

fn ensure_dir(dir: &Path) -> Result<(), WebhookError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir)
        .map_err(|e| WebhookError::Store(format!("{}: {e}", dir.display())))
}

fn save_blocking(dir: &Path, ep: &Endpoint) -> Result<(), WebhookError> {
    let _g = lock(&ep.save_lock);
    if ep.deleted.load(Ordering::Acquire) {
        return Ok(());
    }
    let (id, bytes) = {
        let reg = lock(&ep.reg).clone();
        let history = lock(&ep.history).clone();
        let bytes = serde_json::to_vec(&Stored {
            reg: &reg,
            deliveries: &history,
        })
        .map_err(|e| WebhookError::Store(format!("cannot encode webhook {}: {e}", reg.id)))?;
        (reg.id, bytes)
    };
    ensure_dir(dir)?;
    quiver_log::write_atomic(&file_of(dir, &id), |w| {
        use std::os::unix::fs::PermissionsExt;
        // Before the secret is written: the temp file is private from its first byte.
        w.get_ref()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        w.write_all(&bytes)
    })
    .map_err(|e| WebhookError::Store(e.to_string()))?;
    *lock(&ep.last_saved) = Instant::now();
    Ok(())
}

/// Writes the endpoint's current registration (off the async workers).
pub(crate) async fn save(shared: &Arc<Shared>, ep: &Arc<Endpoint>) -> Result<(), WebhookError> {
    let dir = shared.dir.clone();
    let ep = Arc::clone(ep);
    tokio::task::spawn_blocking(move || save_blocking(&dir, &ep))
        .await
        .map_err(|e| WebhookError::Store(format!("the writer task failed: {e}")))?
}

/// Marks the endpoint deleted and removes its file.
pub(crate) async fn remove(shared: &Arc<Shared>, ep: &Arc<Endpoint>) -> Result<(), WebhookError> {
    let dir = shared.dir.clone();
    let ep = Arc::clone(ep);
    tokio::task::spawn_blocking(move || {
        let _g = lock(&ep.save_lock);
        ep.deleted.store(true, Ordering::Release);
        let id = lock(&ep.reg).id.clone();
        let path = file_of(&dir, &id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(WebhookError::Store(format!("{}: {e}", path.display()))),
        }
    })
    .await
    .map_err(|e| WebhookError::Store(format!("the writer task failed: {e}")))?
}
