//! `kandinsky train <stage>`: trains one stage of our small Kandinsky on the synthetic shapes
//! world, resumable from `OUT/checkpoint.safetensors`, logging loss and progress.

use anyhow::{bail, Context, Result};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::KandinskyPriorPipeline;
use kandinsky_train::clip::train_clip;
use kandinsky_train::eval::EvalDecoder;
use kandinsky_train::mclip::train_mclip;
use kandinsky_train::movq::{
    movq_init, refine_latents, small_movq_config, train_movq, MovqLoss, RefineSettings,
    RefinedLatents,
};
use kandinsky_train::optim::AdamWConfig;
use kandinsky_train::prior::{train_prior, FrozenClip};
use kandinsky_train::shapes::Placement;
use kandinsky_train::tokenizer::read_pieces_tsv_gz;
use kandinsky_train::trainer::{TrainOptions, TrainReport};
use kandinsky_train::unet::{
    cached_pool, train_unet, unet_init, DecoderTeachers, Family, PoolOrigin, Prediction, UNetKind,
    UNetStage,
};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    stage: Stage,
}

impl TrainArgs {
    /// Whether the stage splits its work over threads of its own (the decoder UNets).
    pub fn runs_threads(&self) -> bool {
        matches!(self.stage, Stage::Unet { .. } | Stage::Refine { .. })
    }
}

#[derive(clap::Subcommand)]
enum Stage {
    /// The MoVQ autoencoder (reconstruction + VQ codebook/commitment losses).
    Movq {
        #[command(flatten)]
        args: StageArgs,
        /// Train the decoder on the unquantised latents, which Kandinsky's pipelines decode,
        /// instead of the quantised ones (straight-through).
        #[arg(long)]
        unquantised: bool,
        /// Weight of an L1 pixel loss beside the MSE.
        #[arg(long, default_value_t = 0.0)]
        l1: f64,
        /// Fraction of training images that are 2×2 collages of half-size renders (more
        /// edges and corners per step).
        #[arg(long, default_value_t = 0.0)]
        collage: f32,
        /// Entries of the codebook (Kandinsky's MoVQ has 16,384).
        #[arg(long, default_value_t = 256)]
        codebook_size: usize,
        /// Channels of the latent (Kandinsky's MoVQ has 4).
        #[arg(long, default_value_t = 4)]
        latent_channels: usize,
        /// Start from this trained MoVQ stage (its `movq/`); its config replaces
        /// `--codebook-size` and `--latent-channels`.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Train the decoder alone, on the unquantised latents of the `--init` MoVQ's frozen
        /// encoder, which keeps its latents (and every UNet trained on them) valid.
        #[arg(long, requires = "init")]
        decoder_only: bool,
        /// With `--decoder-only`: the fraction of images whose latents are composites, a random
        /// rectangle of latent cells from another image, decoded to the same composite of
        /// pixels (an inpainting pipeline's kept cells next to generated ones).
        #[arg(long, default_value_t = 0.0, requires = "decoder_only")]
        composite: f32,
        /// With `--composite`: half of the composites get Gaussian noise (standard deviation
        /// uniform up to this) on their foreign cells, and their loss counts only their own
        /// pixels, so that the decoder keeps those whatever the other cells hold (0: none).
        #[arg(long, default_value_t = 0.0, requires = "composite")]
        foreign_noise: f32,
        /// With `--decoder-only`: a file of `train refine`'s latents; each step decodes as many of
        /// them (to their source images) as plain latents, the two losses averaged (so is the
        /// logged reconstruction, which is then not comparable with a run without them).
        #[arg(long, requires = "decoder_only")]
        refined: Option<PathBuf>,
    },
    /// The decoder UNet's own latents for training images, for `train movq --decoder-only
    /// --refined`: each image noised part of the way and denoised again by a trained decoder
    /// (image-to-image with its caption and its CLIP image embedding).
    Refine {
        /// A decoder model directory of either family (`kandinsky-2-1` or `kandinsky-2-2`).
        #[arg(long)]
        decoder: PathBuf,
        /// A prior model directory (its CLIP image encoder embeds the images).
        #[arg(long)]
        prior: PathBuf,
        /// The output file (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Training examples `0..N`.
        #[arg(long, default_value_t = 2048)]
        n: usize,
        /// Sampler steps of the whole schedule.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Classifier-free guidance.
        #[arg(long, default_value_t = 4.0)]
        guidance: f64,
        /// Lowest image-to-image strength.
        #[arg(long, default_value_t = 0.05)]
        strength_min: f64,
        /// Highest image-to-image strength.
        #[arg(long, default_value_t = 0.5)]
        strength_max: f64,
        /// Examples denoised together (one strength each).
        #[arg(long, default_value_t = 16)]
        chunk: usize,
        /// Seed of the data (the MoVQ stage's `--seed`).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// The small CLIP: text and vision towers, contrastive on English and Russian captions.
    Clip {
        #[command(flatten)]
        args: StageArgs,
        /// The real CLIP BPE vocabulary (`vocab.json`, `merges.txt`), which the stage reduces to
        /// the captions' tokens and writes to `OUT/tokenizer/` for the stages after it.
        #[arg(long, default_value = "fixtures/tokenizers/clip")]
        tokenizer: PathBuf,
    },
    /// The M-CLIP text encoder (XLM-R), distilled to the trained CLIP's text embeddings; also
    /// writes its reduced XLM-R tokenizer.
    Mclip {
        #[command(flatten)]
        args: StageArgs,
        /// The CLIP stage's output directory (`text_encoder/`, `image_encoder/`, `tokenizer/`).
        #[arg(long)]
        clip: PathBuf,
        /// The real XLM-R pieces (`piece<TAB>score` lines, gzip).
        #[arg(long, default_value = "fixtures/tokenizers/xlm_roberta/pieces.tsv.gz")]
        pieces: PathBuf,
    },
    /// The decoder UNet (2.1: `text_image` conditioning; 2.2: `image`; ε prediction unless
    /// `--prediction-type` says otherwise, 10 % unconditional), or with `--inpaint` the
    /// 9-channel inpainting UNet (random rectangular masks), or with `--depth-control` the 2.2
    /// depth ControlNet, on MoVQ latents.
    Unet {
        #[command(flatten)]
        args: StageArgs,
        /// The MoVQ stage's output directory (`movq/`).
        #[arg(long)]
        movq: PathBuf,
        /// The CLIP stage's output directory (`image_encoder/`).
        #[arg(long)]
        clip: PathBuf,
        /// The M-CLIP stage's output directory (`text_encoder/`, `tokenizer/`).
        #[arg(long)]
        mclip: PathBuf,
        /// The Kandinsky family: 2.1 (`KandinskyPipeline`) or 2.2 (`KandinskyV22Pipeline`).
        #[arg(long, default_value = "2.1", value_parser = ["2.1", "2.2"])]
        family: String,
        /// Train the inpainting UNet instead.
        #[arg(long, conflicts_with = "depth_control")]
        inpaint: bool,
        /// Train the depth ControlNet (`KandinskyV22ControlnetPipeline`, 2.2 only) instead: the
        /// hint is the example's depth image at 8 times the latent's size.
        #[arg(long)]
        depth_control: bool,
        /// Training examples whose teacher outputs (latents, embeddings) are computed once and
        /// then drawn from with fresh noise.
        #[arg(long, default_value_t = 8192)]
        pool: usize,
        /// Weight the ε loss per timestep by `min(1/ᾱ_t, CAP)` (the v-prediction loss, capped),
        /// normalised to mean 1; 0 keeps the plain ε loss.
        #[arg(long, default_value_t = 0.0)]
        v_weight_cap: f64,
        /// Start from this trained UNet stage (its `unet/`): `conv_in` widened with zeros for
        /// the extra inputs of an inpainting UNet or a ControlNet; a 2.1 UNet's text parameters
        /// dropped for a 2.2 one.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Keep the teachers' outputs in this file: reused when it was written from the same
        /// teacher files (by content), seed, `--pool` and image size, otherwise built and
        /// written there. The recipe shares one between the UNet and the inpainting UNet, which
        /// draw from the same pool. (It records inputs, not the program: after changing the
        /// training code, delete it.)
        #[arg(long)]
        pool_cache: Option<PathBuf>,
        /// With `--inpaint`: the fraction of examples that take another scene's conditioning,
        /// their loss counting only the kept area, so that the model keeps the unmasked part
        /// whatever the prompt says (0: every prompt describes its own image).
        #[arg(long, default_value_t = 0.0)]
        mismatch: f32,
        /// With `--mismatch`: the noise of those examples leans a random share up to this much of
        /// the way towards the other scene's latents, as the sampler's latents drift towards what
        /// the prompt asks, and the model learns to pull the kept area back (0: Gaussian noise).
        #[arg(long, default_value_t = 0.0)]
        drift: f32,
        /// With `--drift`: move the clean latents instead of the noise, so that the model
        /// restores the kept area even at the last sampling steps.
        #[arg(long)]
        drift_in_image: bool,
        /// Draw the training timesteps from `0..N` only (at most 1000): a phase for the
        /// low-noise steps, which draw edges and corners (0: all 1000).
        #[arg(long, default_value_t = 0)]
        max_timestep: usize,
        /// With `--inpaint`: the kept area's loss counts this many times more, with its
        /// timestep weight uncapped, so that the model takes the layout of the kept area from
        /// the known latents at the noisy steps (0: as the rest of the image).
        #[arg(long, default_value_t = 0.0)]
        kept_weight: f64,
        /// With `--depth-control`: the fraction of examples conditioned on the same scene with
        /// the object elsewhere, so that the ControlNet learns to take the position from the
        /// hint rather than from the prompt.
        #[arg(long, default_value_t = 0.0)]
        moved: f32,
        /// With `--inpaint`: the loss of the band of kept latents that the pipelines'
        /// `prepare_mask` hands to the model to paint counts this many times more (0: as the
        /// rest of the image).
        #[arg(long, default_value_t = 0.0)]
        band_weight: f64,
        /// With `--inpaint` or `--depth-control`: the learning rate of `conv_in`'s new inputs
        /// (masked latents and mask, or the hint), which start at zero, is this many times the
        /// rest's (0: the same).
        #[arg(long, default_value_t = 0.0)]
        new_input_lr: f64,
        /// The loss counts this many times more on the object's latent cells and their
        /// neighbours than on the plain background (each example's weights scaled to a mean of
        /// 1), so that small objects' corners are learnt (0: every cell alike).
        #[arg(long, default_value_t = 0.0)]
        object_weight: f64,
        /// With `--mismatch`: those examples are composites, their repainted area showing the
        /// prompt's scene, and their loss counts every position (otherwise only the kept area).
        #[arg(long)]
        composite: bool,
        /// The fraction of examples trained on the unconditional inputs, which classifier-free
        /// guidance extrapolates from.
        #[arg(long, default_value_t = kandinsky_train::unet::COND_DROPOUT)]
        cond_dropout: f32,
        /// What the UNet predicts: `epsilon` (the noise), `sample` (the clean latents) or
        /// `v_prediction` (the velocity), with the same loss in those units, written into the
        /// stage's and the assembled model's scheduler config (`prediction_type`). `--init` and
        /// resuming do not carry it over: give the flag to every stage that should keep it.
        #[arg(long, default_value = "epsilon", value_parser = ["epsilon", "sample", "v_prediction"])]
        prediction_type: String,
        /// Draw the training images' objects with their boxes snapped to the MoVQ's latent grid
        /// (every edge of a square on a latent cell's edge) instead of jittered freely: the UNet
        /// then never has to draw an edge inside a latent cell. The depth hints follow. Not
        /// carried over by `--init` or resuming.
        #[arg(long)]
        grid_aligned: bool,
    },
    /// Assemble the stage outputs under `--runs` (clip/, mclip/, movq/, prior/, unet/,
    /// inpaint/) into diffusers model directories: OUT/prior, OUT/decoder, OUT/decoder-inpaint.
    Assemble {
        /// The directory holding the stages' output directories.
        #[arg(long)]
        runs: PathBuf,
        /// Where to write the model directories.
        #[arg(long)]
        out: PathBuf,
    },
    /// The diffusion prior (x0 prediction, cosine schedule, 10 % text dropout) against a trained
    /// CLIP.
    Prior {
        #[command(flatten)]
        args: StageArgs,
        /// The CLIP stage's output directory (`text_encoder/`, `image_encoder/`, `tokenizer/`).
        #[arg(long)]
        clip: PathBuf,
        /// Embed this many training examples with CLIP once and draw every batch from them,
        /// instead of embedding fresh examples every step (0).
        #[arg(long, default_value_t = 0)]
        pool: usize,
    },
}

#[derive(clap::Args)]
struct StageArgs {
    /// Output directory: checkpoint.safetensors and the exported diffusers components. An
    /// existing checkpoint there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Total optimizer steps.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seed of the parameters and the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 200)]
    checkpoint_every: u64,
    /// Print the loss every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Decay the learning rate linearly to zero over this many final steps (0: constant).
    #[arg(long, default_value_t = 0)]
    lr_decay_steps: u64,
    /// Restart the learning rate at these steps (comma-separated, ascending); each phase ends
    /// with its own `--lr-decay-steps` decay.
    #[arg(long, value_delimiter = ',')]
    lr_restarts: Vec<u64>,
}

impl StageArgs {
    fn options(&self) -> Result<TrainOptions> {
        if self.steps == 0 || self.batch == 0 || self.checkpoint_every == 0 || self.log_every == 0 {
            bail!("--steps, --batch, --checkpoint-every and --log-every must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if self.lr_restarts.windows(2).any(|w| w[0] >= w[1])
            || self.lr_restarts.iter().any(|&r| r == 0 || r >= self.steps)
        {
            bail!(
                "--lr-restarts must be ascending steps between 1 and --steps ({}), got {:?}",
                self.steps,
                self.lr_restarts
            );
        }
        Ok(TrainOptions {
            steps: self.steps,
            batch: self.batch,
            seed: self.seed,
            optim: AdamWConfig {
                lr: self.lr,
                ..Default::default()
            },
            out_dir: self.out.clone(),
            checkpoint_every: self.checkpoint_every,
            image_size: 64,
            lr_decay_steps: self.lr_decay_steps.min(self.steps),
            lr_restarts: self.lr_restarts.clone(),
            init: Default::default(),
            lr_scales: Default::default(),
        })
    }

    /// A progress logger: step, loss, the stage's metric, elapsed time and ETA.
    fn logger(&self, stage: &'static str, metric: &'static str) -> impl FnMut(u64, f32, f32) {
        let (steps, every) = (self.steps, self.log_every);
        let start = Instant::now();
        let mut first: Option<u64> = None;
        move |step, loss, m| {
            let first = *first.get_or_insert(step);
            if step % every == 0 || step == steps {
                let el = start.elapsed().as_secs_f64();
                let eta = el / (step - first + 1) as f64 * (steps - step) as f64;
                eprintln!(
                    "{stage} step {step}/{steps} loss {loss:.5} ({metric} {m:.5}) {el:.0}s, ETA {eta:.0}s"
                );
            }
        }
    }

    fn report(&self, stage: &str, r: &TrainReport, exported: &[&str]) {
        let dirs: Vec<String> = exported
            .iter()
            .map(|d| self.out.join(d).display().to_string())
            .collect();
        if r.start_step >= self.steps {
            // A re-run of a finished stage (the recipe after an interruption) only re-exports.
            println!(
                "{stage}: already trained to step {}; exported {}",
                r.start_step,
                dirs.join(", ")
            );
            return;
        }
        println!(
            "{stage}: steps {}..{}, loss {:.5} -> {:.5}; exported {}",
            r.start_step,
            self.steps,
            r.first_loss,
            r.final_loss,
            dirs.join(", ")
        );
    }
}

pub fn run(a: &TrainArgs) -> Result<()> {
    crate::cpu_only("training")?;
    match &a.stage {
        Stage::Movq {
            args: s,
            unquantised,
            l1,
            codebook_size,
            collage,
            latent_channels,
            init,
            decoder_only,
            composite,
            foreign_noise,
            refined,
        } => {
            let mut opts = s.options()?;
            if !(1..=64).contains(latent_channels) {
                bail!("--latent-channels must be between 1 and 64, got {latent_channels}");
            }
            if !(l1.is_finite() && *l1 >= 0.0) {
                bail!("--l1 must be a number ≥ 0, got {l1}");
            }
            if !(0.0..=1.0).contains(collage) {
                bail!("--collage must be a fraction between 0 and 1, got {collage}");
            }
            if !(2..=65536).contains(codebook_size) {
                bail!("--codebook-size must be between 2 and 65,536, got {codebook_size}");
            }
            if !(0.0..=1.0).contains(composite) {
                bail!("--composite must be a fraction between 0 and 1, got {composite}");
            }
            if !(foreign_noise.is_finite() && (0.0..=100.0).contains(foreign_noise)) {
                bail!("--foreign-noise must be between 0 and 100, got {foreign_noise}");
            }
            let how = MovqLoss {
                quantised: !unquantised,
                l1: *l1,
                collage: *collage,
                decoder_only: *decoder_only,
                composite: *composite,
                foreign_noise: *foreign_noise,
            };
            let config = match init {
                Some(init) => {
                    let (config, params) = movq_init(&init.join("movq")).with_context(|| {
                        format!("loading the MoVQ to start from, {}", init.display())
                    })?;
                    opts.init = params;
                    config
                }
                None => small_movq_config(*latent_channels, *codebook_size)?,
            };
            let refined = match refined {
                Some(path) => Some(
                    RefinedLatents::load(path)
                        .with_context(|| format!("reading refined latents {}", path.display()))?,
                ),
                None => None,
            };
            let r = train_movq(
                &opts,
                &config,
                how,
                refined.as_ref(),
                &mut s.logger("movq", "reconstruction"),
            )?;
            s.report("movq", &r, &["movq"]);
        }
        Stage::Clip { args: s, tokenizer } => {
            let opts = s.options()?;
            let r = train_clip(&opts, tokenizer, &mut s.logger("clip", "accuracy"))?;
            s.report("clip", &r, &["text_encoder", "image_encoder", "tokenizer"]);
        }
        Stage::Mclip {
            args: s,
            clip,
            pieces,
        } => {
            let opts = s.options()?;
            let teacher = FrozenClip::load(clip)?;
            let pieces = read_pieces_tsv_gz(pieces)
                .with_context(|| format!("reading the XLM-R pieces {}", pieces.display()))?;
            let r = train_mclip(
                &opts,
                &teacher,
                &pieces,
                &mut s.logger("mclip", "cosine to CLIP"),
            )?;
            s.report("mclip", &r, &["text_encoder", "tokenizer"]);
        }
        Stage::Unet {
            args: s,
            movq,
            clip,
            mclip,
            family,
            inpaint,
            depth_control,
            pool,
            v_weight_cap,
            init,
            pool_cache,
            mismatch,
            drift,
            drift_in_image,
            max_timestep,
            kept_weight,
            moved,
            band_weight,
            new_input_lr,
            object_weight,
            composite,
            cond_dropout,
            prediction_type,
            grid_aligned,
        } => {
            let mut opts = s.options()?;
            if *pool == 0 {
                bail!("--pool must be at least 1");
            }
            if !(v_weight_cap.is_finite() && *v_weight_cap >= 0.0) {
                bail!("--v-weight-cap must be 0 or a positive number");
            }
            if !(0.0..=1.0).contains(mismatch) || (*mismatch > 0.0 && !*inpaint) {
                bail!("--mismatch is a fraction between 0 and 1, for --inpaint");
            }
            if !(0.0..=1.0).contains(drift) || (*drift > 0.0 && *mismatch == 0.0) {
                bail!("--drift is a share between 0 and 1, for --mismatch");
            }
            if *drift_in_image && *drift == 0.0 {
                bail!("--drift-in-image needs --drift");
            }
            if !(kept_weight.is_finite() && *kept_weight >= 0.0)
                || (*kept_weight > 0.0 && !*inpaint)
            {
                bail!("--kept-weight is 0 or a positive factor, for --inpaint");
            }
            if !(band_weight.is_finite() && *band_weight >= 0.0)
                || (*band_weight > 0.0 && !*inpaint)
            {
                bail!("--band-weight is 0 or a positive factor, for --inpaint");
            }
            if !(new_input_lr.is_finite() && *new_input_lr >= 0.0)
                || (*new_input_lr > 0.0 && !*inpaint && !*depth_control)
            {
                bail!("--new-input-lr is 0 or a positive factor, for --inpaint or --depth-control");
            }
            if *composite && *mismatch == 0.0 {
                bail!("--composite needs --mismatch");
            }
            if !(0.0..=1.0).contains(cond_dropout) {
                bail!("--cond-dropout is a fraction between 0 and 1");
            }
            if !(object_weight.is_finite() && *object_weight >= 0.0) {
                bail!("--object-weight is 0 or a positive factor");
            }
            if *max_timestep > kandinsky_train::unet::TRAIN_TIMESTEPS {
                bail!("--max-timestep is at most 1000 (0: every timestep)");
            }
            let family = if family == "2.2" {
                Family::V22
            } else {
                Family::V21
            };
            let kind = match (*inpaint, *depth_control) {
                (true, _) => UNetKind::Inpaint,
                (_, true) => UNetKind::DepthControl,
                _ => UNetKind::TextToImage,
            };
            if kind == UNetKind::DepthControl && family != Family::V22 {
                bail!("--depth-control trains a Kandinsky 2.2 ControlNet: add --family 2.2");
            }
            if !(0.0..=1.0).contains(moved) || (*moved > 0.0 && kind != UNetKind::DepthControl) {
                bail!("--moved is a fraction between 0 and 1, for --depth-control");
            }
            if let Some(init) = init {
                opts.init = unet_init(&init.join("unet"), family, kind).with_context(|| {
                    format!("loading the UNet to start from, {}", init.display())
                })?;
            }
            let teachers = DecoderTeachers::load(movq, clip, mclip)?;
            let name = match kind {
                UNetKind::TextToImage => "unet",
                UNetKind::Inpaint => "unet-inpaint",
                UNetKind::DepthControl => "unet-depth",
            };
            let dirs = DecoderTeachers::dirs(movq, clip, mclip);
            let placement = if *grid_aligned {
                Placement::Grid(opts.image_size / teachers.movq.scale_factor())
            } else {
                Placement::Free
            };
            let settings = (opts.seed, *pool, opts.image_size, placement);
            let (pool, origin) = cached_pool(&teachers, &dirs, settings, pool_cache.as_deref())?;
            match origin {
                PoolOrigin::Reused => eprintln!(
                    "{name}: teacher outputs for {} examples reused from {}",
                    pool.len(),
                    pool_cache
                        .as_deref()
                        .map_or(String::new(), |p| p.display().to_string())
                ),
                PoolOrigin::Built(seconds) => eprintln!(
                    "{name}: teacher outputs for {} examples in {seconds:.0}s",
                    pool.len()
                ),
            }
            let stage = UNetStage {
                family,
                kind,
                weight_cap: *v_weight_cap,
                mismatch: *mismatch,
                drift: *drift,
                drift_in_image: *drift_in_image,
                timesteps: *max_timestep,
                kept_weight: *kept_weight,
                moved: *moved,
                band_weight: *band_weight,
                new_input_lr: *new_input_lr,
                object_weight: *object_weight,
                composite: *composite,
                cond_dropout: Some(*cond_dropout),
                prediction: match prediction_type.as_str() {
                    "sample" => Prediction::Sample,
                    "v_prediction" => Prediction::VPrediction,
                    _ => Prediction::Epsilon,
                },
            };
            let metric = match stage.prediction {
                Prediction::Sample => "x0 loss",
                Prediction::VPrediction => "v loss",
                Prediction::Epsilon => "ε loss",
            };
            let r = train_unet(&opts, &pool, stage, &mut s.logger(name, metric))?;
            s.report(name, &r, &["unet"]);
        }
        Stage::Assemble { runs, out } => {
            kandinsky_train::assemble::assemble(runs, out)
                .with_context(|| format!("assembling the model from {}", runs.display()))?;
            println!(
                "wrote {0}/prior, {0}/decoder, {0}/decoder-inpaint",
                out.display()
            );
        }
        Stage::Refine {
            decoder,
            prior,
            out,
            n,
            steps,
            guidance,
            strength_min,
            strength_max,
            chunk,
            seed,
        } => {
            if *n == 0 || *n > 1 << 16 {
                bail!("--n is between 1 and 65536, got {n}");
            }
            if !(1..=1000).contains(steps) || !(1..=256).contains(chunk) {
                bail!("--steps is between 1 and 1000 and --chunk between 1 and 256");
            }
            if !(*strength_min > 0.0 && strength_min <= strength_max && *strength_max <= 1.0) {
                bail!(
                    "the strengths must satisfy 0 < --strength-min ≤ --strength-max ≤ 1, got \
                     {strength_min} and {strength_max}"
                );
            }
            if ((*steps as f64) * strength_min).floor() < 1.0 {
                bail!(
                    "--steps {steps} at --strength-min {strength_min} leaves no denoising step \
                     (image-to-image runs int(steps × strength) of them)"
                );
            }
            if !(guidance.is_finite() && *guidance >= 0.0) {
                bail!("--guidance must be a number ≥ 0, got {guidance}");
            }
            if out.is_dir() {
                bail!(
                    "--out {} is a directory; it names the output file",
                    out.display()
                );
            }
            crate::check_output_dir(out)?;
            let class = kandinsky::loading::ModelIndex::load(decoder)
                .with_context(|| format!("reading {}", decoder.join("model_index.json").display()))?
                .class_name;
            if !matches!(class.as_str(), "KandinskyPipeline" | "KandinskyV22Pipeline") {
                bail!(
                    "--decoder must be a text-to-image decoder (KandinskyPipeline or \
                     KandinskyV22Pipeline), {} is a {class}",
                    decoder.display()
                );
            }
            let device = candle_core::Device::Cpu;
            let dec = EvalDecoder::load(decoder, candle_core::DType::F32, &device, None)
                .with_context(|| format!("loading the decoder {}", decoder.display()))?;
            let pri = KandinskyPriorPipeline::load(prior, candle_core::DType::F32, &device)
                .with_context(|| format!("loading the prior {}", prior.display()))?;
            let settings = RefineSettings {
                n: *n,
                steps: *steps,
                guidance: *guidance,
                strength: (*strength_min, *strength_max),
                chunk: *chunk,
                seed: *seed,
                side: 64,
            };
            let start = Instant::now();
            let refined = refine_latents(
                &dec,
                &pri,
                &settings,
                kandinsky_train::unet::GRAD_PARTS,
                &|done, n| {
                    eprintln!(
                        "refine: {done}/{n} ({:.0} s)",
                        start.elapsed().as_secs_f64()
                    )
                },
            )?;
            refined.save(out)?;
            eprintln!(
                "refine: {} latents in {:.1} s -> {}",
                refined.indices().len(),
                start.elapsed().as_secs_f64(),
                out.display()
            );
        }
        Stage::Prior {
            args: s,
            clip,
            pool,
        } => {
            let opts = s.options()?;
            if *pool > 1 << 18 {
                bail!("--pool is at most 262144 examples (about 20 KB of CLIP outputs each stay in memory)");
            }
            let frozen = FrozenClip::load(clip)?;
            let r = train_prior(
                &opts,
                &frozen,
                *pool,
                &mut s.logger("prior", "cosine to target"),
            )?;
            s.report("prior", &r, &["prior"]);
        }
    }
    Ok(())
}
