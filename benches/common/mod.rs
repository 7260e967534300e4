//! What both benchmarks share: the 1 KiB body, sizes from the environment, percentiles and
//! the report (a table and a JSON file under `target/`).

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod in_process;

/// A 1 KiB body, as bytes on the wire (MessagePack `bin`).
#[derive(Clone, Serialize, Deserialize, PartialEq, Debug)]
pub struct Body {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

pub const BODY_BYTES: usize = 1024;

/// The body each message carries: a copy of one made once, so that making it costs the
/// sending side a copy (as a program sending data it has), not a loop over its bytes.
pub fn body() -> Body {
    static TEMPLATE: std::sync::OnceLock<Body> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| Body {
            data: (0..BODY_BYTES).map(|i| (i % 251) as u8).collect(),
        })
        .clone()
}

/// `KIWIMQ_BENCH_<NAME>` from the environment, else `default`.
pub fn size(name: &str, default: usize) -> usize {
    std::env::var(format!("KIWIMQ_BENCH_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p`-th percentile of `samples` (sorted here), in microseconds.
pub fn percentile_us(samples: &mut [Duration], p: usize) -> f64 {
    samples.sort();
    let index = (samples.len() * p / 100).min(samples.len().saturating_sub(1));
    samples[index].as_secs_f64() * 1e6
}

/// The median of `values`.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Messages per second for `n` messages in `elapsed`.
pub fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// Prints `name  value…` rows under `header`.
pub fn print_table(header: &[&str], rows: &[(String, Vec<String>)]) {
    print!("{:<40}", "figure");
    for column in header {
        print!("{column:>14}");
    }
    println!();
    for (name, values) in rows {
        print!("{name:<40}");
        for value in values {
            print!("{value:>14}");
        }
        println!();
    }
}

/// Writes `report` as pretty JSON to `target/<file>` and says where.
pub fn write_report(file: &str, report: &serde_json::Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(file);
    std::fs::write(&path, serde_json::to_string_pretty(report).unwrap()).unwrap();
    println!("\nwritten to {}", path.display());
}

/// This process's resident memory, in MiB.
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
