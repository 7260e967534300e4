#![no_main]
//! A task file of `storage/tasks/` (its name, a newline, its content) as the store reads it at start.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::task_file(data);
});
