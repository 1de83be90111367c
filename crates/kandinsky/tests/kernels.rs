//! Every inference kernel of `kandinsky::ops` against its plain-candle reference (f32: relative
//! L2 error ≤ 1e-6), on the AVX-512 path and on the forced portable one, over the geometries the
//! networks use (3×3 / 1×1 / strided convolutions from 4×4 to 64×64 maps, both tiling modes).

use candle_core::{DType, Device, Tensor, D};
use kandinsky::ops;
use kandinsky::ops::packed::Kind;

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (d / n.max(1e-30)).sqrt()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A deterministic non-Gaussian fill: no dependence on candle's global RNG state.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Runs `check` on the detected path and on the forced portable one.
fn both_paths(check: impl Fn()) {
    check();
    ops::simd::force_portable(true);
    check();
    ops::simd::force_portable(false);
}

#[test]
fn conv2d_matches_candle() {
    // (batch, in, out, side, kernel, stride, pad): deep 4×4 maps (one GEMM for the batch), 64×64
    // maps (row tiles), 1×1, the strided downsampler, odd sizes and a map smaller than the kernel.
    let cases = [
        (2, 16, 24, 4, 3, 1, 1),
        (2, 8, 12, 64, 3, 1, 1),
        (1, 3, 8, 97, 3, 1, 1),
        (2, 16, 8, 33, 1, 1, 0),
        (2, 8, 8, 32, 3, 2, 1),
        (2, 8, 8, 17, 3, 2, 0),
        (1, 4, 4, 2, 3, 1, 1),
        (2, 256, 64, 40, 3, 1, 1),
    ];
    both_paths(|| {
        for (i, &(b, c, o, side, k, s, p)) in cases.iter().enumerate() {
            let x = randn(&[b, c, side, side], i as u64);
            let w = randn(&[o, c, k, k], 100 + i as u64);
            let bias = randn(&[o], 200 + i as u64);
            let fast = ops::conv2d(&x, &w, &bias, s, p).unwrap();
            let reference = x
                .conv2d(&w, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            let e = rel_l2(&fast, &reference);
            assert!(e <= 1e-6, "case {i} {:?}: rel L2 {e}", cases[i]);
        }
    });
}

fn group_norm_reference(x: &Tensor, g: &Tensor, b: &Tensor, groups: usize, eps: f64) -> Tensor {
    let dims = x.dims().to_vec();
    let xg = x.reshape((dims[0], groups, ())).unwrap();
    let mean = xg.mean_keepdim(2).unwrap();
    let xc = xg.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
    let xn = xc
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .reshape(dims.as_slice())
        .unwrap();
    let c = dims[1];
    xn.broadcast_mul(&g.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
}

#[test]
fn group_norm_scale_shift_silu_match_candle() {
    both_paths(|| {
        for (i, &(b, c, side, groups)) in [(2, 64, 8, 32), (2, 96, 33, 32), (1, 8, 5, 4)]
            .iter()
            .enumerate()
        {
            let x = randn(&[b, c, side, side], i as u64)
                .affine(3.0, 0.5)
                .unwrap();
            let g = randn(&[c], 10 + i as u64);
            let bb = randn(&[c], 20 + i as u64);
            let ss = randn(&[b, 2 * c], 30 + i as u64);
            let gb = Tensor::stack(&[&g, &bb], 0).unwrap();
            let reference = group_norm_reference(&x, &g, &bb, groups, 1e-5);
            let plain = ops::group_norm(&x, &gb, groups, 1e-5, None, false).unwrap();
            assert!(rel_l2(&plain, &reference) <= 1e-6, "case {i} plain");

            let scale = ss.narrow(1, 0, c).unwrap().reshape((b, c, 1, 1)).unwrap();
            let shift = ss.narrow(1, c, c).unwrap().reshape((b, c, 1, 1)).unwrap();
            let reference = candle_nn::ops::silu(
                &reference
                    .broadcast_mul(&(scale + 1.0).unwrap())
                    .unwrap()
                    .broadcast_add(&shift)
                    .unwrap(),
            )
            .unwrap();
            let fused = ops::group_norm(&x, &gb, groups, 1e-5, Some(&ss), true).unwrap();
            let e = rel_l2(&fused, &reference);
            assert!(e <= 1e-6, "case {i} fused: rel L2 {e}");
        }
    });
}

#[test]
fn layer_norm_and_silu_match_candle() {
    both_paths(|| {
        for (i, &(rows, d)) in [(162, 2048), (7, 33), (1, 5)].iter().enumerate() {
            let x = randn(&[rows, d], i as u64).affine(4.0, -1.0).unwrap();
            let g = randn(&[d], 50 + i as u64);
            let b = randn(&[d], 60 + i as u64);
            let gb = Tensor::stack(&[&g, &b], 0).unwrap();
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let reference = xc
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&g)
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let e = rel_l2(&ops::layer_norm(&x, &gb, 1e-5).unwrap(), &reference);
            assert!(e <= 1e-6, "layer norm case {i}: rel L2 {e}");

            let x = (x * 8.0).unwrap();
            let e = rel_l2(&ops::silu(&x).unwrap(), &candle_nn::ops::silu(&x).unwrap());
            assert!(e <= 1e-6, "silu case {i}: rel L2 {e}");
            let e = rel_l2(&ops::gelu(&x).unwrap(), &x.gelu_erf().unwrap());
            assert!(e <= 1e-6, "gelu case {i}: rel L2 {e}");
            let quick = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
            let e = rel_l2(&ops::quick_gelu(&x).unwrap(), &quick);
            assert!(e <= 1e-6, "quick_gelu case {i}: rel L2 {e}");
        }
    });
}

#[test]
fn attention_matches_candle_on_strided_heads() {
    both_paths(|| {
        // (batch, heads, queries, keys, head dim): the UNet's cross+self attention, the MoVQ's
        // single wide head, the prior's short sequences, and a query count not a block multiple.
        for (i, &(b, h, n, m, d)) in [
            (2, 4, 256, 260, 64),
            (1, 1, 300, 300, 128),
            (2, 8, 81, 81, 16),
            (1, 2, 3, 1, 8),
        ]
        .iter()
        .enumerate()
        {
            // Views as the attention processors make them: (B, N, H·d) split into heads.
            let split =
                |t: Tensor, len: usize| t.reshape((b, len, h, d)).unwrap().transpose(1, 2).unwrap();
            let q = split((randn(&[b, n, h * d], i as u64) * 2.0).unwrap(), n);
            let k = split((randn(&[b, m, h * d], 70 + i as u64) * 2.0).unwrap(), m);
            let v = split(randn(&[b, m, h * d], 80 + i as u64), m);
            let scale = 1.0 / (d as f64).sqrt();
            let scores = (q
                .contiguous()
                .unwrap()
                .matmul(&k.t().unwrap().contiguous().unwrap())
                .unwrap()
                * scale)
                .unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            // The same with the prior's kind of mask: causal plus padded keys, per image.
            let mask: Vec<f32> = (0..b * n * m)
                .map(|i| {
                    let (bi, r, c) = (i / (n * m), (i / m) % n, i % m);
                    if c > r + 2 || (bi == 1 && c == m - 1 && m > 1) {
                        -10000.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (b, 1, n, m), &Device::Cpu).unwrap();
            let masked_ref =
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap())
                    .unwrap()
                    .matmul(&v.contiguous().unwrap())
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, n, h * d))
                    .unwrap();
            let masked = ops::attention_masked(&q, &k, &v, scale, Some(&mask)).unwrap();
            let e = rel_l2(&masked, &masked_ref);
            assert!(e <= 1e-6, "masked case {i}: rel L2 {e}");
            let reference = probs
                .matmul(&v.contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, n, h * d))
                .unwrap();
            let e = rel_l2(&ops::attention(&q, &k, &v, scale).unwrap(), &reference);
            assert!(e <= 1e-6, "case {i}: rel L2 {e}");
        }
    });
}

#[test]
fn layers_take_the_reference_path_when_asked_and_agree() {
    let w = kandinsky::loading::Weights::random(DType::F32, &Device::Cpu);
    let norm = kandinsky::models::nn::GroupNorm::new(&w, 8, 32, 1e-6).unwrap();
    let x = randn(&[2, 32, 16, 16], 1);
    let ss = randn(&[2, 64], 2);
    let fast = norm.forward_act(&x, Some(&ss), true).unwrap();
    let reference = ops::with_reference(|| norm.forward_act(&x, Some(&ss), true).unwrap());
    let e = rel_l2(&fast, &reference);
    assert!(e <= 1e-6, "GroupNorm layer: rel L2 {e}");
    assert!(ops::applies(&x));
    assert!(!ops::with_reference(|| ops::applies(&x)));
    assert!(!ops::applies(&x.to_dtype(DType::F16).unwrap()));
    let v = candle_core::Var::from_tensor(&x).unwrap();
    assert!(!ops::applies(&(v.as_tensor() * 1.0).unwrap()));
}

/// `C = L·Bᵀ` in f64 from the operands (bf16-rounded for bf16).
fn gemm_reference(kind: Kind, l: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let r = |x: f32| match kind {
        Kind::Bf16 => ops::packed::bf16_to_f32(ops::packed::bf16_bits(x)),
        Kind::F32 => x,
    };
    let mut c = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            let s: f64 = (0..k)
                .map(|kk| r(l[i * k + kk]) as f64 * r(b[j * k + kk]) as f64)
                .sum();
            c[i + j * m] = s as f32;
        }
    }
    c
}

#[test]
fn packed_gemm_matches_f64_reference() {
    use ops::packed::{gemm, Out, Packed, COLS, LANES};
    both_paths(|| {
        for kind in [Kind::Bf16, Kind::F32] {
            // Whole panels, ragged edges, odd depth, a depth over one cache block.
            for (i, &(m, n, k)) in [(64, 24, 64), (45, 13, 37), (32, 12, 301), (7, 1, 1)]
                .iter()
                .enumerate()
            {
                let l = randn(&[m, k], 90 + i as u64)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = randn(&[n, k], 95 + i as u64)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let pl = Packed::pack_as(kind, &l, m, k, k, 1, LANES);
                let pb = Packed::pack_as(kind, &b, n, k, k, 1, COLS);
                let want = gemm_reference(kind, &l, &b, m, n, k);
                for threads in [1, 2] {
                    let mut c = vec![1f32; m * n];
                    // SAFETY: `c` is m × n with columns of m.
                    unsafe {
                        gemm(
                            &pl,
                            &pb,
                            Out {
                                ptr: c.as_mut_ptr(),
                                js: m,
                            },
                            false,
                            threads,
                        )
                    };
                    let (c, w) = (
                        Tensor::from_vec(c, m * n, &Device::Cpu).unwrap(),
                        Tensor::from_vec(want.clone(), m * n, &Device::Cpu).unwrap(),
                    );
                    let e = rel_l2(&c, &w);
                    assert!(e <= 1e-6, "{kind:?} case {i} threads {threads}: rel L2 {e}");
                }
                let mut c = want.clone();
                // SAFETY: as above.
                unsafe {
                    gemm(
                        &pl,
                        &pb,
                        Out {
                            ptr: c.as_mut_ptr(),
                            js: m,
                        },
                        true,
                        2,
                    )
                };
                let doubled: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
                let e = rel_l2(
                    &Tensor::from_vec(c, m * n, &Device::Cpu).unwrap(),
                    &Tensor::from_vec(doubled, m * n, &Device::Cpu).unwrap(),
                );
                assert!(e <= 1e-6, "{kind:?} case {i} accumulate: rel L2 {e}");
                let back = pl.unpack();
                assert_eq!(back.len(), m * k);
                if kind == Kind::F32 {
                    assert_eq!(back, l, "f32 packing is lossless");
                }
            }
        }
    });
}

#[test]
#[ignore = "timing, run by hand: cargo test --release --test kernels -- --ignored --nocapture"]
fn bf16_gemm_speed() {
    use ops::packed::{gemm, Out, Packed, COLS, LANES};
    for &(m, n, k) in &[
        (2048usize, 2048usize, 2048usize),
        (384, 4096, 3456),
        (2048, 162, 2048),
    ] {
        let l = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let pl = Packed::pack(&l, m, k, k, 1, LANES);
        let pb = Packed::pack(&b, n, k, k, 1, COLS);
        let mut c = vec![0f32; m * n];
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            unsafe {
                gemm(
                    &pl,
                    &pb,
                    Out {
                        ptr: c.as_mut_ptr(),
                        js: m,
                    },
                    false,
                    2,
                )
            };
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "bf16 gemm {m}x{n}x{k}: {:.1} GFLOP/s",
            2.0 * (m * n * k) as f64 / best / 1e9
        );
    }
}

#[test]
#[ignore = "timing, run by hand"]
fn softmax_speed() {
    let mut x: Vec<f32> = (0..(1024 * 1088))
        .map(|i| (i % 977) as f32 * 0.01 - 3.0)
        .collect();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        ops::simd::softmax_rows(&mut x, 1088);
        println!(
            "softmax: {:.2} Gelem/s",
            x.len() as f64 / t.elapsed().as_secs_f64() / 1e9
        );
        let t = std::time::Instant::now();
        ops::simd::exp_inplace(&mut x);
        println!(
            "exp: {:.2} Gelem/s",
            x.len() as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
}

#[test]
#[ignore = "timing, run by hand"]
fn linear_speed() {
    for &(n, k, m) in &[
        (162usize, 2048usize, 2048usize),
        (162, 2048, 8192),
        (2048, 768, 768),
    ] {
        let x = randn(&[n, k], 1);
        let w = randn(&[m, k], 2);
        let b = randn(&[m], 3);
        let gb = std::sync::Arc::new(ops::packed::Packed::pack(
            &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m,
            k,
            k,
            1,
            ops::packed::LANES,
        ));
        let bias = std::sync::Arc::new(b.to_vec1::<f32>().unwrap());
        let flops = 2.0 * (n * k * m) as f64;
        let time = |f: &dyn Fn() -> Tensor| {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            flops / best / 1e9
        };
        let candle = time(&|| {
            x.matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
        });
        let bf = time(&|| ops::linear_packed(&x, &gb, Some(&bias)).unwrap());
        let w32 = std::sync::Arc::new(ops::packed::Packed::pack_as(
            Kind::F32,
            &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m,
            k,
            k,
            1,
            ops::packed::LANES,
        ));
        let p32 = time(&|| ops::linear_packed(&x, &w32, Some(&bias)).unwrap());
        println!(
            "linear {n}x{k}->{m}: candle {candle:.0}, packed f32 {p32:.0}, bf16 {bf:.0} GFLOP/s"
        );
    }
}

fn round_bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn packed_linear_and_conv_layers_match_the_reference() {
    use kandinsky::models::nn::{Conv2d, Linear};
    let dev = Device::Cpu;
    both_paths(|| {
        // f32: the layer packs its weight at load; the reference path unpacks it (lossless).
        let w = kandinsky::loading::Weights::random(DType::F32, &dev);
        let lin = Linear::new(&w, 70, 45, true).unwrap();
        let x = randn(&[3, 5, 70], 7);
        let fast = lin.forward(&x).unwrap();
        let reference = ops::with_reference(|| lin.forward(&x).unwrap());
        let e = rel_l2(&fast, &reference);
        assert!(e <= 1e-6, "f32 linear: rel L2 {e}");

        // bf16: against f32 arithmetic on bf16-rounded activations (the reference path holds the
        // bf16-rounded weights); bf16 products are exact in f32, so only the summation differs.
        let w = kandinsky::loading::Weights::random(DType::BF16, &dev);
        assert!(w.packs_bf16() && w.dtype() == DType::F32);
        let lin = Linear::new(&w, 70, 45, true).unwrap();
        let fast = lin.forward(&x).unwrap();
        let reference = ops::with_reference(|| lin.forward(&round_bf16(&x)).unwrap());
        let e = rel_l2(&fast, &reference);
        assert!(e <= 1e-6, "bf16 linear: rel L2 {e}");
        for (i, &(c, o, side, k, s, p)) in [
            (8, 12, 9, 3, 1, 1),
            (16, 24, 40, 3, 1, 1),
            (8, 8, 17, 3, 2, 0),
            (16, 8, 33, 1, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let conv = Conv2d::new(&w, c, o, k, s, p).unwrap();
            let x = randn(&[2, c, side, side], 20 + i as u64);
            let fast = conv.forward(&x).unwrap();
            let reference = ops::with_reference(|| conv.forward(&round_bf16(&x)).unwrap());
            let e = rel_l2(&fast, &reference);
            assert!(e <= 1e-6, "bf16 conv case {i}: rel L2 {e}");
        }
    });
}

/// The training GroupNorm (fused forward and backward, with scale-shift and SiLU) against the
/// layer's plain-candle composition: the output and the gradients of the input, γ, β and the
/// scale-shift, on the AVX-512 and the portable paths.
#[test]
fn training_group_norm_matches_candle_forward_and_backward() {
    use candle_core::Var;
    use kandinsky::loading::{ParamStore, Weights};
    both_paths(|| {
        // (batch, channels, side, groups, scale-shift, SiLU)
        for (i, &(b, c, side, groups, with_ss, silu)) in [
            (2, 64, 8, 32, true, true),
            (3, 32, 5, 8, false, true),
            (2, 16, 7, 4, true, false),
            (1, 8, 3, 8, false, false),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 * i as u64;
            let init = [
                ("weight".to_string(), (randn(&[c], seed) + 1.0).unwrap()),
                ("bias".to_string(), randn(&[c], seed + 1)),
            ]
            .into_iter()
            .collect();
            let store = ParamStore::with_init(0, init, &Device::Cpu);
            let norm =
                kandinsky::models::nn::GroupNorm::new(&Weights::trainable(&store), groups, c, 1e-5)
                    .unwrap();
            // Offset so that the mean matters; the scale-shift as a variable of its own.
            let x = Var::from_tensor(
                &randn(&[b, c, side, side], seed + 2)
                    .affine(2.0, 0.5)
                    .unwrap(),
            )
            .unwrap();
            let ss = Var::from_tensor(&(randn(&[b, 2 * c], seed + 3) * 0.5).unwrap()).unwrap();
            let ss_arg = with_ss.then_some(ss.as_tensor());
            let ours = norm.forward_act(x.as_tensor(), ss_arg, silu).unwrap();
            let reference =
                ops::with_reference(|| norm.forward_act(x.as_tensor(), ss_arg, silu).unwrap());
            let e = rel_l2(&ours, &reference);
            assert!(e <= 1e-6, "case {i} forward: rel L2 {e}");
            let r = randn(&[b, c, side, side], seed + 4);
            let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut vars: Vec<(String, Var)> = store.vars();
            vars.push(("x".into(), x.clone()));
            if with_ss {
                vars.push(("scale_shift".into(), ss.clone()));
            }
            assert_eq!(vars.len(), 3 + with_ss as usize);
            for (name, v) in &vars {
                let (o, f) = (
                    g_ours.get(v.as_tensor()).expect("our gradient"),
                    g_ref.get(v.as_tensor()).expect("the reference gradient"),
                );
                let e = rel_l2(o, f);
                assert!(e <= 1e-6, "case {i} d{name}: rel L2 {e}");
            }
        }
    });
}

/// The training LayerNorm against the layer's plain-candle composition: the output and the
/// gradients of the input, γ and β, for rows of the prior's and CLIP's widths and odd ones.
#[test]
fn training_layer_norm_matches_candle_forward_and_backward() {
    use candle_core::Var;
    use kandinsky::loading::{ParamStore, Weights};
    both_paths(|| {
        for (i, dims) in [vec![4, 81, 64], vec![3, 33], vec![2, 5, 7, 128]]
            .iter()
            .enumerate()
        {
            let d = *dims.last().unwrap();
            let seed = 200 * i as u64;
            let init = [
                ("weight".to_string(), (randn(&[d], seed) + 1.0).unwrap()),
                ("bias".to_string(), randn(&[d], seed + 1)),
            ]
            .into_iter()
            .collect();
            let store = ParamStore::with_init(0, init, &Device::Cpu);
            let norm = kandinsky::models::nn::LayerNorm::new(&Weights::trainable(&store), d, 1e-5)
                .unwrap();
            let x = Var::from_tensor(&randn(dims, seed + 2).affine(3.0, -0.7).unwrap()).unwrap();
            let ours = norm.forward(x.as_tensor()).unwrap();
            let reference = ops::with_reference(|| norm.forward(x.as_tensor()).unwrap());
            let e = rel_l2(&ours, &reference);
            assert!(e <= 1e-6, "case {i} forward: rel L2 {e}");
            let r = randn(dims, seed + 3);
            let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut vars = store.vars();
            vars.push(("x".into(), x.clone()));
            assert_eq!(vars.len(), 3);
            for (name, v) in &vars {
                let (o, f) = (
                    g_ours.get(v.as_tensor()).expect("our gradient"),
                    g_ref.get(v.as_tensor()).expect("the reference gradient"),
                );
                let e = rel_l2(o, f);
                assert!(e <= 1e-6, "case {i} d{name}: rel L2 {e}");
            }
        }
    });
}
