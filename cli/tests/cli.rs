//! The `longtake` binary end to end: renders decoded with ffprobe/ffmpeg, determinism, and the
//! one-line errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn longtake(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args(args)
        .output()
        .expect("run the longtake binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tool(name: &str) -> Command {
    let probe = Command::new(name).arg("-version").output();
    assert!(
        matches!(probe, Ok(ref o) if o.status.success()),
        "{name} is needed to check rendered videos: run tests/setup.sh (installs ffmpeg)"
    );
    Command::new(name)
}

/// `ffprobe`'s view of the first video stream.
fn probe(path: &Path) -> serde_json::Value {
    let out = tool("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["streams"][0].clone()
}

/// The decoded frames of a video as raw RGB bytes.
fn decode(path: &Path) -> Vec<u8> {
    let out = tool("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn render_small(out: &Path, seed: &str) -> Output {
    let path = out.to_str().unwrap();
    longtake(&[
        "render",
        "--prompt",
        "a wolf howling at the moon",
        "--frames",
        "9",
        "--size",
        "64x48",
        "--steps",
        "3",
        "--seed",
        seed,
        "--out",
        path,
    ])
}

#[test]
fn five_seconds_at_16_fps_is_81_frames_of_h264() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("wolf.mp4");
    let run = longtake(&[
        "render",
        "--prompt",
        "a wolf howling at the moon",
        "--seconds",
        "5",
        "--fps",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    let log = stderr(&run);
    assert!(
        log.contains("rounded up to 81"),
        "the CLI must say it rounded 80 frames: {log}"
    );
    assert!(
        log.contains("abstract motion"),
        "the tiny model must say what it is: {log}"
    );
    let stream = probe(&out);
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["pix_fmt"], "yuv420p");
    assert_eq!(stream["r_frame_rate"], "16/1");
    assert_eq!(stream["nb_read_frames"], "81");
}

#[test]
fn same_seed_same_frames_other_seed_other_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.mp4"),
        dir.path().join("b.mp4"),
        dir.path().join("c.mp4"),
    );
    for (path, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let run = render_small(path, seed);
        assert!(run.status.success(), "render failed: {}", stderr(&run));
    }
    let (fa, fb, fc) = (decode(&a), decode(&b), decode(&c));
    assert_eq!(fa.len(), 9 * 64 * 48 * 3);
    assert!(fa == fb, "the same spec twice must give identical frames");
    assert!(fa != fc, "another seed must give other frames");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "and identical files"
    );
}

#[test]
fn png_sequence_output() {
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    let long_prompt =
        "waves rolling onto a black sand beach under a violet sky, seen from a drone at dusk";
    let run = longtake(&[
        "render",
        "--prompt",
        long_prompt,
        "--frames",
        "5",
        "--size",
        "32x32",
        "--steps",
        "2",
        "--format",
        "png",
        "--out",
        frames.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    let mut names: Vec<String> = std::fs::read_dir(&frames)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".png")));
    // The tiny text encoder takes 64 tokens: the CLI must say that the prompt was cut.
    assert!(
        stderr(&run).contains("warning: the prompt is"),
        "{}",
        stderr(&run)
    );
}

/// Asserts a failed run with exactly one line on stderr containing every `needle`.
fn assert_one_line_error(run: &Output, needles: &[&str]) {
    assert!(!run.status.success(), "expected failure");
    let err = stderr(run);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "error should mention {needle:?}: {err}"
        );
    }
}

#[test]
fn width_not_a_multiple_of_16_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mp4");
    let run = longtake(&[
        "render",
        "--prompt",
        "x",
        "--size",
        "250x256",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, &["width", "16"]);
    assert!(!out.exists());
}

fn shared_pipeline() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/wan-tiny/pipeline");
    assert!(
        dir.is_dir(),
        "{} missing: the tests need shared/reference beside the repository",
        dir.display()
    );
    dir
}

/// A writable copy of the reference checkpoint.
fn copy_checkpoint(to: &Path) {
    let status = Command::new("cp")
        .arg("-r")
        .arg(shared_pipeline())
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
    Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(to)
        .status()
        .unwrap();
}

fn render_with_model(model: &Path, out: &Path) -> Output {
    longtake(&[
        "render",
        "--prompt",
        "x",
        "--model",
        model.to_str().unwrap(),
        "--frames",
        "5",
        "--size",
        "48x32",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn a_real_layout_checkpoint_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.mp4");
    let run = render_with_model(&shared_pipeline(), &out);
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    assert_eq!(probe(&out)["nb_read_frames"], "5");
}

#[test]
fn truncated_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_checkpoint(&model);
    let weights = model.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let run = render_with_model(&model, &dir.path().join("x.mp4"));
    assert_one_line_error(&run, &["diffusion_pytorch_model.safetensors", "truncated"]);
}

#[test]
fn corrupt_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_checkpoint(&model);
    let weights = model.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    let run = render_with_model(&model, &dir.path().join("x.mp4"));
    assert_one_line_error(&run, &["vae", "diffusion_pytorch_model.safetensors"]);
}

#[test]
fn missing_component_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_checkpoint(&model);
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    let run = render_with_model(&model, &dir.path().join("x.mp4"));
    assert_one_line_error(&run, &["vae component directory", "not found"]);
}

#[test]
fn check_reference_passes_on_the_shared_fixture_and_fails_on_a_wrong_one() {
    let fixture = shared_pipeline().parent().unwrap().to_path_buf();
    let run = longtake(&["check-reference", fixture.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "check-reference failed:\n{report}{}",
        stderr(&run)
    );
    for case in [
        "tokenizer",
        "text_encoder",
        "transformer",
        "vae_decode",
        "scheduler_unipc",
        "scheduler_euler",
        "pipeline/video",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.contains("PASS") && l.contains(case)),
            "no PASS line for {case}:\n{report}"
        );
    }

    // The same fixture with another fixture's transformer weights must fail that case.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wan-tiny");
    Command::new("cp")
        .arg("-r")
        .arg(&fixture)
        .arg(&wrong)
        .status()
        .unwrap();
    Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&wrong)
        .status()
        .unwrap();
    let weights = wrong.join("pipeline/transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let bias = tensors.get_mut("proj_out.bias").unwrap();
    *bias = (bias.clone() + 0.5).unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let run = longtake(&["check-reference", wrong.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        !run.status.success(),
        "a perturbed transformer must fail:\n{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.contains("FAIL") && l.contains("transformer")),
        "{report}"
    );
}
