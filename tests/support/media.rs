//! Checking rendered outputs by decoding them: ffprobe for MP4 clips, the png crate for PNG
//! sequences (compared frame by frame with a reference render).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `ffprobe -count_frames`'s view of the first video stream of `path`.
pub fn probe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_streams", "-of", "json"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run ffprobe ({e}): run tests/setup.sh (installs ffmpeg)")
        });
    assert!(
        out.status.success(),
        "ffprobe cannot read {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe JSON");
    json["streams"][0].clone()
}

/// The RGB(A) bytes of every PNG under `dir`, in file-name order.
pub fn png_frames(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|path| {
            let file = std::fs::File::open(path).unwrap();
            let decoder = png::Decoder::new(std::io::BufReader::new(file));
            let mut reader = decoder
                .read_info()
                .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            buf.truncate(info.buffer_size());
            buf
        })
        .collect()
}

/// The largest per-byte difference between two frame sequences of the same shape.
pub fn max_diff(a: &[Vec<u8>], b: &[Vec<u8>]) -> u8 {
    assert_eq!(a.len(), b.len(), "frame counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "frame sizes differ");
            x.iter().zip(y).map(|(p, q)| p.abs_diff(*q))
        })
        .max()
        .unwrap_or(0)
}
