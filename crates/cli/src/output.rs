//! # Human and machine output
//!
//! Owns how results look on stdout: aligned plain-text tables for people, pretty JSON for
//! `--json`, and the one text-shortening rule (whitespace folded, cut on a char boundary with
//! `…`). It must never write to stderr and never decide *what* to print: commands pick the
//! rows, this module only lays them out, so every command's table looks the same.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;

/// Folds whitespace runs (newlines included) into single spaces and cuts to at most `max`
/// characters, ending in `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    let folded: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if folded.chars().count() <= max {
        return folded;
    }
    let mut out: String = folded.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A JSON value as a table cell: strings bare, null empty, the rest as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Writes `v` as pretty JSON on stdout.
pub fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).context("writing JSON to stdout")?;
    writeln!(out).context("writing to stdout")?;
    Ok(())
}

/// A plain-text table: a header row, then rows, columns padded to the widest cell.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate().take(n) {
                // `{:<w$}` pads by chars, matching the widths above.
                let w = if i + 1 == n { 0 } else { widths[i] + 2 };
                l.push_str(&format!("{c:<w$}"));
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.headers);
        for r in &self.rows {
            line(r);
        }
        out
    }

    pub fn print(&self) -> Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(self.render().as_bytes())
            .context("writing to stdout")?;
        Ok(())
    }
}

/// `key: value` lines, keys padded, for showing one object.
pub fn print_fields(fields: &[(&str, String)]) -> Result<()> {
    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (k, v) in fields {
        writeln!(out, "{k:<w$}  {v}", w = w + 1).context("writing to stdout")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_folds_and_cuts_on_chars() {
        assert_eq!(truncate("a\n\n b", 10), "a b");
        assert_eq!(truncate("ééééé", 3), "éé…");
        assert_eq!(truncate("abc", 3), "abc");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.render(), "A    LONGER\nxyz  1\n");
    }
}
