#![no_main]
//! kiwiPy envelopes (task, reply, broadcast) and bodies in MessagePack.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::envelope(kiwimq::Codec::MessagePack, data);
});
