//! Every limit in Quiver, in one place, with its unit last in its name.
//!
//! A limit exists so that no input can make the server allocate without bound; past a limit
//! the caller gets a clear error naming the limit. Change a value here and every layer
//! (validation, HTTP body limits, the log's record limit) follows.

/// Longest library name, in bytes (UTF-8).
pub const NAME_BYTES_LIMIT: usize = 256;
/// Longest library description, in bytes.
pub const DESCRIPTION_BYTES_LIMIT: usize = 4096;
/// Longest client-chosen id (document or chunk), in bytes.
pub const ID_BYTES_LIMIT: usize = 256;
/// Longest document title, in bytes.
pub const TITLE_BYTES_LIMIT: usize = 1024;
/// Longest chunk text, in bytes.
pub const TEXT_BYTES_LIMIT: usize = 64 * 1024;
/// Largest metadata object once serialised as JSON, in bytes.
pub const METADATA_BYTES_LIMIT: usize = 16 * 1024;
/// Most chunks one document may carry.
pub const CHUNKS_PER_DOCUMENT_LIMIT: usize = 4096;
/// Largest vector dimension a library may declare.
pub const DIMENSION_LIMIT: usize = 4096;
/// Most documents in one batch request.
pub const BATCH_DOCUMENTS_LIMIT: usize = 1000;
/// Largest `k` for a search request.
pub const SEARCH_K_LIMIT: usize = 1000;
/// Largest JSON request body, in bytes.
pub const BODY_BYTES_LIMIT: usize = 64 * 1024 * 1024;
/// Largest page for document lists.
pub const PAGE_LIMIT: usize = 1000;
/// Most libraries a server holds.
pub const LIBRARIES_LIMIT: usize = 10_000;
/// Deepest nesting of a search filter (must/should/must_not inside each other).
pub const FILTER_DEPTH_LIMIT: usize = 8;
/// Most conditions in one search filter, counted over all levels.
pub const FILTER_CONDITIONS_LIMIT: usize = 256;
