//! End-to-end checks of the video writers against ffmpeg's view of the files: container
//! metadata with ffprobe, pixels with an ffmpeg decode, plus determinism and PNG round trips.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::process::Command;

use longtake_coordinator::encode::{
    open_writer, EncodeError, Mp4Writer, PngSequenceWriter, Quality, VideoFormat,
};

const W: u32 = 256;
const H: u32 = 144;
const FPS: u32 = 16;
const FRAMES: usize = 81;

/// A smooth diagonal gradient that moves by a few pixels per frame, plus a moving bright
/// square so the encoder has real motion to track.
fn frame(t: usize, w: u32, h: u32) -> Vec<u8> {
    let (w, h) = (w as usize, h as usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    let square_x = (t * 3) % (w - 24);
    for y in 0..h {
        for x in 0..w {
            let in_square = (square_x..square_x + 24).contains(&x) && (40..64).contains(&y);
            let r = ((x + 2 * t) * 255 / (w + 2 * FRAMES)) as u8;
            let g = (y * 255 / h) as u8;
            let b = ((x + y + t) % 512).abs_diff(256).min(255) as u8;
            if in_square {
                rgb.extend_from_slice(&[240, 240, 220]);
            } else {
                rgb.extend_from_slice(&[r, g, b]);
            }
        }
    }
    rgb
}

fn tool(name: &str) -> Command {
    let found = Command::new(name)
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not on PATH: these tests need ffmpeg/ffprobe to check the encoded video \
         (Debian/Ubuntu: `apt-get install -y ffmpeg`)"
    );
    Command::new(name)
}

fn write_mp4(path: &Path, quality: Quality) {
    let mut writer = Mp4Writer::create_with_quality(path, W, H, FPS, quality).unwrap();
    for t in 0..FRAMES {
        writer.push_frame(&frame(t, W, H)).unwrap();
    }
    writer.finish().unwrap();
}

fn ffprobe(path: &Path) -> HashMap<String, String> {
    let out = tool("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
        ])
        .arg(
            "stream=codec_name,profile,pix_fmt,width,height,r_frame_rate,avg_frame_rate,\
             nb_frames,nb_read_frames,duration,color_space,color_range",
        )
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ffprobe complained about {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

#[test]
fn mp4_metadata_matches_what_ffprobe_sees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    write_mp4(&path, Quality::default());
    let info = ffprobe(&path);
    let get = |k: &str| info.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(get("codec_name"), "h264", "{info:?}");
    assert_eq!(get("pix_fmt"), "yuv420p", "{info:?}");
    assert_eq!(get("width"), W.to_string());
    assert_eq!(get("height"), H.to_string());
    assert_eq!(get("r_frame_rate"), format!("{FPS}/1"));
    assert_eq!(get("avg_frame_rate"), format!("{FPS}/1"));
    assert_eq!(get("nb_frames"), FRAMES.to_string());
    assert_eq!(get("nb_read_frames"), FRAMES.to_string());
    let duration: f64 = get("duration").parse().unwrap();
    let expected = FRAMES as f64 / f64::from(FPS);
    assert!(
        (duration - expected).abs() < 1e-3,
        "duration {duration} != {expected}"
    );
    assert_eq!(get("color_space"), "bt709", "{info:?}");
    assert_eq!(get("color_range"), "tv", "{info:?}");
    assert_eq!(get("profile"), "Constrained Baseline", "{info:?}");

    // Container details ffprobe tolerates but strict players do not.
    let size = std::fs::metadata(&path).unwrap().len();
    let reader = mp4::Mp4Reader::read_header(BufReader::new(File::open(&path).unwrap()), size)
        .expect("the mp4 crate cannot parse its own output");
    let moov = &reader.moov;
    assert_eq!(moov.mvhd.creation_time, 0);
    assert_eq!(
        moov.mvhd.next_track_id, 2,
        "next_track_ID must exceed the track IDs"
    );
    assert_eq!(moov.traks.len(), 1);
    let stbl = &moov.traks[0].mdia.minf.stbl;
    let avcc = &stbl.stsd.avc1.as_ref().expect("avc1 sample entry").avcc;
    assert_eq!(avcc.sequence_parameter_sets.len(), 1);
    assert_eq!(avcc.picture_parameter_sets.len(), 1);
    // A keyframe every 2 s: samples 1, 33, 65 (1-based).
    let sync: Vec<u32> = stbl.stss.as_ref().expect("stss").entries.clone();
    assert_eq!(sync, vec![1, 2 * FPS + 1, 4 * FPS + 1]);
}

#[test]
fn mp4_colours_survive_the_round_trip() {
    // Flat saturated patches: decoding with the wrong matrix or range shifts these by tens of
    // levels, so this pins the BT.709 limited-range conversion and its signalling.
    let colours: [[u8; 3]; 8] = [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [0, 255, 255],
        [255, 0, 255],
        [255, 255, 255],
        [16, 16, 16],
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("colours.mp4");
    let mut writer = Mp4Writer::create(&path, 64, 32, FPS).unwrap();
    for c in &colours {
        writer.push_frame(&c.repeat(64 * 32)).unwrap();
    }
    writer.finish().unwrap();
    let out = tool("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 64 * 32 * 3 * colours.len());
    for (c, decoded) in colours.iter().zip(out.stdout.chunks(64 * 32 * 3)) {
        let mut mean = [0f64; 3];
        for px in decoded.chunks(3) {
            for k in 0..3 {
                mean[k] += f64::from(px[k]) / (64.0 * 32.0);
            }
        }
        for k in 0..3 {
            assert!(
                (mean[k] - f64::from(c[k])).abs() < 4.0,
                "colour {c:?} decoded as {mean:?}"
            );
        }
    }
}

#[test]
fn mp4_decodes_close_to_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    write_mp4(&path, Quality::default());
    let out = tool("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frame_bytes = (W * H * 3) as usize;
    assert_eq!(
        out.stdout.len(),
        frame_bytes * FRAMES,
        "decoded frame count"
    );
    let mut worst = f64::INFINITY;
    for (t, decoded) in out.stdout.chunks(frame_bytes).enumerate() {
        let p = psnr(&frame(t, W, H), decoded);
        worst = worst.min(p);
    }
    eprintln!("worst per-frame PSNR: {worst:.2} dB");
    assert!(worst > 30.0, "worst per-frame PSNR {worst:.2} dB <= 30 dB");
}

#[test]
fn mp4_is_deterministic_and_quality_option_matters() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.mp4");
    let b = dir.path().join("b.mp4");
    let low = dir.path().join("low.mp4");
    write_mp4(&a, Quality::default());
    write_mp4(&b, Quality::default());
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two encodes of the same frames differ"
    );
    write_mp4(&low, Quality::ConstantQp(40));
    let (hi_len, low_len) = (
        std::fs::metadata(&a).unwrap().len(),
        std::fs::metadata(&low).unwrap().len(),
    );
    eprintln!("81 frames 256x144: QP 18 {hi_len} bytes, QP 40 {low_len} bytes");
    assert!(
        low_len * 2 < hi_len,
        "QP 40 ({low_len} B) not much smaller than QP 18 ({hi_len} B)"
    );
}

#[test]
fn mp4_bitrate_mode_keeps_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("br.mp4");
    write_mp4(&path, Quality::Bitrate(200_000));
    let info = ffprobe(&path);
    assert_eq!(info["nb_read_frames"], FRAMES.to_string());
    assert_eq!(info["r_frame_rate"], format!("{FPS}/1"));
}

#[test]
fn mp4_rejects_odd_sizes_and_wrong_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.mp4");
    for (w, h) in [(255, 144), (256, 143), (0, 144)] {
        let err = Mp4Writer::create(&path, w, h, FPS)
            .err()
            .expect("odd size accepted");
        assert!(matches!(err, EncodeError::InvalidSize { .. }), "{err}");
        assert!(err.to_string().contains("odd.mp4"), "{err}");
    }
    let err = Mp4Writer::create(&path, W, H, 0)
        .err()
        .expect("fps 0 accepted");
    assert!(matches!(err, EncodeError::InvalidFps { .. }), "{err}");

    let mut writer = Mp4Writer::create(&path, W, H, FPS).unwrap();
    let err = writer.push_frame(&[0; 10]).unwrap_err();
    assert!(matches!(err, EncodeError::FrameSize { .. }), "{err}");
    let err = writer.finish().unwrap_err();
    assert!(matches!(err, EncodeError::NoFrames { .. }), "{err}");
}

#[test]
fn png_sequence_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("frames");
    // Odd sizes are fine for PNG.
    let (w, h) = (97, 55);
    let frames: Vec<Vec<u8>> = (0..5).map(|t| frame(t, w, h)).collect();
    let mut writer = PngSequenceWriter::create(&seq, w, h).unwrap();
    for f in &frames {
        writer.push_frame(f).unwrap();
    }
    writer.finish().unwrap();
    for (t, expected) in frames.iter().enumerate() {
        let path = seq.join(format!("frame_{t:05}.png"));
        let decoder = png::Decoder::new(BufReader::new(File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &expected[..], "frame {t}");
    }
    assert!(!seq.join("frame_00005.png").exists());
    // A second render into the same directory must not mix with the stale frames.
    let err = PngSequenceWriter::create(&seq, w, h)
        .err()
        .expect("stale frames accepted");
    assert!(err.to_string().contains("already contains frames"), "{err}");
}

#[test]
fn format_follows_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let for_path = |p: &Path| VideoFormat::for_path(p, None);
    assert_eq!(
        for_path(&dir.path().join("x.mp4")).unwrap(),
        VideoFormat::Mp4
    );
    assert_eq!(
        for_path(&dir.path().join("X.MP4")).unwrap(),
        VideoFormat::Mp4
    );
    assert_eq!(for_path(dir.path()).unwrap(), VideoFormat::PngSequence);
    assert_eq!(
        for_path(&dir.path().join("frames")).unwrap(),
        VideoFormat::PngSequence
    );
    assert_eq!(
        for_path(Path::new("out/clip.d/")).unwrap(),
        VideoFormat::PngSequence
    );
    let err = for_path(&dir.path().join("x.gif")).unwrap_err();
    assert!(err.to_string().contains("x.gif"), "{err}");
    assert_eq!(
        VideoFormat::for_path(&dir.path().join("x.gif"), Some(VideoFormat::PngSequence)).unwrap(),
        VideoFormat::PngSequence
    );
}

#[test]
fn open_writer_dispatches_on_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("clip.mp4");
    let pngs = dir.path().join("frames");
    for path in [&mp4, &pngs] {
        let mut sink = open_writer(path, None, W, H, FPS, Quality::default()).unwrap();
        for t in 0..3 {
            sink.push_frame(&frame(t, W, H)).unwrap();
        }
        assert_eq!(sink.frames_written(), 3);
        sink.finish().unwrap();
    }
    assert_eq!(ffprobe(&mp4)["nb_read_frames"], "3");
    assert!(pngs.join("frame_00002.png").is_file());
}
