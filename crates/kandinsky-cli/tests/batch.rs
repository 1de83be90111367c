//! `kandinsky batch`: shards run at once cover every line exactly once; a shard killed half-way
//! and restarted finishes without redoing or losing work; any split gives the one-shard files
//! byte for byte; bad files are refused before any work.

mod common;

use common::bin;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A prompts file of `n` lines (a blank line in the middle, some lines with their own settings).
fn prompts(dir: &Path, n: usize) -> std::path::PathBuf {
    let colours = ["red", "green", "blue", "yellow"];
    let shapes = ["circle", "square", "triangle"];
    let mut text = String::new();
    for i in 0..n {
        if i == 3 {
            text.push('\n');
        }
        let prompt = format!(
            "a {} {} on a white background",
            colours[i % 4],
            shapes[i % 3]
        );
        let line = match i % 4 {
            0 => serde_json::json!({"prompt": prompt}),
            1 => serde_json::json!({"prompt": prompt, "seed": 1234}),
            2 => serde_json::json!({"prompt": prompt, "steps": 6, "scheduler": "dpm++2m"}),
            _ => serde_json::json!({"prompt": prompt, "num_images": 2, "guidance": 3.0}),
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

fn batch(prompts: &Path, out: &Path, shard: &str) -> Command {
    let mut cmd = bin();
    cmd.args(["batch", "--prompts"])
        .arg(prompts)
        .arg("--output")
        .arg(out)
        .args([
            "--shard",
            shard,
            "--steps",
            "8",
            "--prior-steps",
            "4",
            "--seed",
            "7",
        ])
        .args(["--threads", "1"]);
    cmd
}

/// The PNGs of a directory by name.
fn pngs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Every manifest record of a directory: line → how many times it is recorded.
fn manifest_lines(dir: &Path) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("manifest-") {
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                *seen.entry(v["line"].as_u64().unwrap()).or_default() += 1;
            }
        }
    }
    seen
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

#[test]
fn shards_cover_every_line_once_and_equal_one_shard_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let file = prompts(dir.path(), 9);
    let one = dir.path().join("one");
    run_ok(&mut batch(&file, &one, "0/1"));
    // Line numbers are file lines: the blank fourth line is skipped.
    let lines: Vec<u64> = vec![1, 2, 3, 5, 6, 7, 8, 9, 10];
    assert_eq!(
        manifest_lines(&one).keys().copied().collect::<Vec<_>>(),
        lines
    );
    let reference = pngs(&one);
    // 9 lines, 2 with two images.
    assert_eq!(reference.len(), 11, "{:?}", reference.keys());
    assert!(reference.contains_key("000005-1.png"));
    // Three shards at once into one directory.
    let three = dir.path().join("three");
    let children: Vec<_> = (0..3)
        .map(|i| {
            batch(&file, &three, &format!("{i}/3"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let seen = manifest_lines(&three);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), lines);
    assert!(seen.values().all(|&c| c == 1), "each line once: {seen:?}");
    assert_eq!(
        pngs(&three),
        reference,
        "three shards = one shard, byte for byte"
    );
    // A second run finds everything done and records nothing again.
    let text = run_ok(&mut batch(&file, &three, "1/3"));
    assert!(text.contains("0 lines made"), "{text}");
    assert!(manifest_lines(&three).values().all(|&c| c == 1));
    // `auto` reads a Slurm array (task ids from 1) and a Kubernetes Indexed Job.
    let auto = dir.path().join("auto");
    for (env, shard) in [
        (
            vec![
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
            "1-of-3",
        ),
        (
            vec![("JOB_COMPLETION_INDEX", "0"), ("JOB_COMPLETIONS", "3")],
            "0-of-3",
        ),
    ] {
        let mut cmd = batch(&file, &auto, "auto");
        for k in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_MIN",
            "SLURM_ARRAY_TASK_COUNT",
            "JOB_COMPLETION_INDEX",
            "JOB_COMPLETIONS",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(env);
        run_ok(&mut cmd);
        assert!(auto.join(format!("manifest-{shard}.jsonl")).is_file());
    }
    for (name, bytes) in pngs(&auto) {
        assert_eq!(Some(&bytes), reference.get(&name), "{name}");
    }
}

#[test]
fn a_killed_shard_resumes_without_redoing_or_losing_work() {
    let dir = tempfile::tempdir().unwrap();
    let file = prompts(dir.path(), 12);
    let reference_dir = dir.path().join("reference");
    run_ok(&mut batch(&file, &reference_dir, "0/1"));
    let reference = pngs(&reference_dir);
    let out = dir.path().join("out");
    let mut child = batch(&file, &out, "0/1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a few images are there.
    let start = Instant::now();
    while !out.is_dir() || pngs(&out).len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = pngs(&out);
    assert!(before.len() < reference.len(), "killed half-way");
    // What was written is complete: every PNG equals the reference.
    for (name, bytes) in &before {
        assert_eq!(Some(bytes), reference.get(name), "{name} after the kill");
    }
    let mtimes: BTreeMap<String, std::time::SystemTime> = before
        .keys()
        .map(|n| {
            (
                n.clone(),
                out.join(n).metadata().unwrap().modified().unwrap(),
            )
        })
        .collect();
    let text = run_ok(&mut batch(&file, &out, "0/1"));
    assert!(text.contains("already there"), "{text}");
    assert_eq!(
        pngs(&out),
        reference,
        "the resumed shard = an uninterrupted one"
    );
    for (name, t) in mtimes {
        assert_eq!(
            out.join(&name).metadata().unwrap().modified().unwrap(),
            t,
            "{name} was redone"
        );
    }
    let seen = manifest_lines(&out);
    assert_eq!(seen.len(), 12);
    assert!(seen.values().all(|&c| c == 1), "each line once: {seen:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_prompt_files_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (content, shard, words) in [
        (
            "{\"prompt\": \"a cat\"}\n{\"prompt\": 3}\n",
            "0/1",
            "line 2",
        ),
        (
            "{\"prompt\": \"a cat\", \"colour\": 1}\n",
            "0/1",
            "unknown field",
        ),
        ("{\"prompt\": \"a cat\", \"steps\": 0}\n", "0/1", "line 1"),
        (
            "{\"prompt\": \"a cat\", \"num_images\": 100000}\n",
            "0/1",
            "num_images",
        ),
        (
            "{\"prompt\": \"a cat\", \"scheduler\": \"plms\"}\n",
            "0/1",
            "plms",
        ),
        ("\n\n", "0/1", "no prompts"),
        ("{\"prompt\": \"a cat\"}\n", "3/3", "0 ≤ i < n"),
        ("{\"prompt\": \"a cat\"}\n", "x", "expected i/n"),
    ] {
        let file = dir.path().join("p.jsonl");
        std::fs::write(&file, content).unwrap();
        let o = batch(&file, &out, shard).output().unwrap();
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && text.contains(words),
            "{content:?}: {text}"
        );
        assert!(
            !out.exists() || pngs(&out).is_empty(),
            "{content:?}: nothing made"
        );
    }
}
