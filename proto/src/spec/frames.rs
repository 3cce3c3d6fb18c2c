//! The frame rule: how many frames a duration needs and which counts a video diffusion model can
//! make. Wan's VAE packs 4 frames into each latent frame after the first, so a clip has `4k+1`
//! frames and `k+1` latent frames. Every edge (CLI flags, the coordinator's checks, the model's
//! latent shape) asks here.

/// Frames packed into each latent frame after the first by Wan's VAE (Wan2.1 and Wan2.2).
pub const WAN_TEMPORAL_PACK: u32 = 4;

/// A frame count the VAE cannot make, with the nearest counts it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{frames} is not {pack}k+1 (the VAE packs {pack} frames per latent frame after the first; use {nearest})")]
pub struct FrameCountError {
    pub frames: u32,
    pub pack: u32,
    /// The valid count nearest to `frames` (the smaller one on a tie, never 0).
    pub nearest: u32,
}

/// Frames needed to cover `seconds` at `fps` (at least 1); round with [`round_up`] before
/// rendering.
pub fn for_duration(seconds: f64, fps: u32) -> u32 {
    let exact = seconds * fps as f64;
    if !exact.is_finite() || exact <= 1.0 {
        return 1;
    }
    // 5 s × 16 fps must be 80 frames, not 81 through a rounding error in the product.
    let frames = (exact - 1e-9).ceil();
    if frames >= u32::MAX as f64 {
        u32::MAX
    } else {
        frames as u32
    }
}

/// The smallest count of the form `pack·k+1` that is at least `n` (and at least 1). Saturates
/// at the largest such `u32`.
pub fn round_up(n: u32, pack: u32) -> u32 {
    let pack = pack.max(1);
    if n <= 1 {
        return 1;
    }
    let k = (n - 1).div_ceil(pack);
    k.checked_mul(pack)
        .and_then(|f| f.checked_add(1))
        .unwrap_or(u32::MAX / pack * pack - pack + 1)
}

/// Checks that `frames` is of the form `pack·k+1`.
pub fn check(frames: u32, pack: u32) -> Result<(), FrameCountError> {
    let pack = pack.max(1);
    let below = frames.saturating_sub(1) / pack * pack + 1;
    if frames == below {
        return Ok(());
    }
    let above = below.saturating_add(pack);
    let nearest = if frames == 0 || frames - below <= above - frames {
        below
    } else {
        above
    };
    Err(FrameCountError {
        frames,
        pack,
        nearest,
    })
}

/// The first video frame that latent frame `latent` decodes to: the first latent frame is one
/// video frame, each later one `pack`.
pub fn first_video_frame(latent: usize, pack: usize) -> usize {
    match latent {
        0 => 0,
        k => (k - 1) * pack + 1,
    }
}

/// Latent frames of a valid `frames` count: `(frames − 1) / pack + 1`.
pub fn latent_frames(frames: u32, pack: u32) -> u32 {
    (frames.max(1) - 1) / pack.max(1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_4k_plus_1() {
        assert_eq!(for_duration(5.0, 16), 80);
        assert_eq!(for_duration(5.01, 16), 81);
        assert_eq!(for_duration(0.1, 24), 3);
        assert_eq!(for_duration(0.0, 16), 1);
        assert_eq!(for_duration(f64::NAN, 16), 1);
        assert_eq!(for_duration(3.3, 10), 33);
        let rounded: Vec<u32> = [0, 1, 2, 4, 5, 6, 80, 81, 82]
            .map(|n| round_up(n, 4))
            .to_vec();
        assert_eq!(rounded, [1, 1, 5, 5, 5, 9, 81, 81, 85]);
        assert_eq!(round_up(for_duration(5.0, 16), 4), 81);
        assert_eq!(round_up(for_duration(60.0, 16), 4), 961);
        assert_eq!(check(round_up(u32::MAX, 4), 4), Ok(()));
    }

    #[test]
    fn the_rule_names_the_nearest_valid_count() {
        assert_eq!(check(81, 4), Ok(()));
        assert_eq!(check(1, 4), Ok(()));
        let e = check(80, 4).unwrap_err();
        assert_eq!(e.nearest, 81);
        assert_eq!(
            e.to_string(),
            "80 is not 4k+1 (the VAE packs 4 frames per latent frame after the first; use 81)"
        );
        assert_eq!(check(82, 4).unwrap_err().nearest, 81);
        assert_eq!(check(83, 4).unwrap_err().nearest, 81);
        assert_eq!(check(84, 4).unwrap_err().nearest, 85);
        assert_eq!(check(0, 4).unwrap_err().nearest, 1);
        assert_eq!(latent_frames(81, 4), 21);
        assert_eq!(latent_frames(961, 4), 241);
    }
}
