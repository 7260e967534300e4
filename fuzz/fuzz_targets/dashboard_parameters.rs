#![no_main]
//! The dashboard's query string and path parameters.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::dashboard_parameters(data);
});
