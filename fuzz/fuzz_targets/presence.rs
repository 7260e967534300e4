#![no_main]
//! Presence announcements, as a watcher and the dashboard's roster read them.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiwimq_fuzz::limited();
    kiwimq::fuzzing::presence(data);
});
