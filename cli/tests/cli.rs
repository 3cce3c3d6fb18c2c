//! The `longtake` binary end to end: renders through the embedded farm (coordinator and workers
//! in the process, over loopback gRPC) decoded with ffprobe/ffmpeg, determinism, parallel
//! layouts against the single-worker render, and the one-line errors for bad input and missing or
//! unreachable coordinators. Multi-process farms with etcd are tested in `tests/cluster.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// The cluster tests' PNG reader, shared (only the frame reader is used here).
#[allow(dead_code)]
#[path = "../../tests/support/media.rs"]
mod media;

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
        log.contains("procedural videos"),
        "the default model, toy, must say what it is: {log}"
    );
    let stream = probe(&out);
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["pix_fmt"], "yuv420p");
    assert_eq!(stream["r_frame_rate"], "16/1");
    assert_eq!(stream["nb_read_frames"], "81");
}

/// Without --frames, --seconds, --fps or --size the clip is the model's own: the toy model
/// states 17 frames of 64×64 at 16 fps in its checkpoint, which the farm fills in.
#[test]
fn a_render_without_a_length_takes_the_models_clip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("toy.mp4");
    let run = longtake(&[
        "render",
        "--prompt",
        "a red circle moving left on a blue background",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    assert!(!stderr(&run).contains("rounded up"), "{}", stderr(&run));
    let stream = probe(&out);
    assert_eq!(stream["nb_read_frames"], "17");
    assert_eq!(stream["r_frame_rate"], "16/1");
    assert_eq!(
        (stream["width"].as_u64(), stream["height"].as_u64()),
        (Some(64), Some(64))
    );
    let wrote = String::from_utf8_lossy(&run.stdout);
    assert!(wrote.contains("17 frames, 64x64, 16 fps"), "{wrote}");
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
    // The frames themselves: exactly the single-process render of the same spec, on the
    // default model (whose prompts are cut at 16 tokens).
    let expected = single_process_frames(
        longtake_worker::daemon::ModelSource::Toy,
        longtake_proto::RenderSpec {
            prompt: long_prompt.into(),
            model: "toy".into(),
            frames: 5,
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 5.0,
            fps: 16,
            ..Default::default()
        },
    );
    assert!(
        media::png_frames(&frames).concat() == expected,
        "the PNG frames differ from the single-process render"
    );
}

/// The frames of `spec` rendered by the worker's own pipeline in this process, outside any farm
/// (the spec resolved as a worker resolves it): what a one-worker render must equal exactly.
fn single_process_frames(
    source: longtake_worker::daemon::ModelSource,
    spec: longtake_proto::RenderSpec,
) -> Vec<u8> {
    use longtake_worker::daemon::models::ServedModel;
    use longtake_worker::daemon::task;
    let model = ServedModel::open(source).expect("the model opens");
    let render = task::render_spec(&task::job_spec(&spec, &model).expect("a valid spec"));
    let pipeline = longtake_worker::families::load_pipeline(
        model.source.pipeline_source(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .expect("the pipeline loads");
    pipeline
        .render(&render, &mut |_| {})
        .expect("the render")
        .expect("one rank decodes")
        .rgb
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
    let run = longtake(&[
        "render",
        "--prompt",
        "x",
        "--out",
        "/nonexistent-longtake-dir/x.mp4",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["/nonexistent-longtake-dir/x.mp4"]);
    // Nothing started: no job, no step, no worker (checked by what it printed, not by time).
    for started in ["job ", "step ", "worker", "loading"] {
        assert!(!stderr(&run).contains(started), "{}", stderr(&run));
    }
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
    let port = longtake_proto::membership::testing::free_port();
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
    // The same spec as PNG: exactly the checkpoint's single-process render.
    let pngs = dir.path().join("ref-png");
    let mut args = vec!["--format", "png", "--seed", "0"];
    args.extend(["--out", pngs.to_str().unwrap()]);
    let run = longtake(
        &[
            &[
                "render",
                "--prompt",
                "x",
                "--model",
                shared_pipeline().to_str().unwrap(),
                "--frames",
                "5",
                "--size",
                "48x32",
                "--steps",
                "1",
            ][..],
            &args[..],
        ]
        .concat(),
    );
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    let model = shared_pipeline().to_str().unwrap().to_string();
    let expected = single_process_frames(
        longtake_worker::daemon::ModelSource::Checkpoint {
            name: model.clone(),
            dir: shared_pipeline(),
        },
        longtake_proto::RenderSpec {
            prompt: "x".into(),
            model,
            frames: 5,
            width: 48,
            height: 32,
            steps: 1,
            guidance_scale: 5.0,
            fps: 16,
            ..Default::default()
        },
    );
    let frames = media::png_frames(&pngs);
    assert_eq!(frames.len(), 5);
    assert!(
        frames.concat() == expected,
        "the checkpoint's PNG frames differ from its single-process render"
    );
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
    assert_one_line_error(
        &run,
        &[
            "vae",
            "diffusion_pytorch_model.safetensors",
            "not a valid safetensors file",
            "corrupt",
        ],
    );
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

/// A small render into a PNG directory, with extra arguments (e.g. `--model`, `--layout`).
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

#[test]
fn parallel_layouts_render_the_single_process_frames() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let run = render_png(&single, &["--model", "tiny"]);
    assert!(run.status.success(), "render failed: {}", stderr(&run));
    let expected = media::png_frames(&single);
    assert_eq!(expected.len(), 5);
    // The one-worker render is exactly the single-process one; the layouts within 2 levels.
    let direct = single_process_frames(
        longtake_worker::daemon::ModelSource::Tiny,
        longtake_proto::RenderSpec {
            prompt: "a wolf howling at the moon".into(),
            model: "tiny".into(),
            frames: 5,
            width: 64,
            height: 48,
            steps: 3,
            guidance_scale: 5.0,
            seed: 7,
            fps: 16,
            ..Default::default()
        },
    );
    assert!(
        expected.concat() == direct,
        "the one-worker frames differ from the single-process render"
    );
    for (name, layout) in [("cfg2", "cfg=2"), ("tp2", "tp=2")] {
        let out = dir.path().join(name);
        let run = render_png(&out, &["--model", "tiny", "--layout", layout]);
        assert!(
            run.status.success(),
            "--layout {layout} failed: {}",
            stderr(&run)
        );
        let frames = media::png_frames(&out);
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

/// An embedded worker that cannot start (a bad `--device`, a `--model DIR` that is not there)
/// ends the render with its reason before a job is submitted, instead of leaving it waiting.
#[test]
fn an_embedded_worker_that_cannot_start_is_one_line_before_submitting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames");
    for (extra, needles) in [
        (["--device", "bogus"], ["local-0", "--device bogus"]),
        (
            ["--model", "/nonexistent-longtake-model"],
            ["/nonexistent-longtake-model", "not found"],
        ),
    ] {
        let run = render_png(&out, &extra);
        assert_eq!(run.status.code(), Some(1));
        assert_one_line_error(&run, &needles);
        assert!(!stderr(&run).contains("job "), "{}", stderr(&run));
    }
    assert!(!out.exists(), "nothing is written");
}

/// `kill -SIGNAL pid` for a child this test started.
fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {}", child.id());
}

/// Ctrl-C while an embedded render runs cancels its job: exit 1 with the job's reason, and no
/// half-written clip.
#[test]
fn ctrl_c_cancels_an_embedded_render() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("long.mp4");
    let mut child = longtake_cmd()
        .args([
            "render", "--prompt", "x", "--frames", "33", "--size", "128x128", "--steps", "200",
            "--out",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.starts_with("step 1/200") {
            break;
        }
    }
    assert!(
        log.contains("step 1/200"),
        "the render never started: {log}"
    );
    signal(&child, "INT");
    let start = std::time::Instant::now();
    let hang_guard = std::time::Duration::from_secs(60);
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(
        start.elapsed() < hang_guard,
        "hang guard ({hang_guard:?}): cancelling took {:?}",
        start.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("cancelled") && errors[0].contains("Ctrl-C"),
        "{log}"
    );
    assert!(!log.contains("step 200/200"), "{log}");
    assert!(!out.exists(), "no half-written clip");
}

/// A child process killed when the test ends, however it ends.
struct Served {
    child: std::process::Child,
    ready: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `longtake serve ...` and waits for its ready line on stdout.
fn serve(args: &[&str]) -> Served {
    use std::io::BufRead;
    let mut child = longtake_cmd()
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    Served {
        child,
        ready: ready.trim().to_string(),
    }
}

fn json_out(run: &Output) -> serde_json::Value {
    assert!(run.status.success(), "failed: {}", stderr(run));
    serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&run.stdout)))
}

/// The farm commands against `serve coordinator` and `serve worker` processes on a real etcd:
/// ready lines, the contract's JSON, a job from submit to fetch, NotFound and InvalidArgument
/// as one line, and a SIGTERM'd worker leaving the farm.
#[test]
fn farm_commands_against_served_processes() {
    let etcd = longtake_proto::membership::testing::EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let artifacts = dir.path().join("artifacts");
    let coordinator = serve(&[
        "coordinator",
        "--etcd",
        etcd.url(),
        "--listen",
        "127.0.0.1:0",
        "--artifacts",
        artifacts.to_str().unwrap(),
        "--prefix",
        "/cli-test",
    ]);
    let address = coordinator
        .ready
        .strip_prefix("coordinator listening on ")
        .unwrap_or_else(|| panic!("ready line: {:?}", coordinator.ready))
        .to_string();
    let farm = |args: &[&str]| {
        longtake_cmd()
            .env("LONGTAKE_COORDINATOR", &address)
            .args(args)
            .output()
            .unwrap()
    };

    // No worker yet: the job below waits in the queue until the watch has begun.
    let workers = json_out(&farm(&["workers", "--json"]));
    assert_eq!(workers, serde_json::json!([]), "{workers}");

    let small = [
        "--prompt", "a wolf", "--frames", "9", "--size", "64x64", "--steps", "3",
    ];
    let mut submit = vec!["submit", "--json", "--name", "wolf", "--priority", "3"];
    submit.extend_from_slice(&small);
    let job = json_out(&farm(&submit));
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(
        (job["name"].as_str(), job["priority"].as_i64()),
        (Some("wolf"), Some(3))
    );

    // The watch begins while the job is queued (its first line says so); only then does the
    // worker start, so every step of the job is in the watch, whatever the timing.
    let mut watch = longtake_cmd()
        .env("LONGTAKE_COORDINATOR", &address)
        .args(["watch", &id, "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["state"], "queued", "{first}");
    let mut worker = serve(&[
        "worker",
        "--etcd",
        etcd.url(),
        "--listen",
        "127.0.0.1:0",
        "--id",
        "cli-w1",
        "--label",
        "zone=t",
        // Far longer than the hang guard below: unlisted within it means it left by itself.
        "--lease-ttl",
        "300",
        "--prefix",
        "/cli-test",
    ]);
    assert!(
        worker
            .ready
            .starts_with("worker cli-w1 listening on 127.0.0.1:"),
        "{:?}",
        worker.ready
    );
    let mut events = vec![first];
    for line in lines {
        events.push(serde_json::from_str(&line.unwrap()).unwrap());
    }
    assert!(watch.wait().unwrap().success());
    assert_eq!(events.last().unwrap()["event"], "done", "{events:?}");
    assert_eq!(events.last().unwrap()["state"], "done");
    let steps: Vec<(i64, i64)> = events
        .iter()
        .filter(|e| e["event"] == "step" && e["step"] != 0) // step 0: the job is running
        .map(|e| (e["step"].as_i64().unwrap(), e["total"].as_i64().unwrap()))
        .collect();
    assert_eq!(steps, [(1, 3), (2, 3), (3, 3)], "{events:?}");

    let workers = json_out(&farm(&["workers", "--json"]));
    assert_eq!(workers.as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(workers[0]["id"], "cli-w1");
    assert_eq!(workers[0]["state"], "idle");
    assert_eq!(workers[0]["labels"]["zone"], "t");
    // Started without --model: the default model.
    assert_eq!(workers[0]["models"][0]["name"], "toy");

    let status = json_out(&farm(&["status", &id, "--json"]));
    assert_eq!(status["state"], "done");
    assert_eq!(status["steps_done"], 3);
    assert_eq!(status["workers"], serde_json::json!(["cli-w1"]));
    assert_eq!(status["spec"]["format"], "mp4");
    assert!(status["output_bytes"].as_u64().unwrap() > 0);
    let done = json_out(&farm(&["list", "--state", "done", "--json"]));
    assert!(done
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    let queued = json_out(&farm(&["list", "--state", "queued,running", "--json"]));
    assert!(!queued
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    let table = farm(&["list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id));

    let clip = dir.path().join("wolf.mp4");
    let fetch = farm(&["fetch", &id, "--out", clip.to_str().unwrap()]);
    assert!(fetch.status.success(), "{}", stderr(&fetch));
    assert_eq!(probe(&clip)["nb_read_frames"], "9");

    assert_one_line_error(&farm(&["status", "j-nope"]), &["no job j-nope"]);
    assert_one_line_error(&farm(&["cancel", "j-nope"]), &["no job j-nope"]);
    assert_one_line_error(
        &farm(&["submit", "--prompt", "x", "--size", "250x256"]),
        &["spec.width"],
    );

    // SIGTERM: the worker drains, leaves at once (no lease expiry wait) and exits 0.
    signal(&worker.child, "TERM");
    assert!(worker.child.wait().unwrap().success());
    // The coordinator hears of it through its etcd watch. The hang guard is far shorter than
    // the worker's 300 s lease, so a worker unlisted within it left; no lease expired.
    let hang_guard = std::time::Duration::from_secs(30);
    let deadline = std::time::Instant::now() + hang_guard;
    loop {
        let workers = json_out(&farm(&["workers", "--json"]));
        if workers.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hang guard ({hang_guard:?}, lease 300 s): still listed: {workers}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut coordinator = coordinator;
    signal(&coordinator.child, "TERM");
    assert!(coordinator.child.wait().unwrap().success());
}

/// A 64×64 PNG sequence of a red disc of radius 8 moving right at 0.4 px/frame on gray, written
/// by longtake's own PNG writer.
fn write_toy_clip(dir: &Path) {
    use longtake_coordinator::encode::PngSequenceWriter;
    let mut writer = PngSequenceWriter::create(dir, 64, 64).unwrap();
    for t in 0..41 {
        let cx = 16.0 + 0.4 * f64::from(t);
        let mut rgb = [128u8, 128, 128].repeat(64 * 64);
        for y in 0..64 {
            for x in 0..64 {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - 30.0);
                if dx * dx + dy * dy <= 64.0 {
                    rgb[3 * (y * 64 + x)..3 * (y * 64 + x) + 3].copy_from_slice(&[220, 40, 40]);
                }
            }
        }
        writer.push_frame(&rgb).unwrap();
    }
    writer.finish().unwrap();
}

#[test]
fn inspect_passes_the_right_caption_and_fails_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    write_toy_clip(&clip);
    let clip = clip.to_str().unwrap();

    let right = longtake(&[
        "inspect",
        clip,
        "--caption",
        "a red circle moving right on a gray background",
    ]);
    let out = String::from_utf8_lossy(&right.stdout);
    assert_eq!(right.status.code(), Some(0), "{out}{}", stderr(&right));
    assert!(
        out.contains("direction    right; caption: right  ok"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("verdict      PASS"), "{out}");

    let wrong = longtake(&[
        "inspect",
        clip,
        "--caption",
        "a orange circle moving left on a gray background",
        "--json",
    ]);
    assert_eq!(wrong.status.code(), Some(1), "{}", stderr(&wrong));
    let report: serde_json::Value = serde_json::from_slice(&wrong.stdout).unwrap();
    assert_eq!(report["passed"], false);
    assert_eq!(report["verdict"]["color_right"], false);
    assert_eq!(report["verdict"]["direction_right"], false);
    assert_eq!(report["verdict"]["background_right"], true);
    assert_eq!(report["measurements"]["object"]["nearest"]["name"], "red");
    assert_eq!(report["measurements"]["motion"]["direction"], "right");
    let dx = report["measurements"]["motion"]["dx"].as_f64().unwrap();
    assert!((dx - 16.0).abs() < 1.5, "40 frames at 0.4 px/frame: {dx}");
}

#[test]
fn inspect_names_an_unreadable_clip_and_a_caption_outside_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.mp4");
    let run = longtake(&[
        "inspect",
        missing.to_str().unwrap(),
        "--caption",
        "a red circle moving right on a gray background",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["missing.mp4"]);

    let clip = dir.path().join("clip");
    write_toy_clip(&clip);
    let run = longtake(&[
        "inspect",
        clip.to_str().unwrap(),
        "--caption",
        "a red circle moving sideways on a gray background",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert_one_line_error(&run, &["\"sideways\"", "left, right, up, down"]);
    assert!(run.stdout.is_empty());
}
