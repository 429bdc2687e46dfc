//! Metadata filters: parsed once from JSON into a small tree, then evaluated per chunk
//! *during* the index scan, so a filtered search is exact (only matching chunks compete for
//! the top k).
//!
//! Accepted shapes:
//! - the seeds' list `[{field, operator, value}, …]` — all must hold;
//! - `{must: [...], should: [...], must_not: [...]}` whose items are conditions or nested
//!   filters — all of `must`, at least one of `should` (when given), none of `must_not`;
//! - one condition `{field, operator|op, value}`;
//! - the shorthand `{"genre": "news", "year": 2024}` — each key equals its value.
//!
//! Fields: the built-ins `document_id`, `chunk_id`, `title`, `created_at`, `updated_at`;
//! `chunk.<path>` and `document.<path>` address one metadata object; a bare `<path>` looks in
//! the chunk's metadata, then the document's. A path may use dots to reach into nested
//! objects. Parsing never panics and is bounded by [`FILTER_DEPTH_LIMIT`] and
//! [`FILTER_CONDITIONS_LIMIT`]; evaluation never allocates for metadata fields.

use quiver_model::limits::{FILTER_CONDITIONS_LIMIT, FILTER_DEPTH_LIMIT};
use quiver_model::validate::Invalid;
use quiver_model::{Chunk, Document};
use serde_json::{Map, Value};
use std::cmp::Ordering;

#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Cond(Condition),
    Bool {
        must: Vec<Filter>,
        should: Vec<Filter>,
        must_not: Vec<Filter>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    field: Field,
    op: Op,
    value: Value,
}

#[derive(Clone, Debug, PartialEq)]
enum Field {
    DocumentId,
    ChunkId,
    Title,
    CreatedAt,
    UpdatedAt,
    Chunk(Vec<String>),
    Document(Vec<String>),
    Either(Vec<String>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Nin,
    Contains,
    Exists,
}

fn bad(detail: impl Into<String>) -> Invalid {
    Invalid::new("invalid_filter", detail)
}

impl Filter {
    /// Parses a filter from its JSON form. `null` and `{}` / `[]` mean "no filter" (`None`).
    pub fn parse(v: &Value) -> Result<Option<Filter>, Invalid> {
        let mut budget = FILTER_CONDITIONS_LIMIT;
        match v {
            Value::Null => Ok(None),
            Value::Array(a) if a.is_empty() => Ok(None),
            Value::Object(o) if o.is_empty() => Ok(None),
            _ => parse_node(v, 0, &mut budget).map(Some),
        }
    }

    pub fn matches(&self, doc: &Document, chunk: &Chunk) -> bool {
        match self {
            Filter::Cond(c) => c.matches(doc, chunk),
            Filter::Bool {
                must,
                should,
                must_not,
            } => {
                must.iter().all(|f| f.matches(doc, chunk))
                    && (should.is_empty() || should.iter().any(|f| f.matches(doc, chunk)))
                    && !must_not.iter().any(|f| f.matches(doc, chunk))
            }
        }
    }
}

fn parse_node(v: &Value, depth: usize, budget: &mut usize) -> Result<Filter, Invalid> {
    if depth > FILTER_DEPTH_LIMIT {
        return Err(bad(format!(
            "filter nests deeper than {FILTER_DEPTH_LIMIT} levels"
        )));
    }
    match v {
        Value::Array(items) => Ok(Filter::Bool {
            must: parse_list(items, depth, budget)?,
            should: vec![],
            must_not: vec![],
        }),
        Value::Object(o)
            if o.contains_key("must") || o.contains_key("should") || o.contains_key("must_not") =>
        {
            if let Some(k) = o
                .keys()
                .find(|k| !matches!(k.as_str(), "must" | "should" | "must_not"))
            {
                return Err(bad(format!(
                    "unexpected key {k:?} beside must/should/must_not"
                )));
            }
            let list = |key: &str, budget: &mut usize| -> Result<Vec<Filter>, Invalid> {
                match o.get(key) {
                    None | Some(Value::Null) => Ok(vec![]),
                    Some(Value::Array(items)) => parse_list(items, depth, budget),
                    Some(one @ Value::Object(_)) => Ok(vec![parse_node(one, depth + 1, budget)?]),
                    Some(_) => Err(bad(format!("`{key}` must be a list of conditions"))),
                }
            };
            Ok(Filter::Bool {
                must: list("must", budget)?,
                should: list("should", budget)?,
                must_not: list("must_not", budget)?,
            })
        }
        Value::Object(o) if o.contains_key("field") => parse_condition(o, budget).map(Filter::Cond),
        Value::Object(o) => {
            // Shorthand: every key equals its value.
            let mut must = Vec::with_capacity(o.len());
            for (k, val) in o {
                take_budget(budget)?;
                must.push(Filter::Cond(Condition {
                    field: parse_field(k)?,
                    op: Op::Eq,
                    value: val.clone(),
                }));
            }
            Ok(Filter::Bool {
                must,
                should: vec![],
                must_not: vec![],
            })
        }
        _ => Err(bad("a filter is a list of conditions or an object")),
    }
}

fn parse_list(items: &[Value], depth: usize, budget: &mut usize) -> Result<Vec<Filter>, Invalid> {
    items
        .iter()
        .map(|i| parse_node(i, depth + 1, budget))
        .collect()
}

fn take_budget(budget: &mut usize) -> Result<(), Invalid> {
    if *budget == 0 {
        return Err(Invalid::too_large(
            "invalid_filter",
            format!("filter has more than {FILTER_CONDITIONS_LIMIT} conditions"),
        ));
    }
    *budget -= 1;
    Ok(())
}

fn parse_condition(o: &Map<String, Value>, budget: &mut usize) -> Result<Condition, Invalid> {
    take_budget(budget)?;
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "field" | "operator" | "op" | "value"))
    {
        return Err(bad(format!(
            "unexpected key {k:?} in a condition (expected field, operator, value)"
        )));
    }
    let field = o
        .get("field")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`field` must be a string"))?;
    let op_name = o
        .get("operator")
        .or_else(|| o.get("op"))
        .map(|v| v.as_str().ok_or_else(|| bad("`operator` must be a string")))
        .transpose()?
        .unwrap_or("eq");
    let op = match op_name {
        "eq" | "==" => Op::Eq,
        "ne" | "!=" => Op::Ne,
        "gt" | ">" => Op::Gt,
        "gte" | ">=" => Op::Gte,
        "lt" | "<" => Op::Lt,
        "lte" | "<=" => Op::Lte,
        "in" => Op::In,
        "nin" | "not_in" => Op::Nin,
        "contains" => Op::Contains,
        "exists" => Op::Exists,
        other => {
            return Err(bad(format!(
            "unknown operator {other:?}; use eq, ne, gt, gte, lt, lte, in, nin, contains or exists"
        )))
        }
    };
    let value = o.get("value").cloned().unwrap_or(if op == Op::Exists {
        Value::Bool(true)
    } else {
        Value::Null
    });
    match op {
        Op::In | Op::Nin if !value.is_array() => {
            return Err(bad(format!("`{op_name}` needs a list value")))
        }
        Op::Exists if !value.is_boolean() => return Err(bad("`exists` needs true or false")),
        Op::Gt | Op::Gte | Op::Lt | Op::Lte if !(value.is_number() || value.is_string()) => {
            return Err(bad(format!("`{op_name}` needs a number or a string")))
        }
        Op::Eq | Op::Ne if o.get("value").is_none() => {
            return Err(bad(format!("`{op_name}` needs a value")))
        }
        _ => {}
    }
    Ok(Condition {
        field: parse_field(field)?,
        op,
        value,
    })
}

fn parse_field(f: &str) -> Result<Field, Invalid> {
    let path = |s: &str| -> Result<Vec<String>, Invalid> {
        if s.is_empty() || s.split('.').any(str::is_empty) {
            return Err(bad(format!("field {f:?} is not a valid path")));
        }
        Ok(s.split('.').map(str::to_string).collect())
    };
    Ok(match f {
        "document_id" => Field::DocumentId,
        "chunk_id" => Field::ChunkId,
        "title" => Field::Title,
        "created_at" => Field::CreatedAt,
        "updated_at" => Field::UpdatedAt,
        _ => {
            if let Some(rest) = f.strip_prefix("chunk.") {
                Field::Chunk(path(rest)?)
            } else if let Some(rest) = f.strip_prefix("document.") {
                Field::Document(path(rest)?)
            } else if let Some(rest) = f.strip_prefix("metadata.") {
                Field::Either(path(rest)?)
            } else {
                Field::Either(path(f)?)
            }
        }
    })
}

fn lookup<'a>(m: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = m.get(first)?;
    for p in rest {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

/// A field's value: metadata borrowed, built-ins owned (they are few and small).
enum FieldValue<'a> {
    Borrowed(&'a Value),
    Str(&'a str),
    Time(u64),
}

impl Condition {
    fn resolve<'a>(&self, doc: &'a Document, chunk: &'a Chunk) -> Option<FieldValue<'a>> {
        match &self.field {
            Field::DocumentId => Some(FieldValue::Str(&doc.id)),
            Field::ChunkId => Some(FieldValue::Str(&chunk.id)),
            Field::Title => Some(FieldValue::Str(&doc.title)),
            Field::CreatedAt => Some(FieldValue::Time(doc.created_at_ms)),
            Field::UpdatedAt => Some(FieldValue::Time(doc.updated_at_ms)),
            Field::Chunk(p) => lookup(&chunk.metadata, p).map(FieldValue::Borrowed),
            Field::Document(p) => lookup(&doc.metadata, p).map(FieldValue::Borrowed),
            Field::Either(p) => lookup(&chunk.metadata, p)
                .or_else(|| lookup(&doc.metadata, p))
                .map(FieldValue::Borrowed),
        }
    }

    fn matches(&self, doc: &Document, chunk: &Chunk) -> bool {
        let fv = self.resolve(doc, chunk);
        match self.op {
            Op::Exists => {
                let present = matches!(&fv, Some(FieldValue::Borrowed(v)) if !v.is_null())
                    || matches!(&fv, Some(FieldValue::Str(_) | FieldValue::Time(_)));
                present == self.value.as_bool().unwrap_or(true)
            }
            Op::Ne => !fv.is_some_and(|f| equals(&f, &self.value)),
            Op::Nin => !fv.is_some_and(|f| in_list(&f, &self.value)),
            _ => {
                let Some(f) = fv else { return false };
                match self.op {
                    Op::Eq => equals(&f, &self.value),
                    Op::In => in_list(&f, &self.value),
                    Op::Gt => compare(&f, &self.value) == Some(Ordering::Greater),
                    Op::Gte => matches!(
                        compare(&f, &self.value),
                        Some(Ordering::Greater | Ordering::Equal)
                    ),
                    Op::Lt => compare(&f, &self.value) == Some(Ordering::Less),
                    Op::Lte => matches!(
                        compare(&f, &self.value),
                        Some(Ordering::Less | Ordering::Equal)
                    ),
                    Op::Contains => contains(&f, &self.value),
                    Op::Ne | Op::Nin | Op::Exists => unreachable!("handled above"),
                }
            }
        }
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn time_of(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => quiver_model::time::parse_rfc3339_ms(s),
        _ => None,
    }
}

fn equals(f: &FieldValue, v: &Value) -> bool {
    match f {
        FieldValue::Borrowed(x) => json_eq(x, v),
        FieldValue::Str(s) => v.as_str() == Some(*s),
        FieldValue::Time(t) => time_of(v) == Some(*t),
    }
}

fn in_list(f: &FieldValue, list: &Value) -> bool {
    let Some(items) = list.as_array() else {
        return false;
    };
    match f {
        // An array field is "in" the list when any of its elements is.
        FieldValue::Borrowed(Value::Array(xs)) => {
            xs.iter().any(|x| items.iter().any(|i| json_eq(x, i)))
        }
        _ => items.iter().any(|i| equals(f, i)),
    }
}

fn compare(f: &FieldValue, v: &Value) -> Option<Ordering> {
    match f {
        FieldValue::Borrowed(Value::Number(x)) => x.as_f64()?.partial_cmp(&v.as_f64()?),
        FieldValue::Borrowed(Value::String(x)) => Some(x.as_str().cmp(v.as_str()?)),
        FieldValue::Str(s) => Some((*s).cmp(v.as_str()?)),
        FieldValue::Time(t) => Some(t.cmp(&time_of(v)?)),
        _ => None,
    }
}

fn contains(f: &FieldValue, v: &Value) -> bool {
    match f {
        FieldValue::Borrowed(Value::String(s)) => v.as_str().is_some_and(|n| s.contains(n)),
        FieldValue::Str(s) => v.as_str().is_some_and(|n| s.contains(n)),
        FieldValue::Borrowed(Value::Array(xs)) => xs.iter().any(|x| json_eq(x, v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc_chunk() -> (Document, Chunk) {
        let chunk = Chunk {
            id: "c1".into(),
            document_id: "d1".into(),
            text: "t".into(),
            embedding: vec![],
            metadata: json!({"page": 3, "lang": "en", "tags": ["a", "b"], "nested": {"x": 1}})
                .as_object()
                .cloned()
                .unwrap(),
        };
        let doc = Document {
            id: "d1".into(),
            library_id: "l".into(),
            title: "Rust in Action".into(),
            metadata: json!({"author": "Ana", "year": 2021, "lang": "pt"})
                .as_object()
                .cloned()
                .unwrap(),
            created_at_ms: 1_790_000_000_000,
            updated_at_ms: 1_790_000_000_000,
            chunks: vec![],
        };
        (doc, chunk)
    }

    fn m(f: Value) -> bool {
        let (d, c) = doc_chunk();
        Filter::parse(&f).unwrap().unwrap().matches(&d, &c)
    }

    #[test]
    fn operators() {
        assert!(m(json!([{"field": "page", "operator": "eq", "value": 3}])));
        assert!(m(
            json!([{"field": "page", "operator": "eq", "value": 3.0}])
        ));
        assert!(m(json!([{"field": "page", "operator": "gt", "value": 2}])));
        assert!(!m(json!([{"field": "page", "operator": "gt", "value": 3}])));
        assert!(m(json!([{"field": "page", "operator": "gte", "value": 3}])));
        assert!(m(json!([{"field": "page", "operator": "lt", "value": 4}])));
        assert!(m(json!([{"field": "page", "operator": "lte", "value": 3}])));
        assert!(m(json!([{"field": "page", "operator": "ne", "value": 4}])));
        assert!(m(
            json!([{"field": "page", "operator": "in", "value": [1, 3]}])
        ));
        assert!(m(
            json!([{"field": "page", "operator": "nin", "value": [1, 2]}])
        ));
        assert!(m(
            json!([{"field": "tags", "operator": "contains", "value": "b"}])
        ));
        assert!(m(
            json!([{"field": "title", "operator": "contains", "value": "Rust"}])
        ));
        assert!(m(
            json!([{"field": "author", "operator": "exists", "value": true}])
        ));
        assert!(m(
            json!([{"field": "missing", "operator": "exists", "value": false}])
        ));
        assert!(m(
            json!([{"field": "missing", "operator": "ne", "value": 1}])
        ));
        assert!(!m(
            json!([{"field": "missing", "operator": "gt", "value": 1}])
        ));
        assert!(m(
            json!([{"field": "nested.x", "operator": "eq", "value": 1}])
        ));
        assert!(m(
            json!([{"field": "tags", "operator": "in", "value": ["z", "a"]}])
        ));
    }

    #[test]
    fn field_resolution() {
        // bare: chunk first
        assert!(m(json!({"lang": "en"})));
        assert!(m(
            json!([{"field": "document.lang", "operator": "eq", "value": "pt"}])
        ));
        assert!(m(
            json!([{"field": "chunk.lang", "operator": "eq", "value": "en"}])
        ));
        assert!(m(
            json!([{"field": "author", "operator": "eq", "value": "Ana"}])
        ));
        assert!(m(
            json!([{"field": "document_id", "operator": "eq", "value": "d1"}])
        ));
        assert!(m(
            json!([{"field": "created_at", "operator": "gte", "value": "2026-01-01T00:00:00Z"}])
        ));
        assert!(!m(
            json!([{"field": "created_at", "operator": "lt", "value": 1_000}])
        ));
    }

    #[test]
    fn boolean_combinations() {
        assert!(m(
            json!({"must": [{"field": "page", "operator": "eq", "value": 3}],
                         "should": [{"field": "lang", "op": "eq", "value": "xx"}, {"field": "author", "value": "Ana"}],
                         "must_not": [{"field": "year", "operator": "lt", "value": 2000}]})
        ));
        assert!(!m(
            json!({"must_not": [{"field": "page", "operator": "eq", "value": 3}]})
        ));
        assert!(!m(
            json!({"should": [{"field": "page", "operator": "eq", "value": 9}]})
        ));
        assert!(m(
            json!({"must": [{"should": [{"field": "page", "value": 3}]}]})
        ));
    }

    #[test]
    fn bad_filters_are_refused() {
        for f in [
            json!([{"field": "page", "operator": "like", "value": 3}]),
            json!([{"field": "page", "operator": "in", "value": 3}]),
            json!([{"field": "page", "operator": "gt", "value": [1]}]),
            json!([{"field": "page", "operator": "exists", "value": 1}]),
            json!([{"field": "", "operator": "eq", "value": 1}]),
            json!([{"field": "page", "operator": "eq"}]),
            json!({"must": 3}),
            json!(42),
            json!({"must": [], "extra": 1}),
        ] {
            assert!(Filter::parse(&f).is_err(), "{f}");
        }
        let mut deep = json!([{"field": "a", "value": 1}]);
        for _ in 0..20 {
            deep = json!({"must": [deep]});
        }
        assert!(Filter::parse(&deep).is_err());
        let many: Vec<Value> = (0..300)
            .map(|i| json!({"field": "a", "value": i}))
            .collect();
        assert!(Filter::parse(&Value::Array(many)).is_err());
    }

    #[test]
    fn empty_means_none() {
        assert_eq!(Filter::parse(&json!(null)).unwrap(), None);
        assert_eq!(Filter::parse(&json!([])).unwrap(), None);
        assert_eq!(Filter::parse(&json!({})).unwrap(), None);
    }
}
