//! The `train` commands: each stage trains, checkpoints and exports models that load and generate.

mod common;
use common::*;

#[test]
fn train_movq_writes_a_checkpoint_resumes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = |steps: &str| {
        strings(&[
            "train",
            "movq",
            "--out",
            &out.display().to_string(),
            "--steps",
            steps,
            "--batch",
            "1",
            "--checkpoint-every",
            "1",
            "--codebook-size",
            "64",
            "--collage",
            "0.5",
        ])
    };
    let res = bin().args(args("2")).output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(out.join("checkpoint.safetensors").is_file());
    let config = std::fs::read_to_string(out.join("movq/config.json")).unwrap();
    assert!(config.contains("\"num_vq_embeddings\": 64"), "{config}");
    let res = bin().args(args("3")).output().unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success() && stdout.contains("steps 2..3"),
        "{stdout}"
    );
    // The exported MoVQ decodes like any diffusers MoVQ.
    let png = dir.path().join("d.png");
    let res = bin()
        .args(["decode", "--movq", &out.join("movq").display().to_string()])
        .args(["--latent-size", "4", "--seed", "1", "--output"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // Bad input.
    let res = bin().args(args("0")).output().unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("at least 1"));
    // The decoder alone, from the trained MoVQ: the encoder, codebook and latent scale are
    // exported bit for bit as they were (the UNets' latents stay valid), the decoder moves.
    let decoder_only = dir.path().join("decoder-only");
    let res = bin()
        .args(["train", "movq", "--init", &out.display().to_string()])
        .args(["--out", &decoder_only.display().to_string()])
        .args([
            "--decoder-only",
            "--composite",
            "1",
            "--steps",
            "2",
            "--batch",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let weights = |run: &std::path::Path| {
        candle_core::safetensors::load(
            run.join("movq/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (before, after) = (weights(&out), weights(&decoder_only));
    assert_eq!(before.len(), after.len());
    let mut moved = 0;
    for (name, b) in &before {
        let diff = (b - &after[name])
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap();
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            moved += (diff > 0.0) as usize;
        } else {
            assert_eq!(diff, 0.0, "{name} changed");
        }
    }
    assert!(moved > 10, "only {moved} decoder tensors moved");
    // Without a MoVQ to start from there is no decoder to train alone.
    let res = bin()
        .args(["train", "movq", "--decoder-only", "--out"])
        .arg(dir.path().join("none"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("--init"));
    assert!(!dir.path().join("none").exists());
}

#[test]
fn train_clip_exports_towers_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clip");
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(&out)
        .args(["--steps", "2", "--batch", "4", "--tokenizer"])
        .arg(fixture("tokenizers/clip"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let d = candle_core::Device::Cpu;
    kandinsky::models::clip::ClipTextModelWithProjection::load(
        &out.join("text_encoder"),
        candle_core::DType::F32,
        &d,
    )
    .unwrap();
    kandinsky::models::clip::ClipVisionModelWithProjection::load(
        &out.join("image_encoder"),
        candle_core::DType::F32,
        &d,
    )
    .unwrap();
    // A missing vocabulary is a clear error.
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(dir.path().join("x"))
        .args(["--steps", "1", "--tokenizer", "/no/such/dir"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("CLIP vocabulary"),
        "{err}"
    );
}

#[test]
fn train_prior_against_a_trained_clip() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    let tok = fixture("tokenizers/clip");
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(&clip)
        .args(["--steps", "1", "--batch", "2", "--tokenizer", &tok])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let prior = dir.path().join("prior");
    let res = bin()
        .args(["train", "prior", "--out"])
        .arg(&prior)
        .arg("--clip")
        .arg(&clip)
        .args(["--steps", "2", "--batch", "4"])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    kandinsky::models::transformers::prior_transformer::PriorTransformer::load(
        &prior.join("prior"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // Without a trained CLIP it says so.
    let res = bin()
        .args(["train", "prior", "--out"])
        .arg(dir.path().join("p2"))
        .args(["--clip", "/no/such/clip", "--steps", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("trained CLIP"),
        "{err}"
    );
}

#[test]
fn train_mclip_exports_an_encoder_and_tokenizer_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    let tok = fixture("tokenizers/clip");
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(&clip)
        .args(["--steps", "1", "--batch", "2", "--tokenizer", &tok])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let out = dir.path().join("mclip");
    let res = bin()
        .args(["train", "mclip", "--out"])
        .arg(&out)
        .arg("--clip")
        .arg(&clip)
        .args(["--steps", "2", "--batch", "4", "--pieces"])
        .arg(fixture("tokenizers/xlm_roberta/pieces.tsv.gz"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    kandinsky::pipelines::kandinsky::text_encoder::MultilingualClip::load(
        &out.join("text_encoder"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    kandinsky::tokenization::PromptTokenizer::xlm_roberta_from_dir(&out.join("tokenizer")).unwrap();
}

/// The decoder stages chain: MoVQ, CLIP and M-CLIP outputs feed the UNet and inpainting UNet.
#[test]
fn train_unet_and_inpainting_unet_on_trained_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let tok = fixture("tokenizers/clip");
    let pieces = fixture("tokenizers/xlm_roberta/pieces.tsv.gz");
    // A decoder UNet stage on the trained teachers: `flags`, then its output, the teachers and
    // the pool's size, then `more`.
    let unet = |flags: &[&str], out: &str, more: &[&str]| {
        let mut a = strings(&["train", "unet"]);
        a.extend(strings(flags));
        a.extend(strings(&[
            "--out",
            &p(out),
            "--movq",
            &p("movq"),
            "--clip",
            &p("clip"),
            "--mclip",
            &p("mclip"),
            "--batch",
            "2",
            "--pool",
            "3",
        ]));
        a.extend(strings(more));
        a
    };
    let cache = p("pool.safetensors");
    let (unet_dir, unet_2_2) = (p("unet"), p("unet-2-2"));
    let runs: Vec<Vec<String>> = vec![
        strings(&[
            "train",
            "movq",
            "--out",
            &p("movq"),
            "--steps",
            "1",
            "--batch",
            "1",
        ]),
        strings(&[
            "train",
            "clip",
            "--out",
            &p("clip"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--tokenizer",
            &tok,
        ]),
        strings(&[
            "train",
            "mclip",
            "--out",
            &p("mclip"),
            "--clip",
            &p("clip"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--pieces",
            &pieces,
        ]),
        unet(&[], "unet", &["--steps", "2", "--pool-cache", &cache]),
        // The 2.1 inpainting UNet predicts v, which its assembled scheduler must say.
        unet(
            &["--inpaint"],
            "inpaint",
            &[
                "--steps",
                "1",
                "--init",
                &unet_dir,
                "--prediction-type",
                "v_prediction",
            ],
        ),
        // The 2.2 sibling: its decoder starts from the 2.1 one (on the latent grid, as the
        // recipe trains it), its inpainting UNet and depth ControlNet from its decoder.
        unet(
            &["--family", "2.2", "--grid-aligned"],
            "unet-2-2",
            &["--steps", "1", "--pool-cache", &cache, "--init", &unet_dir],
        ),
        unet(
            &[
                "--family",
                "2.2",
                "--inpaint",
                "--mismatch",
                "0.5",
                "--drift",
                "1",
                "--drift-in-image",
                "--kept-weight",
                "2",
            ],
            "inpaint-2-2",
            &["--steps", "1", "--pool-cache", &cache, "--init", &unet_2_2],
        ),
        unet(
            &["--family", "2.2", "--depth-control", "--moved", "0.5"],
            "depth-2-2",
            &["--steps", "1", "--pool-cache", &cache, "--init", &unet_2_2],
        ),
    ];
    let mut logs = vec![];
    for args in &runs {
        let res = bin().args(args).output().unwrap();
        let log = String::from_utf8_lossy(&res.stderr).to_string();
        assert!(res.status.success(), "{args:?}: {log}");
        logs.push(log);
    }
    // The UNet wrote the teachers' pool; the inpainting UNet (same teachers, seed and size) reused
    // it and trained to the same bits as with a freshly built pool; another size is not reused.
    assert!(
        logs[3].contains("teacher outputs for 3 examples in"),
        "{}",
        logs[3]
    );
    // A pool placed on the grid is another pool: the 2.2 decoder did not take the free one from
    // the cache, and the 2.2 inpainting UNet after it did not take the grid one.
    for i in [5, 6] {
        assert!(
            logs[i].contains("teacher outputs for 3 examples in"),
            "{}",
            logs[i]
        );
    }
    assert!(logs[7].contains("reused from"), "{}", logs[7]);
    let mut cached = runs[4].clone();
    cached.extend(strings(&["--pool-cache", &p("pool.safetensors")]));
    let mut cached_out = cached.clone();
    cached_out[4] = p("inpaint-cached");
    let res = bin().args(&cached_out).output().unwrap();
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success() && log.contains("reused from"), "{log}");
    let inpaint_weights = |d: &str| {
        std::fs::read(
            dir.path()
                .join(d)
                .join("unet/diffusion_pytorch_model.safetensors"),
        )
        .unwrap()
    };
    assert!(inpaint_weights("inpaint") == inpaint_weights("inpaint-cached"));
    let mut other = cached.clone();
    other[4] = p("inpaint-other");
    let at = other.iter().position(|a| a == "--pool").unwrap();
    other[at + 1] = "2".into();
    let res = bin().args(&other).output().unwrap();
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success() && log.contains("teacher outputs for 2 examples in"),
        "{log}"
    );
    for (d, ch) in [("unet", 4), ("inpaint", 9)] {
        let unet = kandinsky::models::UNet2DConditionModel::load(
            &dir.path().join(d).join("unet"),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(unet.config().in_channels, ch);
    }
    // The inpainting UNet started from the text-to-image one: one small step away from it.
    let weights = |d: &str| {
        candle_core::safetensors::load(
            dir.path()
                .join(d)
                .join("unet/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (base, inpaint) = (weights("unet"), weights("inpaint"));
    let w = "conv_out.weight";
    let diff = (&inpaint[w] - &base[w]).unwrap().abs().unwrap();
    let max_diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = base[w]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max_diff < 0.1 * scale, "{max_diff} vs {scale}");
    assert_eq!(inpaint["conv_in.weight"].dims(), &[64, 9, 3, 3]);
    // The 2.2 UNets: image conditioning only, the text's parameters gone, the resnets carried
    // over from the 2.1 UNet (one step away), the ControlNet's hint block added.
    for (d, ch, embed) in [
        ("unet-2-2", 4, "image"),
        ("inpaint-2-2", 9, "image"),
        ("depth-2-2", 8, "image_hint"),
    ] {
        let unet = kandinsky::models::UNet2DConditionModel::load(
            &dir.path().join(d).join("unet"),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(unet.config().in_channels, ch, "{d}");
        assert_eq!(unet.config().addition_embed_type.as_deref(), Some(embed));
        let w = weights(d);
        assert!(!w.keys().any(|k| k.contains("text_proj")), "{d}");
        assert_eq!(
            w["encoder_hid_proj.image_embeds.weight"].dims(),
            &[32 * 64, 64]
        );
        let r = "down_blocks.0.resnets.0.conv1.weight";
        let diff = (&w[r] - &base[r])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 0.05, "{d}");
        assert_eq!(
            w.keys()
                .any(|k| k.starts_with("add_embedding.input_hint_block")),
            d == "depth-2-2"
        );
    }
    // The prior, then the assembled model directories generate through the ordinary commands.
    let more: Vec<Vec<String>> = vec![
        strings(&[
            "train",
            "prior",
            "--out",
            &p("prior"),
            "--clip",
            &p("clip"),
            "--steps",
            "1",
            "--batch",
            "2",
        ]),
        strings(&["train", "assemble", "--runs", &p(""), "--out", &p("model")]),
    ];
    for args in more {
        let res = bin().args(&args).output().unwrap();
        assert!(
            res.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    let model = |d: &str| dir.path().join("model").join(d).display().to_string();
    for (d, prediction) in [
        ("decoder", "epsilon"),
        ("decoder-inpaint", "v_prediction"),
        ("decoder-2-2-inpaint", "epsilon"),
    ] {
        let path = dir
            .path()
            .join("model")
            .join(d)
            .join("scheduler/scheduler_config.json");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(config["prediction_type"], prediction, "{d}");
    }
    let out = dir.path().join("gen.png");
    let common = strings(&[
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--prior-steps",
        "2",
        "--seed",
        "1",
    ]);
    let mut g = strings(&[
        "generate",
        "--prompt",
        "a small red circle on the left on a blue background",
    ]);
    g.extend(strings(&[
        "--model",
        &model("decoder"),
        "--prior",
        &model("prior"),
    ]));
    g.extend(common.clone());
    run_ok(&g, &out);
    assert_eq!(image::open(&out).unwrap().width(), 64);
    let mut i = strings(&[
        "inpaint",
        "--prompt",
        "большой зелёный треугольник сверху, фон белый",
        "--image",
    ]);
    i.push(fixture("images/drawing_64x64.png"));
    i.push("--mask".into());
    i.push(fixture("images/mask_64x64.png"));
    i.extend(strings(&[
        "--model",
        &model("decoder-inpaint"),
        "--prior",
        &model("prior"),
    ]));
    i.extend(common.clone());
    run_ok(&i, &dir.path().join("inp.png"));
    // The 2.2 sibling's directories generate through the same commands (the prior is shared).
    let mut g = strings(&[
        "generate",
        "--prompt",
        "a large yellow square at the top on a black background",
        "--model",
        &model("decoder-2-2"),
        "--prior",
        &model("prior"),
    ]);
    g.extend(common.clone());
    run_ok(&g, &dir.path().join("gen-2-2.png"));
    let mut c = strings(&[
        "controlnet",
        "--prompt",
        "a small green circle on the right on a red background",
        "--hint",
        &fixture("images/drawing_64x64.png"),
        "--model",
        &model("decoder-2-2-controlnet-depth"),
        "--prior",
        &model("prior"),
    ]);
    c.extend(common.clone());
    run_ok(&c, &dir.path().join("depth-2-2.png"));
    assert_eq!(
        image::open(dir.path().join("depth-2-2.png"))
            .unwrap()
            .width(),
        64
    );
    // The evaluation runs on the assembled model and prints its table.
    let res = bin()
        .args([
            "eval",
            "shapes",
            "--model",
            &model("decoder"),
            "--prior",
            &model("prior"),
        ])
        .args([
            "--n",
            "4",
            "--batch",
            "2",
            "--steps",
            "2",
            "--prior-steps",
            "2",
            "--inpaint-model",
            &model("decoder-inpaint"),
            "--inpaint-n",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        stdout.contains("| real images (analyser ceiling) | 8 | 100.0 %"),
        "{stdout}"
    );
    assert!(stdout.contains("generated, Russian"), "{stdout}");
    // The confusion tables count every generated image once (4 per language): shape asked
    // against read, per size, and object colour asked against read.
    let counted = |rows: &[&str]| -> usize {
        stdout
            .lines()
            .filter(|l| rows.iter().any(|r| l.starts_with(&format!("| {r} |"))))
            .flat_map(|l| {
                l.split('|')
                    .filter_map(|c| c.trim().parse::<usize>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    };
    assert_eq!(counted(&["circle", "square", "triangle"]), 8, "{stdout}");
    let colours = [
        "red", "orange", "yellow", "green", "blue", "purple", "white", "black",
    ];
    assert_eq!(counted(&colours), 8, "{stdout}");
    // `eval movq` scores the same round trips as the table's MoVQ row, one row per language.
    let movq_row = stdout
        .lines()
        .find(|l| l.starts_with("| MoVQ round trip of the real images"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let percentages = |row: &str| -> Vec<f64> {
        row.split('|')
            .filter_map(|c| c.trim().strip_suffix(" %")?.parse().ok())
            .collect()
    };
    let error_of = |text: &str, prefix: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(prefix)).unwrap();
        let e = line
            .rsplit("error ")
            .next()
            .unwrap()
            .trim_end_matches("/255");
        e.parse().unwrap_or_else(|_| panic!("{line}"))
    };
    let res = bin()
        .args(["eval", "movq", "--movq", &model("decoder"), "--n", "4"])
        .output()
        .unwrap();
    let per_language = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let rows: Vec<&str> = per_language
        .lines()
        .filter(|l| l.starts_with("| MoVQ round trip, "))
        .collect();
    assert_eq!(rows.len(), 2, "{per_language}");
    let (en, ru) = (percentages(rows[0]), percentages(rows[1]));
    let both = percentages(movq_row);
    assert_eq!(both.len(), 5, "{movq_row}");
    for i in 0..5 {
        assert!(
            (both[i] - (en[i] + ru[i]) / 2.0).abs() < 0.01,
            "{movq_row}\n{per_language}"
        );
    }
    let cell = |row: &str| -> f64 { row.split('|').nth(8).unwrap().trim().parse().unwrap() };
    let mean = (cell(rows[0]) + cell(rows[1])) / 2.0;
    let table = error_of(&stdout, "MoVQ round trip of the real images");
    assert!((mean - table).abs() < 0.011, "{mean} against {table}");
    // The inpainting section: the kept pixels' change and the MoVQ's floor, in 1/255.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| inpainted, Russian | 2 |"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let cells: Vec<f64> = row
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert_eq!(cells.len(), 6, "{row}");
    assert!(
        cells[1..].iter().all(|v| (0.0..=255.0).contains(v)),
        "{row}"
    );
    assert!(
        cells[2] >= cells[1],
        "the worst image is below the mean: {row}"
    );
    // The first two scenes repaint a half: the band is one latent column (4 of 32 pixel
    // columns) of the kept half, so the kept change is 1/8 band + 7/8 rest (the table rounds
    // each to 0.01).
    let (kept, band, rest) = (cells[1], cells[4], cells[5]);
    assert!(
        (kept - (band + 7.0 * rest) / 8.0).abs() < 0.011,
        "kept {kept} is not 1/8 band + 7/8 rest: {row}"
    );
    // The 2.2 sibling under another sampler, with its inpainting and ControlNet sections.
    let res = bin()
        .args(["eval", "shapes", "--model", &model("decoder-2-2")])
        .args(["--prior", &model("prior"), "--scheduler", "dpm++2m"])
        .args([
            "--n",
            "2",
            "--batch",
            "2",
            "--steps",
            "2",
            "--prior-steps",
            "2",
        ])
        .args(["--inpaint-model", &model("decoder-2-2-inpaint")])
        .args(["--inpaint-n", "1", "--controlnet-n", "2"])
        .args(["--controlnet-model", &model("decoder-2-2-controlnet-depth")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for row in [
        "| generated, English | 2 |",
        "| inpainted, Russian | 1 |",
        "| depth ControlNet, English | 2 |",
        "| depth ControlNet, Russian | 2 |",
    ] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
}

/// The optimizer step a checkpoint holds, reading every tensor (a truncated file fails here).
fn checkpoint_step(path: &std::path::Path) -> i64 {
    let all = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{} is not a complete checkpoint: {e}", path.display()));
    assert!(
        all.len() > 3,
        "{} holds {} tensors",
        path.display(),
        all.len()
    );
    all["adamw.step"].to_vec1::<i64>().unwrap()[0]
}

#[test]
fn a_training_run_killed_while_checkpointing_resumes_from_a_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let ckpt = out.join("checkpoint.safetensors");
    let tmp = out.join("checkpoint.tmp");
    let steps = 16;
    let args = strings(&[
        "train",
        "movq",
        "--out",
        &out.display().to_string(),
        "--steps",
        &steps.to_string(),
        "--batch",
        "1",
        "--checkpoint-every",
        "1",
    ]);
    let (mut mid_write, mut last_step) = (0, 0);
    for attempt in 0..6 {
        let mut child = bin()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // SIGKILL the moment a checkpoint is being written (nothing can clean up after it),
        // letting more saves complete first in each attempt so that the run progresses.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let running = |child: &mut std::process::Child| {
            child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline
        };
        for save in 0..=attempt {
            while !tmp.exists() && running(&mut child) {}
            if save < attempt {
                while tmp.exists() && running(&mut child) {}
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if tmp.exists() {
            mid_write += 1;
        }
        if ckpt.exists() {
            let step = checkpoint_step(&ckpt);
            assert!(
                step >= last_step && step < steps,
                "step {step} after {last_step}"
            );
            last_step = step;
        }
        if mid_write >= 3 {
            break;
        }
    }
    assert!(
        mid_write >= 1,
        "no kill landed while a checkpoint was being written"
    );
    assert!(last_step > 0, "no checkpoint survived the kills");
    eprintln!("{mid_write} kills while writing a checkpoint; resuming from step {last_step}");
    let res = bin().args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success() && stdout.contains(&format!("steps {last_step}..{steps}")),
        "{stdout}{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(checkpoint_step(&ckpt), steps);
    assert!(!tmp.exists(), "a temporary checkpoint was left behind");
    let names: Vec<_> = std::fs::read_dir(out.join("movq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")) && names.len() == 2,
        "{names:?}"
    );
}

/// The second generation's flags refuse what they cannot do, before any work and any output.
#[test]
fn new_training_flags_refuse_bad_values_before_working() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.display().to_string();
    let unet = |extra: &[&str]| {
        let mut a = strings(&["train", "unet", "--out", &o, "--movq", "/m", "--clip", "/c"]);
        a.extend(strings(&["--mclip", "/x"]));
        a.extend(strings(extra));
        a
    };
    let decoder_only = |extra: &[&str]| {
        let mut a = strings(&[
            "train",
            "movq",
            "--out",
            &o,
            "--init",
            "/m",
            "--decoder-only",
        ]);
        a.extend(strings(extra));
        a
    };
    for (args, message) in [
        (
            strings(&["train", "movq", "--out", &o, "--latent-channels", "0"]),
            "--latent-channels",
        ),
        (strings(&["train", "movq", "--out", &o, "--l1=-1"]), "--l1"),
        (
            strings(&["train", "movq", "--out", &o, "--collage", "1.5"]),
            "--collage",
        ),
        (
            strings(&["train", "movq", "--out", &o, "--codebook-size", "1"]),
            "--codebook-size",
        ),
        (decoder_only(&["--composite", "1.5"]), "--composite"),
        (
            decoder_only(&["--composite", "0.5", "--foreign-noise", "nan"]),
            "--foreign-noise",
        ),
        (unet(&["--depth-control"]), "--family 2.2"),
        (unet(&["--moved", "0.5"]), "--moved"),
        (
            unet(&["--family", "2.2", "--depth-control", "--moved", "2"]),
            "--moved",
        ),
        (unet(&["--family", "2.3"]), "2.3"),
        (unet(&["--inpaint", "--drift", "0.5"]), "--drift"),
        (
            unet(&["--inpaint", "--mismatch", "0.3", "--drift", "2"]),
            "--drift",
        ),
        (
            unet(&["--inpaint", "--mismatch", "0.3", "--drift-in-image"]),
            "--drift-in-image needs --drift",
        ),
        (unet(&["--kept-weight", "2"]), "--kept-weight"),
        (unet(&["--inpaint", "--kept-weight=-1"]), "--kept-weight"),
        (unet(&["--max-timestep", "1001"]), "--max-timestep"),
        (unet(&["--inpaint", "--depth-control"]), "cannot be used"),
        (unet(&["--band-weight", "4"]), "--band-weight"),
        (unet(&["--cond-dropout", "1.5"]), "--cond-dropout"),
        (unet(&["--cond-dropout", "nan"]), "--cond-dropout"),
        (unet(&["--inpaint", "--band-weight=-1"]), "--band-weight"),
        (unet(&["--new-input-lr", "10"]), "--new-input-lr"),
        (
            unet(&["--inpaint", "--new-input-lr", "inf"]),
            "--new-input-lr",
        ),
        (
            strings(&[
                "train", "prior", "--out", &o, "--clip", "/c", "--pool", "300000",
            ]),
            "--pool is at most",
        ),
    ] {
        let res = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{args:?} succeeded");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// `eval movq` and `eval shapes` refuse sizes they cannot do (an evaluation keeps every image in
/// memory) and MoVQs that are not there.
#[test]
fn evaluations_refuse_bad_sizes_and_missing_models_before_working() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-movq").display().to_string();
    for (args, message) in [
        (strings(&["eval", "movq", "--n", "0"]), "at least 1"),
        (strings(&["eval", "movq", "--n", "10001"]), "at most 10000"),
        (
            strings(&["eval", "movq", "--movq", &missing]),
            "no-such-movq",
        ),
        (
            strings(&["eval", "shapes", "--inpaint-n", "99999999"]),
            "--inpaint-n must be at most 10000",
        ),
        (
            strings(&["eval", "shapes", "--n", "4000000000"]),
            "--n must be at most 10000",
        ),
    ] {
        let res = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{args:?} succeeded");
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

/// `train refine` writes a decoder's own latents for training images, and `train movq
/// --decoder-only --refined` trains on them; latents of another data seed are refused.
#[test]
fn train_refine_writes_latents_that_the_decoder_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let refined = dir.path().join("refined.safetensors");
    let r = refined.display().to_string();
    let (t2i, inpaint) = (
        fixture("pipelines/tiny-2-1"),
        fixture("pipelines/tiny-2-1-inpaint"),
    );
    let refine_with = |decoder: &str, extra: &[&str]| {
        let mut a = strings(&["train", "refine", "--decoder", decoder]);
        a.extend(strings(&["--prior", &fixture("pipelines/tiny-2-1-prior")]));
        a.extend(strings(&["--out", &r, "--steps", "4"]));
        a.extend(strings(extra));
        a
    };
    let refine = |extra: &[&str]| refine_with(&t2i, extra);
    for (extra, needle) in [
        (&["--strength-min", "0"][..], "0 < --strength-min"),
        (
            &["--strength-min", "0.6", "--strength-max", "0.5"][..],
            "0 < --strength-min",
        ),
        (&["--n", "0"][..], "--n is between"),
        (&["--strength-min", "0.2"][..], "no denoising step"),
        (&["--chunk", "300"][..], "--chunk between"),
    ] {
        let res = bin().args(refine(extra)).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success() && err.contains(needle),
            "{extra:?}: {err}"
        );
        assert!(!refined.exists(), "{extra:?} left an output file");
    }
    // An inpainting decoder, or a directory as the output file, is refused before any work.
    for (args, needle) in [
        (
            refine_with(&inpaint, &["--strength-min", "0.5"]),
            "text-to-image decoder",
        ),
        (
            refine_with(&t2i, &["--strength-min", "0.5"])
                .into_iter()
                .map(|a| {
                    if a == r {
                        dir.path().display().to_string()
                    } else {
                        a
                    }
                })
                .collect(),
            "is a directory",
        ),
    ] {
        let res = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && err.contains(needle), "{err}");
        assert!(!refined.exists());
    }
    let res = bin()
        .args(refine(&[
            "--chunk",
            "2",
            "--n",
            "5",
            "--strength-min",
            "0.3",
            "--strength-max",
            "0.6",
        ]))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let t = candle_core::safetensors::load(&refined, &candle_core::Device::Cpu).unwrap();
    let (n, c, _, _) = t["latents"].dims4().unwrap();
    assert_eq!((n, c), (5, 4));
    assert_eq!(t["indices"].to_vec1::<i64>().unwrap(), vec![0, 1, 2, 3, 4]);
    let latents = t["latents"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(latents.iter().all(|v| v.is_finite()));
    let movq = |seed: &str, out: &std::path::Path| {
        bin()
            .args(["train", "movq", "--init", &fixture("pipelines/tiny-2-1")])
            .args([
                "--decoder-only",
                "--refined",
                &r,
                "--steps",
                "2",
                "--batch",
                "2",
            ])
            .args(["--seed", seed, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.path().join("movq");
    let res = movq("0", &out);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(out
        .join("movq/diffusion_pytorch_model.safetensors")
        .is_file());
    let other = dir.path().join("other");
    let res = movq("1", &other);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("seed"), "{err}");
    assert!(!other.exists());
}
