use candle_core::{DType, Device};
use kandinsky::models::VQModel;
use kandinsky::vae_image_processor::{save_png, to_rgb8, Rgb8};
use kandinsky_train::shapes::{eval_prompts, Language, Rng, Shape, Size};

fn main() -> kandinsky::error::Result<()> {
    let dir = std::env::args().nth(1).unwrap();
    let out = std::env::args().nth(2).unwrap();
    let movq = VQModel::load(std::path::Path::new(&dir), DType::F32, &Device::Cpu)?;
    let prompts = eval_prompts(Language::En, 200);
    let mut rng = Rng::new(7);
    let mut row = vec![];
    let mut k = 0;
    for (sc, _) in &prompts {
        let img = sc.render(64, &mut rng);
        if sc.size != Size::Small || sc.shape == Shape::Circle {
            continue;
        }
        let x = candle_core::Tensor::from_vec(
            img.iter()
                .map(|&v| v as f32 / 127.5 - 1.0)
                .collect::<Vec<_>>(),
            (64, 64, 3),
            &Device::Cpu,
        )?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
        let z = movq.encode(&x)?;
        let b = to_rgb8(&movq.decode(&z, true)?)?.remove(0).data;
        let r = kandinsky_train::analyser::analyse(&b, 64);
        println!("{k}: {:?} {:?} read {:?}", sc.shape, sc.colour, r.shape);
        row.push((img, b));
        k += 1;
        if k == 8 {
            break;
        }
    }
    // 8 pairs stacked: 128 wide (real | round trip), 512 tall, scaled 3x
    let (w, h, s) = (128usize, 64 * 8usize, 3usize);
    let mut data = vec![0u8; w * s * h * s * 3];
    for (i, (a, b)) in row.iter().enumerate() {
        for y in 0..64 {
            for x in 0..128 {
                let src = if x < 64 {
                    &a[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3]
                } else {
                    &b[(y * 64 + x - 64) * 3..(y * 64 + x - 64) * 3 + 3]
                };
                for dy in 0..s {
                    for dx in 0..s {
                        let o = (((i * 64 + y) * s + dy) * w * s + x * s + dx) * 3;
                        data[o..o + 3].copy_from_slice(src);
                    }
                }
            }
        }
    }
    save_png(
        std::path::Path::new(&out),
        &Rgb8 {
            width: w * s,
            height: h * s,
            data,
        },
        &[],
    )?;
    Ok(())
}
