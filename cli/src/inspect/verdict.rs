//! [`Verdict`]: whether a clip's measurements show what its caption says: the object's colour,
//! its direction and the background. The shape is reported, not judged.

use serde::Serialize;

use super::checker::Measurements;
use super::world::Caption;

/// The farthest (RGB distance) the object's measured colour may be from its palette colour and
/// still count as it, besides being the nearest entry. Neighbouring object colours are 81 apart
/// (orange–yellow), so a colour nearest to the right name but farther than this is none of them.
pub const COLOR_TOLERANCE: f64 = 100.0;

/// The same for the background; the two nearest backgrounds (blue and green) are 108 apart.
pub const BACKGROUND_TOLERANCE: f64 = 80.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub color_right: bool,
    pub direction_right: bool,
    pub background_right: bool,
}

impl Verdict {
    pub fn judge(caption: &Caption, measured: &Measurements) -> Self {
        let color_right = measured.object.as_ref().is_some_and(|object| {
            object.nearest.name == caption.color.name && object.distance <= COLOR_TOLERANCE
        });
        let direction_right = measured
            .motion
            .as_ref()
            .is_some_and(|m| m.motion.direction.matches(caption.direction));
        let background = &measured.background;
        let background_right = background.nearest.name == caption.background.name
            && background.distance <= BACKGROUND_TOLERANCE;
        Self {
            color_right,
            direction_right,
            background_right,
        }
    }

    pub fn passed(&self) -> bool {
        self.color_right && self.direction_right && self.background_right
    }
}
