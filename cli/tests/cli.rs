//! The `longtake` binary end to end: renders through the embedded farm (coordinator and workers
//! in the process, over loopback gRPC) decoded with ffprobe/ffmpeg, determinism, parallel
//! layouts against the single-worker render, and the one-line errors for bad input and missing or
//! unreachable coordinators. Multi-process farms with etcd are tested in `tests/cluster.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary with no coordinator in its environment: `render` runs the embedded farm.
fn longtake_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_longtake"));
    cmd.env_remove("LONGTAKE_COORDINATOR");
    cmd
}

fn longtake(args: &[&str]) -> Output {
    longtake_cmd()
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
        "64x64",
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
    let stream = probe(&a);
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["nb_read_frames"], "9");
    assert_eq!(
        (stream["width"].as_u64(), stream["height"].as_u64()),
        (Some(64), Some(64))
    );
    let (fa, fb, fc) = (decode(&a), decode(&b), decode(&c));
    assert_eq!(fa.len(), 9 * 64 * 64 * 3);
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
    assert_one_line_error(&run, &["spec.width", "250", "16"]);
    assert!(!out.exists(), "a refused job leaves no output behind");
}

#[test]
fn an_unwritable_out_fails_before_anything_starts() {
    let start = std::time::Instant::now();
    let run = longtake(&[
        "render",
        "--prompt",
        "x",
        "--out",
        "/nonexistent-longtake-dir/x.mp4",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["/nonexistent-longtake-dir/x.mp4"]);
    assert!(!stderr(&run).contains("job "), "{}", stderr(&run));
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn unknown_flags_are_one_line_with_exit_1() {
    let run = longtake(&["render", "--prompt", "x", "--frame", "9", "--out", "x.mp4"]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["--frame"]);
    assert_eq!(stderr(&run).lines().count(), 1, "{}", stderr(&run));
}

#[test]
fn farm_commands_without_a_coordinator_say_how_to_name_one() {
    for args in [
        &["status", "j-1"][..],
        &["watch", "j-1"],
        &["list"],
        &["cancel", "j-1"],
        &["fetch", "j-1", "--out", "x.mp4"],
        &["workers"],
        &["submit", "--prompt", "x"],
    ] {
        let run = longtake(args);
        assert_eq!(run.status.code(), Some(1), "{args:?}");
        assert_one_line_error(&run, &["LONGTAKE_COORDINATOR", "--coordinator"]);
    }
}

#[test]
fn a_coordinator_where_nothing_listens_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let run = longtake(&["list", "--coordinator", &url]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &[&url, "cannot reach the coordinator"]);
    // The environment variable works the same way, and a bare host:port is taken as http.
    let run = longtake_cmd()
        .env("LONGTAKE_COORDINATOR", format!("127.0.0.1:{port}"))
        .args(["workers", "--json"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &[&url]);
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

/// A small tiny-model render into a PNG directory, with extra arguments (e.g. `--layout`).
fn render_png(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "render",
        "--prompt",
        "a wolf howling at the moon",
        "--frames",
        "5",
        "--size",
        "64x48",
        "--steps",
        "3",
        "--seed",
        "7",
        "--format",
        "png",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    longtake(&args)
}

/// The RGB bytes of every PNG in `dir`, frames in name order.
fn png_frames(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|path| {
            let decoder =
                png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            buf.truncate(info.buffer_size());
            buf
        })
        .collect()
}

#[test]
fn parallel_layouts_render_the_single_process_frames() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let run = render_png(&single, &[]);
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    let expected = png_frames(&single);
    assert_eq!(expected.len(), 5);
    for (name, layout) in [("cfg2", "cfg=2"), ("tp2", "tp=2")] {
        let out = dir.path().join(name);
        let run = render_png(&out, &["--layout", layout]);
        assert!(
            run.status.success(),
            "--layout {layout} failed: {}",
            stderr(&run)
        );
        let frames = png_frames(&out);
        assert_eq!(frames.len(), expected.len(), "--layout {layout}");
        // 1e-7 differences in the latents may flip a rounding, no more.
        let worst = frames
            .iter()
            .zip(&expected)
            .flat_map(|(a, b)| {
                assert_eq!(a.len(), b.len());
                a.iter().zip(b).map(|(x, y)| x.abs_diff(*y))
            })
            .max()
            .unwrap();
        assert!(worst <= 2, "--layout {layout}: max |diff| {worst} levels");
        assert!(
            stderr(&run).contains("step 3/3"),
            "the job's progress is shown: {}",
            stderr(&run)
        );
    }
}

#[test]
fn invalid_layout_is_one_line_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames");
    let run = render_png(&out, &["--layout", "tp=3"]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(
        &run,
        &["spec.layout", "tp × ulysses = 3", "4 attention heads"],
    );
    let run = render_png(&out, &["--layout", "cfg=2", "--guidance", "1"]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["cfg = 2 needs classifier-free guidance"]);
    let run = render_png(&out, &["--layout", "tp=two"]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["--layout tp=two"]);
    assert!(!out.exists(), "nothing is written");
}
