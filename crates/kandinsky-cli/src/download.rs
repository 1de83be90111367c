//! `kandinsky download`: a preset's or a hub id's pipeline repositories into the Hugging Face
//! cache (the library's `loading::hub`), with a progress line.

use anyhow::Result;
use kandinsky::loading::hub::{download, HubOptions};
use kandinsky::loading::preset;
use std::io::Write;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DownloadArgs {
    /// A preset (kandinsky-2-1, kandinsky-2-2, …: its decoder and prior) or a hub id `org/name`.
    model: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Fetch nothing (as `HF_HUB_OFFLINE=1`): say what is missing.
    #[arg(long)]
    offline: bool,
}

pub fn run(a: &DownloadArgs) -> Result<()> {
    let repos: Vec<String> = match preset(&a.model) {
        Some(p) => vec![p.decoder.to_string(), p.prior.to_string()],
        None => vec![a.model.clone()],
    };
    let mut options = HubOptions::from_env();
    options.offline |= a.offline;
    for repo in repos {
        eprintln!(
            "fetching {repo}@{} from {} into {}",
            a.revision,
            options.endpoint,
            options.cache.display()
        );
        let start = Instant::now();
        let mut last = Instant::now();
        let mut progress = |file: &str, done: u64, total: u64| {
            if last.elapsed().as_millis() < 200 && done != total {
                return;
            }
            last = Instant::now();
            let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-3);
            let eta = if total > done && rate > 0.0 {
                format!(", ETA {:.0} s", (total - done) as f64 / rate)
            } else {
                String::new()
            };
            eprint!(
                "\r{file}: {:.1}/{:.1} MB, {:.1} MB/s{eta}        ",
                done as f64 / 1e6,
                total as f64 / 1e6,
                rate / 1e6
            );
            let _ = std::io::stderr().flush();
        };
        let got = download(&repo, &a.revision, &options, &mut progress)?;
        eprintln!();
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
