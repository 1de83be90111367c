//! A deterministic pixel analyser for images of the synthetic world ([`super::shapes`]): it reads
//! back background colour, object colour, shape, position and size, so generated images can be
//! scored against their prompts without any learned model. The object is the largest connected
//! region of (3×3-blurred) pixels far from the measured background colour.

use super::shapes::{Colour, Position, Scene, Shape, Size, COLOURS, POSITIONS};

/// RGB distance from the background beyond which a pixel is object: about half the closest
/// distance between two palette colours.
const OBJECT_DISTANCE: f32 = 50.0;

/// What the analyser reads from an image; `None` where it cannot decide (e.g. no object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// Background colour: the palette colour nearest to the median border pixel.
    pub background: Option<Colour>,
    /// Object colour: the palette colour (other than the background) nearest to the mean of the
    /// object's interior pixels.
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
    // Object pixels: far from the *measured* background, not from its palette colour, since a
    // decoder's colours drift off the palette; a 3×3 box blur first, so that a grainy background
    // does not light up pixel by pixel.
    let blurred = box_blur3(image, side);
    let dist = |p: [f32; 3], q: [f32; 3]| (0..3).map(|i| (p[i] - q[i]).powi(2)).sum::<f32>().sqrt();
    let far: Vec<bool> = blurred
        .iter()
        .map(|p| dist(*p, bg_rgb) > OBJECT_DISTANCE)
        .collect();
    // The object is the largest 4-connected region of them; stray specks are not the object. Its
    // outline is then read from the unblurred pixels within 2 px of that region, since the blur
    // eats thin parts such as a small triangle's apex (again its largest region, so that a speck
    // next to the object does not stretch its box).
    let region = largest_component(&far, side);
    let near_region = |x: usize, y: usize| {
        (y.saturating_sub(2)..(y + 3).min(side))
            .any(|yy| (x.saturating_sub(2)..(x + 3).min(side)).any(|xx| region[yy * side + xx]))
    };
    let outline: Vec<bool> = (0..side * side)
        .map(|i| {
            let (x, y) = (i % side, i / side);
            dist(px(x, y), bg_rgb) > OBJECT_DISTANCE && near_region(x, y)
        })
        .collect();
    let mask = largest_component(&outline, side);
    let count = mask.iter().filter(|m| **m).count();
    if count < 4 {
        return reading;
    }
    let (mut x0, mut y0, mut x1, mut y1) = (side, side, 0, 0);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = (i % side, i / side);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    // The colour is the mean of the region's interior (pixels whose 4 neighbours are in it too),
    // away from edges blended with the background; a region too thin for that gives all of it.
    let inside = |x: usize, y: usize| x < side && y < side && mask[y * side + x];
    let interior: Vec<usize> = (0..side * side)
        .filter(|&i| {
            let (x, y) = (i % side, i / side);
            mask[i]
                && x > 0
                && y > 0
                && inside(x - 1, y)
                && inside(x + 1, y)
                && inside(x, y - 1)
                && inside(x, y + 1)
        })
        .collect();
    let pixels: Vec<usize> = if interior.is_empty() {
        (0..side * side).filter(|&i| mask[i]).collect()
    } else {
        interior
    };
    let mut sum = [0f32; 3];
    for &i in &pixels {
        let p = px(i % side, i / side);
        for c in 0..3 {
            sum[c] += p[c];
        }
    }
    let mean = sum.map(|v| v / pixels.len() as f32);
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

/// The mean of each pixel's 3×3 neighbourhood (clamped at the edges), per channel.
fn box_blur3(image: &[u8], side: usize) -> Vec<[f32; 3]> {
    let mut out = vec![[0f32; 3]; side * side];
    for y in 0..side {
        for x in 0..side {
            let mut acc = [0f32; 3];
            for dy in [-1isize, 0, 1] {
                for dx in [-1isize, 0, 1] {
                    let yy = (y as isize + dy).clamp(0, side as isize - 1) as usize;
                    let xx = (x as isize + dx).clamp(0, side as isize - 1) as usize;
                    let i = (yy * side + xx) * 3;
                    for c in 0..3 {
                        acc[c] += image[i + c] as f32;
                    }
                }
            }
            out[y * side + x] = acc.map(|v| v / 9.0);
        }
    }
    out
}

/// The largest 4-connected region of `mask` (the first found among equals), as a mask.
fn largest_component(mask: &[bool], side: usize) -> Vec<bool> {
    let mut label = vec![usize::MAX; side * side];
    let (mut best, mut best_len) = (usize::MAX, 0usize);
    let mut stack = Vec::new();
    for start in 0..side * side {
        if !mask[start] || label[start] != usize::MAX {
            continue;
        }
        label[start] = start;
        stack.push(start);
        let mut len = 0usize;
        while let Some(i) = stack.pop() {
            len += 1;
            let (x, y) = (i % side, i / side);
            let mut visit = |j: usize| {
                if mask[j] && label[j] == usize::MAX {
                    label[j] = start;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < side {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - side);
            }
            if y + 1 < side {
                visit(i + side);
            }
        }
        if len > best_len {
            (best, best_len) = (start, len);
        }
    }
    label.iter().map(|l| *l == best).collect()
}
