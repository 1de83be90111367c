//! diffusers' `VaeImageProcessor` (`image_processor.py`): images to the MoVQ's tensors and back
//! (resize, `x/127.5 - 1`, `x·0.5 + 0.5` → u8), plus what the pipelines need around it: the
//! [`Rgb8`] image type, image files (PNG/JPEG in, atomic PNG with text chunks out), ControlNet
//! hints and the outpainting canvas.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// An 8-bit RGB image: `width × height` pixels, row-major HWC bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width · height · 3` bytes, row by row, R G B per pixel.
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// An image from its bytes, checked to hold `width · height` RGB pixels.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        check_rgb8(width, height, data.len())?;
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// `image` at `width × height` (Pillow bicubic), or a copy when it already has that size.
pub fn resize_rgb8(image: &Rgb8, width: usize, height: usize) -> Rgb8 {
    if (image.width, image.height) == (width, height) {
        return image.clone();
    }
    let data = crate::clip_image_processor::resize_bicubic_rgb8(
        image.width,
        image.height,
        &image.data,
        width,
        height,
    );
    Rgb8 {
        width,
        height,
        data,
    }
}

/// Pillow's RGB → L: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
pub(crate) fn pillow_luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// A buffer of `len` bytes must hold a non-empty `width × height` RGB8 image.
pub(crate) fn check_rgb8(width: usize, height: usize, len: usize) -> Result<()> {
    if width == 0 || height == 0 || len != width * height * 3 {
        return Err(Error::InvalidArgument(format!(
            "image buffer of {len} bytes does not match {width}x{height} RGB"
        )));
    }
    Ok(())
}

/// HWC bytes → `(3, H, W)` f32 (values 0…255).
fn chw_tensor(rgb: Vec<u8>, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(rgb, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?)
}

/// `VaeImageProcessor.normalize` of 8-bit HWC pixels: `x / 127.5 - 1` as `(1, 3, H, W)`.
pub(crate) fn normalize(
    rgb: Vec<u8>,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let t = chw_tensor(rgb, width, height, device)?;
    Ok(((t / 127.5)? - 1.0)?.unsqueeze(0)?)
}

/// Reads an image file (PNG or JPEG) as RGB8.
pub fn read_rgb8(path: &Path) -> Result<Rgb8> {
    let err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let img = decode_image(&bytes)
        .map_err(|e| err(e.to_string()))?
        .to_rgb8();
    Ok(Rgb8 {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.into_raw(),
    })
}

/// The largest input image, in pixels (4096 × 4096).
pub const MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// Why [`decode_image`] refused bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a PNG or JPEG, or a damaged one.
    #[error("{0}")]
    NotAnImage(String),
    /// The header declares more than [`MAX_INPUT_PIXELS`] (a decompression bomb, or too large).
    #[error("the image is {width}x{height}: images may have at most {MAX_INPUT_PIXELS} pixels (4096x4096)")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
}

/// Decodes a PNG or JPEG, refusing it from its header, before decoding, when it declares more
/// than [`MAX_INPUT_PIXELS`] (decompression bombs), and bounding what the decoder may allocate.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<image::DynamicImage, DecodeError> {
    use image::ImageReader;
    use std::io::Cursor;
    let not = |e: image::ImageError| DecodeError::NotAnImage(e.to_string());
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::NotAnImage(e.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::NotAnImage("not a PNG or JPEG image".into()));
    }
    let (width, height) = reader.into_dimensions().map_err(not)?;
    if width as u64 * height as u64 > MAX_INPUT_PIXELS || width == 0 || height == 0 {
        return Err(DecodeError::TooLarge { width, height });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::NotAnImage(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(MAX_INPUT_PIXELS * 8);
    reader.limits(limits);
    reader.decode().map_err(not)
}

/// diffusers' `VaeImageProcessor.preprocess` for the img2img pipelines: the size rounded down to a
/// multiple of `scale_factor`, Pillow bicubic resize with `reducing_gap=1` when the image differs,
/// then `x/127.5 - 1`: `(1, 3, H, W)`.
pub fn prepare_image(
    image: &Rgb8,
    width: usize,
    height: usize,
    scale_factor: usize,
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = (image.width, image.height);
    let (tw, th) = (width - width % scale_factor, height - height % scale_factor);
    if tw == 0 || th == 0 {
        return Err(Error::InvalidArgument(format!(
            "image size {width}x{height} is too small"
        )));
    }
    let rgb = if (w, h) == (tw, th) {
        image.data.clone()
    } else {
        crate::clip_image_processor::resize_rgb8_reducing_gap(
            w,
            h,
            &image.data,
            tw,
            th,
            crate::clip_image_processor::Filter::Bicubic,
            Some(1.0),
        )
    };
    normalize(rgb, tw, th, device)
}

/// diffusers' post-processing of a decoded image `(B, 3, H, W)` in [-1, 1]:
/// `round(clamp(x·0.5 + 0.5, 0, 1) · 255)` as `u8`, one HWC buffer per image.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<Rgb8>> {
    let (b, _, h, w) = images.dims4()?;
    let x = ((images.to_dtype(DType::F32)? * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?.round()?.permute((0, 2, 3, 1))?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v: Vec<f32> = x.get(i)?.flatten_all()?.to_vec1()?;
        out.push(Rgb8 {
            width: w,
            height: h,
            data: v.into_iter().map(|p| p as u8).collect(),
        });
    }
    Ok(out)
}

/// An RGB8 image as PNG bytes, with optional text chunks (keyword, text): Latin-1 `tEXt` when
/// the text is ASCII, UTF-8 `iTXt` otherwise (prompts may be Russian).
pub fn encode_png(image: &Rgb8, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_png(&mut out, image, text).map_err(|message| Error::Image {
        path: "<memory>".into(),
        message,
    })?;
    Ok(out)
}

fn write_png(
    out: impl std::io::Write,
    image: &Rgb8,
    text: &[(&str, &str)],
) -> std::result::Result<(), String> {
    let (width, height, rgb) = (image.width, image.height, &image.data);
    if rgb.len() != width * height * 3 {
        return Err(format!("pixel buffer does not match {width}x{height}"));
    }
    let mut enc = png::Encoder::new(out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        if v.is_ascii() {
            enc.add_text_chunk(k.to_string(), v.to_string())
                .map_err(|e| e.to_string())?;
        } else {
            enc.add_itxt_chunk(k.to_string(), v.to_string())
                .map_err(|e| e.to_string())?;
        }
    }
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(rgb).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())
}

/// Writes an RGB8 buffer as PNG, with optional `tEXt` chunks (keyword, text) such as the
/// A1111-style `parameters` record. The file appears only when complete (written to a temporary
/// name in the same directory, then renamed), so a failure leaves nothing half-written.
pub fn save_png(path: &Path, image: &Rgb8, text: &[(&str, &str)]) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.png".into());
    let tmp = path.with_file_name(format!(".{file_name}.partial"));
    let err = |e: String| Error::Image {
        path: path.to_path_buf(),
        message: e,
    };
    let write = || -> std::result::Result<(), String> {
        let file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut w = std::io::BufWriter::new(file);
        write_png(&mut w, image, text)?;
        std::io::Write::flush(&mut w).map_err(|e| e.to_string())?;
        // On disk before the rename makes it visible, so a crash never shows a short file.
        w.get_ref().sync_all().map_err(|e| e.to_string())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e.to_string())
    })
}

/// A1111's inpainting overlay ("Whole picture", `processing.py` `apply_overlay`): the mask
/// (white = repaint) binarised at 128, blurred with a Gaussian of σ = `mask_blur` pixels (OpenCV's
/// kernel size `2·⌊2.5σ + 0.5⌋ + 1`, border reflected), doubled and clipped so the inner half of
/// the ramp is fully repainted; `generated` shows through that mask and `original` everywhere
/// else, so pixels outside the blurred mask are byte-identical to the input. All three images have
/// the same size.
pub fn overlay_unmasked(
    original: &Rgb8,
    generated: &Rgb8,
    mask: &Rgb8,
    mask_blur: f64,
) -> Result<Rgb8> {
    let (w, h) = (original.width, original.height);
    for (what, img) in [("generated image", generated), ("mask", mask)] {
        if (img.width, img.height) != (w, h) {
            return Err(Error::InvalidArgument(format!(
                "the {what} is {}x{} but the original is {w}x{h}",
                img.width, img.height
            )));
        }
    }
    if !(mask_blur.is_finite() && mask_blur >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "mask blur must be a finite number ≥ 0, got {mask_blur}"
        )));
    }
    let binary: Vec<f32> = mask
        .data
        .chunks_exact(3)
        .map(|p| if pillow_luma(p) > 128 { 255.0 } else { 0.0 })
        .collect();
    let blurred = gaussian_blur(&binary, w, h, mask_blur);
    let mut data = Vec::with_capacity(original.data.len());
    for (i, m) in blurred.iter().enumerate() {
        // `np.clip(mask * 2, 0, 255).astype(uint8)`, then alpha compositing of the original
        // with alpha `255 - m` over the generated image.
        let m = (m.round() * 2.0).clamp(0.0, 255.0).floor();
        let keep = (255.0 - m) / 255.0;
        for c in 0..3 {
            let o = original.data[i * 3 + c] as f32;
            let g = generated.data[i * 3 + c] as f32;
            data.push((o * keep + g * (1.0 - keep)).round() as u8);
        }
    }
    Rgb8::new(w, h, data)
}

/// Separable Gaussian blur of a one-channel image (`cv2.GaussianBlur` with kernel size
/// `2·⌊2.5σ + 0.5⌋ + 1` along each axis and `BORDER_REFLECT_101`).
fn gaussian_blur(src: &[f32], w: usize, h: usize, sigma: f64) -> Vec<f32> {
    let radius = (2.5 * sigma + 0.5) as usize;
    if radius == 0 || sigma == 0.0 {
        return src.to_vec();
    }
    let mut kernel: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let x = i as f64 - radius as f64;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i } else { 2 * (n - 1) - i };
        }
        i as usize
    };
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0f64;
                for (k, wk) in kernel.iter().enumerate() {
                    let d = k as isize - radius as isize;
                    let (sx, sy) = if horizontal {
                        (reflect(x as isize + d, w), y)
                    } else {
                        (x, reflect(y as isize + d, h))
                    };
                    acc += wk * src[sy * w + sx] as f64;
                }
                out[y * w + x] = acc as f32;
            }
        }
        out
    };
    pass(&pass(src, true), false)
}

/// The output path of image `index` of `count`: `path` itself for a single image, otherwise
/// `stem-<index>.ext`.
pub fn numbered_path(path: &Path, index: usize, count: usize) -> std::path::PathBuf {
    if count == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    match path.extension() {
        Some(ext) => path.with_file_name(format!("{stem}-{index}.{}", ext.to_string_lossy())),
        None => path.with_file_name(format!("{stem}-{index}")),
    }
}

/// A ControlNet hint from an image (e.g. a depth map; grey levels become 3 equal channels):
/// resized to `width × height` (Pillow bicubic) when it differs, `/255`, `(1, 3, H, W)` in [0, 1]
/// — the recipe of diffusers' ControlNet examples.
pub fn prepare_hint(image: &Rgb8, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let rgb = resize_rgb8(image, width, height).data;
    let t = chw_tensor(rgb, width, height, device)?;
    Ok((t / 255.0)?.unsqueeze(0)?)
}

/// Outpainting's canvas: the RGB8 image placed at `(left, top)` of a canvas grown by the given
/// margins, the new area filled by repeating the image's edge pixels (so the MoVQ encoder sees no
/// hard border), and a mask that is white (repaint) exactly on the new area. Returns
/// `(canvas, mask)`.
pub fn extend_canvas(image: &Rgb8, margins: Margins) -> (Rgb8, Rgb8) {
    let Margins {
        left,
        top,
        right,
        bottom,
    } = margins;
    let (w, h, rgb) = (image.width, image.height, &image.data);
    let (cw, ch) = (w + left + right, h + top + bottom);
    let mut canvas = Vec::with_capacity(cw * ch * 3);
    let mut mask = Vec::with_capacity(cw * ch * 3);
    for y in 0..ch {
        let sy = y.saturating_sub(top).min(h - 1);
        for x in 0..cw {
            let sx = x.saturating_sub(left).min(w - 1);
            canvas.extend_from_slice(&rgb[(sy * w + sx) * 3..(sy * w + sx) * 3 + 3]);
            let inside = (top..top + h).contains(&y) && (left..left + w).contains(&x);
            mask.extend_from_slice(&[if inside { 0 } else { 255 }; 3]);
        }
    }
    let image = |data| Rgb8 {
        width: cw,
        height: ch,
        data,
    };
    (image(canvas), image(mask))
}

/// Outpainting's margins in pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Margins {
    /// Pixels added on the left.
    pub left: usize,
    /// Pixels added on top.
    pub top: usize,
    /// Pixels added on the right.
    pub right: usize,
    /// Pixels added at the bottom.
    pub bottom: usize,
}
