//! Installs local models and measures them: the Rust side of `bench/embed.sh`, and the
//! command CI runs to install the model the reference test needs.
//!
//! ```text
//! embed_tool install <model> [--dir DIR]            # DIR: $QUIVER_MODEL_DIR or target/quiver-models
//! embed_tool bench <model> <sentences.txt> <out.f32> [--dir DIR] [--repeat N]
//! ```
//! `bench` embeds every line of the file (`N` times, default 3), prints one JSON line per run
//! with sentences/s, and writes the vectors of the last run as little-endian f32 rows.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use quiver_embed::minilm::MiniLm;
use quiver_embed::models;
use quiver_embed::potion::Potion;

type EmbedFn = dyn Fn(&[String]) -> Result<Vec<Vec<f32>>, quiver_embed::EmbedError>;

fn default_dir() -> PathBuf {
    match std::env::var_os("QUIVER_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/quiver-models"),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let dir = take("--dir").map(PathBuf::from).unwrap_or_else(default_dir);
    let repeat: usize = take("--repeat").and_then(|s| s.parse().ok()).unwrap_or(3);
    match args.first().map(String::as_str) {
        Some("install") => {
            let model = args.get(1).ok_or("install <model>")?;
            let t = Instant::now();
            let path = models::install(model, &dir).map_err(|e| e.to_string())?;
            println!("installed {model} in {} ({:.1} s)", path.display(), t.elapsed().as_secs_f64());
            Ok(())
        }
        Some("bench") => {
            let (model, input, out) = match &args[1..] {
                [m, i, o, ..] => (m.clone(), i.clone(), o.clone()),
                _ => return Err("bench <model> <sentences.txt> <out.f32>".into()),
            };
            let text = std::fs::read_to_string(&input).map_err(|e| format!("{input}: {e}"))?;
            let sentences: Vec<String> = text.lines().map(str::to_string).collect();
            let spec = models::spec(&model).ok_or(format!("unknown model {model}"))?;
            let path = models::model_path(spec, &dir);
            let t = Instant::now();
            let embed: Box<EmbedFn> =
                match spec.kind {
                    models::ModelKind::Bert => {
                        let m = MiniLm::load(&path, true).map_err(|e| e.to_string())?;
                        eprintln!("MiniLM forward: {}", m.backend());
                        Box::new(move |t| m.embed(t))
                    }
                    models::ModelKind::Static => {
                        let m = Potion::load(&path, true).map_err(|e| e.to_string())?;
                        Box::new(move |t| m.embed(t))
                    }
                };
            eprintln!("loaded {model} in {:.2} s", t.elapsed().as_secs_f64());
            let mut last = Vec::new();
            for run in 0..repeat.max(1) {
                let t = Instant::now();
                let mut vectors = Vec::with_capacity(sentences.len());
                for part in sentences.chunks(quiver_embed::MAX_TEXTS_PER_CALL) {
                    vectors.extend(embed(part).map_err(|e| e.to_string())?);
                }
                let s = t.elapsed().as_secs_f64();
                println!(
                    "{{\"side\":\"quiver\",\"model\":\"{model}\",\"run\":{run},\"sentences\":{},\"seconds\":{s:.4},\"per_s\":{:.1}}}",
                    sentences.len(),
                    sentences.len() as f64 / s
                );
                last = vectors;
            }
            let mut f = std::io::BufWriter::new(std::fs::File::create(&out).map_err(|e| format!("{out}: {e}"))?);
            for v in &last {
                for x in v {
                    f.write_all(&x.to_le_bytes()).map_err(|e| e.to_string())?;
                }
            }
            f.flush().map_err(|e| e.to_string())?;
            Ok(())
        }
        _ => Err("usage: embed_tool install <model> [--dir DIR] | bench <model> <sentences.txt> <out.f32> [--dir DIR] [--repeat N]".into()),
    }
}
