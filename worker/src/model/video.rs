//! Video geometry and pixels: the pixel sizes Wan can make, the latent shape of a render, and the
//! conversion of the VAE's output into frames of RGB bytes or unit-range floats. The frame rule
//! itself (4k+1 counts, frames for a duration) is the job spec's: `longtake_proto::spec::frames`.

use candle_core::{bail, DType, Tensor};

use longtake_proto::spec::frames;

use super::noise::LatentShape;

/// Wan's VAE packs 4 frames into each latent frame after the first.
pub const VAE_SCALE_TEMPORAL: usize = longtake_proto::spec::frames::WAN_TEMPORAL_PACK as usize;
/// Wan's VAE downsamples 8× in height and width.
pub const VAE_SCALE_SPATIAL: usize = 8;

/// The latent shape of a `frames`×`height`×`width` video for Wan's VAE (4× in time, 8× in
/// space) and a transformer with spatial patch size `patch`, with `z_dim` latent channels.
/// Errors are one line naming the dimension at fault and the nearest valid value.
pub fn latent_shape(
    frames: usize,
    height: usize,
    width: usize,
    patch: usize,
    z_dim: usize,
) -> Result<LatentShape, String> {
    latent_shape_with(
        frames,
        height,
        width,
        VAE_SCALE_TEMPORAL,
        VAE_SCALE_SPATIAL,
        patch,
        z_dim,
    )
}

/// [`latent_shape`] for a VAE with other scale factors.
pub fn latent_shape_with(
    frames: usize,
    height: usize,
    width: usize,
    vae_scale_temporal: usize,
    vae_scale_spatial: usize,
    patch: usize,
    z_dim: usize,
) -> Result<LatentShape, String> {
    if vae_scale_temporal == 0 || vae_scale_spatial == 0 || patch == 0 || z_dim == 0 {
        return Err(format!(
            "invalid model geometry: temporal scale {vae_scale_temporal}, spatial scale {vae_scale_spatial}, patch {patch}, z_dim {z_dim} must all be positive"
        ));
    }
    let pack = u32::try_from(vae_scale_temporal).map_err(|_| "temporal scale too large")?;
    let count = u32::try_from(frames).map_err(|_| format!("frames {frames} is far too many"))?;
    frames::check(count, pack).map_err(|e| format!("frames {e}"))?;
    // The transformer patches the latent, so pixels must divide by scale × patch.
    let unit = vae_scale_spatial * patch;
    for (name, value) in [("height", height), ("width", width)] {
        if value == 0 || value % unit != 0 {
            let nearest = ((value + unit / 2) / unit).max(1) * unit;
            return Err(format!(
                "{name} {value} is not a multiple of {unit} (VAE scale {vae_scale_spatial} × patch {patch}); try {nearest}"
            ));
        }
    }
    Ok(LatentShape {
        channels: z_dim,
        frames: (frames - 1) / vae_scale_temporal + 1,
        height: height / vae_scale_spatial,
        width: width / vae_scale_spatial,
    })
}

/// The VAE's output `(1, 3, F, H, W)` in [-1, 1] as frames `(F, H, W, 3)` in [0, 1], f32:
/// `(x / 2 + 0.5).clamp(0, 1)`, as diffusers' video processor does.
pub fn video_to_unit_frames(video: &Tensor) -> candle_core::Result<Tensor> {
    let dims = video.dims();
    if dims.len() != 5 || dims[0] != 1 || dims[1] != 3 {
        bail!("expected a video tensor (1, 3, frames, height, width), got {dims:?}");
    }
    video
        .to_dtype(DType::F32)?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .squeeze(0)?
        .permute((1, 2, 3, 0))
}

/// The VAE's output `(1, 3, F, H, W)` in [-1, 1] as packed RGB bytes, frame after frame, row
/// after row: `(bytes, frames, height, width)` with `bytes.len() == F·H·W·3`. Each value is
/// `round(255 · unit)` with ties to even, as numpy rounds in diffusers' export.
pub fn video_to_rgb8(video: &Tensor) -> candle_core::Result<(Vec<u8>, usize, usize, usize)> {
    let frames = video_to_unit_frames(video)?;
    let (f, h, w, _) = frames.dims4()?;
    let values = frames.flatten_all()?.to_vec1::<f32>()?;
    // The clamp bounds every product to [0, 255], so the cast cannot saturate.
    let bytes = values
        .into_iter()
        .map(|x| (x * 255.0).round_ties_even() as u8)
        .collect();
    Ok((bytes, f, h, w))
}

/// Packed RGB bytes (`frames × height × width × 3`, as [`video_to_rgb8`] makes them) as a
/// video `(1, 3, F, H, W)` in [-1, 1], f32: what the VAE encoder takes.
pub fn rgb8_to_video(
    rgb: &[u8],
    frames: usize,
    height: usize,
    width: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let expected = frames * height * width * 3;
    if rgb.len() != expected {
        bail!(
            "{} bytes of RGB for {frames} frames of {width}×{height}: expected {expected}",
            rgb.len()
        );
    }
    Tensor::from_slice(rgb, (frames, height, width, 3), device)?
        .to_dtype(DType::F32)?
        .affine(2.0 / 255.0, -1.0)?
        .permute((3, 0, 1, 2))?
        .unsqueeze(0)?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn latent_shapes() {
        let s = latent_shape(81, 480, 832, 2, 16).unwrap();
        assert_eq!(
            s,
            LatentShape {
                channels: 16,
                frames: 21,
                height: 60,
                width: 104
            }
        );
        let s = latent_shape(1, 16, 32, 2, 4).unwrap();
        assert_eq!(
            s,
            LatentShape {
                channels: 4,
                frames: 1,
                height: 2,
                width: 4
            }
        );

        let err = latent_shape(81, 500, 832, 2, 16).unwrap_err();
        assert!(
            err.starts_with("height 500 ") && err.ends_with("try 496"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let err = latent_shape(81, 480, 840, 2, 16).unwrap_err();
        assert!(
            err.starts_with("width 840 ") && err.ends_with("try 848"),
            "{err}"
        );
        let err = latent_shape(81, 480, 5, 2, 16).unwrap_err();
        assert!(err.ends_with("try 16"), "{err}");
        let err = latent_shape(80, 480, 832, 2, 16).unwrap_err();
        assert!(
            err.starts_with("frames 80 ") && err.ends_with("use 81)"),
            "{err}"
        );
        let err = latent_shape(83, 480, 832, 2, 16).unwrap_err();
        assert!(err.ends_with("use 81)"), "{err}");
        let err = latent_shape(0, 480, 832, 2, 16).unwrap_err();
        assert!(err.ends_with("use 1)"), "{err}");
        // Another VAE geometry.
        let s = latent_shape_with(9, 24, 48, 8, 4, 3, 8).unwrap();
        assert_eq!(
            s,
            LatentShape {
                channels: 8,
                frames: 2,
                height: 6,
                width: 12
            }
        );
        assert!(latent_shape_with(9, 24, 48, 4, 8, 0, 16).is_err());
    }

    #[test]
    fn pixels_follow_diffusers() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (1, 3, F=2, H=1, W=2): channel c, frame f, column x.
        let values: Vec<f32> = vec![
            -1.0,
            1.0,
            -2.0,
            2.0, // R: frame 0 (x0, x1), frame 1
            0.0,
            0.5,
            -0.5,
            0.25, // G
            // B: −0.0078431368 maps to a unit value whose product with 255 is exactly 126.5: ties
            // go to even (126), where rounding half away from zero would give 127.
            -0.007_843_137,
            0.0,
            0.999,
            -0.999,
        ];
        let video = Tensor::from_vec(values, (1, 3, 2, 1, 2), &dev)?;
        let unit = video_to_unit_frames(&video)?;
        assert_eq!(unit.dims(), &[2, 1, 2, 3]);
        let u = unit.flatten_all()?.to_vec1::<f32>()?;
        // frame 0, x0 = (R, G, B)
        assert_eq!(&u[0..2], &[0.0, 0.5]);
        assert_eq!(u[3..5], [1.0, 0.75]);
        assert_eq!(u[6..8], [0.0, 0.25]); // clamped −2
        assert_eq!(u[9..11], [1.0, 0.625]); // clamped 2

        let (rgb, f, h, w) = video_to_rgb8(&video)?;
        assert_eq!((f, h, w), (2, 1, 2));
        assert_eq!(rgb.len(), f * h * w * 3);
        assert_eq!(&rgb[0..3], &[0, 128, 126]);
        assert_eq!(&rgb[3..6], &[255, 191, 128]);
        // 255 · 0.9995 = 254.87 and 255 · 0.0005 = 0.13
        assert_eq!(&rgb[6..9], &[0, 64, 255]);
        assert_eq!(&rgb[9..12], &[255, 159, 0]);

        assert!(video_to_rgb8(&video.squeeze(0)?).is_err());
        assert!(video_to_unit_frames(&Tensor::zeros((1, 4, 1, 1, 1), DType::F32, &dev)?).is_err());
        Ok(())
    }

    /// The reference pipeline's `video` (frames, height, width, 3) in [0, 1], mapped back to the
    /// VAE's (1, 3, F, H, W) range, must come out of `video_to_unit_frames` unchanged, with the
    /// sizes of `pipeline.json`.
    #[test]
    fn unit_frames_match_the_reference_layout() {
        let dev = Device::Cpu;
        for case in crate::model::reference::test_fixture_dirs() {
            let cases = case.join("cases");
            let spec: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(cases.join("pipeline.json")).unwrap(),
            )
            .unwrap();
            let size = |k: &str| spec[k].as_u64().unwrap() as usize;
            let fixture = crate::model::loader::SafetensorsWeights::open_file(
                cases.join("pipeline.safetensors"),
            )
            .unwrap();
            let reference = fixture.load("video", &dev).unwrap();
            assert_eq!(
                reference.dims(),
                &[size("num_frames"), size("height"), size("width"), 3],
                "{}",
                case.display()
            );
            let vae_out = reference
                .affine(2.0, -1.0)
                .and_then(|v| v.permute((3, 0, 1, 2)))
                .and_then(|v| v.unsqueeze(0))
                .unwrap();
            let ours = video_to_unit_frames(&vae_out).unwrap();
            let err = crate::model::compare::relative_l2(&ours, &reference).unwrap();
            assert!(err < 1e-6, "{}: rel L2 {err}", case.display());
            let (rgb, f, h, w) = video_to_rgb8(&vae_out).unwrap();
            assert_eq!(
                (f, h, w, rgb.len()),
                (
                    size("num_frames"),
                    size("height"),
                    size("width"),
                    f * h * w * 3
                )
            );
        }
    }

    #[test]
    fn rgb_bytes_go_back_to_the_video_they_came_from() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let rgb: Vec<u8> = (0..2 * 3 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let video = rgb8_to_video(&rgb, 2, 3, 4, &device)?;
        assert_eq!(video.dims(), &[1, 3, 2, 3, 4]);
        assert_eq!(video_to_rgb8(&video)?, (rgb.clone(), 2, 3, 4));
        assert!(rgb8_to_video(&rgb[1..], 2, 3, 4, &device).is_err());
        Ok(())
    }

    #[test]
    fn half_precision_video_is_accepted() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let video = Tensor::ones((1, 3, 1, 2, 2), DType::BF16, &dev)?;
        let (rgb, ..) = video_to_rgb8(&video)?;
        assert!(rgb.iter().all(|&b| b == 255));
        Ok(())
    }
}
