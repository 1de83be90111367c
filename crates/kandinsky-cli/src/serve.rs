//! `kandinsky serve`: flags → [`kandinsky_server::ServerConfig`], then serve until Ctrl-C.

use anyhow::{Context, Result};
use kandinsky_server::{Server, ServerConfig};
use std::net::IpAddr;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port.
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// A model the server may use (repeatable): `small` (the default), a preset name
    /// (kandinsky-2-1, kandinsky-2-2, …; its cached inpainting and ControlNet siblings join it),
    /// a decoder directory or a hub id, optionally named `NAME=…` (decoders of different kinds
    /// under one name serve every mode). Requests name models, never paths.
    #[arg(long = "model")]
    models: Vec<String>,
    /// The prior of models given as directories or hub ids.
    #[arg(long)]
    prior: Option<String>,
    /// Jobs that may wait; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Require `Authorization: Bearer <token>` on every API call.
    #[arg(long)]
    api_token: Option<String>,
    /// Pipelines kept in memory at once (least recently used dropped first).
    #[arg(long, default_value_t = 2)]
    max_loaded: usize,
    /// Follow symlinks in model directories that lead outside them. Off, such a directory is
    /// refused, so whoever can write into a served model directory cannot make the server read
    /// other files; links inside it, and a Hugging Face cache snapshot's links into its blobs,
    /// are followed either way.
    #[arg(long)]
    follow_symlinks: bool,
}

pub fn run(a: &ServeArgs) -> Result<()> {
    if a.queue == 0 {
        anyhow::bail!("--queue must be at least 1");
    }
    // Presets and hub ids are fetched now, on first use, rather than failing later.
    for spec in &a.models {
        let what = match spec.split_once('=') {
            Some((_, w)) if !std::path::Path::new(spec).exists() => w,
            _ => spec.as_str(),
        };
        let small = kandinsky::loading::SMALL_MODEL_NAMES.contains(&what);
        if !small && !std::path::Path::new(what).exists() {
            crate::download::ensure_pipeline(what, a.prior.as_deref())?;
        }
    }
    let config = ServerConfig {
        models: a.models.clone(),
        prior: a.prior.clone(),
        queue: a.queue,
        api_token: a.api_token.clone().filter(|t| !t.is_empty()),
        load: crate::load_options()?,
        max_loaded: a.max_loaded,
        public: !a.host.is_loopback(),
        port: a.port,
        follow_symlinks: a.follow_symlinks,
        ..ServerConfig::default()
    };
    let server = Server::start(config)?;
    let names = server.state().catalog.names();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host, a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        if !a.host.is_loopback() {
            eprintln!(
                "warning: listening on {addr}, reachable from the network{}",
                if a.api_token.is_some() {
                    ""
                } else {
                    " without --api-token: anyone who can reach it can use it"
                }
            );
        }
        eprintln!("models: {}", names.join(", "));
        println!(
            "kandinsky serve: open http://{addr}/ (API: /api/v1, A1111: /sdapi/v1); Ctrl-C stops"
        );
        server.serve(listener).await?;
        Ok(())
    })
}
