//! `HF_HUB_CACHE` / `HF_HOME` select the cache (own test binary: it sets process environment).

use kandinsky::loading::{hf_hub_cache, resolve_model_dir};

#[test]
fn environment_selects_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snap = cache.path().join("models--org--name/snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HOME", cache.path().parent().unwrap().join("elsewhere"));
    }
    assert!(hf_hub_cache().ends_with("elsewhere/hub"));
    assert!(resolve_model_dir("org/name").is_err());
    unsafe { std::env::set_var("HF_HUB_CACHE", cache.path()) };
    assert_eq!(hf_hub_cache(), cache.path());
    assert_eq!(resolve_model_dir("org/name").unwrap(), snap);
}
