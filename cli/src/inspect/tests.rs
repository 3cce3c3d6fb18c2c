//! The checker end to end on drawn clips: every colour on every background it may appear on,
//! every direction, blur, noise and faint frames; captions that must fail; other frame sizes; and
//! clips written and read back by longtake's own PNG and MP4 writers.

use super::synth::{add_noise, blur, fade, Scene};
use super::world::{Direction, Rgb, Shape, BACKGROUNDS, OBJECT_COLORS};
use super::*;

fn caption(color: &str, shape: Shape, direction: Direction, background: &str) -> Caption {
    let motion = match direction {
        Direction::Bouncing => "bouncing".to_string(),
        d => format!("moving {}", d.name()),
    };
    format!(
        "a {color} {} {motion} on a {background} background",
        shape.name()
    )
    .parse()
    .unwrap()
}

fn report(caption: Caption, frames: &[Frame]) -> Report {
    Report::of_frames("test-clip".into(), caption, frames).unwrap()
}

const DIRECTIONS: [Direction; 5] = [
    Direction::Left,
    Direction::Right,
    Direction::Up,
    Direction::Down,
    Direction::Bouncing,
];

/// Every colour on every background it may appear on, each pair with another direction and
/// shape, so all five directions and three shapes are covered.
fn every_pair() -> Vec<(&'static str, Rgb, &'static str, Rgb, Direction, Shape)> {
    let mut out = Vec::new();
    for (c, &(color, color_rgb)) in OBJECT_COLORS.iter().enumerate() {
        for (b, &(background, background_rgb)) in BACKGROUNDS.iter().enumerate() {
            if color != background {
                let k = out.len();
                out.push((
                    color,
                    color_rgb,
                    background,
                    background_rgb,
                    DIRECTIONS[(k + c) % 5],
                    Shape::ALL[(k + b) % 3],
                ));
            }
        }
    }
    out
}

#[test]
fn every_colour_on_every_background_passes_with_its_own_caption() {
    for (color, color_rgb, background, background_rgb, direction, shape) in every_pair() {
        let scene = Scene::new(color_rgb, background_rgb, shape, direction);
        let report = report(
            caption(color, shape, direction, background),
            &scene.render(),
        );
        assert!(report.passed, "{}\n{report}", report.caption);

        let m = &report.measurements;
        let object = m.object.as_ref().unwrap();
        assert!(object.distance < 3.0, "{report}");
        assert!(m.background.distance < 1.0, "{report}");
        assert!(m.consistency.missing_frames.is_empty(), "{report}");
        // thresholding moves a few edge pixels in and out as the shape slides
        assert!(m.consistency.area_cv.unwrap() < 0.08, "{report}");
        assert!(m.consistency.color_std.unwrap() < 3.0, "{report}");
        let motion = m.motion.as_ref().unwrap();
        assert!(motion.stays_inside, "{report}");
        if direction == Direction::Bouncing {
            assert_eq!(
                [motion.motion.reflections_x, motion.motion.reflections_y],
                scene.reflections(),
                "{report}"
            );
        } else {
            let truth = scene.velocity.map(|v| v * (scene.frames - 1) as f64);
            assert!((motion.motion.dx - truth[0]).abs() < 0.5, "{report}");
            assert!((motion.motion.dy - truth[1]).abs() < 0.5, "{report}");
            assert!((motion.motion.velocity[0] - scene.velocity[0]).abs() < 0.01);
            assert!((motion.motion.velocity[1] - scene.velocity[1]).abs() < 0.01);
            assert!(motion.motion.dx.hypot(motion.motion.dy) > 20.0);
            // 1.75 px/frame; the weighted centroid follows sub-pixel motion.
            assert!(m.consistency.max_centroid_jump.unwrap() < 2.0, "{report}");
        }
    }
}

/// The wrapping world: a straight mover crosses the right edge and comes back at the left. On
/// the torus it is one object moving right all the way, at its speed and without a jump; read
/// as a plane, its centroid leaps across the frame where it is split in two.
#[test]
fn a_mover_across_the_torus_edge_keeps_its_track() {
    let mut scene = Scene::new([220, 40, 40], [0, 0, 0], Shape::Square, Direction::Right);
    scene.wrap = true;
    scene.frames = 33;
    scene.start = [30.0, 32.0];
    let frames = scene.render();
    let torus = measure(&frames, Topology::Torus).unwrap();
    let motion = torus.motion.as_ref().unwrap();
    assert_eq!(
        motion.motion.direction,
        motion::ObservedDirection::Right,
        "{motion:?}"
    );
    assert!(
        (motion.motion.velocity[0] - 1.75).abs() < 0.01,
        "{motion:?}"
    );
    assert!((motion.motion.dx - 56.0).abs() < 0.5, "{motion:?}");
    assert!(torus.consistency.max_centroid_jump.unwrap() < 2.0);
    let object = torus.object.as_ref().unwrap();
    assert_eq!(object.nearest_shape, Shape::Square);
    let plane = measure(&frames, Topology::Plane).unwrap();
    assert!(plane.consistency.max_centroid_jump.unwrap() > 20.0);
}

/// Only a wrapping world's straight movers are measured on the torus: a bouncing object stays
/// inside the frame, in a clip of one prompt or of a timeline, and the bordered world has edges.
#[test]
fn the_world_and_the_prompts_choose_the_topology() {
    use Direction::{Bouncing, Left, Right, Up};
    let cases = [
        (ToyWorld::Wrapping, vec![Right], Topology::Torus),
        (ToyWorld::Wrapping, vec![Right, Left, Up], Topology::Torus),
        (ToyWorld::Wrapping, vec![Bouncing], Topology::Plane),
        (ToyWorld::Wrapping, vec![Right, Bouncing], Topology::Plane),
        (ToyWorld::Wrapping, vec![], Topology::Plane),
        (ToyWorld::Bordered, vec![Right], Topology::Plane),
        (ToyWorld::Bordered, vec![Bouncing], Topology::Plane),
    ];
    for (world, directions, want) in cases {
        assert_eq!(
            Topology::of_world(world, directions.clone()),
            want,
            "{world:?} {directions:?}"
        );
    }
}

#[test]
fn the_shape_is_measured_by_how_much_of_its_box_it_fills() {
    for shape in Shape::ALL {
        let scene = Scene::new([220, 40, 40], [0, 0, 0], shape, Direction::Right);
        let measured = measure(&scene.render(), Topology::Plane).unwrap();
        let object = measured.object.unwrap();
        assert_eq!(object.nearest_shape, shape, "{shape:?}: {object:?}");
        assert!(
            (object.fill_ratio - shape.fill_ratio()).abs() < 0.1,
            "{shape:?}: {object:?}"
        );
    }
}

/// The damage a small diffusion model does: soft edges, noise, a dimmer object, and frames where
/// it almost disappears.
fn damaged(scene: &Scene, seed: u64) -> Vec<Frame> {
    scene
        .render()
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let frame = blur(frame, 2);
            let keep = match i % 20 {
                7 => 0.15, // nearly gone
                13 => 0.5,
                _ => 0.9,
            };
            let frame = fade(&frame, scene.background, keep);
            add_noise(&frame, 12.0, seed + i as u64)
        })
        .collect()
}

#[test]
fn blurred_noisy_and_faint_clips_still_pass() {
    for (k, (color, color_rgb, background, background_rgb, direction, shape)) in
        every_pair().into_iter().enumerate()
    {
        let scene = Scene::new(color_rgb, background_rgb, shape, direction);
        let frames = damaged(&scene, k as u64 * 1000);
        let report = report(caption(color, shape, direction, background), &frames);
        assert!(report.passed, "{}\n{report}", report.caption);

        let m = &report.measurements;
        // Frame 7 keeps 15% of the object: too faint to find in most pairs.
        assert!(m.consistency.missing_frames.len() <= 2, "{report}");
        for missing in &m.consistency.missing_frames {
            assert_eq!(missing % 20, 7, "{report}");
        }
        assert!(m.object.as_ref().unwrap().distance < 60.0, "{report}");
        // Noise clipped at 0 or 255 brightens black and darkens white by ~3 per channel.
        assert!(m.background.distance < 8.0, "{report}");
    }
}

#[test]
fn a_wrong_colour_fails_even_the_nearest_one() {
    for (color, color_rgb, background, background_rgb, direction, shape) in every_pair() {
        let frames = Scene::new(color_rgb, background_rgb, shape, direction).render();
        // The palette colour nearest to the drawn one, other than itself.
        let (wrong, _) = OBJECT_COLORS
            .iter()
            .filter(|(name, _)| *name != color && *name != background)
            .map(|&(name, rgb)| {
                let d = world::distance(color_rgb.map(f64::from), rgb.map(f64::from));
                (name, d)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        let report = report(caption(wrong, shape, direction, background), &frames);
        assert!(!report.passed, "{report}");
        assert_eq!(
            report.verdict,
            Verdict {
                color_right: false,
                direction_right: true,
                background_right: true
            },
            "{report}"
        );
    }
}

#[test]
fn a_wrong_background_fails() {
    let frames = Scene::new([40, 190, 60], [30, 50, 140], Shape::Square, Direction::Up).render();
    let report = report(
        caption("green", Shape::Square, Direction::Up, "black"),
        &frames,
    );
    assert!(!report.passed);
    assert!(!report.verdict.background_right, "{report}");
    assert!(report.verdict.color_right && report.verdict.direction_right);
    assert_eq!(report.measurements.background.nearest.name, "blue");
}

#[test]
fn every_wrong_direction_fails() {
    for drawn in DIRECTIONS {
        let frames = Scene::new([245, 140, 30], [128, 128, 128], Shape::Circle, drawn).render();
        for said in DIRECTIONS {
            let report = report(caption("orange", Shape::Circle, said, "gray"), &frames);
            assert_eq!(
                report.passed,
                said == drawn,
                "drawn {drawn:?}, said {said:?}\n{report}"
            );
            assert_eq!(report.verdict.direction_right, said == drawn);
            assert!(report.verdict.color_right && report.verdict.background_right);
        }
    }
}

#[test]
fn a_static_object_matches_no_direction() {
    let mut scene = Scene::new([150, 60, 200], [0, 0, 0], Shape::Triangle, Direction::Left);
    scene.velocity = [0.0, 0.0];
    scene.center_path();
    let frames: Vec<Frame> = scene
        .render()
        .iter()
        .enumerate()
        .map(|(i, f)| add_noise(&blur(f, 1), 10.0, i as u64))
        .collect();
    let measured = measure(&frames, Topology::Plane).unwrap();
    let motion = measured.motion.as_ref().unwrap();
    assert_eq!(
        motion.motion.direction,
        motion::ObservedDirection::Static,
        "{motion:?}"
    );
    for said in DIRECTIONS {
        let report = report(caption("purple", Shape::Triangle, said, "black"), &frames);
        assert!(
            !report.passed && !report.verdict.direction_right,
            "{report}"
        );
    }
}

#[test]
fn a_clip_without_an_object_fails_colour_and_direction() {
    let frames = vec![Frame::filled(64, 64, [128, 128, 128]); 20];
    let report = report(
        caption("red", Shape::Circle, Direction::Left, "gray"),
        &frames,
    );
    assert!(report.measurements.object.is_none() && report.measurements.motion.is_none());
    assert_eq!(report.measurements.consistency.missing_frames.len(), 20);
    assert!(!report.verdict.color_right && !report.verdict.direction_right);
    assert!(report.verdict.background_right);
    assert!(
        report.to_string().contains("not found in any frame"),
        "{report}"
    );
}

#[test]
fn an_object_that_leaves_the_frame_is_reported() {
    let mut scene = Scene::new(
        [240, 220, 40],
        [30, 110, 50],
        Shape::Square,
        Direction::Right,
    );
    scene.start = [40.0, 32.0];
    let measured = measure(&scene.render(), Topology::Plane).unwrap();
    let motion = measured.motion.unwrap();
    assert!(!motion.stays_inside, "{motion:?}");
    assert_eq!(motion.motion.direction, motion::ObservedDirection::Right);
}

#[test]
fn other_frame_sizes_are_measured_in_their_own_pixels() {
    for (width, height) in [(128, 96), (48, 80)] {
        for direction in DIRECTIONS {
            let mut scene = Scene::new([40, 90, 230], [255, 255, 255], Shape::Circle, direction);
            (scene.width, scene.height) = (width, height);
            scene.radius = 0.15 * width.min(height) as f64;
            if direction == Direction::Bouncing {
                scene.start = [0.3 * width as f64, 0.4 * height as f64];
            } else {
                scene.center_path();
            }
            let frames = scene.render();
            assert_eq!(frames[0].width(), width);
            let report = report(caption("blue", Shape::Circle, direction, "white"), &frames);
            assert!(report.passed, "{width}x{height} {direction:?}\n{report}");
        }
    }
}

#[test]
fn differently_sized_frames_are_refused() {
    let frames = vec![Frame::filled(8, 8, [0; 3]), Frame::filled(8, 6, [0; 3])];
    assert_eq!(
        measure(&frames, Topology::Plane).unwrap_err(),
        CheckError::SizeChanges {
            index: 1,
            got: "8x6".into(),
            expected: "8x8".into()
        }
    );
    assert_eq!(
        measure(&[], Topology::Plane).unwrap_err(),
        CheckError::NoFrames
    );
}

#[test]
fn the_report_serialises_every_figure() {
    let scene = Scene::new([220, 40, 40], [0, 0, 0], Shape::Circle, Direction::Bouncing);
    let report = report(
        caption("red", Shape::Circle, Direction::Bouncing, "black"),
        &scene.render(),
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["verdict"]["direction_right"], true);
    assert_eq!(json["expected"]["direction"], "bouncing");
    assert_eq!(json["measurements"]["object"]["nearest"]["name"], "red");
    assert_eq!(json["measurements"]["motion"]["direction"], "bouncing");
    assert!(
        json["measurements"]["motion"]["reflections"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert_eq!(
        json["measurements"]["per_frame"].as_array().unwrap().len(),
        17
    );
    let text = report.to_string();
    assert!(
        text.contains("direction    bouncing; caption: bouncing  ok"),
        "{text}"
    );
    assert!(text.ends_with("verdict      PASS"), "{text}");
}

#[test]
fn a_png_sequence_written_by_longtake_reads_back_exactly() {
    use longtake_coordinator::encode::PngSequenceWriter;
    let frames = Scene::new(
        [245, 245, 245],
        [30, 50, 140],
        Shape::Triangle,
        Direction::Down,
    )
    .render();
    let dir = tempfile::tempdir().unwrap();
    let mut writer = PngSequenceWriter::create(dir.path(), 64, 64).unwrap();
    for frame in &frames {
        writer.push_frame(frame.rgb()).unwrap();
    }
    writer.finish().unwrap();
    assert_eq!(read_clip(dir.path()).unwrap(), frames);
    let report = inspect(
        dir.path(),
        "a white triangle moving down on a blue background",
    )
    .unwrap();
    assert!(report.passed, "{report}");
}

#[test]
fn an_mp4_written_by_longtake_decodes_to_the_frames_within_compression_error() {
    use longtake_coordinator::encode::Mp4Writer;
    let scene = Scene::new(
        [150, 60, 200],
        [128, 128, 128],
        Shape::Circle,
        Direction::Bouncing,
    );
    let frames = scene.render();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let mut writer = Mp4Writer::create(&path, 64, 64, 16).unwrap();
    for frame in &frames {
        writer.push_frame(frame.rgb()).unwrap();
    }
    writer.finish().unwrap();

    let decoded = read_clip(&path).unwrap();
    assert_eq!(decoded.len(), frames.len());
    // Away from the object's edges H.264 at QP 18 gives flat colours back within a few levels.
    let corner = |f: &Frame| f.pixel(2, 62).map(i32::from);
    for (a, b) in frames.iter().zip(&decoded) {
        let diff = corner(a)
            .iter()
            .zip(corner(b))
            .map(|(x, y)| (x - y).abs())
            .max();
        assert!(diff.unwrap() <= 3, "{:?} vs {:?}", corner(a), corner(b));
    }
    let report = inspect(&path, "a purple circle bouncing on a gray background").unwrap();
    assert!(report.passed, "{report}");
    // Decoding with BT.601 instead of the BT.709 the encoder used would put this purple ~20 off.
    let object = report.measurements.object.as_ref().unwrap();
    let off = world::distance(object.median_rgb, [150.0, 60.0, 200.0]);
    assert!(off < 6.0, "{off}\n{report}");
    let motion = report.measurements.motion.as_ref().unwrap();
    assert_eq!(
        [motion.motion.reflections_x, motion.motion.reflections_y],
        scene.reflections(),
        "{report}"
    );
}

#[test]
fn unreadable_clips_and_bad_captions_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let err = inspect(dir.path(), "a red circle bouncing on a gray background")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no frame_*.png") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );

    let missing = dir.path().join("nothing.mp4");
    let err = inspect(&missing, "a red circle bouncing on a gray background")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing.mp4"), "{err}");

    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(&garbage, b"not a video at all").unwrap();
    let err = inspect(&garbage, "a red circle bouncing on a gray background")
        .unwrap_err()
        .to_string();
    assert!(err.contains("garbage.mp4"), "{err}");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"x").unwrap();
    let err = inspect(&text, "a red circle bouncing on a gray background").unwrap_err();
    assert!(
        matches!(err, InspectError::Clip(ClipError::NotAClip { .. })),
        "{err}"
    );

    let err = inspect(&garbage, "a red blob bouncing on a gray background").unwrap_err();
    assert!(
        matches!(err, InspectError::Caption(_)),
        "the caption is checked first: {err}"
    );
    assert!(err.to_string().contains("\"blob\""), "{err}");
}

#[test]
fn a_dimmed_object_is_named_by_its_colour_not_the_nearest_rgb() {
    // Yellow at 80% on black is nearer orange than yellow in plain RGB.
    let scene = Scene::new([240, 220, 40], [0, 0, 0], Shape::Circle, Direction::Left);
    let frames: Vec<Frame> = scene
        .render()
        .iter()
        .map(|f| fade(&blur(f, 1), [0, 0, 0], 0.8))
        .collect();
    let yellow = report(
        caption("yellow", Shape::Circle, Direction::Left, "black"),
        &frames,
    );
    assert!(yellow.passed, "{yellow}");
    let object = yellow.measurements.object.as_ref().unwrap();
    assert!((object.strength - 0.8).abs() < 0.05, "{yellow}");
    let orange = report(
        caption("orange", Shape::Circle, Direction::Left, "black"),
        &frames,
    );
    assert!(!orange.verdict.color_right, "{orange}");
}
