//! Replays every kept corpus input and crasher of every target (`fuzz/corpus/<target>/`,
//! `fuzz/artifacts/<target>/`), then a short fresh run: random mutations of the corpus (bit
//! flips, byte and length changes, splices), deterministic from a fixed seed. A panic, or an input
//! that takes more than a few seconds, fails the test with the input's file name.

use kandinsky_fuzz::TARGETS;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    out.sort();
    out
}

/// xorshift64*: the mutations' randomness, fixed by the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = a.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, b'9', b'"'][rng.below(6)];
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            4 if !b.is_empty() => {
                let (i, j) = (rng.below(v.len() + 1), rng.below(b.len()));
                v.splice(i..i, b[j..].iter().take(64).copied());
            }
            _ => {
                // Interesting numbers where digits are.
                if let Some(i) = v.iter().position(|c| c.is_ascii_digit()) {
                    let n =
                        ["4294967296", "-1", "1e308", "18446744073709551615", "0"][rng.below(5)];
                    v.splice(i..i + 1, n.bytes());
                }
            }
        }
    }
    v
}

fn run(target: &str, f: fn(&[u8]), name: &str, data: &[u8]) {
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| f(data));
    if result.is_err() && std::env::var_os("KANDINSKY_FUZZ_SAVE").is_some() {
        // Keep the input as a crasher, replayed from then on.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/artifacts")
            .join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name.replace(' ', "-")), data).unwrap();
    }
    assert!(result.is_ok(), "{target}: {name} panicked");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{target}: {name} took {:?}",
        start.elapsed()
    );
}

#[test]
fn corpora_crashers_and_a_short_fresh_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let fresh: usize = std::env::var("KANDINSKY_FUZZ_FRESH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for (target, f) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(target));
        assert!(!corpus.is_empty(), "{target}: no corpus");
        for (path, data) in corpus
            .iter()
            .chain(&inputs(&root.join("artifacts").join(target)))
        {
            run(target, *f, &path.display().to_string(), data);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        for i in 0..fresh {
            let a = &corpus[rng.below(corpus.len())].1;
            let b = &corpus[rng.below(corpus.len())].1;
            let data = mutate(&mut rng, a, b);
            run(target, *f, &format!("fresh mutation {i}"), &data);
        }
        eprintln!(
            "{target}: {} corpus inputs and {fresh} mutations",
            corpus.len()
        );
    }
}
