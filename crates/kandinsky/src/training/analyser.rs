//! A deterministic pixel analyser for images of the synthetic world ([`super::shapes`]): it reads
//! back background colour, object colour, shape, position and size, so generated images can be
//! scored against their prompts without any learned model.

use super::shapes::{Colour, Position, Scene, Shape, Size, COLOURS, POSITIONS};

/// What the analyser reads from an image; `None` where it cannot decide (e.g. no object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// Background colour: the palette colour nearest to the median border pixel.
    pub background: Option<Colour>,
    /// Object colour: the palette colour (other than the background) nearest to the mean of the
    /// object's core pixels.
    pub colour: Option<Colour>,
    /// Shape, from how much of its bounding box the object fills and where its mass lies.
    pub shape: Option<Shape>,
    /// Position: the anchor nearest to the bounding box's centre.
    pub position: Option<Position>,
    /// Size: the bounding box's larger side against 35 % of the image.
    pub size: Option<Size>,
}

/// Per-attribute agreement of a reading with the scene it should show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Score {
    /// Background colour right.
    pub background: bool,
    /// Object colour right.
    pub colour: bool,
    /// Shape right.
    pub shape: bool,
    /// Position right.
    pub position: bool,
    /// Size right.
    pub size: bool,
}

impl Reading {
    /// Compares with the intended scene.
    pub fn score(&self, scene: &Scene) -> Score {
        Score {
            background: self.background == Some(scene.background),
            colour: self.colour == Some(scene.colour),
            shape: self.shape == Some(scene.shape),
            position: self.position == Some(scene.position),
            size: self.size == Some(scene.size),
        }
    }
}

/// Reads a `side × side` RGB8 (HWC) image.
pub fn analyse(image: &[u8], side: usize) -> Reading {
    let px = |x: usize, y: usize| -> [f32; 3] {
        let i = (y * side + x) * 3;
        [image[i] as f32, image[i + 1] as f32, image[i + 2] as f32]
    };
    // Background: the per-channel median of the border.
    let mut border: Vec<[f32; 3]> = Vec::new();
    for i in 0..side {
        border.extend([px(i, 0), px(i, side - 1), px(0, i), px(side - 1, i)]);
    }
    let median = |c: usize| {
        let mut v: Vec<f32> = border.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    let bg_rgb = [median(0), median(1), median(2)];
    let background = Colour::nearest(bg_rgb, COLOURS);
    let mut reading = Reading {
        background,
        ..Default::default()
    };
    let Some(bg) = background else {
        return reading;
    };
    // Object pixels: far from the background colour (half the closest palette distance is ~50).
    let bgc = bg.rgb().map(|v| v as f32);
    let dist = |p: [f32; 3], q: [f32; 3]| (0..3).map(|i| (p[i] - q[i]).powi(2)).sum::<f32>().sqrt();
    let mut mask = vec![false; side * side];
    let (mut x0, mut y0, mut x1, mut y1) = (side, side, 0, 0);
    let mut count = 0usize;
    let mut sum = [0f32; 3];
    let mut core = 0usize;
    for y in 0..side {
        for x in 0..side {
            let p = px(x, y);
            let d = dist(p, bgc);
            if d > 50.0 {
                mask[y * side + x] = true;
                count += 1;
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
            // The colour is taken from clearly-object pixels, away from blended edges.
            if d > 100.0 {
                for c in 0..3 {
                    sum[c] += p[c];
                }
                core += 1;
            }
        }
    }
    if count < 4 {
        return reading;
    }
    let mean = if core > 0 {
        sum.map(|v| v / core as f32)
    } else {
        // A low-contrast object: average what there is.
        let mut s = [0f32; 3];
        for (i, m) in mask.iter().enumerate() {
            if *m {
                let p = px(i % side, i / side);
                for c in 0..3 {
                    s[c] += p[c];
                }
            }
        }
        s.map(|v| v / count as f32)
    };
    reading.colour = Colour::nearest(mean, COLOURS.into_iter().filter(|c| *c != bg));
    let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let fill = count as f32 / (bw * bh);
    // Triangles (apex up) carry most of their mass in the lower half of the box.
    let mid = (y0 + y1) as f32 / 2.0;
    let lower = mask
        .iter()
        .enumerate()
        .filter(|(i, m)| **m && (i / side) as f32 > mid)
        .count() as f32
        / count as f32;
    reading.shape = Some(if fill > 0.9 {
        Shape::Square
    } else if fill < 0.65 || lower > 0.65 {
        Shape::Triangle
    } else {
        Shape::Circle
    });
    let s = side as f32;
    let (cx, cy) = (
        (x0 + x1 + 1) as f32 / 2.0 / s,
        (y0 + y1 + 1) as f32 / 2.0 / s,
    );
    reading.position = POSITIONS.into_iter().min_by(|a, b| {
        let d = |p: Position| {
            let (px, py) = p.centre();
            (px - cx).powi(2) + (py - cy).powi(2)
        };
        d(*a).total_cmp(&d(*b))
    });
    reading.size = Some(if bw.max(bh) / s > 0.35 {
        Size::Large
    } else {
        Size::Small
    });
    reading
}
