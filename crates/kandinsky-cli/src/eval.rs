//! `kandinsky eval shapes`: generates images for held-out prompts of the synthetic world in
//! English and Russian, scores them with the pixel analyser, and reports the Fréchet distance to
//! real images in the model's CLIP image-embedding space, next to the analyser's ceiling on the
//! real images.

use crate::generate::SchedulerChoice;
use anyhow::{Context, Result};
use kandinsky::loading::{given_or_small, small_decoder_part, small_named_dirs, SMALL_MODEL_NAMES};
use kandinsky::pipelines::auto_pipeline::DecoderKind;
use kandinsky_train::eval::{
    check_eval_n, eval_controlnet, eval_inpainting, eval_shapes, Accuracy, Confusion, ShapesEval,
};
use kandinsky_train::shapes::{en_colour, COLOURS, SHAPES};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Score generated images of held-out shape prompts (EN and RU).
    Shapes(ShapesArgs),
    /// Score a MoVQ's round trip of the held-out renders: the ceiling of any decoder using it.
    Movq(MovqArgs),
}

#[derive(clap::Args)]
struct MovqArgs {
    /// The MoVQ: its directory, or a directory holding it as `movq/` (a decoder, or a
    /// `train movq` run); default: the small model's.
    #[arg(long)]
    movq: Option<std::path::PathBuf>,
    /// Renders per language (the held-out prompts of `eval shapes`, same order and seed).
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Seed of the renders (as `eval shapes --seed`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run_movq(m: &MovqArgs) -> Result<()> {
    check_eval_n("--n", m.n)?;
    let dir = match &m.movq {
        Some(d) => d.clone(),
        None => given_or_small(None, "decoder")?,
    };
    let dir = if dir.join("movq").join("config.json").is_file() {
        dir.join("movq")
    } else {
        dir
    };
    let device = crate::compute_device()?;
    let movq = kandinsky::models::VQModel::load(&dir, crate::compute_dtype(), &device)
        .with_context(|| format!("loading the MoVQ from {}", dir.display()))?;
    let rows = kandinsky_train::eval::eval_movq(&movq, m.n, m.seed, &device)?;
    println!("| images | n | background | object colour | shape | position | size | mean abs. error (/255) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let e = r.pixel_error.map_or("—".to_string(), |e| format!("{e:.2}"));
        println!("{}", row_with(r.name, &r.accuracy, e));
    }
    for r in &rows {
        if let Some(c) = &r.confusion {
            print_confusion(r.name, c);
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct ShapesArgs {
    /// The decoder: `small` (default), `small-2-2`, or a decoder directory
    /// (`KandinskyPipeline` or `KandinskyV22Pipeline`). A small model's name also picks its
    /// inpainting decoder and (2.2) depth ControlNet for their sections.
    #[arg(long)]
    model: Option<String>,
    /// The decoder's sampler.
    #[arg(long, value_enum, default_value_t = SchedulerChoice::Default)]
    scheduler: SchedulerChoice,
    /// The prior directory; default `models/small/prior`.
    #[arg(long)]
    prior: Option<String>,
    /// Prompts per language.
    #[arg(long, default_value_t = 200)]
    n: usize,
    #[command(flatten)]
    sampling: crate::generate::SamplingArgs,
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
    /// The inpainting decoder of the inpainting section; default: the small model's when
    /// `--model` names one (none otherwise).
    #[arg(long)]
    inpaint_model: Option<String>,
    /// Scenes per language of the inpainting section (0: skip it).
    #[arg(long, default_value_t = 40)]
    inpaint_n: usize,
    /// The depth ControlNet of the ControlNet section (`KandinskyV22ControlnetPipeline`);
    /// default: `small-2-2`'s when `--model` is `small-2-2` (none otherwise).
    #[arg(long)]
    controlnet_model: Option<String>,
    /// Scenes per language of the ControlNet section (0: skip it).
    #[arg(long, default_value_t = 40)]
    controlnet_n: usize,
}

/// The decoder directory for a section: `given` (a small model's name or a directory), or the
/// small model `model`'s decoder `which` when `model` names a small model (or is omitted:
/// `small`); `None` otherwise or when the section is skipped (`n` 0).
fn section_dir(
    given: Option<&str>,
    model: Option<&str>,
    which: DecoderKind,
    n: usize,
) -> Result<Option<std::path::PathBuf>> {
    let named = |m: &str| SMALL_MODEL_NAMES.contains(&m) && !std::path::Path::new(m).is_dir();
    if n == 0 {
        return Ok(None);
    }
    Ok(match given {
        Some(g) if named(g) => Some(small_named_dirs(g, which)?.decoder),
        Some(g) => Some(given_or_small(Some(g), "")?),
        None => match model.unwrap_or("small") {
            m if named(m) && small_decoder_part(m, which).is_some() => {
                Some(small_named_dirs(m, which)?.decoder)
            }
            _ => None,
        },
    })
}

/// A table row: the accuracies, then `last` (a number to 3 decimals, or a dash).
fn row(name: &str, a: &Accuracy, last: Option<f64>) -> String {
    row_with(name, a, last.map_or("—".to_string(), |f| format!("{f:.3}")))
}

fn row_with(name: &str, a: &Accuracy, last: String) -> String {
    let pct = |v: f64| format!("{:.1} %", 100.0 * v);
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} |",
        a.n,
        pct(a.background),
        pct(a.colour),
        pct(a.shape),
        pct(a.position),
        pct(a.size),
        last
    )
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let s = match &a.what {
        What::Shapes(s) => s,
        What::Movq(m) => return run_movq(m),
    };
    // Every size is checked before the first section runs (they take minutes each).
    for (what, n) in [
        ("--n", s.n),
        ("--inpaint-n", s.inpaint_n),
        ("--controlnet-n", s.controlnet_n),
    ] {
        check_eval_n(what, n)?;
    }
    let decoder = section_dir(s.model.as_deref(), None, DecoderKind::TextToImage, 1)?
        .context("the small model has a text-to-image decoder")?;
    let settings = ShapesEval {
        decoder,
        prior: given_or_small(s.prior.as_deref(), "prior")?,
        n: s.n,
        steps: s.sampling.steps,
        prior_steps: s.sampling.prior_steps,
        guidance: s.sampling.guidance,
        prior_guidance: s.sampling.prior_guidance,
        seed: s.seed,
        batch: s.batch,
        oracle: s.oracle,
        save: s.save.clone(),
        scheduler: s.scheduler.class(),
        dtype: crate::compute_dtype(),
        device: crate::compute_device()?,
    };
    // Every section's model is found before the first one runs (they take minutes each).
    let inpaint = section_dir(
        s.inpaint_model.as_deref(),
        s.model.as_deref(),
        DecoderKind::Inpaint,
        s.inpaint_n,
    )?;
    let controlnet = section_dir(
        s.controlnet_model.as_deref(),
        s.model.as_deref(),
        DecoderKind::Controlnet,
        s.controlnet_n,
    )?;
    let rows = eval_shapes(&settings, &mut |name, done, n| {
        eprint!("\r{name}: {done}/{n}");
        if done == n {
            eprintln!();
        }
    })?;
    for r in &rows {
        if let Some(c) = r.prior_cosine {
            eprintln!(
                "{}: mean cosine between the prior's embedding and the real image's: {c:.3}",
                r.name
            );
        }
    }
    let inpaint_rows = match inpaint {
        Some(decoder) => {
            eval_inpainting(&settings, &decoder, s.inpaint_n, &mut |name, done, n| {
                eprint!("\r{name}: {done}/{n}");
                if done == n {
                    eprintln!();
                }
            })?
        }
        None => Vec::new(),
    };
    let control_rows = match controlnet {
        Some(dir) => eval_controlnet(&settings, &dir, s.controlnet_n, &mut |name, done, n| {
            eprint!("\r{name}: {done}/{n}");
            if done == n {
                eprintln!();
            }
        })?,
        None => Vec::new(),
    };
    println!("| images | n | background | object colour | shape | position | size | Fréchet distance (CLIP) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", row(r.name, &r.accuracy, r.frechet));
    }
    for r in &rows {
        if let Some(e) = r.pixel_error {
            println!("\n{}: mean absolute error {e:.2}/255", r.name);
        }
    }
    for r in &rows {
        if let Some(c) = &r.confusion {
            print_confusion(r.name, c);
        }
    }
    if !inpaint_rows.is_empty() {
        println!();
        println!("| inpainting (no compositing) | n | mean change of the kept pixels (/255) | worst image (/255) | MoVQ round trip (floor, /255) | band that prepare_mask repaints (/255) | rest (/255) |");
        println!("|---|---|---|---|---|---|---|");
        for r in inpaint_rows {
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.name, r.n, r.kept_change, r.worst, r.movq_floor, r.band, r.rest
            );
        }
    }
    if !control_rows.is_empty() {
        println!();
        println!("| depth ControlNet (prompt names another position) | n | object where the hint puts it | object where the prompt puts it |");
        println!("|---|---|---|---|");
        for r in control_rows {
            println!(
                "| {} | {} | {:.1} % | {:.1} % |",
                r.name,
                r.n,
                100.0 * r.hint_position,
                100.0 * r.prompt_position
            );
        }
    }
    Ok(())
}

/// Shape confusion per size and colour confusion as Markdown tables (rows: asked; columns: read),
/// labelled in the order [`Confusion`] counts them ([`SHAPES`], [`COLOURS`]).
fn print_confusion(name: &str, c: &Confusion) {
    let shapes = SHAPES.map(|s| format!("{s:?}").to_lowercase());
    for (size, label) in ["small", "large"].iter().enumerate() {
        println!("\n{name}, {label} objects: shape asked (rows) against read (columns)\n");
        println!("| asked | {} | unread |", shapes.join(" | "));
        println!("|---|{}---|", "---|".repeat(shapes.len()));
        for (asked, shape) in shapes.iter().enumerate() {
            let counts = c.shape[size][asked].map(|n| n.to_string()).join(" | ");
            println!("| {shape} | {counts} |");
        }
    }
    let colours = COLOURS.map(en_colour);
    println!("\n{name}: object colour asked (rows) against read (columns)\n");
    println!("| asked | {} | unread |", colours.join(" | "));
    println!("|---|{}---|", "---|".repeat(colours.len()));
    for (asked, colour) in colours.iter().enumerate() {
        let counts = c.colour[asked].map(|n| n.to_string()).join(" | ");
        println!("| {colour} | {counts} |");
    }
}
