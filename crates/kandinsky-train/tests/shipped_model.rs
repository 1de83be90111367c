//! The shipped small model's 2.2 depth ControlNet (`models/small/decoder-2-2-controlnet-depth`)
//! follows its hint rather than the prompt.

use candle_core::{DType, Device};
use kandinsky::loading::small_named_dirs;
use kandinsky::pipelines::auto_pipeline::DecoderKind;
use kandinsky_train::eval::{eval_controlnet, ShapesEval};

/// The fraction of images whose object must sit where the hint put it. The recipe run's model
/// scored 20 of 20 per language at n = 20 (docs/small-model.md); 6 of 8 leaves room for a retrained
/// model's misses while a model that ignored the hint (its prompt names another place) fails.
const HINT_AT_LEAST: f64 = 0.75;

/// `eval_controlnet` on held-out scenes with the default sampler settings: each image's depth
/// hint puts the object at the scene's position, its prompt names another position, and the
/// analyser reads where the object came out.
#[test]
fn shipped_controlnet_puts_the_object_where_the_hint_does() {
    let controlnet = small_named_dirs("small-2-2", DecoderKind::Controlnet).unwrap();
    let decoder = small_named_dirs("small-2-2", DecoderKind::TextToImage).unwrap();
    let n = 8;
    let s = ShapesEval {
        decoder: decoder.decoder,
        prior: decoder.prior,
        n,
        steps: 100,
        prior_steps: 25,
        guidance: 4.0,
        prior_guidance: 4.0,
        seed: 0,
        batch: 1,
        oracle: false,
        save: None,
        scheduler: None,
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let rows = eval_controlnet(&s, &controlnet.decoder, n, &mut |_, _, _| {}).unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row.n, n);
        // Where the prompt put it is a different place, so a model that ignored the hint would
        // score at most 1 - hint_position here.
        assert!(
            row.hint_position >= HINT_AT_LEAST && row.prompt_position <= 1.0 - HINT_AT_LEAST,
            "{}: object at the hint's position in {:.0} %, at the prompt's in {:.0} %",
            row.name,
            100.0 * row.hint_position,
            100.0 * row.prompt_position
        );
    }
}
