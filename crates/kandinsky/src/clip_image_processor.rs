//! transformers `CLIPImageProcessor`: shortest side → `size` with PIL's bicubic resampling of the
//! 8-bit image, centre crop, `/255`, mean/std normalisation.
//!
//! The resampler reproduces Pillow's `Image.resize` (bicubic and Lanczos) for 8-bit images
//! (convolution with support scaled by the reduction factor, 22-bit fixed-point weights, Pillow
//! 13's pass order, rounding to 8 bits after each pass, and the `reducing_gap` pre-reduction
//! diffusers asks for), which is what transformers uses without torchvision.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

/// A size given as a number or as `{"height": h, "width": w}` / `{"shortest_edge": s}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(usize),
    Dict {
        shortest_edge: Option<usize>,
        height: Option<usize>,
        width: Option<usize>,
    },
}

/// OpenAI CLIP's per-channel mean (`OPENAI_CLIP_MEAN` in transformers).
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel standard deviation (`OPENAI_CLIP_STD` in transformers).
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `image_processor/preprocessor_config.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawConfig {
    do_resize: bool,
    size: SizeSpec,
    resample: u32,
    do_center_crop: bool,
    crop_size: SizeSpec,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: [f64; 3],
    image_std: [f64; 3],
}

impl Default for RawConfig {
    /// transformers' `CLIPImageProcessor` defaults.
    fn default() -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::Int(224),
            resample: 3,
            do_center_crop: true,
            crop_size: SizeSpec::Int(224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }
}

/// `CLIPImageProcessor`.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    shortest_edge: Option<usize>,
    crop: Option<(usize, usize)>,
    rescale_factor: Option<f64>,
    mean_std: Option<([f64; 3], [f64; 3])>,
}

impl Default for ClipImageProcessor {
    /// The Kandinsky priors' processor: 224 shortest side, 224×224 crop, OpenAI CLIP mean/std.
    fn default() -> Self {
        Self {
            shortest_edge: Some(224),
            crop: Some((224, 224)),
            rescale_factor: Some(1.0 / 255.0),
            mean_std: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
        }
    }
}

impl ClipImageProcessor {
    /// Reads `preprocessor_config.json` (unknown keys ignored, transformers' defaults).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let raw: RawConfig = crate::loading::read_json(path)?;
        if raw.resample != 3 {
            return Err(Error::unsupported("resample", raw.resample));
        }
        let shortest_edge = match (raw.do_resize, &raw.size) {
            (false, _) => None,
            (true, SizeSpec::Int(s)) => Some(*s),
            (
                true,
                SizeSpec::Dict {
                    shortest_edge: Some(s),
                    ..
                },
            ) => Some(*s),
            (true, other) => return Err(Error::unsupported("size", other)),
        };
        let crop = match (raw.do_center_crop, &raw.crop_size) {
            (false, _) => None,
            (true, SizeSpec::Int(s)) => Some((*s, *s)),
            (
                true,
                SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                },
            ) => Some((*h, *w)),
            (true, other) => return Err(Error::unsupported("crop_size", other)),
        };
        Ok(Self {
            shortest_edge,
            crop,
            rescale_factor: raw.do_rescale.then_some(raw.rescale_factor),
            mean_std: raw.do_normalize.then_some((raw.image_mean, raw.image_std)),
        })
    }

    /// Preprocesses an RGB8 image (`width × height`, row-major HWC) into `(3, H, W)` f32.
    pub fn preprocess(
        &self,
        width: usize,
        height: usize,
        rgb: &[u8],
        device: &Device,
    ) -> Result<Tensor> {
        crate::vae_image_processor::check_rgb8(width, height, rgb.len())?;
        let mut img = Planar::from_hwc(width, height, rgb);
        if let Some(s) = self.shortest_edge {
            let (h, w) = resize_output_size(height, width, s);
            img = img.resize(w, h, Filter::Bicubic);
        }
        if let Some((ch, cw)) = self.crop {
            img = img.center_crop(ch, cw);
        }
        let (w, h) = (img.width, img.height);
        let mut out = Vec::with_capacity(3 * w * h);
        for c in 0..3 {
            for &v in &img.planes[c] {
                let mut x = v as f32;
                if let Some(r) = self.rescale_factor {
                    x *= r as f32;
                }
                if let Some((mean, std)) = &self.mean_std {
                    x = (x - mean[c] as f32) / std[c] as f32;
                }
                out.push(x);
            }
        }
        Ok(Tensor::from_vec(out, (3, h, w), device)?)
    }
}

/// Pillow's `Image.resize((width, height), BICUBIC)` of an RGB8 image (HWC bytes in and out).
pub fn resize_bicubic_rgb8(
    width: usize,
    height: usize,
    rgb: &[u8],
    new_width: usize,
    new_height: usize,
) -> Vec<u8> {
    resize_rgb8(width, height, rgb, new_width, new_height, Filter::Bicubic)
}

/// Pillow's resampling filters we need: bicubic (images) and Lanczos (inpainting masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BICUBIC` (a = -0.5, support 2).
    Bicubic,
    /// `Image.LANCZOS` (windowed sinc, support 3).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic(x),
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Pillow's `Image.resize((width, height), filter)` of an RGB8 image (HWC bytes in and out).
pub fn resize_rgb8(
    width: usize,
    height: usize,
    rgb: &[u8],
    new_width: usize,
    new_height: usize,
    filter: Filter,
) -> Vec<u8> {
    resize_rgb8_reducing_gap(width, height, rgb, new_width, new_height, filter, None)
}

/// Pillow's `Image.resize((width, height), filter, reducing_gap=gap)`: with a gap, a shrink by a
/// factor of at least `gap` first box-averages the image by the integer factor
/// `int(in / out / gap)` per axis (`Image.reduce`), then resamples the part of the reduced image
/// that covers the original (a fractional box). diffusers' image preprocessing uses `gap = 1`.
pub fn resize_rgb8_reducing_gap(
    width: usize,
    height: usize,
    rgb: &[u8],
    new_width: usize,
    new_height: usize,
    filter: Filter,
    reducing_gap: Option<f64>,
) -> Vec<u8> {
    let mut img = Planar::from_hwc(width, height, rgb);
    let (mut box_w, mut box_h) = (width as f64, height as f64);
    if (width, height) == (new_width, new_height) {
        return rgb.to_vec();
    }
    if let Some(gap) = reducing_gap {
        let factor = |i: usize, o: usize| ((i as f64 / o as f64 / gap) as usize).max(1);
        let (fx, fy) = (factor(width, new_width), factor(height, new_height));
        if fx > 1 || fy > 1 {
            img = img.reduce(fx, fy);
            // Pillow hands the box to C as `float`.
            box_w = (box_w / fx as f64) as f32 as f64;
            box_h = (box_h / fy as f64) as f32 as f64;
        }
    }
    let img = img.resize_box(new_width, new_height, filter, box_w, box_h);
    let mut out = Vec::with_capacity(new_width * new_height * 3);
    for i in 0..new_width * new_height {
        for c in 0..3 {
            out.push(img.planes[c][i]);
        }
    }
    out
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes
/// `size`, the long side `int(size · long / short)`. Returns `(height, width)`.
fn resize_output_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// An 8-bit image as three planes.
struct Planar {
    width: usize,
    height: usize,
    planes: [Vec<u8>; 3],
}

/// Pillow's bicubic filter (`a = -0.5`).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Per output index: first input index and fixed-point weights; plus their precision.
struct Coeffs {
    spans: Vec<(usize, Vec<i32>)>,
    precision: u32,
}

/// Pillow's `precompute_coeffs` for the input span `[0, in_end)` of a line of `in_size` pixels.
fn coeffs(in_size: usize, in_end: f64, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_end / out_size as f64;
    let support = filter.support() * scale.max(1.0);
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut float_spans = Vec::with_capacity(out_size);
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let mut w: Vec<f64> = (0..xsize.max(0))
            .map(|j| filter.eval((j as f64 + xmin as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
            }
        }
        float_spans.push((xmin as usize, w));
    }
    // Pillow's `normalize_coeffs_8bpc`: 22 fractional bits, rounded half away from zero.
    let precision = 22u32;
    let one = (1u64 << precision) as f64;
    let spans = float_spans
        .into_iter()
        .map(|(xmin, w)| {
            let wi = w
                .into_iter()
                .map(|v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, wi)
        })
        .collect();
    Coeffs { spans, precision }
}

fn resample_line(src: &[u8], stride: usize, c: &Coeffs, out: &mut [u8], out_stride: usize) {
    let round = if c.precision > 0 {
        1i32 << (c.precision - 1)
    } else {
        0
    };
    for (o, (xmin, w)) in c.spans.iter().enumerate() {
        let mut acc = round;
        for (j, wj) in w.iter().enumerate() {
            acc += src[(xmin + j) * stride] as i32 * wj;
        }
        out[o * out_stride] = (acc >> c.precision).clamp(0, 255) as u8;
    }
}

impl Planar {
    fn from_hwc(width: usize, height: usize, rgb: &[u8]) -> Self {
        let planes = [0, 1, 2].map(|c| rgb.iter().skip(c).step_by(3).copied().collect());
        Self {
            width,
            height,
            planes,
        }
    }

    fn resize(self, out_w: usize, out_h: usize, filter: Filter) -> Self {
        let (w, h) = (self.width as f64, self.height as f64);
        self.resize_box(out_w, out_h, filter, w, h)
    }

    /// `ImagingResample` of the box `(0, 0, box_w, box_h)`. A pass that would be the identity is
    /// skipped; the horizontal pass runs first unless the height shrinks by more than twice as
    /// many pixels as the width (Pillow 13's order; older Pillow always went horizontal first).
    fn resize_box(
        self,
        out_w: usize,
        out_h: usize,
        filter: Filter,
        box_w: f64,
        box_h: f64,
    ) -> Self {
        let need_h = out_w != self.width || box_w != self.width as f64;
        let need_v = out_h != self.height || box_h != self.height as f64;
        let (dh, dw) = (
            self.height as i64 - out_h as i64,
            self.width as i64 - out_w as i64,
        );
        let horizontal_first = !(dh > 0 && dh > dw * 2);
        let mut img = self;
        if horizontal_first {
            if need_h {
                img = img.pass_horizontal(out_w, filter, box_w);
            }
            if need_v {
                img = img.pass_vertical(out_h, filter, box_h);
            }
        } else {
            if need_v {
                img = img.pass_vertical(out_h, filter, box_h);
            }
            if need_h {
                img = img.pass_horizontal(out_w, filter, box_w);
            }
        }
        img
    }

    fn pass_horizontal(self, out_w: usize, filter: Filter, box_w: f64) -> Self {
        let c = coeffs(self.width, box_w, out_w, filter);
        let (w, h) = (self.width, self.height);
        let planes = self.planes.map(|p| {
            let mut out = vec![0u8; out_w * h];
            for y in 0..h {
                resample_line(&p[y * w..], 1, &c, &mut out[y * out_w..], 1);
            }
            out
        });
        Self {
            width: out_w,
            height: h,
            planes,
        }
    }

    fn pass_vertical(self, out_h: usize, filter: Filter, box_h: f64) -> Self {
        let c = coeffs(self.height, box_h, out_h, filter);
        let w = self.width;
        let planes = self.planes.map(|p| {
            let mut out = vec![0u8; w * out_h];
            for x in 0..w {
                resample_line(&p[x..], w, &c, &mut out[x..], w);
            }
            out
        });
        Self {
            width: w,
            height: out_h,
            planes,
        }
    }

    /// Pillow's `Image.reduce((fx, fy))`: the mean of each `fx × fy` block (partial blocks at the
    /// right and bottom edges average the pixels they have), in Pillow's fixed point:
    /// `((sum + n/2) · ⌊2^32 / (256 n)⌋) >> 24` for a block of `n` pixels.
    fn reduce(self, fx: usize, fy: usize) -> Self {
        let (w, h) = (self.width, self.height);
        let (ow, oh) = (w.div_ceil(fx), h.div_ceil(fy));
        let planes = self.planes.map(|p| {
            let mut out = vec![0u8; ow * oh];
            for oy in 0..oh {
                let ys = oy * fy..((oy + 1) * fy).min(h);
                for ox in 0..ow {
                    let xs = ox * fx..((ox + 1) * fx).min(w);
                    let n = (ys.len() * xs.len()) as u32;
                    let mut sum = n / 2;
                    for y in ys.clone() {
                        for x in xs.clone() {
                            sum += p[y * w + x] as u32;
                        }
                    }
                    // `division_UINT32`: a float32 quotient truncated.
                    let multiplier = (4294967296f32 / (256 * n) as f32) as u32;
                    out[oy * ow + ox] = (sum.wrapping_mul(multiplier) >> 24) as u8;
                }
            }
            out
        });
        Self {
            width: ow,
            height: oh,
            planes,
        }
    }

    /// transformers' centre crop: zero padding when the crop is larger, offsets
    /// `(size - crop) / 2` rounded down.
    fn center_crop(self, ch: usize, cw: usize) -> Self {
        let (w, h) = (self.width, self.height);
        // Offsets into the (virtually) padded image.
        let pad_left = cw.saturating_sub(w).div_ceil(2);
        let pad_top = ch.saturating_sub(h).div_ceil(2);
        let pw = w.max(cw);
        let ph = h.max(ch);
        let left = (pw - cw) / 2;
        let top = (ph - ch) / 2;
        let planes = self.planes.map(|p| {
            let mut out = vec![0u8; cw * ch];
            for y in 0..ch {
                for x in 0..cw {
                    let (sy, sx) = (
                        (y + top) as isize - pad_top as isize,
                        (x + left) as isize - pad_left as isize,
                    );
                    if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        out[y * cw + x] = p[sy as usize * w + sx as usize];
                    }
                }
            }
            out
        });
        Self {
            width: cw,
            height: ch,
            planes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resize_output_size;

    #[test]
    fn shortest_edge_sizes() {
        assert_eq!(resize_output_size(480, 640, 224), (224, 298));
        assert_eq!(resize_output_size(640, 480, 224), (298, 224));
        assert_eq!(resize_output_size(100, 100, 224), (224, 224));
    }
}
