//! Configuration: fsync policy, retention policy and the log's limits, with
//! their string forms (`FromStr` and `Display` round-trip).
//!
//! This module owns validation of every limit before the log touches disk. It
//! must never accept a value it cannot represent back (so configs survive
//! being printed and re-read) and never silently clamp: a bad value is an
//! error naming the input.

use crate::error::{LogError, ParseError};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Default roll size of a segment file.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Smallest accepted segment roll size (small values are for tests).
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 1024;
/// Largest accepted segment roll size.
pub const SEGMENT_SIZE_BYTES_MAX: u64 = 1 << 40;
/// Default largest payload of one record.
pub const RECORD_SIZE_BYTES_DEFAULT: u32 = 32 * 1024 * 1024;
/// Largest accepted record size limit.
pub const RECORD_SIZE_BYTES_MAX: u32 = 1 << 30;
/// Default number of records that may wait for the writer thread.
pub const QUEUE_RECORDS_DEFAULT: usize = 16_384;
/// Largest accepted queue limit.
pub const QUEUE_RECORDS_MAX: usize = 1 << 22;
/// Largest in-memory cache of recent records one can configure.
pub const RECENT_BYTES_MAX: usize = 1 << 30;
/// Largest accepted fsync interval.
pub const FSYNC_INTERVAL_MAX: Duration = Duration::from_secs(3600);

/// When the writer thread makes written records durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync after every group commit; `durable_seq` means on disk.
    Always,
    /// fdatasync at most this often; `durable_seq` means handed to the OS.
    Interval(Duration),
    /// Never fsync except at segment roll and close; `durable_seq` means
    /// handed to the OS.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = ParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |reason: &str| ParseError {
            what: "fsync policy",
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let text = input.trim();
        match text {
            "always" => return Ok(FsyncPolicy::Always),
            "never" => return Ok(FsyncPolicy::Never),
            _ => {}
        }
        let Some(ms_text) = text.strip_prefix("interval=") else {
            return Err(error(
                "expected \"always\", \"never\" or \"interval=<milliseconds>\"",
            ));
        };
        let ms_text = ms_text.strip_suffix("ms").unwrap_or(ms_text);
        let interval_ms: u64 = ms_text
            .parse()
            .map_err(|_| error("the interval must be a whole number of milliseconds"))?;
        let interval = Duration::from_millis(interval_ms);
        if interval.is_zero() {
            return Err(error(
                "the interval must be at least 1 ms (use \"always\" to sync every commit)",
            ));
        }
        if interval > FSYNC_INTERVAL_MAX {
            return Err(error("the interval must be at most 3600000 ms (one hour)"));
        }
        Ok(FsyncPolicy::Interval(interval))
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(interval) => write!(f, "interval={}", interval.as_millis()),
        }
    }
}

/// How much history to keep beyond what the latest snapshot requires.
///
/// A segment already covered by a snapshot is deleted when it is outside
/// retention: its age is at least `max_age`, OR it lies beyond `max_bytes`
/// counting from the newest segment. `None` means no limit of that kind, so
/// [`Retention::FOREVER`] keeps everything and [`Retention::NONE`] keeps
/// nothing the snapshot does not need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Keep nothing beyond the snapshot requirement (`"none"` / `"0"`).
    pub const NONE: Retention = Retention {
        max_age: Some(Duration::ZERO),
        max_bytes: None,
    };
    /// Keep every segment (`"forever"`).
    pub const FOREVER: Retention = Retention {
        max_age: None,
        max_bytes: None,
    };
}

const DURATION_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

const SIZE_UNITS: [(&str, u64); 9] = [
    ("tib", 1 << 40),
    ("gib", 1 << 30),
    ("mib", 1 << 20),
    ("kib", 1 << 10),
    ("tb", 1_000_000_000_000),
    ("gb", 1_000_000_000),
    ("mb", 1_000_000),
    ("kb", 1_000),
    ("b", 1),
];

enum RetentionPart {
    Age(Duration),
    Bytes(u64),
}

fn parse_retention_part(part: &str) -> Result<RetentionPart, String> {
    let digits_end = part
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(part.len());
    let (number_text, unit_text) = part.split_at(digits_end);
    if number_text.is_empty() {
        return Err(format!("{part:?} does not start with a number"));
    }
    let number: u64 = number_text
        .parse()
        .map_err(|_| format!("{number_text:?} is too large"))?;
    let unit = unit_text.trim().to_ascii_lowercase();
    if unit.is_empty() {
        if number == 0 {
            return Ok(RetentionPart::Age(Duration::ZERO));
        }
        return Err(format!(
            "{part:?} has no unit; use s, m, h, d for ages or B, KiB, MiB, GiB, KB, MB, GB for sizes"
        ));
    }
    if let Some((_, ms_per_unit)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) {
        let ms = number
            .checked_mul(*ms_per_unit)
            .ok_or_else(|| format!("{part:?} is too long a duration"))?;
        return Ok(RetentionPart::Age(Duration::from_millis(ms)));
    }
    if let Some((_, bytes_per_unit)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) {
        let bytes = number
            .checked_mul(*bytes_per_unit)
            .ok_or_else(|| format!("{part:?} is too large a size"))?;
        return Ok(RetentionPart::Bytes(bytes));
    }
    Err(format!(
        "unknown unit {unit_text:?}; use s, m, h, d for ages or B, KiB, MiB, GiB, KB, MB, GB for sizes"
    ))
}

impl FromStr for Retention {
    type Err = ParseError;

    /// Accepts `"none"` / `"0"`, `"forever"`, an age (`"7d"`, `"24h"`,
    /// `"30m"`, `"90s"`), a size (`"10GiB"`, `"500MB"`, `"4096B"`), or an age
    /// and a size separated by a comma (`"7d,10GiB"`).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |reason: String| ParseError {
            what: "retention",
            input: input.to_string(),
            reason,
        };
        let text = input.trim();
        match text.to_ascii_lowercase().as_str() {
            "none" | "0" => return Ok(Retention::NONE),
            "forever" => return Ok(Retention::FOREVER),
            "" => {
                return Err(error(
                    "empty; expected e.g. \"7d\", \"10GiB\" or \"none\"".into(),
                ))
            }
            _ => {}
        }
        let mut retention = Retention::FOREVER;
        for part in text.split(',') {
            match parse_retention_part(part.trim()).map_err(error)? {
                RetentionPart::Age(age) => {
                    if retention.max_age.replace(age).is_some() {
                        return Err(error("more than one age given".into()));
                    }
                }
                RetentionPart::Bytes(bytes) => {
                    if retention.max_bytes.replace(bytes).is_some() {
                        return Err(error("more than one size given".into()));
                    }
                }
            }
        }
        Ok(retention)
    }
}

fn format_age(age: Duration) -> String {
    let ms = age.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    for (name, ms_per_unit) in DURATION_UNITS {
        let ms_per_unit = u128::from(ms_per_unit);
        if ms / ms_per_unit * ms_per_unit == ms {
            return format!("{}{name}", ms / ms_per_unit);
        }
    }
    unreachable!("every duration is a whole number of ms units");
}

fn format_bytes(bytes: u64) -> String {
    const BINARY: [(&str, u64); 5] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    for (name, bytes_per_unit) in BINARY {
        if bytes != 0 && bytes / bytes_per_unit * bytes_per_unit == bytes {
            return format!("{}{name}", bytes / bytes_per_unit);
        }
    }
    "0B".to_string()
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.max_age, self.max_bytes) {
            (None, None) => f.write_str("forever"),
            (Some(age), None) if age.is_zero() => f.write_str("none"),
            (Some(age), None) => f.write_str(&format_age(age)),
            (None, Some(bytes)) => f.write_str(&format_bytes(bytes)),
            (Some(age), Some(bytes)) => write!(f, "{},{}", format_age(age), format_bytes(bytes)),
        }
    }
}

/// Where the log lives and its limits.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// A segment is rolled before a record that would take it past this.
    pub segment_size_bytes_limit: u64,
    /// Largest payload of one record.
    pub record_size_bytes_limit: u32,
    /// Records that may wait for the writer; `append` blocks beyond this.
    pub queue_records_limit: usize,
    /// Payload bytes of the newest records kept in memory for readers near the tail (0 turns
    /// the cache off; every read then goes to the files).
    pub recent_bytes_limit: usize,
}

impl LogConfig {
    /// Defaults: fsync always, 64 MiB segments, 32 MiB records, 16384 queued
    /// records.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            segment_size_bytes_limit: SEGMENT_SIZE_BYTES_DEFAULT,
            record_size_bytes_limit: RECORD_SIZE_BYTES_DEFAULT,
            queue_records_limit: QUEUE_RECORDS_DEFAULT,
            recent_bytes_limit: crate::recent::RECENT_BYTES_LIMIT_DEFAULT,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), LogError> {
        let range_error = |name: &str, value: u64, min: u64, max: u64| {
            LogError::InvalidConfig(format!(
                "{name} is {value} but must be between {min} and {max}"
            ))
        };
        if !(SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX)
            .contains(&self.segment_size_bytes_limit)
        {
            return Err(range_error(
                "segment_size_bytes_limit",
                self.segment_size_bytes_limit,
                SEGMENT_SIZE_BYTES_MIN,
                SEGMENT_SIZE_BYTES_MAX,
            ));
        }
        if !(1..=RECORD_SIZE_BYTES_MAX).contains(&self.record_size_bytes_limit) {
            return Err(range_error(
                "record_size_bytes_limit",
                u64::from(self.record_size_bytes_limit),
                1,
                u64::from(RECORD_SIZE_BYTES_MAX),
            ));
        }
        if !(1..=QUEUE_RECORDS_MAX).contains(&self.queue_records_limit) {
            return Err(range_error(
                "queue_records_limit",
                self.queue_records_limit as u64,
                1,
                QUEUE_RECORDS_MAX as u64,
            ));
        }
        if self.recent_bytes_limit > RECENT_BYTES_MAX {
            return Err(range_error(
                "recent_bytes_limit",
                self.recent_bytes_limit as u64,
                0,
                RECENT_BYTES_MAX as u64,
            ));
        }
        if let FsyncPolicy::Interval(interval) = self.fsync {
            if interval.is_zero() || interval > FSYNC_INTERVAL_MAX {
                return Err(LogError::InvalidConfig(format!(
                    "the fsync interval is {interval:?} but must be between 1ms and 1h"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_round_trips() {
        for (text, policy) in [
            ("always", FsyncPolicy::Always),
            ("never", FsyncPolicy::Never),
            (
                "interval=250",
                FsyncPolicy::Interval(Duration::from_millis(250)),
            ),
            (
                "interval=1",
                FsyncPolicy::Interval(Duration::from_millis(1)),
            ),
        ] {
            let parsed: FsyncPolicy = text.parse().expect("valid policy");
            assert_eq!(parsed, policy);
            assert_eq!(parsed.to_string(), text);
            assert_eq!(parsed.to_string().parse::<FsyncPolicy>(), Ok(policy));
        }
        assert_eq!(
            "interval=20ms".parse::<FsyncPolicy>(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(20)))
        );
        for bad in [
            "",
            "Always",
            "sometimes",
            "interval",
            "interval=",
            "interval=0",
            "interval=-5",
            "interval=1.5",
            "interval=99999999",
        ] {
            let error = bad.parse::<FsyncPolicy>().expect_err(bad);
            let message = error.to_string();
            assert!(message.contains("fsync policy"), "{message}");
            assert!(message.contains(&format!("{bad:?}")), "{message}");
        }
    }

    #[test]
    fn retention_parses_and_round_trips() {
        let day = Duration::from_secs(86_400);
        for (text, expected, display) in [
            (
                "7d",
                Retention {
                    max_age: Some(7 * day),
                    max_bytes: None,
                },
                "7d",
            ),
            (
                "24h",
                Retention {
                    max_age: Some(day),
                    max_bytes: None,
                },
                "1d",
            ),
            (
                "30m",
                Retention {
                    max_age: Some(Duration::from_secs(1800)),
                    max_bytes: None,
                },
                "30m",
            ),
            (
                "90s",
                Retention {
                    max_age: Some(Duration::from_secs(90)),
                    max_bytes: None,
                },
                "90s",
            ),
            (
                "10GiB",
                Retention {
                    max_age: None,
                    max_bytes: Some(10 << 30),
                },
                "10GiB",
            ),
            (
                "500MB",
                Retention {
                    max_age: None,
                    max_bytes: Some(500_000_000),
                },
                "500000000B",
            ),
            (
                "1024KiB",
                Retention {
                    max_age: None,
                    max_bytes: Some(1 << 20),
                },
                "1MiB",
            ),
            (
                "4096B",
                Retention {
                    max_age: None,
                    max_bytes: Some(4096),
                },
                "4KiB",
            ),
            (
                "0B",
                Retention {
                    max_age: None,
                    max_bytes: Some(0),
                },
                "0B",
            ),
            ("none", Retention::NONE, "none"),
            ("0", Retention::NONE, "none"),
            ("forever", Retention::FOREVER, "forever"),
            (
                "7d,10GiB",
                Retention {
                    max_age: Some(7 * day),
                    max_bytes: Some(10 << 30),
                },
                "7d,10GiB",
            ),
        ] {
            let parsed: Retention = text.parse().expect(text);
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), display, "{text}");
            assert_eq!(display.parse::<Retention>(), Ok(parsed), "{text}");
        }
        for bad in [
            "",
            "7",
            "d",
            "7x",
            "-7d",
            "7.5d",
            "10 apples",
            "7d,8d",
            "1GiB,2GiB",
            "99999999999999999999d",
            "20000000000000000TiB",
        ] {
            let error = bad.parse::<Retention>().expect_err(bad);
            let message = error.to_string();
            assert!(message.starts_with("invalid retention"), "{message}");
        }
    }

    #[test]
    fn config_validation() {
        let config = LogConfig::new("/tmp/x");
        assert!(config.validate().is_ok());
        let mut bad = config.clone();
        bad.segment_size_bytes_limit = 10;
        assert!(bad.validate().is_err());
        let mut bad = config.clone();
        bad.record_size_bytes_limit = 0;
        assert!(bad.validate().is_err());
        let mut bad = config;
        bad.queue_records_limit = 0;
        assert!(bad.validate().is_err());
    }
}
