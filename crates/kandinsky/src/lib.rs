//! Kandinsky 2.1 / 2.2 text-to-image in Rust, on candle, numerically matching diffusers.
//!
//! The layout mirrors diffusers: [`models`] (one file per network), [`schedulers`],
//! [`pipelines`] (every mode behind [`pipelines::auto_pipeline::AutoPipeline`]), plus [`loading`]
//! (model directories, configs, weights), [`vae_image_processor`] (diffusers' image pre- and
//! post-processing, image files) and [`clip_image_processor`] (transformers' CLIP one).
//! Tensor names equal diffusers' state-dict names, so checkpoints load without renaming.
//!
//! # Text to image
//!
//! Every mode of the paper's demo (text to image, image to image, inpainting, outpainting, mixing,
//! variations, ControlNet depth) is one [`pipelines::auto_pipeline::Request`] to an
//! [`pipelines::auto_pipeline::AutoPipeline`], built from a decoder directory and a prior
//! directory in diffusers' layout. The generator is explicit and behaves as `torch.Generator`, so
//! a seed gives diffusers' image.
//!
//! ```no_run
//! use kandinsky::pipelines::auto_pipeline::{AutoPipeline, LoadOptions, Request, TextToImage};
//! use kandinsky::utils::torch_utils::TorchGenerator;
//!
//! # fn main() -> kandinsky::Result<()> {
//! // Our small model, shipped in the repository (64×64 images of shapes, offline).
//! let dirs = kandinsky::loading::small_model_dirs(false)?;
//! let mut pipe = AutoPipeline::from_pretrained(&dirs.decoder, &dirs.prior, LoadOptions::default())?;
//! let mut request = Request::new(TextToImage::new("a large red circle in the centre on a blue background"));
//! request.params.steps = 50;
//! let images = pipe.generate(request, &mut TorchGenerator::new(42), &mut |_, _, _| {})?;
//! kandinsky::vae_image_processor::save_png("circle.png".as_ref(), &images[0], &[])?;
//! # Ok(())
//! # }
//! ```
//!
//! # Real weights, a GPU, half precision
//!
//! A preset name or hub id resolves through the Hugging Face cache; [`loading::hub`] fills it
//! without Python (in `huggingface_hub`'s layout, shared with diffusers). With the `cuda` feature
//! the networks run on a GPU; `f16`/`bf16` halve the weights' memory (norms and softmax stay f32).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use kandinsky::loading::hub::{download, HubOptions};
//! use kandinsky::loading::preset;
//! use kandinsky::pipelines::auto_pipeline::{AutoPipeline, LoadOptions, Request, TextToImage};
//! use kandinsky::utils::torch_utils::TorchGenerator;
//!
//! # fn main() -> kandinsky::Result<()> {
//! let p = preset("kandinsky-2-2").expect("a preset");
//! let options = HubOptions::from_env(); // HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE
//! let decoder = download(p.decoder, "main", &options, &|s| eprint!("\r{}/{} bytes", s.done, s.total))?;
//! let prior = download(p.prior, "main", &options, &|_| {})?;
//! let load = LoadOptions {
//!     dtype: DType::F16,
//!     device: Device::new_cuda(0)?, // an error unless built with the `cuda` feature
//!     ..LoadOptions::default()
//! };
//! let mut pipe = AutoPipeline::from_pretrained(&decoder.snapshot, &prior.snapshot, load)?;
//! let request = Request::new(TextToImage::new("a lighthouse at dusk, oil painting"));
//! let images = pipe.generate(request, &mut TorchGenerator::new(0), &mut |_, _, _| {})?;
//! # Ok(())
//! # }
//! ```
//!
//! # Inpainting
//!
//! Masks are images of the same size: white is repainted, black kept.
//!
//! ```no_run
//! use kandinsky::pipelines::auto_pipeline::{AutoPipeline, Inpainting, LoadOptions, Prompt, Request};
//! use kandinsky::utils::torch_utils::TorchGenerator;
//! use kandinsky::vae_image_processor::{read_rgb8, Rgb8};
//!
//! # fn main() -> kandinsky::Result<()> {
//! let dirs = kandinsky::loading::small_model_dirs(true)?; // the inpainting decoder
//! let mut pipe = AutoPipeline::from_pretrained(&dirs.decoder, &dirs.prior, LoadOptions::default())?;
//! let image = read_rgb8("circle.png".as_ref())?;
//! // Repaint the left half.
//! let mut mask = vec![0u8; image.width * image.height * 3];
//! for (i, px) in mask.chunks_mut(3).enumerate() {
//!     if i % image.width < image.width / 2 {
//!         px.fill(255);
//!     }
//! }
//! let mask = Rgb8::new(image.width, image.height, mask)?;
//! let request = Request::new(Inpainting {
//!     prompt: Prompt { prompt: "a yellow square on a blue background".into(), negative_prompt: None },
//!     image,
//!     mask,
//!     mask_blur: Some(4.0), // keep the unmasked pixels, as AUTOMATIC1111 does
//!     latents: None,
//!     prior_latents: None,
//! });
//! let images = pipe.generate(request, &mut TorchGenerator::new(7), &mut |_, _, _| {})?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! - `cuda`: candle's CUDA backend (`Device::new_cuda`). Building it needs the CUDA toolkit's
//!   `nvcc`; our CPU kernels ([`ops`]) stay CPU-only and every layer takes its plain-candle path
//!   on a GPU.

pub mod clip_image_processor;
pub mod error;
pub mod loading;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod schedulers;
pub mod tokenization;
pub mod utils;
pub mod vae_image_processor;

pub use error::{Error, Result};
