//! The synthetic world our own small Kandinsky is trained on: one shape on a plain background,
//! with captions in English and Russian from a grammar with varied word order and synonyms.
//! Everything is a pure function of a seed, so datasets are reproducible and unlimited.

/// The object's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An isosceles triangle pointing up.
    Triangle,
}

/// Palette colours (object and background).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    /// (220, 40, 40)
    Red,
    /// (245, 140, 30)
    Orange,
    /// (240, 220, 40)
    Yellow,
    /// (40, 170, 60)
    Green,
    /// (40, 80, 220)
    Blue,
    /// (140, 60, 190)
    Purple,
    /// (245, 245, 245)
    White,
    /// (20, 20, 20)
    Black,
}

/// Where the object's centre is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// (0.5, 0.5)
    Centre,
    /// (0.25, 0.5)
    Left,
    /// (0.75, 0.5)
    Right,
    /// (0.5, 0.25)
    Top,
    /// (0.5, 0.75)
    Bottom,
}

/// The object's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    /// About a quarter of the image width.
    Small,
    /// About 45 % of the image width.
    Large,
}

/// Caption language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// English.
    En,
    /// Russian.
    Ru,
}

/// All shapes.
pub const SHAPES: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
/// All colours.
pub const COLOURS: [Colour; 8] = [
    Colour::Red,
    Colour::Orange,
    Colour::Yellow,
    Colour::Green,
    Colour::Blue,
    Colour::Purple,
    Colour::White,
    Colour::Black,
];
/// All positions.
pub const POSITIONS: [Position; 5] = [
    Position::Centre,
    Position::Left,
    Position::Right,
    Position::Top,
    Position::Bottom,
];
/// All sizes.
pub const SIZES: [Size; 2] = [Size::Small, Size::Large];

impl Colour {
    /// The colour's RGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Orange => [245, 140, 30],
            Colour::Yellow => [240, 220, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Purple => [140, 60, 190],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
        }
    }

    /// The palette colour nearest to `rgb` (Euclidean), among `candidates`.
    pub fn nearest(rgb: [f32; 3], candidates: impl IntoIterator<Item = Colour>) -> Option<Colour> {
        candidates.into_iter().min_by(|a, b| {
            let d = |c: Colour| {
                let p = c.rgb();
                (0..3).map(|i| (rgb[i] - p[i] as f32).powi(2)).sum::<f32>()
            };
            d(*a).total_cmp(&d(*b))
        })
    }
}

impl Position {
    /// The centre as fractions of width and height.
    pub fn centre(self) -> (f32, f32) {
        match self {
            Position::Centre => (0.5, 0.5),
            Position::Left => (0.25, 0.5),
            Position::Right => (0.75, 0.5),
            Position::Top => (0.5, 0.25),
            Position::Bottom => (0.5, 0.75),
        }
    }
}

impl Size {
    /// The object's extent as a fraction of the image width.
    pub fn fraction(self) -> f32 {
        match self {
            Size::Small => 0.25,
            Size::Large => 0.45,
        }
    }
}

/// Where the renderer puts an object: what the decoder UNets learn to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Jittered freely in position and size (the world as the evaluation renders it).
    #[default]
    Free,
    /// The jittered box snapped to a grid of `n × n` cells over the image (at least one cell
    /// wide): with `n` the decoder's latent side, every edge of a square falls on a latent cell's
    /// edge, so the UNet never has to draw an edge inside a cell.
    Grid(usize),
}

/// One scene: what is drawn, independent of pixels and words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scene {
    /// The object's shape.
    pub shape: Shape,
    /// The object's colour.
    pub colour: Colour,
    /// The background colour (never the object's).
    pub background: Colour,
    /// Where the object is.
    pub position: Position,
    /// How large it is.
    pub size: Size,
}

impl Scene {
    /// Every valid scene (3 · 8 · 7 · 5 · 2 = 1,680), in a fixed order.
    pub fn all() -> Vec<Scene> {
        let mut v = Vec::new();
        for shape in SHAPES {
            for colour in COLOURS {
                for background in COLOURS {
                    if background == colour {
                        continue;
                    }
                    for position in POSITIONS {
                        for size in SIZES {
                            v.push(Scene {
                                shape,
                                colour,
                                background,
                                position,
                                size,
                            });
                        }
                    }
                }
            }
        }
        v
    }

    /// Whether this combination is held out of training (about 1 in 10, fixed by a hash of the
    /// combination), so evaluation prompts describe scenes never captioned in training.
    pub fn held_out(&self) -> bool {
        let idx = |i: usize| i as u64;
        let key = idx(SHAPES.iter().position(|s| *s == self.shape).unwrap_or(0)) * 1_000_000
            + idx(COLOURS.iter().position(|c| *c == self.colour).unwrap_or(0)) * 10_000
            + idx(COLOURS
                .iter()
                .position(|c| *c == self.background)
                .unwrap_or(0))
                * 100
            + idx(POSITIONS
                .iter()
                .position(|p| *p == self.position)
                .unwrap_or(0))
                * 10
            + idx(SIZES.iter().position(|s| *s == self.size).unwrap_or(0));
        splitmix64(key ^ 0x5eed_5eed).is_multiple_of(10)
    }

    /// A random scene from `rng`.
    pub fn random(rng: &mut Rng) -> Scene {
        let colour = COLOURS[rng.below(8)];
        let background = loop {
            let c = COLOURS[rng.below(8)];
            if c != colour {
                break c;
            }
        };
        Scene {
            shape: SHAPES[rng.below(3)],
            colour,
            background,
            position: POSITIONS[rng.below(5)],
            size: SIZES[rng.below(2)],
        }
    }

    /// Renders the scene as `side × side` RGB8 (HWC), with a small jitter of position and size
    /// from `rng` and 4×4 supersampled edges.
    pub fn render(&self, side: usize, rng: &mut Rng) -> Vec<u8> {
        self.render_placed(side, Placement::Free, rng)
    }

    /// [`Scene::render`] with the object placed as `placement` says (the same generator draws).
    pub fn render_placed(&self, side: usize, placement: Placement, rng: &mut Rng) -> Vec<u8> {
        let (fg, bg) = (self.colour.rgb(), self.background.rgb());
        self.paint(side, placement, rng, fg, bg)
    }

    /// The depth hint of the scene as [`Scene::render`] would draw it with the same `rng` state
    /// (same jitter), at any `side`: the object near (light grey, 224), the plain background far
    /// (dark grey, 32), as a depth estimator's near-is-light map, RGB8 HWC.
    pub fn render_depth(&self, side: usize, rng: &mut Rng) -> Vec<u8> {
        self.render_depth_placed(side, Placement::Free, rng)
    }

    /// [`Scene::render_depth`] with the object placed as `placement` says.
    pub fn render_depth_placed(&self, side: usize, placement: Placement, rng: &mut Rng) -> Vec<u8> {
        self.paint(side, placement, rng, [DEPTH_NEAR; 3], [DEPTH_FAR; 3])
    }

    /// The scene's silhouette in `fg` on `bg`, jittered by `rng` (three draws) and placed as
    /// `placement` says.
    fn paint(
        &self,
        side: usize,
        placement: Placement,
        rng: &mut Rng,
        fg: [u8; 3],
        bg: [u8; 3],
    ) -> Vec<u8> {
        let s = side as f32;
        let (fx, fy) = self.position.centre();
        let jitter = 0.03 * s;
        let cx = fx * s + (rng.unit() * 2.0 - 1.0) * jitter;
        let cy = fy * s + (rng.unit() * 2.0 - 1.0) * jitter;
        let extent = self.size.fraction() * s * (1.0 + (rng.unit() * 2.0 - 1.0) * 0.06);
        let (cx, cy, extent) = match placement {
            Placement::Free => (cx, cy, extent),
            Placement::Grid(n) => {
                let cell = s / n.max(1) as f32;
                let e = (extent / cell).round().max(1.0) * cell;
                let snap = |c: f32| ((c - e / 2.0) / cell).round() * cell + e / 2.0;
                (snap(cx), snap(cy), e)
            }
        };
        let r = extent / 2.0;
        let inside = |x: f32, y: f32| -> bool {
            let (dx, dy) = (x - cx, y - cy);
            match self.shape {
                Shape::Circle => dx * dx + dy * dy <= r * r,
                Shape::Square => dx.abs() <= r && dy.abs() <= r,
                // Apex at the top centre, base at the bottom; width grows linearly downwards.
                Shape::Triangle => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
            }
        };
        let mut out = Vec::with_capacity(side * side * 3);
        const SS: usize = 4;
        for y in 0..side {
            for x in 0..side {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let px = x as f32 + (sx as f32 + 0.5) / SS as f32;
                        let py = y as f32 + (sy as f32 + 0.5) / SS as f32;
                        hits += inside(px, py) as usize;
                    }
                }
                let a = hits as f32 / (SS * SS) as f32;
                for c in 0..3 {
                    let v = fg[c] as f32 * a + bg[c] as f32 * (1.0 - a);
                    out.push(v.round() as u8);
                }
            }
        }
        out
    }

    /// A caption in `lang`, with template and synonyms chosen by `rng`.
    pub fn caption(&self, lang: Language, rng: &mut Rng) -> String {
        match lang {
            Language::En => self.caption_en(rng),
            Language::Ru => self.caption_ru(rng),
        }
    }

    fn caption_en(&self, rng: &mut Rng) -> String {
        let pick = |rng: &mut Rng, v: &[&'static str]| v[rng.below(v.len())];
        let size = match self.size {
            Size::Small => pick(rng, &["small", "little", "tiny"]),
            Size::Large => pick(rng, &["large", "big", "huge"]),
        };
        let colour = en_colour(self.colour);
        let bg = en_colour(self.background);
        let shape = match self.shape {
            Shape::Circle => pick(rng, &["circle", "disc", "round dot"]),
            Shape::Square => pick(rng, &["square", "box"]),
            Shape::Triangle => pick(rng, &["triangle"]),
        };
        let pos = match self.position {
            Position::Centre => pick(rng, &["in the centre", "in the middle", "at the center"]),
            Position::Left => pick(rng, &["on the left", "at the left", "to the left"]),
            Position::Right => pick(rng, &["on the right", "at the right", "to the right"]),
            Position::Top => pick(rng, &["at the top", "on top", "near the top"]),
            Position::Bottom => pick(rng, &["at the bottom", "near the bottom", "below"]),
        };
        match rng.below(5) {
            0 => format!("a {size} {colour} {shape} {pos} on a {bg} background"),
            1 => format!("{size} {colour} {shape} {pos}, {bg} background"),
            2 => format!("a {colour} {shape}, {size}, {pos}, on {bg}"),
            3 => format!("{bg} background with a {size} {colour} {shape} {pos}"),
            _ => format!("{pos}: a {size} {colour} {shape} against a {bg} background"),
        }
    }

    fn caption_ru(&self, rng: &mut Rng) -> String {
        let pick = |rng: &mut Rng, v: &[&'static str]| v[rng.below(v.len())];
        // Every shape noun is masculine, so adjectives agree in the masculine forms.
        let size = match self.size {
            Size::Small => pick(rng, &["маленький", "небольшой", "крошечный"]),
            Size::Large => pick(rng, &["большой", "крупный", "огромный"]),
        };
        let colour = ru_colour(self.colour).0;
        let (bg_nom, bg_prep) = {
            let (n, p) = ru_colour(self.background);
            (n, p)
        };
        let shape = match self.shape {
            Shape::Circle => pick(rng, &["круг", "кружок"]),
            Shape::Square => pick(rng, &["квадрат"]),
            Shape::Triangle => pick(rng, &["треугольник"]),
        };
        let pos = match self.position {
            Position::Centre => pick(rng, &["в центре", "посередине", "по центру"]),
            Position::Left => pick(rng, &["слева", "на левой стороне"]),
            Position::Right => pick(rng, &["справа", "на правой стороне"]),
            Position::Top => pick(rng, &["сверху", "вверху"]),
            Position::Bottom => pick(rng, &["снизу", "внизу"]),
        };
        match rng.below(5) {
            0 => format!("{size} {colour} {shape} {pos} на {bg_prep} фоне"),
            1 => format!("{size} {colour} {shape} {pos}, фон {bg_nom}"),
            2 => format!("{pos} {size} {colour} {shape} на {bg_prep} фоне"),
            3 => format!("{colour} {shape}, {size}, {pos}, {bg_nom} фон"),
            _ => format!("на {bg_prep} фоне {pos} {size} {colour} {shape}"),
        }
    }
}

/// The colour's English name (the captions' word for it).
pub fn en_colour(c: Colour) -> &'static str {
    match c {
        Colour::Red => "red",
        Colour::Orange => "orange",
        Colour::Yellow => "yellow",
        Colour::Green => "green",
        Colour::Blue => "blue",
        Colour::Purple => "purple",
        Colour::White => "white",
        Colour::Black => "black",
    }
}

/// (masculine nominative, masculine/neuter prepositional) of a colour adjective.
fn ru_colour(c: Colour) -> (&'static str, &'static str) {
    match c {
        Colour::Red => ("красный", "красном"),
        Colour::Orange => ("оранжевый", "оранжевом"),
        Colour::Yellow => ("жёлтый", "жёлтом"),
        Colour::Green => ("зелёный", "зелёном"),
        Colour::Blue => ("синий", "синем"),
        Colour::Purple => ("фиолетовый", "фиолетовом"),
        Colour::White => ("белый", "белом"),
        Colour::Black => ("чёрный", "чёрном"),
    }
}

/// SplitMix64: a tiny, well-mixed, seedable generator for the dataset (not for sampling noise;
/// that is [`kandinsky::utils::torch_utils::TorchGenerator`]).
#[derive(Debug, Clone)]
pub struct Rng(u64);

/// SplitMix64's output function: a well-mixed 64-bit hash of `z`, for deriving independent
/// seeds from (seed, index) pairs.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One training example: a scene, its image and a caption.
#[derive(Debug, Clone)]
pub struct Example {
    /// What is drawn.
    pub scene: Scene,
    /// `side × side` RGB8, HWC.
    pub image: Vec<u8>,
    /// The caption.
    pub caption: String,
    /// The caption's language.
    pub language: Language,
}

/// Grey level of the object in a depth hint (near).
pub const DEPTH_NEAR: u8 = 224;
/// Grey level of the background in a depth hint (far).
pub const DEPTH_FAR: u8 = 32;

/// The `index`-th training example of the dataset with `seed`: a scene that is not held out,
/// rendered at `side`, captioned in English or Russian (alternating by index). A pure function of
/// `(seed, index, side)`, so any example can be regenerated without the ones before it.
pub fn training_example(seed: u64, index: u64, side: usize) -> Example {
    training_example_placed(seed, index, side, Placement::Free)
}

/// [`training_example`] with the object placed as `placement` says (same scene and caption).
pub fn training_example_placed(
    seed: u64,
    index: u64,
    side: usize,
    placement: Placement,
) -> Example {
    let (scene, mut rng) = training_scene(seed, index);
    example(scene, index, side, placement, &mut rng)
}

/// The scene of [`training_example`] `index` (without rendering it).
pub fn training_example_scene(seed: u64, index: u64) -> Scene {
    training_scene(seed, index).0
}

/// The scene of [`training_example`] `index` and the generator state its render starts from.
fn training_scene(seed: u64, index: u64) -> (Scene, Rng) {
    let mut rng = Rng::new(splitmix64(seed ^ splitmix64(index)));
    let scene = loop {
        let s = Scene::random(&mut rng);
        if !s.held_out() {
            break s;
        }
    };
    (scene, rng)
}

/// The depth hint ([`Scene::render_depth`]) of [`training_example`] `index`, at `side` (any
/// size: the geometry is the example's, scaled).
pub fn training_depth_hint(seed: u64, index: u64, side: usize) -> Vec<u8> {
    training_depth_hint_placed(seed, index, side, Placement::Free)
}

/// [`training_depth_hint`] of [`training_example_placed`] `index`.
pub fn training_depth_hint_placed(
    seed: u64,
    index: u64,
    side: usize,
    placement: Placement,
) -> Vec<u8> {
    let (scene, mut rng) = training_scene(seed, index);
    scene.render_depth_placed(side, placement, &mut rng)
}

/// Renders and captions `scene` as example `index` (English at even indices, Russian at odd).
fn example(scene: Scene, index: u64, side: usize, placement: Placement, rng: &mut Rng) -> Example {
    let language = if index.is_multiple_of(2) {
        Language::En
    } else {
        Language::Ru
    };
    let image = scene.render_placed(side, placement, rng);
    let caption = scene.caption(language, rng);
    Example {
        scene,
        image,
        caption,
        language,
    }
}

/// The `index`-th example of the contrastive (CLIP) dataset with `seed`: examples come in groups
/// of `group` consecutive indices that share the object and background colours (drawn per group)
/// and differ in shape, position and size. With random scenes, the colour pair alone tells almost
/// every pair of a batch apart, so CLIP learned colours and hardly anything else (position at
/// chance); a group makes the other attributes the only way to tell its members apart. Each
/// scene's distribution is the same as [`training_example`]'s. A pure function of
/// `(seed, index, side, group)`.
pub fn grouped_example(seed: u64, index: u64, side: usize, group: u64) -> Example {
    let group = group.max(1);
    let mut colours = Rng::new(splitmix64(seed ^ splitmix64(index / group) ^ 0xc010_u64));
    let pair = Scene::random(&mut colours);
    let mut rng = Rng::new(splitmix64(seed ^ splitmix64(index)));
    // Every colour pair has non-held-out layouts (30 layouts, each held out with p = 1/10), so
    // this ends; the bound only guards against an unlucky hash.
    let scene = (0..1000)
        .map(|_| Scene {
            colour: pair.colour,
            background: pair.background,
            ..Scene::random(&mut rng)
        })
        .find(|s| !s.held_out());
    let Some(scene) = scene else {
        return training_example(seed, index, side);
    };
    example(scene, index, side, Placement::Free, &mut rng)
}

/// Evaluation prompts: `n` captions in `lang` of held-out scenes (cycling through them with
/// varied wording), deterministic.
pub fn eval_prompts(lang: Language, n: usize) -> Vec<(Scene, String)> {
    let mut held: Vec<Scene> = Scene::all().into_iter().filter(|s| s.held_out()).collect();
    // A fixed shuffle (the same in both languages): `Scene::all` is shape-major, so without it
    // a short evaluation would see circles only.
    let mut order = Rng::new(0x5cee_e0de);
    for i in (1..held.len()).rev() {
        held.swap(i, order.below(i + 1));
    }
    let mut rng = Rng::new(0xe7a1 + lang as u64);
    (0..n)
        .map(|i| {
            let s = held[i % held.len()];
            (s, s.caption(lang, &mut rng))
        })
        .collect()
}

/// `per_scene` captions of every scene (held-out ones too) in each language, deterministic: the
/// text the small model's vocabularies are reduced to.
pub fn caption_sample(per_scene: usize) -> Vec<String> {
    let mut rng = Rng::new(0xca97_1045);
    let mut out = Vec::new();
    for scene in Scene::all() {
        for lang in [Language::En, Language::Ru] {
            for _ in 0..per_scene {
                out.push(scene.caption(lang, &mut rng));
            }
        }
    }
    out
}

/// Training examples `first..first + batch` (see [`training_example`]).
pub fn training_examples(seed: u64, first: u64, batch: usize, side: usize) -> Vec<Example> {
    training_examples_placed(seed, first, batch, side, Placement::Free)
}

/// [`training_examples`] with the objects placed as `placement` says.
pub fn training_examples_placed(
    seed: u64,
    first: u64,
    batch: usize,
    side: usize,
    placement: Placement,
) -> Vec<Example> {
    (0..batch as u64)
        .map(|i| training_example_placed(seed, first + i, side, placement))
        .collect()
}

/// The examples' images as a `(B, 3, S, S)` tensor, each byte mapped by `f(channel, value)`.
pub fn planar_batch(
    examples: &[Example],
    side: usize,
    f: impl Fn(usize, u8) -> f32,
) -> kandinsky::Result<candle_core::Tensor> {
    let images: Vec<&[u8]> = examples.iter().map(|ex| ex.image.as_slice()).collect();
    planar_images(&images, side, f)
}

/// `side × side` RGB8 (HWC) images as a `(B, 3, S, S)` tensor, each byte mapped by
/// `f(channel, value)`.
pub fn planar_images(
    images: &[&[u8]],
    side: usize,
    f: impl Fn(usize, u8) -> f32,
) -> kandinsky::Result<candle_core::Tensor> {
    let mut data = Vec::with_capacity(images.len() * 3 * side * side);
    for image in images {
        for c in 0..3 {
            for p in 0..side * side {
                data.push(f(c, image[p * 3 + c]));
            }
        }
    }
    Ok(candle_core::Tensor::from_vec(
        data,
        (images.len(), 3, side, side),
        &candle_core::Device::Cpu,
    )?)
}
