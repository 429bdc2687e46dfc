//! Whole-file atomic replacement and directory fsync.
//!
//! Owns the crash-safety recipe for small files (snapshots, manifests): write
//! a temp file in the same directory, fsync it, rename it over the target,
//! fsync the directory. It must never leave a partially written target
//! visible, and never rename before the data is durable, because after a
//! crash the target would then exist with unwritten contents.

use crate::error::LogError;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes a directory's entries (created, renamed, deleted files) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), LogError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let handle = File::open(dir).map_err(|e| LogError::io(dir, e))?;
    handle.sync_all().map_err(|e| LogError::io(dir, e))
}

fn temp_path(path: &Path) -> Result<PathBuf, LogError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return Err(LogError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        ));
    };
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}-{unique}", std::process::id()));
    Ok(path.with_file_name(temp_name))
}

/// Atomically replaces `path` with what `f` writes: temp file in the same
/// directory, fsync, rename over `path`, fsync the directory. On any error the
/// temp file is removed and `path` is left as it was.
pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), LogError> {
    let temp = temp_path(path)?;
    let result = write_temp_then_rename(path, &temp, f);
    if result.is_err() {
        // Best effort: the temp file may not exist, or the rename may have
        // consumed it.
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn write_temp_then_rename(
    path: &Path,
    temp: &Path,
    f: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), LogError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| LogError::io(temp, e))?;
    let mut writer = BufWriter::new(file);
    f(&mut writer).map_err(|e| LogError::io(temp, e))?;
    writer.flush().map_err(|e| LogError::io(temp, e))?;
    let file = writer
        .into_inner()
        .map_err(|e| LogError::io(temp, e.into_error()))?;
    file.sync_all().map_err(|e| LogError::io(temp, e))?;
    drop(file);
    std::fs::rename(temp, path).map_err(|e| LogError::io(path, e))?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        write_atomic(&path, |w| w.write_all(b"one")).unwrap();
        write_atomic(&path, |w| w.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let failed = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(matches!(failed, Err(LogError::Io { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
