//! The spec checks: what a submitted [`RenderSpec`] must satisfy to be accepted ([`check`]) and,
//! once the workers that will run it are known, the model defaults its zero fields take and the
//! checks those values need ([`resolve`]). Every error names the field first
//! (`spec.width: 250 is not a multiple of 16`), so the studio knows what to change.

use longtake_proto::{ModelInfo, OutputFormat, RenderSpec};
use longtake_worker::parallel::layout::Layout;

use crate::Limits;

/// The model a spec without one renders with.
pub const DEFAULT_MODEL: &str = "tiny";

/// A spec field that breaks a rule. Displays as `spec.<field>: <problem>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

/// Checks `spec` against `limits` and returns it normalised (empty model → [`DEFAULT_MODEL`])
/// with its parsed layout. Zero width, height and steps are left for [`resolve`].
pub fn check(spec: &RenderSpec, limits: &Limits) -> Result<(RenderSpec, Layout), SpecError> {
    let mut spec = spec.clone();
    if spec.prompt.trim().is_empty() {
        return Err(bad("prompt", "must not be empty"));
    }
    check_text("prompt", &spec.prompt, limits.max_prompt_chars)?;
    check_text(
        "negative_prompt",
        &spec.negative_prompt,
        limits.max_prompt_chars,
    )?;
    if spec.model.trim().is_empty() {
        spec.model = DEFAULT_MODEL.to_string();
    }
    check_frames(spec.frames, limits.max_frames)?;
    check_size("width", spec.width, limits.max_width)?;
    check_size("height", spec.height, limits.max_height)?;
    check_steps(spec.steps, limits.max_steps)?;
    if !spec.guidance_scale.is_finite() || spec.guidance_scale < 0.0 {
        return Err(bad(
            "guidance_scale",
            format!(
                "{} is not a finite number ≥ 0 (1 or less disables guidance; 5 is typical)",
                spec.guidance_scale
            ),
        ));
    }
    if let Some(shift) = spec.shift {
        if !shift.is_finite() || shift <= 0.0 {
            return Err(bad(
                "shift",
                format!("{shift} is not a positive number (leave it unset for the checkpoint's)"),
            ));
        }
    }
    match spec.scheduler.as_str() {
        "" | "unipc" | "euler" => {}
        other => {
            return Err(bad(
                "scheduler",
                format!("\"{other}\" is not unipc or euler"),
            ))
        }
    }
    if spec.fps == 0 {
        return Err(bad("fps", "must be at least 1"));
    }
    if OutputFormat::try_from(spec.format).is_err() {
        return Err(bad(
            "format",
            format!("{} is not mp4 (0) or png (1)", spec.format),
        ));
    }
    let layout = check_layout(&spec, limits)?;
    Ok((spec, layout))
}

/// Fills the zero width, height and steps of a checked spec from `model`'s defaults and checks
/// what only the model can tell (the defaults against the limits, the layout against its heads).
pub fn resolve(
    spec: &RenderSpec,
    layout: &Layout,
    model: &ModelInfo,
    limits: &Limits,
) -> Result<RenderSpec, SpecError> {
    let mut spec = spec.clone();
    let fill = |field: &'static str, value: u32, default: u32| {
        if value != 0 {
            Ok(value)
        } else if default != 0 {
            Ok(default)
        } else {
            Err(bad(
                field,
                format!("model {} has no default {field}; set it", model.name),
            ))
        }
    };
    spec.width = fill("width", spec.width, model.default_width)?;
    spec.height = fill("height", spec.height, model.default_height)?;
    spec.steps = fill("steps", spec.steps, model.default_steps)?;
    check_size("width", spec.width, limits.max_width)?;
    check_size("height", spec.height, limits.max_height)?;
    check_steps(spec.steps, limits.max_steps)?;
    let heads = model.attention_heads as usize;
    let split = layout.tp * layout.ulysses;
    if heads != 0 && !heads.is_multiple_of(split) {
        return Err(bad(
            "layout",
            format!(
                "tp × ulysses = {split} does not divide the {heads} attention heads of model {}",
                model.name
            ),
        ));
    }
    Ok(spec)
}

/// The layout of a spec (empty: one rank). Only valid for specs that passed [`check`].
pub fn layout_of(spec: &RenderSpec) -> Layout {
    spec.layout.parse().unwrap_or(Layout::SINGLE)
}

fn check_text(field: &'static str, text: &str, max_chars: u32) -> Result<(), SpecError> {
    let chars = text.chars().count();
    if chars > max_chars as usize {
        return Err(bad(
            field,
            format!("{chars} characters is over this farm's limit of {max_chars}"),
        ));
    }
    Ok(())
}

fn check_frames(frames: u32, max: u32) -> Result<(), SpecError> {
    if frames == 0 {
        return Err(bad(
            "frames",
            "must be set (Wan renders 4k+1 frames, e.g. 81 for 5 s at 16 fps)",
        ));
    }
    if !(frames - 1).is_multiple_of(4) {
        let nearest = (frames + 1) / 4 * 4 + 1;
        return Err(bad(
            "frames",
            format!("{frames} is not 4k+1 (Wan renders 4k+1 frames; use {nearest})"),
        ));
    }
    if frames > max {
        return Err(bad(
            "frames",
            format!("{frames} is over this farm's limit of {max}"),
        ));
    }
    Ok(())
}

/// Zero means "the model's default" and passes here.
fn check_size(field: &'static str, value: u32, max: u32) -> Result<(), SpecError> {
    if !value.is_multiple_of(16) {
        return Err(bad(field, format!("{value} is not a multiple of 16")));
    }
    if value > max {
        return Err(bad(
            field,
            format!("{value} is over this farm's limit of {max}"),
        ));
    }
    Ok(())
}

fn check_steps(steps: u32, max: u32) -> Result<(), SpecError> {
    if steps > max {
        return Err(bad(
            "steps",
            format!("{steps} is over this farm's limit of {max}"),
        ));
    }
    Ok(())
}

fn check_layout(spec: &RenderSpec, limits: &Limits) -> Result<Layout, SpecError> {
    let layout: Layout =
        spec.layout
            .parse()
            .map_err(|e: longtake_worker::parallel::layout::LayoutError| {
                bad("layout", e.to_string())
            })?;
    if layout.cfg > 2 {
        return Err(bad(
            "layout",
            format!(
                "cfg = {}: classifier-free guidance runs at most 2 branches (cond, uncond)",
                layout.cfg
            ),
        ));
    }
    if layout.cfg == 2 && spec.guidance_scale <= 1.0 {
        return Err(bad(
            "layout",
            format!(
                "cfg = 2 needs classifier-free guidance, but guidance_scale is {} (≤ 1 disables it)",
                spec.guidance_scale
            ),
        ));
    }
    let world = layout.world_size();
    if world > limits.max_ranks as usize {
        return Err(bad(
            "layout",
            format!(
                "{layout} needs {world} ranks, over this farm's limit of {}",
                limits.max_ranks
            ),
        ));
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RenderSpec {
        RenderSpec {
            prompt: "a wolf howls at the moon".into(),
            frames: 9,
            width: 64,
            height: 64,
            steps: 3,
            guidance_scale: 5.0,
            fps: 16,
            ..Default::default()
        }
    }

    fn err(spec: RenderSpec) -> String {
        check(&spec, &Limits::default())
            .expect_err("spec should be refused")
            .to_string()
    }

    #[test]
    fn a_good_spec_passes_and_gets_the_default_model() {
        let (spec, layout) = check(&spec(), &Limits::default()).unwrap();
        assert_eq!(spec.model, "tiny");
        assert_eq!(layout, Layout::SINGLE);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(RenderSpec, &str)> = vec![
            (RenderSpec { prompt: "  ".into(), ..spec() }, "spec.prompt: must not be empty"),
            (
                RenderSpec { frames: 80, ..spec() },
                "spec.frames: 80 is not 4k+1 (Wan renders 4k+1 frames; use 81)",
            ),
            (RenderSpec { frames: 0, ..spec() }, "spec.frames: must be set"),
            (
                RenderSpec { frames: 2001, ..spec() },
                "spec.frames: 2001 is over this farm's limit of 1441",
            ),
            (RenderSpec { width: 250, ..spec() }, "spec.width: 250 is not a multiple of 16"),
            (RenderSpec { height: 72, ..spec() }, "spec.height: 72 is not a multiple of 16"),
            (
                RenderSpec { width: 4096, ..spec() },
                "spec.width: 4096 is over this farm's limit of 1920",
            ),
            (
                RenderSpec { steps: 201, ..spec() },
                "spec.steps: 201 is over this farm's limit of 200",
            ),
            (RenderSpec { fps: 0, ..spec() }, "spec.fps: must be at least 1"),
            (
                RenderSpec { guidance_scale: -1.0, ..spec() },
                "spec.guidance_scale: -1 is not a finite number",
            ),
            (
                RenderSpec { guidance_scale: f64::NAN, ..spec() },
                "spec.guidance_scale: NaN",
            ),
            (
                RenderSpec { shift: Some(0.0), ..spec() },
                "spec.shift: 0 is not a positive number",
            ),
            (
                RenderSpec { scheduler: "x".into(), ..spec() },
                "spec.scheduler: \"x\" is not unipc or euler",
            ),
            (RenderSpec { format: 7, ..spec() }, "spec.format: 7 is not mp4 (0) or png (1)"),
            (RenderSpec { layout: "tp=two".into(), ..spec() }, "spec.layout: layout `tp=two`"),
            (RenderSpec { layout: "cfg=3".into(), ..spec() }, "spec.layout: cfg = 3"),
            (
                RenderSpec { layout: "cfg=2".into(), guidance_scale: 1.0, ..spec() },
                "spec.layout: cfg = 2 needs classifier-free guidance",
            ),
            (
                RenderSpec { layout: "tp=8,ulysses=16".into(), ..spec() },
                "spec.layout: cfg=1,tp=8,ulysses=16,ring=1 needs 128 ranks, over this farm's limit of 64",
            ),
            (
                RenderSpec { prompt: "x".repeat(4001), ..spec() },
                "spec.prompt: 4001 characters is over this farm's limit of 4000",
            ),
            (
                RenderSpec { negative_prompt: "é".repeat(4001), ..spec() },
                "spec.negative_prompt: 4001 characters is over this farm's limit of 4000",
            ),
        ];
        for (spec, want) in cases {
            let got = err(spec);
            assert!(
                got.starts_with(want),
                "got {got:?}, want it to start with {want:?}"
            );
        }
    }

    #[test]
    fn zero_size_and_steps_wait_for_the_model() {
        let bare = RenderSpec {
            width: 0,
            height: 0,
            steps: 0,
            ..spec()
        };
        let (checked, layout) = check(&bare, &Limits::default()).unwrap();
        let model = ModelInfo {
            name: "tiny".into(),
            default_width: 64,
            default_height: 48,
            default_steps: 4,
            attention_heads: 4,
        };
        let resolved = resolve(&checked, &layout, &model, &Limits::default()).unwrap();
        assert_eq!(
            (resolved.width, resolved.height, resolved.steps),
            (64, 48, 4)
        );

        let small = Limits {
            max_steps: 2,
            ..Limits::default()
        };
        let e = resolve(&checked, &layout, &model, &small).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.steps: 4 is over this farm's limit of 2"
        );

        let no_default = ModelInfo {
            default_width: 0,
            ..model.clone()
        };
        let e = resolve(&checked, &layout, &no_default, &Limits::default()).unwrap_err();
        assert_eq!(e.field, "width");

        let split = check(
            &RenderSpec {
                layout: "tp=3".into(),
                ..spec()
            },
            &Limits::default(),
        )
        .unwrap();
        let e = resolve(&split.0, &split.1, &model, &Limits::default()).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("spec.layout: tp × ulysses = 3 does not divide the 4"));
    }
}
