#![no_main]
//! kiwimq's envelopes in bincode (typed bodies only: bincode is not self-describing).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::envelope(kiwimq::Codec::Bincode, data);
});
