//! The in-process backend's throughput, release build, under the system allocator (glibc's
//! on Linux): task round trips, RPC round trips and broadcast deliveries per second with
//! 1 KiB bodies. `cargo bench --bench mem_mimalloc` runs the same under mimalloc.
//!
//! `cargo bench --bench mem` (`KIWIMQ_BENCH_N` sets the messages per figure, default
//! 100000; `KIWIMQ_BENCH_ROUNDS` how often each runs, default 3, the median reported with
//! the range). Prints a table and writes `target/kiwimq-bench-mem.json`.

mod common;

fn main() {
    common::in_process::run("system", "kiwimq-bench-mem.json");
}
