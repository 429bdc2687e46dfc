//! What the index examples share: reading the benchmarks' raw files, flat arrays of
//! little-endian 4-byte values (`f32` rows, `u32` ground-truth ids) as `bench/hnsw_peers.py`
//! and `bench/flat_search.py` write them. An example panics with the path on a bad file: these
//! are benchmark tools, not the server.

/// The values of `path`, each decoded from 4 little-endian bytes by `decode`
/// (`f32::from_le_bytes`, `u32::from_le_bytes`). Asserts the file holds whole values.
pub fn read_le<T>(path: &str, decode: fn([u8; 4]) -> T) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    assert_eq!(bytes.len() % 4, 0, "{path}: not whole 4-byte values");
    bytes
        .chunks_exact(4)
        .map(|b| decode([b[0], b[1], b[2], b[3]]))
        .collect()
}
