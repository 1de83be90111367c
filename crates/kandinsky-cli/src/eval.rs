//! `kandinsky eval shapes`: generates images for held-out prompts of the synthetic world in
//! English and Russian, scores them with the pixel analyser, and reports the Fréchet distance to
//! real images in the model's CLIP image-embedding space, next to the analyser's ceiling on the
//! real images.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use kandinsky::image_io::{save_png, to_rgb8};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::DecoderParams;
use kandinsky::training::eval::{frechet_distance, score, Accuracy};
use kandinsky::training::shapes::{eval_prompts, Language, Rng, Scene};
use kandinsky::utils::torch_utils::TorchGenerator;

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Score generated images of held-out shape prompts (EN and RU).
    Shapes(ShapesArgs),
}

#[derive(clap::Args)]
struct ShapesArgs {
    /// The 2.1-style decoder directory (`KandinskyPipeline`); default `models/small/decoder`.
    #[arg(long)]
    model: Option<String>,
    /// The prior directory; default `models/small/prior`.
    #[arg(long)]
    prior: Option<String>,
    /// Prompts per language.
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Decoder steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Prior steps.
    #[arg(long, default_value_t = 25)]
    prior_steps: usize,
    /// Decoder guidance.
    #[arg(long, default_value_t = 4.0)]
    guidance: f64,
    /// Prior guidance.
    #[arg(long, default_value_t = 4.0)]
    prior_guidance: f64,
    /// Seed of the generator (one per language).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts generated together.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Diagnostic: condition the decoder on the CLIP image embedding of a real render of each
    /// scene instead of the prior's sample, which measures the decoder alone.
    #[arg(long)]
    oracle: bool,
    /// Also write every generated image to this directory as `en-000.png`, `ru-000.png`, …,
    /// with its prompt in the PNG's `parameters` text.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
}

const SIDE: usize = 64;

fn row(name: &str, a: &Accuracy, fd: Option<f64>) -> String {
    let pct = |v: f64| format!("{:.1} %", 100.0 * v);
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} |",
        a.n,
        pct(a.background),
        pct(a.colour),
        pct(a.shape),
        pct(a.position),
        pct(a.size),
        fd.map_or("—".to_string(), |f| format!("{f:.3}"))
    )
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let What::Shapes(s) = &a.what;
    if s.n < 2 || s.batch == 0 || s.steps == 0 || s.prior_steps < 2 {
        bail!("--n must be at least 2, --batch and --steps at least 1, --prior-steps at least 2");
    }
    if let Some(dir) = &s.save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let device = Device::Cpu;
    let prior_dir = crate::generate::given_or_small(s.prior.as_deref(), "prior")?;
    let model_dir = crate::generate::given_or_small(s.model.as_deref(), "decoder")?;
    let prior = KandinskyPriorPipeline::load(&prior_dir, DType::F32, &device)
        .with_context(|| format!("loading the prior from {}", prior_dir.display()))?;
    let decoder = KandinskyPipeline::load(&model_dir, DType::F32, &device)
        .with_context(|| format!("loading the decoder from {}", model_dir.display()))?;
    let features = |e: &candle_core::Tensor| -> Result<Vec<f64>> {
        Ok(e.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let mut rows = Vec::new();
    let mut all_real: Vec<(Vec<u8>, Scene)> = Vec::new();
    for (lang, name, tag) in [
        (Language::En, "generated, English", "en"),
        (Language::Ru, "generated, Russian", "ru"),
    ] {
        let prompts = eval_prompts(lang, s.n);
        let mut gen = TorchGenerator::new(s.seed);
        let mut images = Vec::new();
        let mut scenes = Vec::new();
        let mut rng = Rng::new(s.seed ^ lang as u64);
        let real: Vec<Vec<u8>> = prompts
            .iter()
            .map(|(sc, _)| sc.render(SIDE, &mut rng))
            .collect();
        // The real renders' CLIP embeddings: the prior's reference, the oracle's conditioning
        // and the Fréchet distance's second set.
        let real_emb = real
            .iter()
            .map(|rgb| prior.embed_image(SIDE, SIDE, rgb))
            .collect::<kandinsky::Result<Vec<_>>>()?;
        let (mut cos_sum, mut cos_n) = (0.0, 0usize);
        for (i, chunk) in prompts.chunks(s.batch).enumerate() {
            let texts: Vec<String> = chunk.iter().map(|(_, t)| t.clone()).collect();
            let params = PriorParams {
                steps: s.prior_steps,
                guidance_scale: s.prior_guidance,
                num_images_per_prompt: 1,
            };
            let (emb, neg) = prior.call(&texts, None, params, &mut gen, None, &mut |_, _| {})?;
            let truth =
                candle_core::Tensor::cat(&real_emb[i * s.batch..i * s.batch + chunk.len()], 0)?;
            let cos = (&emb * &truth)?.sum(1)?
                / (emb.sqr()?.sum(1)?.sqrt()? * truth.sqr()?.sum(1)?.sqrt()?)?;
            cos_sum += cos?.sum_all()?.to_scalar::<f32>()? as f64;
            cos_n += chunk.len();
            let emb = if s.oracle { truth } else { emb };
            let dp = DecoderParams {
                height: SIDE,
                width: SIDE,
                steps: s.steps,
                guidance_scale: s.guidance,
            };
            let out = decoder.call(&texts, None, &emb, &neg, dp, &mut gen, None, &mut |_, _| {})?;
            for ((_, _, rgb), text) in to_rgb8(&out)?.into_iter().zip(&texts) {
                if let Some(dir) = &s.save {
                    let path = dir.join(format!("{tag}-{:03}.png", images.len()));
                    save_png(&path, SIDE, SIDE, &rgb, &[("parameters", text)])?;
                }
                images.push(rgb);
            }
            scenes.extend(chunk.iter().map(|(sc, _)| *sc));
            eprint!("\r{name}: {}/{}", ((i + 1) * s.batch).min(s.n), s.n);
        }
        eprintln!();
        eprintln!(
            "{name}: mean cosine between the prior's embedding and the real image's: {:.3}",
            cos_sum / cos_n as f64
        );
        let fa: Vec<Vec<f64>> = images
            .iter()
            .map(|rgb| features(&prior.embed_image(SIDE, SIDE, rgb)?))
            .collect::<Result<_>>()?;
        let fb: Vec<Vec<f64>> = real_emb.iter().map(features).collect::<Result<_>>()?;
        let fd = frechet_distance(&fa, &fb)?;
        rows.push(row(name, &score(&images, &scenes, SIDE), Some(fd)));
        all_real.extend(real.into_iter().zip(scenes));
    }
    let (real, scenes): (Vec<Vec<u8>>, Vec<Scene>) = all_real.into_iter().unzip();
    rows.push(row(
        "real images (analyser ceiling)",
        &score(&real, &scenes, SIDE),
        None,
    ));
    println!("| images | n | background | object colour | shape | position | size | Fréchet distance (CLIP) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
