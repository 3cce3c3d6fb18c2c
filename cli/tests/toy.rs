//! The built-in `toy` model draws what its caption says: the README's first command (an
//! embedded-farm render to MP4 at the model's defaults) for captions seen in training and
//! captions whose colour × shape × motion combination was held out of it, each judged by
//! `longtake inspect`, which must also reject the same clip under a wrong caption. The figures
//! over 50 captions come from `cargo bench -p longtake-cli --bench toy_eval` (README).

use std::path::Path;
use std::process::{Command, Output};

use longtake_cli::inspect::world::{Named, OBJECT_COLORS};
use longtake_cli::inspect::Caption;

fn longtake(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longtake"))
        .env_remove("LONGTAKE_COORDINATOR")
        .args(args)
        .output()
        .expect("run the longtake binary")
}

fn render(caption: &str, out: &Path) {
    let out_arg = out.to_str().unwrap();
    let rendered = longtake(&["render", "--prompt", caption, "--seed", "1", "--out", out_arg]);
    assert!(
        rendered.status.success(),
        "render {caption:?}: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
}

fn inspect(clip: &Path, caption: &str) -> (bool, serde_json::Value) {
    let out = longtake(&[
        "inspect",
        clip.to_str().unwrap(),
        "--caption",
        caption,
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect {caption:?}: no JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

#[test]
fn the_toy_model_draws_the_captioned_object_moving_as_said() {
    let dir = tempfile::tempdir().unwrap();
    // (caption, held out of training): the held-out ones satisfy (c + 2s + 3d) mod 5 = 0
    let cases = [
        ("a red circle bouncing on a blue background", false),
        ("a yellow square moving right on a black background", false),
        ("a green triangle moving left on a gray background", true),
        ("a white circle moving up on a blue background", true),
    ];
    for (i, (caption, held_out)) in cases.into_iter().enumerate() {
        let parsed: Caption = caption.parse().unwrap();
        assert_eq!(parsed.held_out(), held_out, "{caption}");
        let clip = dir.path().join(format!("{i}.mp4"));
        render(caption, &clip);
        let (passed, report) = inspect(&clip, caption);
        assert!(
            passed,
            "{caption:?} (held out: {held_out}): {}",
            serde_json::to_string_pretty(&report["verdict"]).unwrap()
        );
        let frames = report["measurements"]["frames"].as_u64().unwrap();
        assert_eq!(frames, 33, "the toy model's own clip length");
        // the same clip does not pass for another colour of the grammar
        let wrong = if parsed.color.name == "purple" { "red" } else { "purple" };
        let &(name, rgb) = OBJECT_COLORS.iter().find(|(n, _)| *n == wrong).unwrap();
        let other = Caption {
            color: Named { name, rgb },
            ..parsed
        }
        .to_string();
        let (passed, _) = inspect(&clip, &other);
        assert!(!passed, "{caption:?} also passed as {other:?}");
    }
}
