#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vstor_fuzz::vhost::vhost_chain(data));
