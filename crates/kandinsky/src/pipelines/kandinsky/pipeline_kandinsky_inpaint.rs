//! diffusers `pipelines/kandinsky/pipeline_kandinsky_inpaint.py`: `KandinskyInpaintPipeline`
//! (2.1 inpainting) and its mask handling, shared with 2.2. Mask convention of diffusers ≥ 0.19:
//! white (1) = repaint, black (0) = keep.

use super::pipeline_kandinsky::KandinskyPipeline;
use crate::error::{Error, Result};
use crate::image_processor::{resize_rgb8_reducing_gap, Filter};
use crate::pipelines::kandinsky2_2::pipeline_kandinsky2_2::{DecoderParams, Init};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{DType, Device, Tensor};

/// An RGB8 image: `(width, height, HWC bytes)`.
pub type Rgb8<'a> = (usize, usize, &'a [u8]);

/// `prepare_mask_and_masked_image` for PIL inputs: the image resized to `width × height`
/// (Pillow bicubic, `reducing_gap=1`) as `(1, 3, H, W)` in [-1, 1], and the mask resized (Pillow Lanczos), turned
/// to luminance (`convert("L")`), `/255`, binarised at 0.5 and inverted to the model's keep-mask
/// `(1, 1, H, W)` (1 = keep). Returns `(mask, image)`. Image and mask must have the same size.
pub fn prepare_mask_and_masked_image(
    image: Rgb8,
    mask: Rgb8,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if (image.0, image.1) != (mask.0, mask.1) {
        return Err(Error::InvalidArgument(format!(
            "the mask is {}x{} but the image is {}x{}: they must have the same size",
            mask.0, mask.1, image.0, image.1
        )));
    }
    let resize = |(w, h, rgb): Rgb8, filter, gap| {
        resize_rgb8_reducing_gap(w, h, rgb, width, height, filter, gap)
    };
    let rgb = resize(image, Filter::Bicubic, Some(1.0));
    let image = Tensor::from_vec(rgb, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    let image = ((image / 127.5)? - 1.0)?.unsqueeze(0)?;
    let keep: Vec<f32> = resize(mask, Filter::Lanczos, None)
        .chunks_exact(3)
        .map(|p| {
            // Pillow's RGB → L: (19595 R + 38470 G + 7471 B + 2^15) >> 16.
            let l = (p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16;
            if l as f32 / 255.0 >= 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(keep, (1, 1, height, width), device)?;
    Ok((mask, image))
}

/// `prepare_mask`: erodes the keep region (1) of `(B, 1, h, w)` masks: every 0 clears its
/// neighbours above, left, above-left, below, right and below-right (6 of 8, read from the
/// original mask), growing the region to repaint by about one latent pixel.
pub fn prepare_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    let old = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut new = old.clone();
    for plane in 0..b * c {
        let o = &old[plane * h * w..(plane + 1) * h * w];
        let n = &mut new[plane * h * w..(plane + 1) * h * w];
        for i in 0..h {
            for j in 0..w {
                if o[i * w + j] == 1.0 {
                    continue;
                }
                let mut clear = |y: usize, x: usize| n[y * w + x] = 0.0;
                if i != 0 {
                    clear(i - 1, j);
                }
                if j != 0 {
                    clear(i, j - 1);
                }
                if i != 0 && j != 0 {
                    clear(i - 1, j - 1);
                }
                if i + 1 != h {
                    clear(i + 1, j);
                }
                if j + 1 != w {
                    clear(i, j + 1);
                }
                if i + 1 != h && j + 1 != w {
                    clear(i + 1, j + 1);
                }
            }
        }
    }
    Ok(Tensor::from_vec(new, (b, c, h, w), mask.device())?.to_dtype(mask.dtype())?)
}

impl KandinskyPipeline {
    /// `KandinskyInpaintPipeline.__call__`: `image (1, 3, H, W)` in [-1, 1] and its keep-mask
    /// `(1, 1, H, W)` from [`prepare_mask_and_masked_image`] (`latents` replaces the initial noise); the UNet (9 input channels) sees the
    /// masked image latents and the mask at every step. `H` and `W` must be multiples of the
    /// latent grid (64 for the real MoVQ).
    #[allow(clippy::too_many_arguments)]
    pub fn inpaint(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
        image: &Tensor,
        mask: &Tensor,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        generator: &mut TorchGenerator,
        latents: Option<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let init = Init::from_mask(self.movq(), image, mask, false, latents)?;
        self.run(
            prompts,
            negative_prompt,
            image_embeds,
            negative_image_embeds,
            params,
            generator,
            init,
            progress,
        )
    }
}
