//! `kandinsky download`, and the same download on first use of a preset or hub id with
//! `--model`: a pipeline's repositories into the Hugging Face cache (the library's
//! `loading::hub`), with one line saying what and how much, and a progress bar.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use kandinsky::loading::hub::{self, HubOptions, HubStatus, Plan};
use kandinsky::loading::{
    is_hub_id, preset, resolve_model_dir, resolve_pipeline_dirs_with, PipelineDirs,
};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct DownloadArgs {
    /// A preset (kandinsky-2-1, kandinsky-2-2, …: its decoder and prior) or a hub id `org/name`.
    model: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
}

pub fn run(a: &DownloadArgs) -> Result<()> {
    let repos: Vec<String> = match preset(&a.model) {
        Some(p) => vec![p.decoder.to_string(), p.prior.to_string()],
        None => vec![a.model.clone()],
    };
    let options = HubOptions::from_env();
    for repo in repos {
        let plan = hub::plan(&repo, &a.revision, &options)?;
        announce(&plan, &options);
        let bar = progress_bar();
        let got = hub::fetch(&plan, &options, &|s| show(&bar, s))?;
        bar.finish_and_clear();
        println!(
            "{repo}: {} files fetched ({:.1} MB), {} already cached → {}",
            got.fetched.0,
            got.fetched.1 as f64 / 1e6,
            got.cached,
            got.snapshot.display()
        );
    }
    Ok(())
}

/// The line before a fetch: what, how much, from where, to where.
fn announce(plan: &Plan, options: &HubOptions) {
    let resumed: u64 = plan.files.iter().map(|f| f.partial).sum();
    eprintln!(
        "fetching {}@{} ({}): {} files, {}{} from {} into {}",
        plan.repo,
        plan.revision,
        &plan.commit[..plan.commit.len().min(12)],
        plan.files.len(),
        human_bytes(plan.bytes_to_fetch()),
        if resumed > 0 {
            format!(" (resuming; {} already here)", human_bytes(resumed))
        } else {
            String::new()
        },
        options.endpoint,
        options.cache.display()
    );
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / 1e6),
        n => format!("{:.1} kB", n as f64 / 1e3),
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("#>-"),
    );
    bar
}

fn show(bar: &ProgressBar, s: HubStatus) {
    bar.set_length(s.total);
    bar.set_position(s.done);
    bar.set_message(format!("{}/{} files", s.files_done, s.files));
}

/// A `--model` / `--prior` value as a directory: a directory as is; a hub id from the cache,
/// fetched first when the cache lacks it (or holds only part of it) and we are not offline.
pub fn ensure_model(model: &str) -> Result<PathBuf> {
    if Path::new(model).is_dir() || !is_hub_id(model) {
        return Ok(resolve_model_dir(model)?);
    }
    let options = HubOptions::from_env();
    let bar = progress_bar();
    let dir = hub::ensure(
        model,
        &options,
        &mut |plan| announce(plan, &options),
        &|s| show(&bar, s),
    )?;
    bar.finish_and_clear();
    Ok(dir)
}

/// The decoder and prior directories of `--model` (a directory, a hub id or a preset) and
/// `--prior`, fetching what the cache lacks; `None` when there is no prior to use.
pub fn ensure_pipeline(model: &str, prior: Option<&str>) -> Result<Option<PipelineDirs>> {
    resolve_pipeline_dirs_with(model, prior, ensure_model)
}
