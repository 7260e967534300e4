//! The in-process benchmark of `benches/mem.rs`, with mimalloc as the program's global
//! allocator, as a worker binary can choose: a round trip allocates on one thread what
//! another frees, which glibc's allocator serves through locked arenas (see
//! docs/performance.md). Writes `target/kiwimq-bench-mem-mimalloc.json`.

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    common::in_process::run("mimalloc", "kiwimq-bench-mem-mimalloc.json");
}
