//! What a render starts from besides its prompt ([`JobInput`]): a picture (image-to-video) or a
//! clip it extends, and the rules that tie the file to the spec: the size a picture's render
//! takes ([`size_for_picture`]), how many of a clip's last frames the extension holds
//! ([`held_latent_frames`]), and whether a clip fits the spec ([`JobInput::check_clip_fits`]).

use crate::{Input, InputKind as ProtoKind};

/// What kind of file a job starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A PNG picture: the clip's first frame.
    Image,
    /// An H.264 MP4 clip the render extends.
    Clip,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Image => "picture",
            Self::Clip => "clip",
        }
    }

    fn to_proto(self) -> ProtoKind {
        match self {
            Self::Image => ProtoKind::Image,
            Self::Clip => ProtoKind::Clip,
        }
    }
}

/// A job's input file and what the coordinator read from it (all zero until it has read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    pub kind: InputKind,
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    /// 1 for a picture.
    pub frames: u32,
    /// 0 for a picture.
    pub fps: u32,
    /// A clip: its last frames the render holds as its first (0 until the job is placed).
    pub held_frames: u32,
}

impl JobInput {
    /// An input of `kind` not read yet (what a client submits).
    pub fn unread(kind: InputKind) -> Self {
        Self {
            kind,
            bytes: 0,
            sha256: String::new(),
            width: 0,
            height: 0,
            frames: 0,
            fps: 0,
            held_frames: 0,
        }
    }

    /// Whether the coordinator has read the file (a stored job's input always has been).
    pub fn is_read(&self) -> bool {
        self.frames > 0 && self.width > 0 && self.height > 0
    }

    /// The protocol's input field: `None` for a spec without one, an error naming the field for
    /// a kind this build does not know.
    pub fn from_proto(input: Option<&Input>) -> Result<Option<Self>, String> {
        let Some(input) = input else {
            return Ok(None);
        };
        let kind = match ProtoKind::try_from(input.kind) {
            Ok(ProtoKind::Image) => InputKind::Image,
            Ok(ProtoKind::Clip) => InputKind::Clip,
            Ok(ProtoKind::Unspecified) => {
                return Err("kind is unset: a picture (image) or a clip to extend (clip)".into())
            }
            Err(_) => return Err(format!("kind {} is not image (1) or clip (2)", input.kind)),
        };
        Ok(Some(Self {
            kind,
            bytes: input.bytes,
            sha256: input.sha256.clone(),
            width: input.width,
            height: input.height,
            frames: input.frames,
            fps: input.fps,
            held_frames: input.held_frames,
        }))
    }

    pub fn to_proto(&self) -> Input {
        Input {
            kind: self.kind.to_proto() as i32,
            bytes: self.bytes,
            sha256: self.sha256.clone(),
            width: self.width,
            height: self.height,
            frames: self.frames,
            fps: self.fps,
            held_frames: self.held_frames,
        }
    }

    /// Checks that an extension of this clip renders at its size and frame rate (`None`: the
    /// spec leaves the field to the clip); the message names the field and the clip's value.
    pub fn check_clip_fits(
        &self,
        width: Option<u32>,
        height: Option<u32>,
        fps: Option<u32>,
    ) -> Result<(), (&'static str, String)> {
        for (field, asked, clip) in [
            ("width", width, self.width),
            ("height", height, self.height),
            ("fps", fps, self.fps),
        ] {
            if let Some(asked) = asked.filter(|&a| a != clip) {
                return Err((
                    field,
                    format!(
                        "{asked} differs from the clip's {clip} ({}×{} at {} fps): an extension \
                         renders at the clip's size and frame rate; leave it unset",
                        self.width, self.height, self.fps
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The size of a render from a `picture_width × picture_height` picture when the spec sets
/// none: the picture's aspect over about the model's default area, each side a multiple of
/// `multiple` (rounded down, at least one multiple), as diffusers' image-to-video examples size
/// a render.
pub fn size_for_picture(
    (picture_width, picture_height): (u32, u32),
    (default_width, default_height): (u32, u32),
    multiple: u32,
) -> (u32, u32) {
    let area = f64::from(default_width) * f64::from(default_height);
    let aspect = f64::from(picture_height) / f64::from(picture_width.max(1));
    let side = |value: f64| ((value.round() as u32) / multiple).max(1) * multiple;
    let height = side((area * aspect).sqrt());
    let width = side((area / aspect).sqrt());
    (width, height)
}

/// How many latent frames of a clip an extension holds fixed at the start of its first window:
/// the window's overlap, at least 2 (two latent frames carry the clip's motion, one only a
/// still), and fewer than the window (the first window must render something new) and than the
/// clip has (`clip_frames` video frames). 0 when the window has no room (one latent frame).
pub fn held_latent_frames(window: u32, overlap: u32, clip_frames: u32, temporal: u32) -> u32 {
    let clip_latents = clip_frames.saturating_sub(1) / temporal + 1;
    overlap
        .max(2)
        .min(window.saturating_sub(1))
        .min(clip_latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_sets_the_aspect_over_the_default_area() {
        // diffusers' example: a 480p model, a landscape picture
        assert_eq!(size_for_picture((1024, 576), (832, 480), 16), (832, 464));
        assert_eq!(size_for_picture((576, 1024), (832, 480), 16), (464, 832));
        assert_eq!(size_for_picture((300, 300), (64, 64), 16), (64, 64));
        assert_eq!(size_for_picture((4000, 10), (64, 64), 16), (1280, 16));
    }

    #[test]
    fn an_extension_holds_the_overlap_within_the_window_and_the_clip() {
        assert_eq!(held_latent_frames(5, 1, 81, 4), 2);
        assert_eq!(held_latent_frames(21, 7, 81, 4), 7);
        assert_eq!(held_latent_frames(21, 7, 9, 4), 3);
        assert_eq!(held_latent_frames(2, 1, 81, 4), 1);
        assert_eq!(held_latent_frames(1, 0, 81, 4), 0);
    }

    #[test]
    fn a_clip_fits_at_its_own_size_and_rate() {
        let clip = JobInput {
            width: 64,
            height: 64,
            frames: 81,
            fps: 16,
            ..JobInput::unread(InputKind::Clip)
        };
        assert!(clip.check_clip_fits(None, Some(64), None).is_ok());
        let (field, message) = clip.check_clip_fits(None, None, Some(24)).unwrap_err();
        assert_eq!(field, "fps");
        assert!(message.contains("clip's 16"), "{message}");
        let proto = clip.to_proto();
        assert_eq!(JobInput::from_proto(Some(&proto)).unwrap(), Some(clip));
        let unknown = Input {
            kind: 9,
            ..Default::default()
        };
        assert!(JobInput::from_proto(Some(&unknown)).is_err());
    }
}
