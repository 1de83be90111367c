//! The synthetic world: reproducible examples, captions in both languages, held-out scenes, and
//! the pixel analyser reading every attribute back from rendered images.

use kandinsky_train::analyser::{analyse, Score};
use kandinsky_train::shapes::{eval_prompts, grouped_example, training_example, Language, Scene};

#[test]
fn examples_are_a_pure_function_of_seed_and_index() {
    let a = training_example(7, 123, 64);
    let b = training_example(7, 123, 64);
    assert_eq!(a.image, b.image);
    assert_eq!(a.caption, b.caption);
    assert_ne!(training_example(8, 123, 64).image, a.image);
    assert_eq!(a.image.len(), 64 * 64 * 3);
    assert!(!a.scene.held_out());
}

#[test]
fn captions_come_in_english_and_russian() {
    let mut en = 0;
    let mut ru = 0;
    for i in 0..200 {
        let e = training_example(1, i, 64);
        let cyrillic = e.caption.chars().any(|c| ('а'..='я').contains(&c));
        match e.language {
            Language::En => {
                en += 1;
                assert!(!cyrillic, "{}", e.caption);
                assert!(
                    e.caption.contains("background") || e.caption.contains(" on "),
                    "{}",
                    e.caption
                );
            }
            Language::Ru => {
                ru += 1;
                assert!(cyrillic, "{}", e.caption);
                assert!(e.caption.contains("фон"), "{}", e.caption);
            }
        }
    }
    assert_eq!((en, ru), (100, 100));
}

/// CLIP's contrastive batches: groups share the colour pair and vary the layout, no scene is held
/// out, and each example is reproducible on its own.
#[test]
fn grouped_examples_share_colours_within_a_group_only() {
    let group = 8;
    let examples: Vec<_> = (0..256).map(|i| grouped_example(5, i, 32, group)).collect();
    let mut layouts_differ = 0;
    for chunk in examples.chunks(group as usize) {
        let first = chunk[0].scene;
        for e in chunk {
            assert_eq!(
                (e.scene.colour, e.scene.background),
                (first.colour, first.background)
            );
            assert!(!e.scene.held_out());
        }
        let layouts: std::collections::HashSet<_> = chunk
            .iter()
            .map(|e| (e.scene.shape, e.scene.position, e.scene.size))
            .collect();
        layouts_differ += (layouts.len() > 1) as usize;
    }
    assert_eq!(layouts_differ, 256 / group as usize);
    let pairs: std::collections::HashSet<_> = examples
        .iter()
        .map(|e| (e.scene.colour, e.scene.background))
        .collect();
    assert!(pairs.len() > 20, "only {} colour pairs", pairs.len());
    let again = grouped_example(5, 77, 32, group);
    assert_eq!(again.image, examples[77].image);
    assert_eq!(again.caption, examples[77].caption);
}

#[test]
fn held_out_scenes_are_about_a_tenth_and_only_in_eval_prompts() {
    let all = Scene::all();
    assert_eq!(all.len(), 1680);
    let held = all.iter().filter(|s| s.held_out()).count();
    assert!((120..=220).contains(&held), "{held} held out");
    for lang in [Language::En, Language::Ru] {
        let prompts = eval_prompts(lang, 200);
        assert_eq!(prompts.len(), 200);
        assert!(prompts.iter().all(|(s, _)| s.held_out()));
        // A short evaluation sees every shape about equally often, in both languages alike.
        let first: Vec<Scene> = prompts.iter().take(60).map(|(s, _)| *s).collect();
        for shape in kandinsky_train::shapes::SHAPES {
            let k = first.iter().filter(|s| s.shape == shape).count();
            assert!((10..=30).contains(&k), "{k} of 60 are {shape:?}");
        }
        let other: Vec<Scene> = eval_prompts(Language::En, 60)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(first, other);
    }
    assert!((0..2000).all(|i| !training_example(3, i, 64).scene.held_out()));
}

/// A score's attributes in the order background, colour, shape, position, size.
fn attributes(s: &Score) -> [bool; 5] {
    [s.background, s.colour, s.shape, s.position, s.size]
}

/// The analyser's ceiling: on real dataset images it should read everything right.
#[test]
fn analyser_reads_rendered_scenes() {
    let n = 2000;
    let mut wrong = [0usize; 5];
    for i in 0..n {
        let e = training_example(11, i, 64);
        let s = analyse(&e.image, 64).score(&e.scene);
        for (k, ok) in attributes(&s).into_iter().enumerate() {
            if !ok {
                wrong[k] += 1;
                if wrong[k] <= 3 {
                    eprintln!(
                        "attribute {k} wrong for {:?}: {:?}",
                        e.scene,
                        analyse(&e.image, 64)
                    );
                }
            }
        }
    }
    println!("wrong of {n} (background, colour, shape, position, size): {wrong:?}");
    assert_eq!(wrong, [0; 5]);
}

/// Generated images drift off the palette and carry specks: the analyser reads the object against
/// the measured background and keeps its largest region. The palette-relative analyser read most
/// of these as one image-filling object.
#[test]
fn analyser_ignores_background_drift_and_specks() {
    use kandinsky_train::shapes::{Rng, COLOURS};
    let n: usize = 500;
    let mut rng = Rng::new(5);
    let mut wrong = [0usize; 5];
    for i in 0..n {
        let e = training_example(12, i as u64, 64);
        let mut img = e.image.clone();
        let bg = e.scene.background.rgb();
        // A per-image drift of the background of up to ±30 per channel (RGB distance up to 52).
        let drift: Vec<i32> = (0..3).map(|_| rng.below(61) as i32 - 30).collect();
        for p in img.chunks_mut(3) {
            if p.iter().zip(bg).all(|(a, b)| a.abs_diff(b) < 8) {
                for c in 0..3 {
                    p[c] = (p[c] as i32 + drift[c]).clamp(0, 255) as u8;
                }
            }
        }
        // 20 isolated specks of random palette colours.
        for _ in 0..20 {
            let (x, y) = (rng.below(64), rng.below(64));
            let c = COLOURS[rng.below(COLOURS.len())].rgb();
            img[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3].copy_from_slice(&c);
        }
        let s = analyse(&img, 64).score(&e.scene);
        for (k, ok) in attributes(&s).into_iter().enumerate() {
            wrong[k] += usize::from(!ok);
        }
    }
    println!("wrong of {n} (background, colour, shape, position, size): {wrong:?}");
    assert_eq!(wrong, [0; 5]);
}

#[test]
fn frechet_distance_and_eigen_decomposition() {
    use kandinsky_train::eval::{frechet_distance, symmetric_eigen};
    // 1-D: means 1 and 3, variances 2 and 8: (1-3)² + (√2-√8)² = 6.
    let d = frechet_distance(&[vec![0.0], vec![2.0]], &[vec![1.0], vec![5.0]]).unwrap();
    assert!((d - 6.0).abs() < 1e-9, "{d}");
    // A set against itself.
    let a: Vec<Vec<f64>> = (0..50)
        .map(|i| {
            (0..4)
                .map(|j| ((i * 7 + j * 13) % 11) as f64 + j as f64 * 0.5)
                .collect()
        })
        .collect();
    assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-8);
    // A shifted copy: only the mean term.
    let b: Vec<Vec<f64>> = a
        .iter()
        .map(|r| r.iter().map(|x| x + 1.0).collect())
        .collect();
    assert!((frechet_distance(&a, &b).unwrap() - 4.0).abs() < 1e-8);
    let (w, v) = symmetric_eigen(&[vec![2.0, 1.0], vec![1.0, 2.0]]);
    let mut w2 = w.clone();
    w2.sort_by(f64::total_cmp);
    assert!(
        (w2[0] - 1.0).abs() < 1e-12 && (w2[1] - 3.0).abs() < 1e-12,
        "{w:?}"
    );
    assert!((v[0][0].abs() - 0.5f64.sqrt()).abs() < 1e-12);
}

/// The analyser's ceiling on the evaluation scenes themselves.
#[test]
fn real_images_of_held_out_scenes_score_perfectly() {
    use kandinsky_train::eval::score;
    use kandinsky_train::shapes::{Rng, Scene};
    let scenes: Vec<Scene> = Scene::all().into_iter().filter(|s| s.held_out()).collect();
    let mut rng = Rng::new(5);
    let images: Vec<Vec<u8>> = scenes.iter().map(|s| s.render(64, &mut rng)).collect();
    let acc = score(&images, &scenes, 64);
    assert_eq!(acc.n, scenes.len());
    for v in [
        acc.background,
        acc.colour,
        acc.shape,
        acc.position,
        acc.size,
    ] {
        assert_eq!(v, 1.0, "{acc:?}");
    }
}

#[test]
fn depth_hints_draw_the_examples_object_near_at_any_size() {
    use kandinsky_train::shapes::{training_depth_hint, DEPTH_FAR, DEPTH_NEAR};
    for index in 0..40 {
        let ex = training_example(3, index, 64);
        let hint = training_depth_hint(3, index, 128);
        assert_eq!(hint.len(), 128 * 128 * 3);
        let bg = ex.scene.background.rgb();
        let (mut agree, mut object) = (0, 0);
        for y in 0..64 {
            for x in 0..64 {
                let p = (y * 64 + x) * 3;
                let is_object = ex.image[p..p + 3] == ex.scene.colour.rgb();
                let is_background = ex.image[p..p + 3] == bg;
                // The hint's 2×2 block over the pixel, grey (all channels equal).
                let q = ((2 * y) * 128 + 2 * x) * 3;
                let (h, g) = (hint[q], hint[q + 1]);
                assert_eq!(h, g);
                if is_object {
                    object += 1;
                    agree += (h == DEPTH_NEAR) as usize;
                } else if is_background {
                    agree += (h == DEPTH_FAR) as usize;
                } else {
                    agree += 1; // an edge pixel, blended in both
                }
            }
        }
        assert!(object > 0, "example {index} has no object");
        assert!(
            agree >= 64 * 64 - 16,
            "example {index}: {agree} of 4096 agree"
        );
    }
}

/// The object's bounding box (pixels that are not the background colour): `(x0, y0, x1, y1)`,
/// end-exclusive.
fn object_box(image: &[u8], side: usize, bg: [u8; 3]) -> (usize, usize, usize, usize) {
    let (mut x0, mut y0, mut x1, mut y1) = (side, side, 0, 0);
    for p in 0..side * side {
        if image[3 * p..3 * p + 3] != bg {
            let (y, x) = (p / side, p % side);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    (x0, y0, x1, y1)
}

#[test]
fn grid_placement_snaps_every_box_to_the_cells_and_keeps_scene_caption_and_hint() {
    use kandinsky_train::shapes::{
        training_depth_hint_placed, training_example_placed, Placement, Shape, DEPTH_FAR,
    };
    let (side, cells) = (64, 16);
    let cell = side / cells;
    let mut moved = 0;
    for index in 0..120 {
        let free = training_example(5, index, side);
        let ex = training_example_placed(5, index, side, Placement::Grid(cells));
        assert_eq!(ex.scene, free.scene);
        assert_eq!(ex.caption, free.caption);
        moved += (ex.image != free.image) as usize;
        let bg = ex.scene.background.rgb();
        let (x0, y0, x1, y1) = object_box(&ex.image, side, bg);
        // A square fills whole cells, so its box is on the grid exactly; a circle's or a
        // triangle's silhouette lies inside its snapped box, with the vertical extent exact
        // for a triangle (apex and base).
        let on_grid = |v: usize| v.is_multiple_of(cell);
        match ex.scene.shape {
            Shape::Square => {
                assert!(
                    [x0, y0, x1, y1].into_iter().all(on_grid),
                    "example {index}: square box {:?} is off the {cell}-pixel grid",
                    (x0, y0, x1, y1)
                );
                assert!(x1 - x0 >= cell && x1 - x0 == y1 - y0, "example {index}");
            }
            Shape::Triangle => assert!(on_grid(y1), "example {index}: base at {y1}"),
            Shape::Circle => {}
        }
        // The depth hint at twice the size draws the same snapped object (a curved or slanted
        // edge may cover one pixel more or less at the finer size).
        let hint = training_depth_hint_placed(5, index, 2 * side, Placement::Grid(cells));
        let (hx0, hy0, hx1, hy1) = object_box(&hint, 2 * side, [DEPTH_FAR; 3]);
        let slack = if ex.scene.shape == Shape::Square {
            0
        } else {
            2
        };
        for (h, v) in [(hx0, x0), (hy0, y0), (hx1, x1), (hy1, y1)] {
            assert!(
                h.abs_diff(2 * v) <= slack,
                "example {index}: hint edge {h}, image {v}"
            );
        }
    }
    // Jitter of a fraction of a cell is what the grid takes away: most images change.
    assert!(moved > 60, "only {moved} of 120 images changed");
}
