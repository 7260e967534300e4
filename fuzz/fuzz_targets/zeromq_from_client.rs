#![no_main]
//! AiiDA's ZeroMQ messages as kiwimq's broker reads them from clients, and the frames it stores and forwards.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::zeromq_from_client(data);
});
