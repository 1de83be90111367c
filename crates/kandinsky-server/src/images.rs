//! Images in requests and responses: base64 (with or without a `data:` prefix) to pixels with
//! the size checked before decoding (decompression bombs), and PNGs back to base64.

use crate::error::ApiError;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use image::{DynamicImage, GenericImageView};
use kandinsky::vae_image_processor::{encode_png, DecodeError, Rgb8};

pub use kandinsky::vae_image_processor::MAX_INPUT_PIXELS;

/// Decodes a base64 image (PNG or JPEG; an optional `data:image/...;base64,` prefix), refusing
/// it before decoding when its header declares more than [`MAX_INPUT_PIXELS`]. `what` names the
/// field in errors.
pub fn decode_image(text: &str, what: &str) -> Result<DynamicImage, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, b64)| b64)
            .ok_or_else(|| ApiError::bad_request(format!("{what}: a data URL without a comma")))?,
        None => text,
    };
    let cleaned: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let bytes = STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| ApiError::bad_request(format!("{what} is not valid base64: {e}")))?;
    kandinsky::vae_image_processor::decode_image(&bytes).map_err(|e| match e {
        DecodeError::TooLarge { .. } => ApiError::too_large(format!("{what}: {e}")),
        DecodeError::NotAnImage(m) => {
            ApiError::bad_request(format!("{what} is not a readable PNG or JPEG image: {m}"))
        }
    })
}

/// RGB pixels; transparency is flattened onto white (A1111's `img2img_background_color`).
pub fn to_rgb8(image: &DynamicImage) -> Rgb8 {
    let (w, h) = image.dimensions();
    let data = if image.color().has_alpha() {
        let rgba = image.to_rgba8();
        rgba.pixels()
            .flat_map(|p| {
                let a = p[3] as u32;
                [0, 1, 2].map(|c| ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8)
            })
            .collect()
    } else {
        image.to_rgb8().into_raw()
    };
    Rgb8 {
        width: w as usize,
        height: h as usize,
        data,
    }
}

/// A mask as A1111 reads it: the alpha channel when the image has any transparency (opaque =
/// repaint), else its luminance; white = repaint. Returned as a grey RGB image.
pub fn to_mask(image: &DynamicImage) -> Rgb8 {
    let (w, h) = image.dimensions();
    let rgba = image.to_rgba8();
    let transparent = image.color().has_alpha() && rgba.pixels().any(|p| p[3] != 255);
    let grey: Vec<u8> = if transparent {
        rgba.pixels().map(|p| p[3]).collect()
    } else {
        image.to_luma8().into_raw()
    };
    Rgb8 {
        width: w as usize,
        height: h as usize,
        data: grey.iter().flat_map(|&g| [g, g, g]).collect(),
    }
}

/// An image as base64 PNG (no prefix) with text chunks.
pub fn png_base64(image: &Rgb8, text: &[(&str, &str)]) -> kandinsky::Result<String> {
    Ok(STANDARD.encode(encode_png(image, text)?))
}

/// Bytes as base64.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}
