//! The toy world's grammar as `worker/toy/world.py` defines it: the object and background
//! palettes, the shapes and directions, and [`Caption`], a caption parsed from text. The palette
//! must stay equal to the generator's, since the checker names colours by their nearest entry.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// An 8-bit RGB colour.
pub type Rgb = [u8; 3];

/// The object colours, in the generator's order.
pub const OBJECT_COLORS: [(&str, Rgb); 7] = [
    ("red", [220, 40, 40]),
    ("green", [40, 190, 60]),
    ("blue", [40, 90, 230]),
    ("yellow", [240, 220, 40]),
    ("white", [245, 245, 245]),
    ("orange", [245, 140, 30]),
    ("purple", [150, 60, 200]),
];

/// The background colours, in the generator's order.
pub const BACKGROUNDS: [(&str, Rgb); 5] = [
    ("black", [0, 0, 0]),
    ("gray", [128, 128, 128]),
    ("blue", [30, 50, 140]),
    ("green", [30, 110, 50]),
    ("white", [255, 255, 255]),
];

/// The object's outline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The share of its bounding box the shape fills: π/4 for a circle, all of it for a square,
    /// half for the generator's triangle (base and height both 2r).
    pub fn fill_ratio(self) -> f64 {
        match self {
            Shape::Circle => std::f64::consts::FRAC_PI_4,
            Shape::Square => 1.0,
            Shape::Triangle => 0.5,
        }
    }
}

/// How a caption says the object moves. Image `y` grows downwards, so `Down` is `+y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Left,
    Right,
    Up,
    Down,
    Bouncing,
}

impl Direction {
    /// The straight directions, the words that may follow `moving`.
    pub const STRAIGHT: [Direction; 4] = [
        Direction::Left,
        Direction::Right,
        Direction::Up,
        Direction::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Left => "left",
            Direction::Right => "right",
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Bouncing => "bouncing",
        }
    }
}

/// One palette entry: a colour name and its RGB value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Named {
    pub name: &'static str,
    pub rgb: Rgb,
}

impl Named {
    fn find(palette: &[(&'static str, Rgb)], word: &str) -> Option<Named> {
        palette
            .iter()
            .find(|(name, _)| *name == word)
            .map(|&(name, rgb)| Named { name, rgb })
    }
}

/// A caption of the grammar `a {color} {shape} moving {left|right|up|down} on a {background}
/// background` or `a {color} {shape} bouncing on a {background} background`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Caption {
    pub color: Named,
    pub shape: Shape,
    pub direction: Direction,
    pub background: Named,
}

impl fmt::Display for Caption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let motion = match self.direction {
            Direction::Bouncing => "bouncing".to_string(),
            straight => format!("moving {}", straight.name()),
        };
        write!(
            f,
            "a {} {} {motion} on a {} background",
            self.color.name,
            self.shape.name(),
            self.background.name
        )
    }
}

impl Caption {
    /// The directions in the generator's order (`DIRECTIONS` in `world.py`).
    pub const DIRECTIONS: [Direction; 5] = [
        Direction::Left,
        Direction::Right,
        Direction::Up,
        Direction::Down,
        Direction::Bouncing,
    ];

    /// Whether this caption's colour × shape × direction combination was kept out of the toy
    /// model's training: `(c + 2s + 3d) mod 5 = 0` over the generator's list indices, 21 of the
    /// 105 combinations, one direction per colour × shape pair (`held_out` in `world.py`).
    pub fn held_out(&self) -> bool {
        let c = OBJECT_COLORS
            .iter()
            .position(|(name, _)| *name == self.color.name)
            .expect("a caption's colour is in the palette");
        let s = Shape::ALL
            .iter()
            .position(|&s| s == self.shape)
            .expect("a shape");
        let d = Self::DIRECTIONS
            .iter()
            .position(|&d| d == self.direction)
            .expect("a direction");
        (c + 2 * s + 3 * d) % 5 == 0
    }

    /// `count` captions alternating between combinations seen in the toy model's training and
    /// held-out ones, a pure function of `seed`: what `toy_eval` and the toy test render.
    pub fn evaluation_set(count: usize, seed: u64) -> Vec<Caption> {
        let (held, seen): (Vec<Caption>, Vec<Caption>) =
            Self::all().into_iter().partition(Caption::held_out);
        let mut state = seed;
        let mut next = move || {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        (0..count)
            .map(|i| {
                let pool = if i % 2 == 0 { &seen } else { &held };
                pool[(next() % pool.len() as u64) as usize]
            })
            .collect()
    }

    /// Every caption of the grammar: each colour × shape × direction on each background that is
    /// not the object's colour name, in the generator's order.
    pub fn all() -> Vec<Caption> {
        let mut out = Vec::new();
        for &(color, color_rgb) in &OBJECT_COLORS {
            for shape in Shape::ALL {
                for direction in Self::DIRECTIONS {
                    for &(background, background_rgb) in &BACKGROUNDS {
                        if background != color {
                            out.push(Caption {
                                color: Named {
                                    name: color,
                                    rgb: color_rgb,
                                },
                                shape,
                                direction,
                                background: Named {
                                    name: background,
                                    rgb: background_rgb,
                                },
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// Why a text is not a caption of the grammar. Every variant quotes the caption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptionError {
    #[error("caption {caption:?}: word {position} is {found:?}, expected {expected}")]
    Word {
        caption: String,
        /// 1-based, as a person counts.
        position: usize,
        found: String,
        expected: String,
    },
    #[error("caption {caption:?} ends after {words} words, expected {expected} next")]
    TooShort {
        caption: String,
        words: usize,
        expected: String,
    },
    #[error("caption {caption:?}: {extra:?} after the end of the caption (\"... background\")")]
    TooLong { caption: String, extra: String },
    #[error(
        "caption {caption:?}: the object is {color} on a {color} background; the world never draws an object in its background's colour"
    )]
    InvisibleObject {
        caption: String,
        color: &'static str,
    },
}

impl FromStr for Caption {
    type Err = CaptionError;

    /// Words are compared lower-cased, split on any whitespace.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lowered = text.to_lowercase();
        let mut words = Words {
            caption: text,
            words: lowered.split_whitespace().collect(),
            next: 0,
        };
        words.literal("a")?;
        let color = words.one_of("a colour", &OBJECT_COLORS.map(|(name, _)| name))?;
        let shape = words.one_of("a shape", &Shape::ALL.map(Shape::name))?;
        let direction = match words.one_of("a motion", &["moving", "bouncing"])? {
            "bouncing" => Direction::Bouncing,
            _ => {
                let word =
                    words.one_of("a direction", &Direction::STRAIGHT.map(Direction::name))?;
                *Direction::STRAIGHT
                    .iter()
                    .find(|d| d.name() == word)
                    .expect("one_of returned a listed word")
            }
        };
        words.literal("on")?;
        words.literal("a")?;
        let background = words.one_of("a background", &BACKGROUNDS.map(|(name, _)| name))?;
        words.literal("background")?;
        words.end()?;

        let color = Named::find(&OBJECT_COLORS, color).expect("one_of returned a palette name");
        let background =
            Named::find(&BACKGROUNDS, background).expect("one_of returned a palette name");
        if color.name == background.name {
            return Err(CaptionError::InvisibleObject {
                caption: text.to_string(),
                color: color.name,
            });
        }
        let shape = *Shape::ALL
            .iter()
            .find(|s| s.name() == shape)
            .expect("one_of returned a listed word");
        Ok(Caption {
            color,
            shape,
            direction,
            background,
        })
    }
}

/// The caption's words, consumed left to right.
struct Words<'a> {
    caption: &'a str,
    words: Vec<&'a str>,
    next: usize,
}

impl<'a> Words<'a> {
    fn literal(&mut self, word: &'static str) -> Result<(), CaptionError> {
        self.one_of(&format!("{word:?}"), &[word]).map(|_| ())
    }

    /// The next word, which must be one of `allowed`; `what` names the slot in errors.
    fn one_of<'w>(&mut self, what: &str, allowed: &[&'w str]) -> Result<&'w str, CaptionError> {
        let expected = if allowed.len() == 1 {
            what.to_string()
        } else {
            format!("{what} ({})", allowed.join(", "))
        };
        let Some(&word) = self.words.get(self.next) else {
            return Err(CaptionError::TooShort {
                caption: self.caption.to_string(),
                words: self.words.len(),
                expected,
            });
        };
        self.next += 1;
        allowed
            .iter()
            .find(|&&a| a == word)
            .copied()
            .ok_or_else(|| CaptionError::Word {
                caption: self.caption.to_string(),
                position: self.next,
                found: word.to_string(),
                expected,
            })
    }

    fn end(&self) -> Result<(), CaptionError> {
        if self.next < self.words.len() {
            return Err(CaptionError::TooLong {
                caption: self.caption.to_string(),
                extra: self.words[self.next..].join(" "),
            });
        }
        Ok(())
    }
}

/// The palette entry nearest to `rgb` (Euclidean RGB distance) and that distance.
pub fn nearest(palette: &[(&'static str, Rgb)], rgb: [f64; 3]) -> (Named, f64) {
    palette
        .iter()
        .map(|&(name, entry)| {
            (
                Named { name, rgb: entry },
                distance(rgb, entry.map(f64::from)),
            )
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("palettes are not empty")
}

/// The palette entry nearest to `rgb` when each entry may have faded towards `background` (blur
/// and faint frames mix the object with it): entry `P` stands for every `background + k·(P -
/// background)` with `k` in `min_strength..=1`. Returns the entry, the distance to its nearest
/// such colour and that `k`. A darkened yellow on black is yellow at 80%, not the orange it is
/// nearest to in plain RGB.
pub fn nearest_faded(
    palette: &[(&'static str, Rgb)],
    rgb: [f64; 3],
    background: [f64; 3],
    min_strength: f64,
) -> (Named, f64, f64) {
    palette
        .iter()
        .map(|&(name, entry)| {
            let toward: Vec<f64> = (0..3)
                .map(|c| f64::from(entry[c]) - background[c])
                .collect();
            let length2: f64 = toward.iter().map(|t| t * t).sum();
            let along: f64 = (0..3).map(|c| (rgb[c] - background[c]) * toward[c]).sum();
            let strength = if length2 > 0.0 {
                (along / length2).clamp(min_strength, 1.0)
            } else {
                1.0
            };
            let faded = [0, 1, 2].map(|c| background[c] + strength * toward[c]);
            (Named { name, rgb: entry }, distance(rgb, faded), strength)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("palettes are not empty")
}

/// Euclidean distance between two RGB colours.
pub fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifth_of_the_combinations_is_held_out_one_direction_per_colour_and_shape() {
        let all = Caption::all();
        // 7 colours × 3 shapes × 5 directions × 5 backgrounds, less the object on a background
        // of its own colour name (blue, green, white: 3 colours × 3 shapes × 5 directions)
        assert_eq!(all.len(), 7 * 3 * 5 * 5 - 3 * 3 * 5);
        let mut combos: Vec<(&str, Shape, Direction)> = all
            .iter()
            .filter(|c| c.held_out())
            .map(|c| (c.color.name, c.shape, c.direction))
            .collect();
        combos.dedup();
        assert_eq!(combos.len(), 21);
        for (color, _) in OBJECT_COLORS {
            for shape in Shape::ALL {
                let held = combos.iter().filter(|(c, s, _)| *c == color && *s == shape);
                assert_eq!(held.count(), 1, "{color} {}", shape.name());
            }
        }
        // the generator's own examples: (red, circle, left) → 0 + 0 + 0 ≡ 0; (red, circle,
        // right) → 3, not held out
        let red_circle_left: Caption = "a red circle moving left on a black background"
            .parse()
            .unwrap();
        assert!(red_circle_left.held_out());
        let red_circle_right: Caption = "a red circle moving right on a black background"
            .parse()
            .unwrap();
        assert!(!red_circle_right.held_out());
    }

    #[test]
    fn every_caption_of_the_generator_parses_back_to_itself() {
        let mut count = 0;
        for (color, _) in OBJECT_COLORS {
            for shape in Shape::ALL {
                for direction in Direction::STRAIGHT.into_iter().chain([Direction::Bouncing]) {
                    for (background, _) in BACKGROUNDS {
                        let motion = match direction {
                            Direction::Bouncing => "bouncing".to_string(),
                            d => format!("moving {}", d.name()),
                        };
                        let text = format!(
                            "a {color} {} {motion} on a {background} background",
                            shape.name()
                        );
                        if color == background {
                            assert!(matches!(
                                text.parse::<Caption>(),
                                Err(CaptionError::InvisibleObject { .. })
                            ));
                            continue;
                        }
                        let caption: Caption = text.parse().unwrap();
                        assert_eq!(caption.to_string(), text);
                        assert_eq!(
                            (caption.color.name, caption.shape, caption.direction),
                            (color, shape, direction)
                        );
                        assert_eq!(caption.background.name, background);
                        count += 1;
                    }
                }
            }
        }
        // 7 colours × 3 shapes × 5 motions × 5 backgrounds, less the 3 colours that are also
        // backgrounds' (blue, green, white) on their own background.
        assert_eq!(count, 7 * 3 * 5 * 5 - 3 * 3 * 5);
    }

    #[test]
    fn case_and_spacing_do_not_matter() {
        let caption: Caption = "  A Red  circle moving LEFT on a gray background "
            .parse()
            .unwrap();
        assert_eq!(caption.color.rgb, [220, 40, 40]);
        assert_eq!(caption.direction, Direction::Left);
        assert_eq!(caption.background.rgb, [128, 128, 128]);
    }

    #[test]
    fn a_bad_word_is_named_with_what_was_allowed() {
        let err = "a pink circle moving left on a gray background"
            .parse::<Caption>()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, CaptionError::Word { position: 2, .. }),
            "{text}"
        );
        assert!(text.contains("\"pink\""), "{text}");
        assert!(
            text.contains("red, green, blue, yellow, white, orange, purple"),
            "{text}"
        );

        let err = "a red circle moving sideways on a gray background"
            .parse::<Caption>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"sideways\"") && err.contains("left, right, up, down"),
            "{err}"
        );

        let err = "a red hexagon bouncing on a gray background"
            .parse::<Caption>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("circle, square, triangle"), "{err}");

        let err = "a red circle bouncing on a orange background"
            .parse::<Caption>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("black, gray, blue, green, white"), "{err}");
    }

    #[test]
    fn short_long_and_invisible_captions_are_refused() {
        assert!(matches!(
            "a red circle moving".parse::<Caption>(),
            Err(CaptionError::TooShort { words: 4, .. })
        ));
        assert!(matches!(
            "a red circle bouncing on a gray background today".parse::<Caption>(),
            Err(CaptionError::TooLong { ref extra, .. }) if extra == "today"
        ));
        // "bouncing" takes no direction
        assert!(matches!(
            "a red circle bouncing left on a gray background".parse::<Caption>(),
            Err(CaptionError::Word { position: 5, .. })
        ));
        assert!(matches!(
            "a white square moving up on a white background".parse::<Caption>(),
            Err(CaptionError::InvisibleObject { color: "white", .. })
        ));
        assert!("".parse::<Caption>().is_err());
    }

    #[test]
    fn nearest_palette_entry() {
        let (named, d) = nearest(&OBJECT_COLORS, [225.0, 45.0, 40.0]);
        assert_eq!(named.name, "red");
        assert!((d - 50f64.sqrt()).abs() < 1e-9);
        assert_eq!(nearest(&BACKGROUNDS, [120.0, 130.0, 125.0]).0.name, "gray");
    }

    #[test]
    fn a_faded_colour_is_named_by_what_it_faded_from() {
        let dark_yellow = [192.0, 176.0, 32.0];
        assert_eq!(nearest(&OBJECT_COLORS, dark_yellow).0.name, "orange");
        let (named, d, strength) = nearest_faded(&OBJECT_COLORS, dark_yellow, [0.0; 3], 0.6);
        assert_eq!(named.name, "yellow");
        assert!(d < 1.0 && (strength - 0.8).abs() < 0.01, "{d} {strength}");
        // fading has a floor: a colour halfway to the background is not its palette colour
        let (_, d, strength) = nearest_faded(&OBJECT_COLORS, [120.0, 110.0, 20.0], [0.0; 3], 0.6);
        assert!(d > 20.0 && strength == 0.6, "{d} {strength}");
        // and an unfaded colour is measured as plainly
        let (named, d, strength) =
            nearest_faded(&OBJECT_COLORS, [220.0, 40.0, 40.0], [128.0; 3], 0.6);
        assert_eq!((named.name, d, strength), ("red", 0.0, 1.0));
    }
}
