#![no_main]
//! `storage/broker-state.json` as kiwimq's broker reads it at start.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::broker_state(data);
});
