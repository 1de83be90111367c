//! The `kandinsky` command: a thin layer over the library (argument parsing, progress, errors).

mod batch;
mod bench;
mod decode;
mod download;
mod eval;
mod generate;
mod serve;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kandinsky", version, about = "Kandinsky 2.1 / 2.2 in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the kernels (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Compute precision: `f32` (the parity reference), `bf16` (on the CPU: bf16 GEMM and
    /// convolution weights with f32 activations; on a GPU: bf16 throughout) or `f16` (weights and
    /// activations in f16; meant for GPUs). Norms and softmax run in f32 in every case.
    #[arg(long, global = true, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Where the networks run: `cpu`, `cuda` or `cuda:N` (binaries built with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    /// Never touch the network (as `HF_HUB_OFFLINE=1`): presets and hub ids must be in the cache.
    #[arg(long, global = true)]
    offline: bool,
}

/// The `--dtype` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Precision {
    F32,
    Bf16,
    F16,
}

/// The `--device` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("'{s}' is not cpu, cuda or cuda:N")),
    }
}

static DEVICE: std::sync::OnceLock<DeviceArg> = std::sync::OnceLock::new();

/// The device chosen with `--device`, opened; an error that says what is missing when this
/// binary has no CUDA or the machine has no such GPU.
pub fn compute_device() -> anyhow::Result<candle_core::Device> {
    match DEVICE.get().copied().unwrap_or(DeviceArg::Cpu) {
        DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
        DeviceArg::Cuda(n) => {
            if !cfg!(feature = "cuda") {
                anyhow::bail!(
                    "--device cuda: this kandinsky was built without CUDA; rebuild it with `cargo build --release -p kandinsky-cli --features cuda` (needs the CUDA toolkit's nvcc; see README)"
                );
            }
            candle_core::Device::new_cuda(n).map_err(|e| {
                anyhow::anyhow!(
                    "--device cuda:{n}: no usable CUDA device {n} ({e}); check `nvidia-smi` and the NVIDIA driver"
                )
            })
        }
    }
}

/// The pipelines' load options from `--dtype` and `--device`.
pub fn load_options() -> anyhow::Result<kandinsky::pipelines::auto_pipeline::LoadOptions> {
    Ok(kandinsky::pipelines::auto_pipeline::LoadOptions {
        dtype: compute_dtype(),
        device: compute_device()?,
        ..Default::default()
    })
}

/// Refuses an output path whose directory does not exist, before any work is done.
pub fn check_output_dir(output: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.is_dir() {
            anyhow::bail!("output directory {} does not exist", dir.display());
        }
    }
    Ok(())
}

/// Refuses `--device cuda` for a subcommand that runs on the CPU only.
pub fn cpu_only(what: &str) -> anyhow::Result<()> {
    if DEVICE.get().copied().unwrap_or(DeviceArg::Cpu) != DeviceArg::Cpu {
        anyhow::bail!("{what} runs on the CPU only; drop --device");
    }
    Ok(())
}

static DTYPE: std::sync::OnceLock<candle_core::DType> = std::sync::OnceLock::new();

/// The compute dtype chosen with `--dtype`.
pub fn compute_dtype() -> candle_core::DType {
    *DTYPE.get().unwrap_or(&candle_core::DType::F32)
}

#[derive(Subcommand)]
enum Command {
    /// Text to image for every line of a JSONL file, resumable, split over machines with
    /// `--shard i/n` or `--shard auto` (Kubernetes Indexed Jobs, Slurm arrays).
    Batch(batch::BatchArgs),
    /// Time every stage of a real 2.1 / 2.2 generation (UNet steps, prior, MoVQ, text and image
    /// encoders, loading) with random weights of the real configurations.
    Bench(bench::BenchArgs),
    /// Text to image (Kandinsky 2.1 or 2.2): prior, then decoder.
    Generate(generate::GenerateArgs),
    /// Image to image (2.1 or 2.2): prior, then the decoder from the noised image.
    Img2img(generate::Img2ImgArgs),
    /// Mix prompts and images with weights (`prior.interpolate`), then decode.
    Mix(generate::MixArgs),
    /// Variations of an image (its CLIP image embedding), then decode.
    Variations(generate::VariationsArgs),
    /// Inpainting (2.1 or 2.2 inpainting models): repaint the white area of a mask.
    Inpaint(generate::InpaintArgs),
    /// Outpainting: extend an image by margins and paint the new area (inpainting models).
    Outpaint(generate::OutpaintArgs),
    /// ControlNet depth (2.2): follow a hint image, from noise or from an image.
    Controlnet(generate::ControlnetArgs),
    /// Serve the web editor and the HTTP APIs (native and AUTOMATIC1111) on this machine.
    Serve(serve::ServeArgs),
    /// Evaluate a model (`eval shapes`: our small model on held-out shape prompts).
    Eval(eval::EvalArgs),
    /// Train a stage of our small Kandinsky on the synthetic shapes world (resumable).
    Train(train::TrainArgs),
    /// Download a preset's or a hub id's pipeline into the Hugging Face cache (what loading needs
    /// only; resumable; sha256-checked).
    Download(download::DownloadArgs),
    /// Decode a latent to a PNG with a MoVQ model (the last stage of every pipeline).
    Decode(decode::DecodeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    kandinsky::utils::keep_freed_memory();
    let _ = DTYPE.set(match cli.dtype {
        Precision::F32 => candle_core::DType::F32,
        Precision::Bf16 => candle_core::DType::BF16,
        Precision::F16 => candle_core::DType::F16,
    });
    let _ = DEVICE.set(cli.device);
    if cli.threads == Some(0) {
        eprintln!("error: --threads must be at least 1");
        return std::process::ExitCode::FAILURE;
    }
    if cli.offline {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    }
    if matches!(&cli.command, Command::Train(t) if t.runs_threads()) {
        // SAFETY: no other thread exists yet.
        unsafe { kandinsky_train::threads::one_kernel_thread() };
    } else if let Some(n) = cli.threads {
        // candle's elementwise workers and rayon's pool (our kernels, the GEMM) read these on
        // first use.
        for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            // SAFETY: no other thread exists yet.
            unsafe { std::env::set_var(var, n.to_string()) };
        }
    }
    let result = match cli.command {
        Command::Batch(args) => batch::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Decode(args) => decode::run(&args),
        Command::Download(args) => download::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Img2img(args) => generate::run_img2img(&args),
        Command::Mix(args) => generate::run_mix(&args),
        Command::Inpaint(args) => generate::run_inpaint(&args),
        Command::Outpaint(args) => generate::run_outpaint(&args),
        Command::Controlnet(args) => generate::run_controlnet(&args),
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Variations(args) => generate::run_variations(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
