//! Training guards: every network built from trainable parameters passes gradients to every
//! parameter it uses (candle's fused softmax / layer_norm / rms_norm have no backward and would
//! silently cut them), and parameters are created deterministically from the seed.

#[path = "../../kandinsky/tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use kandinsky::loading::{read_json, ParamStore, Weights};

/// `loss = Σ out · R` with a fixed random `R` (so no gradient cancels by symmetry), backward, and
/// the parameters whose gradient is missing or all zero.
fn dead_params(store: &ParamStore, outputs: &[Tensor]) -> Vec<String> {
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for o in outputs {
        let r = Tensor::randn(0f32, 1f32, o.shape(), &Device::Cpu).unwrap();
        loss = (loss + (o * r).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    without_gradient(store, &grads)
}

/// The parameters whose gradient is missing or all zero.
fn without_gradient(store: &ParamStore, grads: &candle_core::backprop::GradStore) -> Vec<String> {
    store
        .vars()
        .into_iter()
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn every_unet_parameter_gets_a_gradient() {
    use kandinsky::models::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
    for name in [
        "dummy_2_1",
        "dummy_2_1_inpaint",
        "dummy_2_2",
        "topo_2_2_controlnet",
    ] {
        let dir = fixtures().join("unet").join(name);
        let config = UNet2DConditionConfig::load(&dir).unwrap();
        let store = ParamStore::new(1, &Device::Cpu);
        let unet = UNet2DConditionModel::new(&Weights::trainable(&store), &config).unwrap();
        let d = &Device::Cpu;
        let latent_c = if name.contains("controlnet") {
            4
        } else {
            config.in_channels
        };
        let (h, w) = (8, 8);
        let x = Tensor::randn(0f32, 1f32, (2, latent_c, h, w), d).unwrap();
        let cross = config
            .cross_attention_dim
            .expand("cross_attention_dim", 1)
            .unwrap()[0];
        let hid = config.encoder_hid_dim.unwrap();
        let (img, txt, states, hint);
        let cond = if name.contains("2_1") {
            img = Tensor::randn(0f32, 1f32, (2, cross), d).unwrap();
            txt = Tensor::randn(0f32, 1f32, (2, cross), d).unwrap();
            states = Tensor::randn(0f32, 1f32, (2, 5, hid), d).unwrap();
            UNetConditioning {
                image_embeds: Some(&img),
                text_embeds: Some(&txt),
                encoder_hidden_states: Some(&states),
                hint: None,
            }
        } else {
            img = Tensor::randn(0f32, 1f32, (2, hid), d).unwrap();
            hint = Tensor::rand(0f32, 1f32, (2, 3, 8 * h, 8 * w), d).unwrap();
            UNetConditioning {
                image_embeds: Some(&img),
                hint: name.contains("controlnet").then_some(&hint),
                ..Default::default()
            }
        };
        let out = unet.forward(&x, 500.0, &cond).unwrap();
        let dead = dead_params(&store, &[out]);
        assert!(store.vars().len() > 50, "{name}");
        assert!(dead.is_empty(), "{name}: no gradient for {dead:?}");
    }
}

#[test]
fn every_movq_parameter_gets_a_gradient_except_the_unused_codebook() {
    use kandinsky::models::{VQModel, VQModelConfig};
    let config = VQModelConfig::load(&fixtures().join("movq/dummy")).unwrap();
    let store = ParamStore::new(2, &Device::Cpu);
    let movq = VQModel::new(&Weights::trainable(&store), &config).unwrap();
    let x = Tensor::rand(-1f32, 1f32, (2, 3, 16, 16), &Device::Cpu).unwrap();
    let z = movq.encode(&x).unwrap();
    let out = movq.decode(&z, true).unwrap();
    let dead = dead_params(&store, &[out]);
    // Without quantisation (how the pipelines decode) the codebook is not used.
    assert_eq!(dead, vec!["quantize.embedding.weight".to_string()]);
}

#[test]
fn every_prior_and_encoder_parameter_gets_a_gradient() {
    use kandinsky::models::clip::{
        ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig,
        ClipVisionModelWithProjection,
    };
    use kandinsky::models::transformers::prior_transformer::{
        PriorTransformer, PriorTransformerConfig,
    };
    let d = &Device::Cpu;
    // Prior (clip_mean / clip_std are data statistics used only after sampling).
    let c: PriorTransformerConfig =
        read_json(&fixtures().join("encoders/prior_dummy/config.json")).unwrap();
    let store = ParamStore::new(3, d);
    let prior = PriorTransformer::new(&Weights::trainable(&store), &c).unwrap();
    let e = c.embedding_dim;
    let x = Tensor::randn(0f32, 1f32, (2, e), d).unwrap();
    let proj = Tensor::randn(0f32, 1f32, (2, e), d).unwrap();
    let states = Tensor::randn(0f32, 1f32, (2, c.num_embeddings, e), d).unwrap();
    let out = prior.forward(&x, 10.0, &proj, Some(&states), None).unwrap();
    let dead = dead_params(&store, &[out]);
    assert_eq!(dead, vec!["clip_mean".to_string(), "clip_std".to_string()]);
    // CLIP text tower.
    let c: ClipTextConfig =
        read_json(&fixtures().join("encoders/clip_text_2_2/config.json")).unwrap();
    let store = ParamStore::new(4, d);
    let text = ClipTextModelWithProjection::new(&Weights::trainable(&store), &c).unwrap();
    let ids = Tensor::new(&[[0u32, 5, 9, 2, 1], [0, 7, 2, 1, 1]], d).unwrap();
    let out = text.forward(&ids, None).unwrap();
    let dead = dead_params(&store, &[out.text_embeds, out.last_hidden_state]);
    assert!(dead.is_empty(), "CLIP text: {dead:?}");
    // CLIP vision tower.
    let c: ClipVisionConfig =
        read_json(&fixtures().join("encoders/clip_vision_2_2/config.json")).unwrap();
    let store = ParamStore::new(5, d);
    let vision = ClipVisionModelWithProjection::new(&Weights::trainable(&store), &c).unwrap();
    let px = Tensor::randn(0f32, 1f32, (2, 3, c.image_size, c.image_size), d).unwrap();
    let out = vision.forward(&px).unwrap();
    let dead = dead_params(&store, &[out.image_embeds]);
    assert!(dead.is_empty(), "CLIP vision: {dead:?}");
}

#[test]
fn parameters_are_a_function_of_seed_and_name() {
    use kandinsky::models::{VQModel, VQModelConfig};
    let config = VQModelConfig::load(&fixtures().join("movq/dummy")).unwrap();
    let build = |seed| {
        let store = ParamStore::new(seed, &Device::Cpu);
        VQModel::new(&Weights::trainable(&store), &config).unwrap();
        store.tensors()
    };
    let (a, b, c) = (build(7), build(7), build(8));
    let w = "encoder.conv_in.weight";
    let same = |x: &Tensor, y: &Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0
    };
    assert!(same(&a[w], &b[w]));
    assert!(!same(&a[w], &c[w]));
    assert_eq!(a.len(), b.len());
}

const TINY_MOVQ: &str = r#"{
  "block_out_channels": [32, 32],
  "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
  "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
  "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32, "norm_type": "spatial",
  "num_vq_embeddings": 16, "vq_embed_dim": 4, "sample_size": 16
}"#;

fn tiny_opts(dir: &std::path::Path, steps: u64) -> kandinsky_train::trainer::TrainOptions {
    kandinsky_train::trainer::TrainOptions {
        steps,
        batch: 2,
        seed: 1,
        optim: kandinsky_train::optim::AdamWConfig {
            lr: 2e-3,
            ..Default::default()
        },
        out_dir: dir.to_path_buf(),
        checkpoint_every: 2,
        image_size: 16,
        lr_decay_steps: 0,
        lr_restarts: Vec::new(),
        init: Default::default(),
        lr_scales: Default::default(),
    }
}

fn exported(dir: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        dir.join("movq/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn assert_same_weights(
    a: &std::collections::HashMap<String, Tensor>,
    b: &std::collections::HashMap<String, Tensor>,
) {
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k} differs");
    }
}

/// Two runs with one seed give identical weights, and stopping after 2 steps then resuming from
/// the checkpoint gives the same weights as 4 uninterrupted steps.
#[test]
fn movq_training_is_deterministic_and_resumes_exactly() {
    use kandinsky_train::movq::train_movq;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    train_movq(
        &tiny_opts(&a, 4),
        TINY_MOVQ,
        Default::default(),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    train_movq(
        &tiny_opts(&b, 4),
        TINY_MOVQ,
        Default::default(),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_same_weights(&exported(&a), &exported(&b));
    train_movq(
        &tiny_opts(&c, 2),
        TINY_MOVQ,
        Default::default(),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    let report = train_movq(
        &tiny_opts(&c, 4),
        TINY_MOVQ,
        Default::default(),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(report.start_step, 2);
    assert_same_weights(&exported(&a), &exported(&c));
    // The export loads as a diffusers component.
    kandinsky::models::VQModel::load(&a.join("movq"), DType::F32, &Device::Cpu).unwrap();
}

/// The loss falls on a fixed batch, and every MoVQ parameter (codebook included, through the
/// codebook loss) gets a gradient from the training loss.
#[test]
fn standardised_movq_latents_have_unit_variance_and_decode_the_same() {
    use kandinsky::models::{VQModel, VQModelConfig};
    use kandinsky_train::movq::{image_batch, latent_scale, standardise_latents};
    let config = VQModelConfig::load(&fixtures().join("movq/dummy")).unwrap();
    let store = ParamStore::new(3, &Device::Cpu);
    let movq = VQModel::new(&Weights::trainable(&store), &config).unwrap();
    let k = latent_scale(&movq, 0, 32).unwrap();
    assert!(k.is_finite() && (k - 1.0).abs() > 0.05, "scale {k}");
    let mut tensors = store.tensors();
    standardise_latents(&mut tensors, k).unwrap();
    let scaled_store = ParamStore::with_init(3, tensors, &Device::Cpu);
    let scaled = VQModel::new(&Weights::trainable(&scaled_store), &config).unwrap();
    let k2 = latent_scale(&scaled, 0, 32).unwrap();
    assert!((k2 - 1.0).abs() < 1e-4, "scale after standardising {k2}");
    let x = image_batch(5, 0, 2, 32).unwrap();
    let (z, zs) = (movq.encode(&x).unwrap(), scaled.encode(&x).unwrap());
    assert!(common::errors(&zs, &(&z * k).unwrap()).0 < 1e-5);
    for force in [true, false] {
        let a = movq.decode(&z, force).unwrap();
        let b = scaled.decode(&zs, force).unwrap();
        let r = common::errors(&b, &a).0;
        assert!(
            r < 1e-4,
            "decode (force_not_quantize {force}) moved by rel L2 {r}"
        );
    }
}

#[test]
fn movq_loss_falls_on_a_fixed_batch() {
    use kandinsky::models::{VQModel, VQModelConfig};
    use kandinsky_train::movq::{image_batch, movq_loss};
    use kandinsky_train::optim::{AdamW, AdamWConfig};
    let config: VQModelConfig = serde_json::from_str(TINY_MOVQ).unwrap();
    let store = ParamStore::new(3, &Device::Cpu);
    let movq = VQModel::new(&Weights::trainable(&store), &config).unwrap();
    let x = image_batch(5, 0, 4, 16).unwrap();
    let (loss, _) = movq_loss(&movq, &x, Default::default()).unwrap();
    let grads = loss.backward().unwrap();
    let dead = without_gradient(&store, &grads);
    assert!(dead.is_empty(), "no gradient for {dead:?}");
    let mut opt = AdamW::new(AdamWConfig {
        lr: 2e-3,
        ..Default::default()
    });
    let vars = store.vars();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (loss, _) = movq_loss(&movq, &x, Default::default()).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&vars, &loss.backward().unwrap()).unwrap();
    }
    println!("loss {} -> {}", losses[0], losses[39]);
    assert!(losses[39] < 0.3 * losses[0], "{losses:?}");
}

/// The training convolution (im2col + GEMM custom op) against candle's conv2d: forward values and
/// the gradients of input, weight and bias, for 3×3 / 1×1 kernels, strides 1 and 2, padding 0 / 1.
#[test]
fn gemm_convolution_matches_candle_forward_and_backward() {
    use candle_core::Var;
    let d = &Device::Cpu;
    for (c, o, h, w, k, s, p) in [
        (5usize, 4usize, 9usize, 7usize, 3usize, 1usize, 1usize),
        (3, 6, 8, 8, 3, 2, 1),
        (4, 2, 7, 9, 3, 2, 0),
        (6, 5, 5, 6, 1, 1, 0),
        (2, 3, 6, 5, 3, 1, 0),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, h, w), d).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1., (o, c, k, k), d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., o, d).unwrap()).unwrap();
        let reference = x
            .conv2d(&wt, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        let ours = kandinsky::ops::im2col::conv2d_gemm(&x, &wt, &b, s, p).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        let r = Tensor::randn(0f32, 1., ours.shape(), d).unwrap();
        let g_ref = (&reference * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (rel, _, _) = common::errors(a, b);
            assert!(rel < 1e-5, "{c}->{o} k{k} s{s} p{p} {what}: rel {rel}");
        };
        close(&ours, &reference, "forward");
        for (v, what) in [(&x, "dx"), (&wt, "dw"), (&b, "db")] {
            close(
                g_ours.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
                what,
            );
        }
    }
}

fn clip_tokenizer() -> kandinsky::tokenization::PromptTokenizer {
    let dir = fixtures().join("tokenizers/clip");
    kandinsky::tokenization::PromptTokenizer::clip_from_files(
        &dir.join("vocab.json"),
        &dir.join("merges.txt"),
        "<|endoftext|>",
        77,
    )
    .unwrap()
}

/// A randomly initialised CLIP (towers from these configs, parameters from `seed`) with the real
/// BPE, as the frozen teacher of the prior and M-CLIP stages, and the store of its parameters.
fn random_frozen_clip(
    seed: u64,
    text: serde_json::Value,
    vision: serde_json::Value,
) -> (kandinsky_train::prior::FrozenClip, ParamStore) {
    let store = ParamStore::new(seed, &Device::Cpu);
    let clip = kandinsky_train::clip::Clip::new(
        &store,
        &serde_json::from_value(text).unwrap(),
        &serde_json::from_value(vision).unwrap(),
    )
    .unwrap();
    let frozen = kandinsky_train::prior::FrozenClip {
        text: clip.text,
        vision: clip.vision,
        tokenizer: clip_tokenizer(),
    };
    (frozen, store)
}

/// Every caption of the synthetic world fits CLIP's 77 tokens (Russian costs ~2 tokens a letter).
#[test]
fn captions_fit_the_clip_context() {
    let tok = clip_tokenizer();
    let mut longest = 0;
    for i in 0..3000 {
        let e = kandinsky_train::shapes::training_example(9, i, 16);
        let (_, mask) = tok.encode_one(&e.caption).unwrap();
        let n = mask.iter().filter(|m| **m == 1).count();
        longest = longest.max(n);
        assert!(n < 77, "{} may be truncated ({n} tokens)", e.caption);
    }
    println!("longest caption: {longest} tokens");
}

/// The contrastive loss falls and retrieval accuracy rises on a fixed batch; every parameter of
/// both towers (and the temperature) gets a gradient.
#[test]
fn clip_loss_falls_on_a_fixed_batch() {
    use kandinsky_train::clip::{
        clip_batch, Clip, SMALL_CLIP_TEXT_CONFIG, SMALL_CLIP_VISION_CONFIG,
    };
    use kandinsky_train::optim::{AdamW, AdamWConfig};
    let mut text: serde_json::Value = serde_json::from_str(SMALL_CLIP_TEXT_CONFIG).unwrap();
    let mut vision: serde_json::Value = serde_json::from_str(SMALL_CLIP_VISION_CONFIG).unwrap();
    // Narrower and shallower than the real recipe, to keep the test fast.
    text["hidden_size"] = 32.into();
    text["num_hidden_layers"] = 1.into();
    vision["hidden_size"] = 32.into();
    vision["num_hidden_layers"] = 1.into();
    vision["image_size"] = 32.into();
    let store = ParamStore::new(4, &Device::Cpu);
    let clip = Clip::new(
        &store,
        &serde_json::from_value(text).unwrap(),
        &serde_json::from_value(vision).unwrap(),
    )
    .unwrap();
    let tok = clip_tokenizer();
    let (pixels, captions) = clip_batch(2, 0, 8, 32).unwrap();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let ids = tok.encode(&refs, &Device::Cpu).unwrap().input_ids;
    let (loss, _) = clip.loss(&pixels, &ids).unwrap();
    let dead = {
        let grads = loss.backward().unwrap();
        without_gradient(&store, &grads)
    };
    assert!(dead.is_empty(), "no gradient for {dead:?}");
    let mut opt = AdamW::new(AdamWConfig {
        lr: 3e-3,
        ..Default::default()
    });
    let vars = store.vars();
    let mut first = None;
    let mut last = (0.0, 0.0);
    for _ in 0..40 {
        let (loss, acc) = clip.loss(&pixels, &ids).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(l);
        last = (l, acc.to_scalar::<f32>().unwrap());
        opt.step(&vars, &loss.backward().unwrap()).unwrap();
    }
    let first = first.unwrap();
    println!("clip loss {first} -> {}, accuracy {}", last.0, last.1);
    assert!(last.0 < 0.5 * first, "loss {first} -> {}", last.0);
    assert!(last.1 >= 0.75, "accuracy {}", last.1);
}

/// The prior's x0 loss falls on a fixed batch (fixed timesteps and noise) against a frozen CLIP;
/// every prior parameter except the data statistics gets a gradient, CLIP none.
#[test]
fn prior_loss_falls_on_a_fixed_batch() {
    use kandinsky::models::transformers::prior_transformer::{
        PriorTransformer, PriorTransformerConfig,
    };
    use kandinsky::utils::torch_utils::TorchGenerator;
    use kandinsky_train::clip::{SMALL_CLIP_TEXT_CONFIG, SMALL_CLIP_VISION_CONFIG};
    use kandinsky_train::optim::{AdamW, AdamWConfig};
    use kandinsky_train::prior::{embedding_stats, prior_loss, SMALL_PRIOR_CONFIG};
    use kandinsky_train::shapes::Rng;
    let mut text: serde_json::Value = serde_json::from_str(SMALL_CLIP_TEXT_CONFIG).unwrap();
    let mut vision: serde_json::Value = serde_json::from_str(SMALL_CLIP_VISION_CONFIG).unwrap();
    text["num_hidden_layers"] = 1.into();
    vision["num_hidden_layers"] = 1.into();
    vision["image_size"] = 32.into();
    let (frozen, clip_store) = random_frozen_clip(6, text, vision);
    let mut config: serde_json::Value = serde_json::from_str(SMALL_PRIOR_CONFIG).unwrap();
    config["num_layers"] = 2.into();
    let config: PriorTransformerConfig = serde_json::from_value(config).unwrap();
    let store = ParamStore::new(7, &Device::Cpu);
    let prior = PriorTransformer::new(&Weights::trainable(&store), &config).unwrap();
    let (mean, std) = embedding_stats(&frozen, 3, 64, 32).unwrap();
    let cond = frozen.embed(3, 0, 8, 32, 0.0, &mut Rng::new(0)).unwrap();
    let loss_at = |p: &PriorTransformer| {
        prior_loss(
            p,
            &cond,
            &mean,
            &std,
            &mut Rng::new(1),
            &mut TorchGenerator::new(1),
        )
        .unwrap()
    };
    let (loss, _) = loss_at(&prior);
    let grads = loss.backward().unwrap();
    let dead = without_gradient(&store, &grads);
    assert_eq!(dead, vec!["clip_mean".to_string(), "clip_std".to_string()]);
    assert!(clip_store
        .vars()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_none()));
    let mut opt = AdamW::new(AdamWConfig {
        lr: 2e-3,
        ..Default::default()
    });
    let vars = store.vars();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (loss, _) = loss_at(&prior);
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&vars, &loss.backward().unwrap()).unwrap();
    }
    println!("prior loss {} -> {}", losses[0], losses[39]);
    assert!(losses[39] < 0.3 * losses[0], "{losses:?}");
}

/// The UNet's ε loss falls on a fixed batch (fixed timesteps and noise), for the text-to-image and
/// the 9-channel inpainting variants; every parameter gets a gradient from the training loss.
#[test]
fn timestep_weights_are_the_capped_v_loss_weights() {
    use kandinsky_train::unet::timestep_weights;
    // Kandinsky 2.1's linear β schedule.
    let mut prod = 1f64;
    let ac: Vec<f32> = (0..1000)
        .map(|i| {
            prod *= 1.0 - (0.00085 + (0.012 - 0.00085) * i as f64 / 999.0);
            prod as f32
        })
        .collect();
    assert!(timestep_weights(&ac, 0.0).iter().all(|&w| w == 1.0));
    for cap in [50.0, 1e9] {
        let w = timestep_weights(&ac, cap);
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / 1000.0;
        assert!((mean - 1.0).abs() < 1e-5, "mean {mean}");
        assert!(w.windows(2).all(|p| p[1] >= p[0]), "not monotone");
        // Uncapped, w_t ∝ 1/ᾱ_t: ratios follow ᾱ.
        let (s, t) = (100, 600);
        if cap > 1e6 {
            let r = (w[t] / w[s]) as f64 / (ac[s] / ac[t]) as f64;
            assert!((r - 1.0).abs() < 1e-4, "ratio {r}");
        } else {
            assert_eq!(w[999], w[990], "the cap flattens the noisiest steps");
            assert!(w[999] / w[0] > 40.0 && w[999] / w[0] < 50.5);
        }
    }
}

/// The small UNet's architecture at two levels and half the width (fresh parameters, seed 8),
/// with a batch of 4 random clean latents, conditioning and (for 9 input channels) inpainting
/// inputs.
#[allow(clippy::type_complexity)]
fn tiny_unet_batch(
    in_channels: usize,
) -> (
    ParamStore,
    kandinsky::models::UNet2DConditionModel,
    Tensor,
    kandinsky_train::unet::UNetCond,
    Option<Tensor>,
) {
    let d = &Device::Cpu;
    let mut config: serde_json::Value =
        serde_json::from_str(kandinsky_train::unet::SMALL_UNET_CONFIG).unwrap();
    config["block_out_channels"] = serde_json::json!([32, 64]);
    config["down_block_types"] =
        serde_json::json!(["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"]);
    config["up_block_types"] =
        serde_json::json!(["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]);
    config["attention_head_dim"] = 16.into();
    config["in_channels"] = in_channels.into();
    let config = serde_json::from_value(config).unwrap();
    let store = ParamStore::new(8, d);
    let unet =
        kandinsky::models::UNet2DConditionModel::new(&Weights::trainable(&store), &config).unwrap();
    let mut g = kandinsky::utils::torch_utils::TorchGenerator::new(9);
    let x0 = g.randn((4, 4, 8, 8), d).unwrap();
    let cond = (
        g.randn((4, 64), d).unwrap(),
        g.randn((4, 64), d).unwrap(),
        g.randn((4, 7, 64), d).unwrap(),
    );
    let extra = (in_channels == 9).then(|| g.randn((4, 5, 8, 8), d).unwrap());
    (store, unet, x0, cond, extra)
}

#[test]
fn unet_loss_falls_on_a_fixed_batch() {
    use kandinsky::models::UNet2DConditionModel;
    use kandinsky::utils::torch_utils::TorchGenerator;
    use kandinsky_train::optim::{AdamW, AdamWConfig};
    use kandinsky_train::shapes::Rng;
    use kandinsky_train::unet::unet_loss;
    for in_channels in [4usize, 9] {
        let (store, unet, x0, cond, extra) = tiny_unet_batch(in_channels);
        let loss_at = |u: &UNet2DConditionModel| {
            unet_loss(
                u,
                &x0,
                &cond,
                extra.as_ref(),
                50.0,
                &mut Rng::new(1),
                &mut TorchGenerator::new(2),
            )
            .unwrap()
        };
        let (loss, _) = loss_at(&unet);
        let grads = loss.backward().unwrap();
        let dead = without_gradient(&store, &grads);
        assert!(
            dead.is_empty(),
            "in {in_channels}: no gradient for {dead:?}"
        );
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        });
        let vars = store.vars();
        let mut losses = Vec::new();
        for _ in 0..30 {
            let (loss, _) = loss_at(&unet);
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.step(&vars, &loss.backward().unwrap()).unwrap();
        }
        println!(
            "unet (in {in_channels}) loss {} -> {}",
            losses[0], losses[29]
        );
        assert!(losses[29] < 0.5 * losses[0], "{losses:?}");
    }
}

/// The decoder's batch split into parts on threads ([`kandinsky_train::unet::GRAD_PARTS`])
/// gives the whole batch's loss and gradients, also for uneven parts, and the same bits twice.
#[test]
fn unet_gradients_in_parts_equal_the_whole_batch() {
    use kandinsky::utils::torch_utils::TorchGenerator;
    use kandinsky_train::shapes::Rng;
    use kandinsky_train::unet::NoisyBatch;
    let (store, unet, x0, cond, _) = tiny_unet_batch(4);
    let vars = store.vars();
    let batch = NoisyBatch::new(
        &x0,
        &cond,
        None,
        50.0,
        &mut Rng::new(1),
        &mut TorchGenerator::new(2),
    )
    .unwrap();
    let (whole, loss, metric) = batch.grads(&unet, &vars, 1).unwrap();
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // Some gradients are rounding noise around zero (a conv bias right before a GroupNorm):
    // those are held to a floor set by the largest gradient of the model.
    let floor = vars
        .iter()
        .map(|(_, v)| max_abs(whole.get(v.as_tensor()).unwrap()))
        .fold(0f32, f32::max)
        * 1e-6;
    for parts in [2, 3, 4] {
        let (split, l, m) = batch.grads(&unet, &vars, parts).unwrap();
        assert!(
            (l - loss).abs() <= 1e-5 * loss,
            "{parts} parts: loss {l} vs {loss}"
        );
        assert!(
            (m - metric).abs() <= 1e-5 * metric,
            "{parts} parts: ε {m} vs {metric}"
        );
        for (name, var) in &vars {
            let a = whole.get(var.as_tensor()).unwrap();
            let b = split.get(var.as_tensor()).unwrap();
            let (scale, diff) = (max_abs(a), max_abs(&(a - b).unwrap()));
            assert!(
                diff <= 1e-4 * scale + floor,
                "{parts} parts, {name}: {diff} of {scale}"
            );
        }
    }
    let (again, _, _) = batch.grads(&unet, &vars, 2).unwrap();
    let (first, _, _) = batch.grads(&unet, &vars, 2).unwrap();
    for (name, var) in &vars {
        let (a, b) = (
            first.get(var.as_tensor()).unwrap(),
            again.get(var.as_tensor()).unwrap(),
        );
        let same = a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "{name}: two runs of the same split differ");
    }
}

/// The small XLM-R vocabulary: the real pieces our captions use. Captions never seen while
/// reducing tokenize to the same pieces as with the full 250,002-piece vocabulary, and the saved
/// tokenizer loads through the production path.
#[test]
fn reduced_xlm_roberta_vocabulary_tokenizes_captions_like_the_full_one() {
    use kandinsky_train::shapes::{eval_prompts, training_example, Language};
    use kandinsky_train::tokenizer::{reduce_vocabulary, save_xlm_roberta, xlm_roberta_tokenizer};
    let full = kandinsky_train::tokenizer::read_pieces_tsv_gz(
        &fixtures().join("tokenizers/xlm_roberta/pieces.tsv.gz"),
    )
    .unwrap();
    let captions: Vec<String> = (0..4000)
        .map(|i| training_example(0, i, 8).caption)
        .collect();
    let reduced = reduce_vocabulary(&full, &captions).unwrap();
    println!("reduced vocabulary: {} pieces", reduced.len());
    assert!(reduced.len() < 1500, "{}", reduced.len());
    assert_eq!(reduced[0].0, "<s>");
    assert_eq!(reduced.last().unwrap().0, "<mask>");
    let full_tok = xlm_roberta_tokenizer(full).unwrap();
    let small_tok = xlm_roberta_tokenizer(reduced).unwrap();
    let mut unseen: Vec<String> = (0..500)
        .map(|i| training_example(77, i, 8).caption)
        .collect();
    unseen.extend(eval_prompts(Language::En, 50).into_iter().map(|(_, c)| c));
    unseen.extend(eval_prompts(Language::Ru, 50).into_iter().map(|(_, c)| c));
    for c in &unseen {
        let a = full_tok.encode(c.as_str(), true).unwrap();
        let b = small_tok.encode(c.as_str(), true).unwrap();
        assert_eq!(a.get_tokens(), b.get_tokens(), "{c}");
        assert!(!b.get_ids().contains(&3), "{c}: <unk>");
    }
    let dir = tempfile::tempdir().unwrap();
    save_xlm_roberta(&small_tok, dir.path()).unwrap();
    let tok = kandinsky::tokenization::PromptTokenizer::xlm_roberta_from_dir(dir.path()).unwrap();
    let (ids, _) = tok.encode_one(&unseen[0]).unwrap();
    let b = small_tok.encode(unseen[0].as_str(), true).unwrap();
    assert_eq!(&ids[..b.get_ids().len()], b.get_ids());
}

/// M-CLIP distillation: the loss falls on a fixed batch of English and Russian captions; every
/// parameter but XLM-R's pooler (part of the checkpoint, unused by `MultilingualCLIP`) gets a
/// gradient.
#[test]
fn mclip_loss_falls_on_a_fixed_batch() {
    use kandinsky::pipelines::kandinsky::text_encoder::{MClipConfig, MultilingualClip};
    use kandinsky_train::clip::{SMALL_CLIP_TEXT_CONFIG, SMALL_CLIP_VISION_CONFIG};
    use kandinsky_train::mclip::{mclip_loss, small_mclip_config};
    use kandinsky_train::optim::{AdamW, AdamWConfig};
    use kandinsky_train::shapes::training_example;
    use kandinsky_train::tokenizer::{save_xlm_roberta, xlm_roberta_tokenizer};
    let mut text: serde_json::Value = serde_json::from_str(SMALL_CLIP_TEXT_CONFIG).unwrap();
    text["num_hidden_layers"] = 1.into();
    let vision: serde_json::Value = serde_json::from_str(SMALL_CLIP_VISION_CONFIG).unwrap();
    let (teacher, _) = random_frozen_clip(10, text, vision);
    // The real XLM-R pieces, reduced to what these captions use.
    let pieces: Vec<(String, f64)> = kandinsky_train::tokenizer::read_pieces_tsv_gz(
        &fixtures().join("tokenizers/xlm_roberta/pieces.tsv.gz"),
    )
    .unwrap();
    let captions: Vec<String> = (0..8).map(|i| training_example(4, i, 8).caption).collect();
    let vocab = kandinsky_train::tokenizer::reduce_vocabulary(&pieces, &captions).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_xlm_roberta(&xlm_roberta_tokenizer(vocab.clone()).unwrap(), dir.path()).unwrap();
    let tok = kandinsky::tokenization::PromptTokenizer::xlm_roberta_from_dir(dir.path()).unwrap();
    let mut config = small_mclip_config(vocab.len());
    config["num_hidden_layers"] = 1.into();
    let config: MClipConfig = serde_json::from_value(config).unwrap();
    let store = ParamStore::new(11, &Device::Cpu);
    let mclip = MultilingualClip::new(&Weights::trainable(&store), &config).unwrap();
    let (loss, _) = mclip_loss(&mclip, &tok, &teacher, &captions).unwrap();
    let grads = loss.backward().unwrap();
    let dead = without_gradient(&store, &grads);
    assert_eq!(
        dead,
        vec![
            "transformer.pooler.dense.bias".to_string(),
            "transformer.pooler.dense.weight".to_string()
        ]
    );
    let mut opt = AdamW::new(AdamWConfig {
        lr: 2e-3,
        ..Default::default()
    });
    let vars = store.vars();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (loss, _) = mclip_loss(&mclip, &tok, &teacher, &captions).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&vars, &loss.backward().unwrap()).unwrap();
    }
    println!("mclip loss {} -> {}", losses[0], losses[39]);
    assert!(losses[39] < 0.3 * losses[0], "{losses:?}");
}

/// The small CLIP vocabulary: the real BPE tokens our captions use and the merges that build
/// them. Captions never seen while reducing (training and held-out ones, both languages) give
/// the same tokens as with the full 49,408-token vocabulary; other text still tokenizes within
/// the reduced vocabulary.
#[test]
fn reduced_clip_vocabulary_tokenizes_captions_like_the_full_one() {
    use kandinsky::tokenization::PromptTokenizer;
    use kandinsky_train::shapes::{caption_sample, eval_prompts, training_example, Language};
    use kandinsky_train::tokenizer::reduce_clip_vocabulary;
    let full_dir = fixtures().join("tokenizers/clip");
    let dir = tempfile::tempdir().unwrap();
    let size = reduce_clip_vocabulary(&full_dir, &caption_sample(2), dir.path()).unwrap();
    println!("reduced CLIP vocabulary: {size} tokens");
    assert!((512..2000).contains(&size), "{size}");
    let load = |d: &std::path::Path| {
        let tok = PromptTokenizer::clip_from_files(
            &d.join("vocab.json"),
            &d.join("merges.txt"),
            "<|endoftext|>",
            77,
        )
        .unwrap();
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(&std::fs::read_to_string(d.join("vocab.json")).unwrap()).unwrap();
        let names: std::collections::HashMap<u32, String> =
            vocab.into_iter().map(|(t, i)| (i, t)).collect();
        (tok, names)
    };
    let (full, full_names) = load(&full_dir);
    let (small, small_names) = load(dir.path());
    // The end token keeps the highest id (the text tower pools there).
    assert_eq!(small_names[&(size as u32 - 1)], "<|endoftext|>");
    assert_eq!(small_names[&(size as u32 - 2)], "<|startoftext|>");
    let tokens =
        |tok: &PromptTokenizer, names: &std::collections::HashMap<u32, String>, t: &str| {
            let (ids, _) = tok.encode_one(t).unwrap();
            ids.iter().map(|i| names[i].clone()).collect::<Vec<_>>()
        };
    let mut texts: Vec<String> = (1000..3000)
        .map(|i| training_example(5, i, 8).caption)
        .collect();
    for lang in [Language::En, Language::Ru] {
        texts.extend(eval_prompts(lang, 300).into_iter().map(|(_, t)| t));
    }
    for t in &texts {
        assert_eq!(
            tokens(&full, &full_names, t),
            tokens(&small, &small_names, t),
            "{t}"
        );
    }
    for odd in ["a purple ☃ 🐈 круг!! on a zebra", "ÆØÅ 12345", ""] {
        let (ids, _) = small.encode_one(odd).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < size), "{odd}: {ids:?}");
    }
}

/// The prior's pool hands out exactly what CLIP gives the same examples: each drawn row's text
/// outputs belong to the example whose image embedding it carries, and a dropped caption's
/// outputs are those of `""`.
#[test]
fn prior_pool_rows_are_clip_outputs_of_their_examples() {
    use kandinsky_train::clip::{SMALL_CLIP_TEXT_CONFIG, SMALL_CLIP_VISION_CONFIG};
    use kandinsky_train::shapes::Rng;
    let mut text: serde_json::Value = serde_json::from_str(SMALL_CLIP_TEXT_CONFIG).unwrap();
    let mut vision: serde_json::Value = serde_json::from_str(SMALL_CLIP_VISION_CONFIG).unwrap();
    text["num_hidden_layers"] = 1.into();
    vision["num_hidden_layers"] = 1.into();
    vision["image_size"] = 32.into();
    let (frozen, _) = random_frozen_clip(6, text, vision);
    let pool = frozen.pool(3, 8, 32).unwrap();
    assert_eq!(pool.len(), 8);
    let (t, h, m, i) = frozen.embed(3, 0, 8, 32, 0.0, &mut Rng::new(0)).unwrap();
    let rows = |x: &Tensor| -> Vec<Vec<f32>> {
        (0..x.dim(0).unwrap())
            .map(|r| x.get(r).unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let (t, h, m, i) = (rows(&t), rows(&h), rows(&m), rows(&i));
    let (bt, bh, bm, bi) = pool.batch(16, 0.0, &mut Rng::new(5)).unwrap();
    let (bt, bh, bm, bi) = (rows(&bt), rows(&bh), rows(&bm), rows(&bi));
    let mut seen = std::collections::HashSet::new();
    for r in 0..16 {
        let j = i
            .iter()
            .position(|e| *e == bi[r])
            .expect("an example's image embedding");
        seen.insert(j);
        assert_eq!((&bt[r], &bh[r], &bm[r]), (&t[j], &h[j], &m[j]), "row {r}");
    }
    assert!(seen.len() > 1, "16 draws all took one example");
    let tok = frozen.tokenizer.encode(&[""], &Device::Cpu).unwrap();
    let empty = frozen.text.forward(&tok.input_ids, None).unwrap();
    let (et, eh) = (
        rows(&empty.text_embeds)[0].clone(),
        rows(&empty.last_hidden_state)[0].clone(),
    );
    let (dt, dh, dm, _) = pool.batch(4, 1.0, &mut Rng::new(5)).unwrap();
    for (r, ((a, b), c)) in rows(&dt).iter().zip(rows(&dh)).zip(rows(&dm)).enumerate() {
        assert_eq!((a, &b), (&et, &eh), "dropped row {r}");
        assert_eq!(c, rows(&tok.attention_mask)[0], "dropped row {r}");
    }
}

/// `refine_latents` gives the same latents whatever the number of threads (each chunk's output
/// depends only on its index), and they are the decoder's work, not the images' encodings.
#[test]
fn refined_latents_do_not_depend_on_threads_and_are_denoised() {
    use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::KandinskyPriorPipeline;
    use kandinsky_train::eval::EvalDecoder;
    use kandinsky_train::movq::{image_tensor, refine_latents, RefineSettings};
    let dev = Device::Cpu;
    let pipelines = fixtures().join("pipelines");
    let decoder = EvalDecoder::load(&pipelines.join("tiny-2-1"), DType::F32, &dev, None).unwrap();
    let prior =
        KandinskyPriorPipeline::load(&pipelines.join("tiny-2-1-prior"), DType::F32, &dev).unwrap();
    let s = RefineSettings {
        n: 5,
        steps: 4,
        guidance: 4.0,
        strength: (0.5, 1.0),
        chunk: 2,
        seed: 3,
        side: 64,
    };
    let one = refine_latents(&decoder, &prior, &s, 1, &|_, _| {}).unwrap();
    let three = refine_latents(&decoder, &prior, &s, 3, &|_, _| {}).unwrap();
    assert_eq!(one.indices(), [0, 1, 2, 3, 4]);
    let same = (one.latents() - three.latents())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(same, 0.0, "the latents depend on the threads");
    let images =
        image_tensor(&kandinsky_train::shapes::training_examples(3, 0, 5, 64), 64).unwrap();
    let encoded = decoder.movq().encode(&images).unwrap();
    assert_eq!(encoded.dims(), one.latents().dims());
    let moved = (one.latents() - &encoded)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        moved > 1e-3,
        "the latents are the encodings (mean change {moved})"
    );
}
