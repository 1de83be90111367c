//! The synthetic world: reproducible examples, captions in both languages, held-out scenes, and
//! the pixel analyser reading every attribute back from rendered images.

use kandinsky::training::analyser::analyse;
use kandinsky::training::shapes::{eval_prompts, training_example, Language, Scene};

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
    }
    assert!((0..2000).all(|i| !training_example(3, i, 64).scene.held_out()));
}

/// The analyser's ceiling: on real dataset images it should read everything right.
#[test]
fn analyser_reads_rendered_scenes() {
    let n = 2000;
    let mut wrong = [0usize; 5];
    for i in 0..n {
        let e = training_example(11, i, 64);
        let s = analyse(&e.image, 64).score(&e.scene);
        for (k, ok) in [s.background, s.colour, s.shape, s.position, s.size]
            .into_iter()
            .enumerate()
        {
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
