#![no_main]
//! AiiDA's ZeroMQ messages as kiwimq's client reads them from a broker, and the envelopes they become.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::zeromq_from_broker(data);
});
