#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kandinsky_fuzz::latents(data));
