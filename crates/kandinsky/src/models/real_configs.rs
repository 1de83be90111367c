//! The `config.json` files of the published Kandinsky 2.1 / 2.2 checkpoints, embedded: real-size
//! models can be built (with [`crate::loading::Weights::random`] or
//! [`crate::loading::Weights::meta`]) to benchmark or to check names and shapes, without the
//! weights.
//!
//! ```
//! use kandinsky::models::{real_configs, UNet2DConditionConfig};
//!
//! let unet = UNet2DConditionConfig::from_json(real_configs::UNET_2_2).unwrap();
//! assert_eq!(unet.block_out_channels, [384, 768, 1152, 1536]);
//! ```

macro_rules! real_config {
    ($(#[$doc:meta] $name:ident = $path:literal;)*) => {$(
        #[$doc]
        pub const $name: &str =
            include_str!(concat!("../../real_configs/", $path, "/config.json"));
    )*};
}

real_config! {
    /// `kandinsky-community/kandinsky-2-2-decoder`, `unet/`.
    UNET_2_2 = "kandinsky-2-2-decoder/unet";
    /// `kandinsky-community/kandinsky-2-2-decoder-inpaint`, `unet/`.
    UNET_2_2_INPAINT = "kandinsky-2-2-decoder-inpaint/unet";
    /// `kandinsky-community/kandinsky-2-2-controlnet-depth`, `unet/`.
    UNET_2_2_CONTROLNET_DEPTH = "kandinsky-2-2-controlnet-depth/unet";
    /// `kandinsky-community/kandinsky-2-1`, `unet/`.
    UNET_2_1 = "kandinsky-2-1/unet";
    /// `kandinsky-community/kandinsky-2-1-inpaint`, `unet/`.
    UNET_2_1_INPAINT = "kandinsky-2-1-inpaint/unet";
    /// `kandinsky-community/kandinsky-2-2-prior`, `prior/`.
    PRIOR_2_2 = "kandinsky-2-2-prior/prior";
    /// `kandinsky-community/kandinsky-2-1-prior`, `prior/`.
    PRIOR_2_1 = "kandinsky-2-1-prior/prior";
    /// The 2.2 prior's CLIP ViT-bigG text tower, `text_encoder/`.
    CLIP_BIGG_TEXT = "kandinsky-2-2-prior/text_encoder";
    /// The 2.2 prior's CLIP ViT-bigG vision tower, `image_encoder/`.
    CLIP_BIGG_VISION = "kandinsky-2-2-prior/image_encoder";
    /// The 2.1 prior's CLIP ViT-L/14 text tower, `text_encoder/`.
    CLIP_L_TEXT = "kandinsky-2-1-prior/text_encoder";
    /// The 2.1 prior's CLIP ViT-L/14 vision tower, `image_encoder/`.
    CLIP_L_VISION = "kandinsky-2-1-prior/image_encoder";
    /// The 2.1 decoder's M-CLIP (XLM-R) text encoder, `text_encoder/`.
    MCLIP = "kandinsky-2-1/text_encoder";
    /// The MoVQ of every 2.1 / 2.2 decoder, `movq/`.
    MOVQ = "movq";
}
