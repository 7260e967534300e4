#![no_main]
//! The broker's journal as it is replayed at start.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::journal(data);
});
