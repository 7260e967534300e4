#![no_main]
//! `broker.status` as a client (and `verdi status`) reads it.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::broker_status(data);
});
