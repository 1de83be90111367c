//! `kandinsky batch`: text to image for every line of a JSONL file (COCO-30K style), resumable
//! and split into shards over machines: a line's image depends on that line alone (its parameters
//! and its seed), so any split gives the same files.

use anyhow::{bail, Context, Result};
use kandinsky::pipelines::auto_pipeline::{AutoPipeline, LoadOptions, Request, TextToImage};
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::save_png;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::generate::SchedulerChoice;

#[derive(clap::Args)]
pub struct BatchArgs {
    /// One JSON object per line: `prompt` (required) and any of `negative_prompt`, `seed`,
    /// `width`, `height`, `steps`, `prior_steps`, `guidance`, `prior_guidance`, `scheduler`,
    /// `num_images`. Blank lines are skipped; line numbers name the outputs.
    #[arg(long)]
    prompts: PathBuf,
    /// Output directory (created): `<line>.png` (`<line>-<k>.png` with several images per line)
    /// and `manifest-<i>-of-<n>.jsonl`, one record per finished line.
    #[arg(long)]
    output: PathBuf,
    /// `i/n` (0 ≤ i < n): this process does the lines whose number ≡ i + 1 (mod n). `auto`:
    /// from Kubernetes Indexed Jobs (`JOB_COMPLETION_INDEX`, and `JOB_COMPLETIONS` set to the
    /// Job's completions) or Slurm job arrays (`SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN`,
    /// `SLURM_ARRAY_TASK_COUNT`).
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// Seed of a line without one: this plus its line number.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decoder model (as `generate --model`); default: our small model.
    #[arg(long)]
    model: Option<String>,
    /// Prior model (as `generate --prior`).
    #[arg(long)]
    prior: Option<String>,
    /// Defaults of the lines' settings.
    #[command(flatten)]
    sampling: crate::generate::SamplingArgs,
    /// Default sampler.
    #[arg(long, value_enum, default_value_t = SchedulerChoice::Default)]
    scheduler: SchedulerChoice,
}

/// One line of the prompts file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    width: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    height: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prior_steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prior_guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_images: Option<usize>,
}

/// Lines per file at most, and images per line: checked before any work.
const MAX_LINES: usize = 10_000_000;
const MAX_IMAGES_PER_LINE: usize = 64;

/// `(index, count)` from `--shard`.
fn parse_shard(spec: &str) -> Result<(usize, usize)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let num = |k: &str, v: String| -> Result<usize> {
        v.trim()
            .parse()
            .with_context(|| format!("{k}={v} is not a number"))
    };
    let (i, n) = if spec == "auto" {
        if let Some(i) = env("JOB_COMPLETION_INDEX") {
            let n = env("JOB_COMPLETIONS").context(
                "--shard auto: JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not (set it to the Job's .spec.completions, as deploy/kubernetes-job.yaml does)",
            )?;
            (num("JOB_COMPLETION_INDEX", i)?, num("JOB_COMPLETIONS", n)?)
        } else if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
            let min =
                env("SLURM_ARRAY_TASK_MIN").map_or(Ok(0), |m| num("SLURM_ARRAY_TASK_MIN", m))?;
            let n = env("SLURM_ARRAY_TASK_COUNT").context(
                "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not",
            )?;
            let id = num("SLURM_ARRAY_TASK_ID", id)?;
            let i = id.checked_sub(min).with_context(|| {
                format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
            })?;
            (i, num("SLURM_ARRAY_TASK_COUNT", n)?)
        } else {
            bail!("--shard auto: neither a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) nor a Slurm array (SLURM_ARRAY_TASK_ID) is set; pass --shard i/n");
        }
    } else {
        let (i, n) = spec
            .split_once('/')
            .with_context(|| format!("--shard {spec}: expected i/n or auto"))?;
        (
            num("--shard", i.to_string())?,
            num("--shard", n.to_string())?,
        )
    };
    if n == 0 || i >= n {
        bail!("shard {i}/{n}: need 0 ≤ i < n");
    }
    Ok((i, n))
}

/// Every non-blank line with its 1-based number, parsed and checked for shape.
fn read_lines(path: &Path) -> Result<Vec<(usize, Line)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the prompts file {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() == MAX_LINES {
            bail!("{}: more than {MAX_LINES} lines", path.display());
        }
        let line: Line = serde_json::from_str(raw)
            .with_context(|| format!("{} line {}: not a valid request", path.display(), i + 1))?;
        if line
            .num_images
            .is_some_and(|n| n == 0 || n > MAX_IMAGES_PER_LINE)
        {
            bail!(
                "{} line {}: num_images must be 1..={MAX_IMAGES_PER_LINE}",
                path.display(),
                i + 1
            );
        }
        lines.push((i + 1, line));
    }
    if lines.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(lines)
}

/// The output files of line `n` with `k` images.
fn outputs(dir: &Path, n: usize, k: usize) -> Vec<PathBuf> {
    if k == 1 {
        vec![dir.join(format!("{n:06}.png"))]
    } else {
        (0..k)
            .map(|j| dir.join(format!("{n:06}-{j}.png")))
            .collect()
    }
}

pub fn run(a: &BatchArgs) -> Result<()> {
    let (shard, shards) = parse_shard(&a.shard)?;
    let lines = read_lines(&a.prompts)?;
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    let dirs = crate::generate::pipeline_dirs(a.model.as_deref(), a.prior.as_deref())?;
    let mut pipe = AutoPipeline::from_pretrained(
        &dirs.decoder,
        &dirs.prior,
        LoadOptions {
            keep_loaded: true,
            ..crate::load_options()?
        },
    )?;
    pipe.verify()?;
    // Every line of every shard is checked before any work, so all shards fail alike and early.
    let mut jobs = Vec::new();
    for (n, line) in &lines {
        let scheduler = match &line.scheduler {
            None => a.scheduler,
            Some(s) => <SchedulerChoice as clap::ValueEnum>::from_str(s, true)
                .map_err(|e| anyhow::anyhow!("line {n}: scheduler {s:?}: {e}"))?,
        };
        let mut request = Request::new(TextToImage {
            prompt: kandinsky::pipelines::auto_pipeline::Prompt {
                prompt: line.prompt.clone(),
                negative_prompt: line.negative_prompt.clone(),
            },
            latents: None,
            prior_latents: None,
        });
        let p = &mut request.params;
        p.width = line.width;
        p.height = line.height;
        p.steps = line.steps.unwrap_or(a.sampling.steps);
        p.prior_steps = line.prior_steps.unwrap_or(a.sampling.prior_steps);
        p.guidance = line.guidance.unwrap_or(a.sampling.guidance);
        p.prior_guidance = line.prior_guidance.unwrap_or(a.sampling.prior_guidance);
        p.num_images = line.num_images.unwrap_or(1);
        p.scheduler = scheduler.class();
        pipe.check(&request)
            .with_context(|| format!("{} line {n}", a.prompts.display()))?;
        if (n - 1) % shards == shard {
            let seed = line.seed.unwrap_or(a.seed.wrapping_add(*n as u64));
            jobs.push((*n, line.clone(), request, seed));
        }
    }
    let manifest_path = a.output.join(format!("manifest-{shard}-of-{shards}.jsonl"));
    let recorded: BTreeSet<usize> = std::fs::read_to_string(&manifest_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["line"].as_u64())
        .map(|n| n as usize)
        .collect();
    let mut manifest = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&manifest_path)
        .with_context(|| format!("cannot open {}", manifest_path.display()))?;
    let total = jobs.len();
    let start = Instant::now();
    let (mut made, mut skipped) = (0usize, 0usize);
    eprintln!(
        "shard {shard}/{shards}: {total} of {} lines → {}",
        lines.len(),
        a.output.display()
    );
    for (n, line, request, seed) in jobs {
        let files = outputs(&a.output, n, request.params.num_images);
        let done = files.iter().all(|f| f.is_file());
        if !done {
            let parameters = format!(
                "{}\nNegative prompt: {}\nSteps: {}, Prior steps: {}, CFG scale: {}, Prior CFG scale: {}, Seed: {seed}, Model: {}, Line: {n}",
                line.prompt,
                line.negative_prompt.as_deref().unwrap_or(""),
                request.params.steps,
                request.params.prior_steps,
                request.params.guidance,
                request.params.prior_guidance,
                a.model.as_deref().unwrap_or("small (models/small)"),
            );
            pipe.generate_chunked(
                request,
                &mut TorchGenerator::new(seed),
                &mut |_, _, _| {},
                &mut |k, image| save_png(&files[k], &image, &[("parameters", &parameters)]),
            )
            .with_context(|| format!("line {n}"))?;
            made += 1;
        } else {
            skipped += 1;
        }
        // The images are in place (written atomically) before their record: a process killed in
        // between leaves the images, and the next run records them without redoing them.
        if done && recorded.contains(&n) {
            continue;
        }
        let mut record = serde_json::to_value(&line)?;
        record["line"] = n.into();
        record["seed"] = seed.into();
        record["files"] = files
            .iter()
            .map(|f| f.file_name().map(|s| s.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .into();
        let mut text = serde_json::to_string(&record)?;
        text.push('\n');
        manifest
            .write_all(text.as_bytes())
            .and_then(|()| manifest.flush())
            .with_context(|| format!("cannot write {}", manifest_path.display()))?;
        let finished = made + skipped;
        if !done {
            let rate = made as f64 / start.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "line {n}: {finished}/{total} ({made} made, {skipped} already there), {:.2} lines/s, ETA {:.0} s",
                rate,
                (total - finished) as f64 / rate.max(1e-9)
            );
        }
    }
    println!(
        "shard {shard}/{shards}: {made} lines made, {skipped} already there, manifest {}",
        manifest_path.display()
    );
    Ok(())
}
