#![no_main]
//! kiwiPy envelopes (task, reply, broadcast) and bodies in YAML, as PyYAML writes them.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::envelope(kiwimq::Codec::Yaml, data);
});
