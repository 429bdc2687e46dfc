//! Every consumer group of one data directory: `<data_dir>/consumers/<name>.json`.
//!
//! The registry owns the set of consumers (at most [`CONSUMERS_LIMIT`]), their creation (the
//! file is written before the consumer exists for anyone), loading at start-up and deletion.
//! It must never hand out a consumer whose file could not be read as if it were empty (such a
//! name answers `Unreadable` until an operator fixes or deletes the file), and never let two
//! consumers share a name. Why: a consumer silently reset to its start would redeliver
//! everything it had acked.

use crate::error::ConsumerError;
use crate::group::{validate_name, Consumer, ConsumerConfig};
use crate::limits::CONSUMERS_LIMIT;
use quiver_log::Seq;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    consumers: Mutex<BTreeMap<String, Arc<Consumer>>>,
    /// Files that exist but do not load: name → why.
    broken: Mutex<BTreeMap<String, String>>,
}

impl Registry {
    /// Opens `dir` (created on first use) and loads every consumer file in it. Files that do
    /// not load are reported by [`Registry::broken`] and answer `Unreadable`.
    pub fn open(dir: impl Into<PathBuf>) -> Registry {
        let dir = dir.into();
        let mut consumers = BTreeMap::new();
        let mut broken = BTreeMap::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Some(name) = consumer_name(&path) else {
                        continue;
                    };
                    match Consumer::load(&path) {
                        Ok(c) if c.name() == name => {
                            consumers.insert(name, Arc::new(c));
                        }
                        Ok(c) => {
                            broken.insert(name, format!("the file names consumer {:?}", c.name()));
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), "consumer file does not load: {e}");
                            broken.insert(name, e.to_string());
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(dir = %dir.display(), "consumer directory cannot be read: {e}");
                broken.insert("*".to_string(), e.to_string());
            }
        }
        Registry {
            dir,
            consumers: Mutex::new(consumers),
            broken: Mutex::new(broken),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a consumer and writes its file (blocking I/O).
    pub fn create(&self, config: ConsumerConfig) -> Result<Arc<Consumer>, ConsumerError> {
        config.validate()?;
        let mut map = lock(&self.consumers);
        if map.contains_key(&config.name) || lock(&self.broken).contains_key(&config.name) {
            return Err(ConsumerError::Exists(config.name));
        }
        if map.len() >= CONSUMERS_LIMIT {
            return Err(ConsumerError::TooMany {
                limit: CONSUMERS_LIMIT,
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| ConsumerError::io(&self.dir, e))?;
        let path = self.dir.join(format!("{}.json", config.name));
        let name = config.name.clone();
        let consumer = Arc::new(Consumer::create(path, config)?);
        map.insert(name, Arc::clone(&consumer));
        Ok(consumer)
    }

    pub fn get(&self, name: &str) -> Result<Arc<Consumer>, ConsumerError> {
        if let Some(c) = lock(&self.consumers).get(name) {
            return Ok(Arc::clone(c));
        }
        if let Some(why) = lock(&self.broken).get(name) {
            return Err(ConsumerError::Unreadable {
                name: name.to_string(),
                detail: why.clone(),
            });
        }
        validate_name(name)?;
        Err(ConsumerError::NotFound(name.to_string()))
    }

    /// Every consumer, by name.
    /// The oldest seq any consumer still needs (see [`Consumer::oldest_needed`]).
    /// The oldest seq any consumer still needs, and that consumer's name.
    pub fn oldest_needed(&self) -> Option<(Seq, String)> {
        lock(&self.consumers)
            .values()
            .map(|c| (c.oldest_needed(), c.name().to_string()))
            .min()
    }

    pub fn list(&self) -> Vec<Arc<Consumer>> {
        lock(&self.consumers).values().cloned().collect()
    }

    /// Consumer files that did not load, by name.
    pub fn broken(&self) -> BTreeMap<String, String> {
        lock(&self.broken).clone()
    }

    /// Deletes a consumer and its file (blocking I/O).
    pub fn delete(&self, name: &str) -> Result<(), ConsumerError> {
        let mut map = lock(&self.consumers);
        let Some(consumer) = map.get(name).cloned() else {
            drop(map);
            // A broken file can be deleted too (that is how an operator clears it).
            if lock(&self.broken).contains_key(name) {
                let path = self.dir.join(format!("{name}.json"));
                std::fs::remove_file(&path).map_err(|e| ConsumerError::io(&path, e))?;
                lock(&self.broken).remove(name);
                return Ok(());
            }
            validate_name(name)?;
            return Err(ConsumerError::NotFound(name.to_string()));
        };
        consumer.delete_file()?;
        map.remove(name);
        Ok(())
    }
}

fn consumer_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let name = file.strip_suffix(".json")?;
    validate_name(name).ok()?;
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            types: vec!["document.*".into()],
            library_id: None,
            near: None,
            ack_wait_ms: 1000,
            max_deliver: 3,
            start_seq: 5,
            created_at_ms: 0,
        }
    }

    #[test]
    fn create_reload_delete_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().join("consumers"));
        let c = r.create(config("a")).unwrap();
        assert!(matches!(
            r.create(config("a")),
            Err(ConsumerError::Exists(_))
        ));
        c.offer(&[6], 9);
        let l = c.lease(1, 10);
        c.ack(&[l[0].seq]);
        c.persist().unwrap();
        std::fs::write(dir.path().join("consumers/bad.json"), b"{not json").unwrap();
        let r2 = Registry::open(dir.path().join("consumers"));
        let a = r2.get("a").unwrap();
        assert_eq!(a.scan_position(), 9);
        assert_eq!(a.info(9, 10).counters.acked, 1);
        assert!(matches!(
            r2.get("bad"),
            Err(ConsumerError::Unreadable { .. })
        ));
        assert!(matches!(r2.get("nope"), Err(ConsumerError::NotFound(_))));
        r2.delete("a").unwrap();
        r2.delete("bad").unwrap();
        assert!(
            a.persist().is_err(),
            "a deleted consumer is never written again"
        );
        let r3 = Registry::open(dir.path().join("consumers"));
        assert!(r3.list().is_empty() && r3.broken().is_empty());
    }
}
