//! Stateless validation: everything that can be checked without looking at the database.
//! Each failure is a [`Invalid`] with a stable code and a sentence a user can act on.
//! Checks that need state (does the library exist, is the name taken) live in the engine.

use crate::limits::*;
use crate::types::Metric;
use serde_json::{Map, Value};

/// A rejected input: `code` is stable for programs, `detail` is for people.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Invalid {
    pub code: &'static str,
    pub detail: String,
    /// True when the input broke a size limit (HTTP 413 rather than 422).
    pub too_large: bool,
}

impl Invalid {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Invalid {
            code,
            detail: detail.into(),
            too_large: false,
        }
    }
    pub fn too_large(code: &'static str, detail: impl Into<String>) -> Self {
        Invalid {
            code,
            detail: detail.into(),
            too_large: true,
        }
    }
}

pub fn name(name: &str) -> Result<(), Invalid> {
    if name.trim().is_empty() {
        return Err(Invalid::new("invalid_name", "name must not be empty"));
    }
    if name.len() > NAME_BYTES_LIMIT {
        return Err(Invalid::too_large(
            "name_too_long",
            format!(
                "name is {} bytes; the limit is {NAME_BYTES_LIMIT}",
                name.len()
            ),
        ));
    }
    Ok(())
}

pub fn description(s: &str) -> Result<(), Invalid> {
    if s.len() > DESCRIPTION_BYTES_LIMIT {
        return Err(Invalid::too_large(
            "description_too_long",
            format!(
                "description is {} bytes; the limit is {DESCRIPTION_BYTES_LIMIT}",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// Client-chosen ids: 1..=ID_BYTES_LIMIT bytes of printable ASCII other than `/`, so an id
/// can always be written in a URL path segment.
pub fn id(kind: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > ID_BYTES_LIMIT {
        return Err(Invalid::new(
            "invalid_id",
            format!("{kind} id must be 1 to {ID_BYTES_LIMIT} bytes"),
        ));
    }
    // `batch` and `stream` are route names under `/documents/`; a document so named could not
    // be read back by id, so it is refused up front rather than silently unreachable.
    if kind == "document" && matches!(id, "batch" | "stream") {
        return Err(Invalid::new(
            "reserved_id",
            format!("document id {id:?} is reserved (it names a route under /documents/)"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'?' && b != b'#')
    {
        return Err(Invalid::new(
            "invalid_id",
            format!("{kind} id {id:?} may hold only printable ASCII without '/', '?' or '#'"),
        ));
    }
    Ok(())
}

pub fn title(t: &str) -> Result<(), Invalid> {
    if t.len() > TITLE_BYTES_LIMIT {
        return Err(Invalid::too_large(
            "title_too_long",
            format!(
                "title is {} bytes; the limit is {TITLE_BYTES_LIMIT}",
                t.len()
            ),
        ));
    }
    Ok(())
}

pub fn text(t: &str) -> Result<(), Invalid> {
    if t.len() > TEXT_BYTES_LIMIT {
        return Err(Invalid::too_large(
            "text_too_long",
            format!(
                "chunk text is {} bytes; the limit is {TEXT_BYTES_LIMIT}",
                t.len()
            ),
        ));
    }
    Ok(())
}

/// Counts bytes written to it, keeping none (to size JSON without building it).
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of `m` serialised as compact JSON, in bytes, without allocating it.
pub fn json_size_bytes(m: &Map<String, Value>) -> usize {
    let mut counter = ByteCounter(0);
    match serde_json::to_writer(&mut counter, m) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

pub fn metadata(what: &str, m: &Map<String, Value>) -> Result<(), Invalid> {
    if m.is_empty() {
        return Ok(());
    }
    let size_bytes = json_size_bytes(m);
    if size_bytes > METADATA_BYTES_LIMIT {
        return Err(Invalid::too_large(
            "metadata_too_large",
            format!("{what} metadata is {size_bytes} bytes as JSON; the limit is {METADATA_BYTES_LIMIT}"),
        ));
    }
    Ok(())
}

pub fn dimension(d: u64) -> Result<u32, Invalid> {
    if d == 0 || d > DIMENSION_LIMIT as u64 {
        return Err(Invalid::new(
            "invalid_dimension",
            format!("dimension must be between 1 and {DIMENSION_LIMIT}, got {d}"),
        ));
    }
    Ok(d as u32)
}

/// Checks a vector against a library's dimension and metric and returns it ready to store:
/// finite, right length, and L2-normalised for cosine (where the zero vector is refused, as it
/// has no direction).
pub fn vector(mut v: Vec<f32>, dimension: u32, metric: Metric) -> Result<Vec<f32>, Invalid> {
    if v.len() != dimension as usize {
        return Err(Invalid::new(
            "dimension_mismatch",
            format!(
                "vector has {} dimensions; the library expects {dimension}",
                v.len()
            ),
        ));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Invalid::new(
            "invalid_vector",
            format!("vector component {i} is not a finite number"),
        ));
    }
    if metric == Metric::Cosine {
        // Eight independent f64 lanes, so the compiler can vectorise the sum of squares.
        let mut lanes = [0f64; 8];
        let mut chunks = v.chunks_exact(8);
        for c in &mut chunks {
            for (lane, x) in lanes.iter_mut().zip(c) {
                *lane += (*x as f64) * (*x as f64);
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum();
        let norm = (lanes.iter().sum::<f64>() + tail).sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Err(Invalid::new(
                "invalid_vector",
                "the zero vector has no direction and cannot be used with the cosine metric",
            ));
        }
        // One reciprocal, then a multiply the compiler vectorises.
        let inv_norm = (1.0 / norm) as f32;
        for x in v.iter_mut() {
            *x *= inv_norm;
        }
    }
    Ok(v)
}

/// Decodes `embedding_b64`: base64 of little-endian f32 values.
pub fn vector_b64(s: &str) -> Result<Vec<f32>, Invalid> {
    use base64::Engine as _;
    let s = s.trim();
    let max_len_bytes = DIMENSION_LIMIT * 4;
    if s.len() > (max_len_bytes / 3 + 1) * 4 + 4 {
        return Err(Invalid::too_large(
            "invalid_vector",
            format!("embedding_b64 is longer than {DIMENSION_LIMIT} f32 values"),
        ));
    }
    // Decode straight into the f32 buffer: one allocation, no intermediate byte vector.
    let mut out = vec![0f32; base64::decoded_len_estimate(s.len()).div_ceil(4)];
    // SAFETY: an f32 buffer is `len * 4` initialised bytes, and every bit pattern is a valid
    // f32, so viewing it as bytes to write into is sound.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 4) };
    let written = base64::engine::general_purpose::STANDARD
        .decode_slice(s, bytes)
        .map_err(|e| {
            Invalid::new(
                "invalid_vector",
                format!("embedding_b64 is not base64: {e}"),
            )
        })?;
    if written % 4 != 0 {
        return Err(Invalid::new(
            "invalid_vector",
            "embedding_b64 must hold a whole number of little-endian f32 values",
        ));
    }
    out.truncate(written / 4);
    if cfg!(target_endian = "big") {
        for x in out.iter_mut() {
            *x = f32::from_bits(x.to_bits().swap_bytes());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors() {
        assert!(vector(vec![1.0, 2.0], 3, Metric::L2).is_err());
        assert!(vector(vec![1.0, f32::NAN, 0.0], 3, Metric::L2).is_err());
        assert!(vector(vec![0.0, 0.0, 0.0], 3, Metric::Cosine).is_err());
        assert_eq!(
            vector(vec![0.0, 0.0, 0.0], 3, Metric::L2).unwrap(),
            vec![0.0; 3]
        );
        let v = vector(vec![3.0, 4.0], 2, Metric::Cosine).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn json_size_matches_serialisation() {
        let m = serde_json::json!({"a": [1, 2, {"b": "ü\"x"}], "c": null})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(json_size_bytes(&m), serde_json::to_vec(&m).unwrap().len());
        let mut v: Vec<f32> = (0..19).map(|i| i as f32 - 7.5).collect();
        let n: f64 = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let expected: Vec<f32> = v.iter().map(|x| (*x as f64 / n) as f32).collect();
        v = vector(v, 19, Metric::Cosine).unwrap();
        for (a, b) in v.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn b64() {
        use base64::Engine as _;
        let raw: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let s = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(vector_b64(&s).unwrap(), vec![1.5, -2.0]);
        assert!(vector_b64("!!").is_err());
        assert!(vector_b64("AAA=").is_err());
    }

    #[test]
    fn ids_and_names() {
        assert!(id("document", "doc-1").is_ok());
        assert!(id("document", "a/b").is_err());
        assert!(id("document", "").is_err());
        assert!(id("document", &"x".repeat(ID_BYTES_LIMIT + 1)).is_err());
        assert!(name(" ").is_err());
        assert!(
            name(&"n".repeat(NAME_BYTES_LIMIT + 1))
                .unwrap_err()
                .too_large
        );
    }
}
