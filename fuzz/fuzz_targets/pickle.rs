#![no_main]
libfuzzer_sys::fuzz_target!(
    // Panics the code under test catches itself (a dependency's, turned into an error) must not
    // abort the run: a silent hook; any panic that escapes still aborts, as libFuzzer reports it.
    init: { std::panic::set_hook(Box::new(|_| {})) },
    |data: &[u8]| kandinsky_fuzz::pickle(data)
);
