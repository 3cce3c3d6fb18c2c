//! Where a job's output lands: the `--out` path checked (and the MP4 file created) before
//! anything is rendered, then the `FetchOutput` chunks written into it, each file checked to be
//! complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use longtake_coordinator::encode::VideoFormat;
use longtake_proto::{OutputChunk, OutputFormat};

/// The format `render` asks for: `--format` if given, otherwise from `--out` (`.mp4` → MP4, a
/// directory or a path without extension → PNG sequence), as the encoder decides for files.
pub fn format_for(path: &Path, explicit: Option<OutputFormat>) -> Result<OutputFormat> {
    let explicit = explicit.map(|f| match f {
        OutputFormat::Mp4 => VideoFormat::Mp4,
        OutputFormat::Png => VideoFormat::PngSequence,
    });
    Ok(
        match VideoFormat::for_path(path, explicit).context("--out")? {
            VideoFormat::Mp4 => OutputFormat::Mp4,
            VideoFormat::PngSequence => OutputFormat::Png,
        },
    )
}

/// A writable output: an MP4 file (created now) or a PNG-sequence directory.
pub struct Destination {
    path: PathBuf,
    target: Target,
}

enum Target {
    Mp4(File),
    /// `created`: the directory did not exist before, so an empty one is ours to remove.
    Png {
        created: bool,
    },
}

/// What was written.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Received {
    pub files: usize,
    pub bytes: u64,
}

impl Destination {
    /// Creates the MP4 file or the directory, so an unwritable `--out` fails before a job is
    /// submitted rather than after it rendered.
    pub fn prepare(path: &Path, format: OutputFormat) -> Result<Self> {
        let target = match format {
            OutputFormat::Mp4 => {
                if path.is_dir() {
                    bail!(
                        "--out {} is a directory: an MP4 needs a file path (or pass --format png)",
                        path.display()
                    );
                }
                Target::Mp4(
                    File::create(path)
                        .with_context(|| format!("cannot write --out {}", path.display()))?,
                )
            }
            OutputFormat::Png => {
                let created = !path.exists();
                std::fs::create_dir_all(path).with_context(|| {
                    format!("cannot create the --out directory {}", path.display())
                })?;
                tempfile::NamedTempFile::new_in(path)
                    .with_context(|| format!("cannot write into --out {}", path.display()))?;
                Target::Png { created }
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            target,
        })
    }

    /// Writes every chunk of the stream; fails if a file arrives incomplete.
    pub async fn receive(
        &mut self,
        mut next: impl AsyncChunks,
        describe_error: impl Fn(tonic::Status) -> anyhow::Error,
    ) -> Result<Received> {
        let mut files: BTreeMap<String, FileProgress> = BTreeMap::new();
        while let Some(chunk) = next.next_chunk().await.map_err(&describe_error)? {
            self.write(&chunk, &mut files)?;
        }
        for (name, progress) in &files {
            if progress.written != progress.size {
                bail!(
                    "the download of {name} stopped at {} of {} bytes: fetch it again",
                    progress.written,
                    progress.size
                );
            }
        }
        if files.is_empty() {
            bail!("the coordinator sent no output");
        }
        Ok(Received {
            files: files.len(),
            bytes: files.values().map(|f| f.written).sum(),
        })
    }

    fn write(
        &mut self,
        chunk: &OutputChunk,
        files: &mut BTreeMap<String, FileProgress>,
    ) -> Result<()> {
        let name = chunk.file.as_str();
        if !files.contains_key(name) {
            check_file_name(name)?;
            if matches!(self.target, Target::Mp4(_)) && !files.is_empty() {
                bail!("the coordinator sent several files ({name} after the clip) for an MP4 job");
            }
            files.insert(
                name.to_string(),
                FileProgress {
                    size: chunk.file_size,
                    written: 0,
                    file: None,
                },
            );
        }
        let progress = files.get_mut(name).expect("inserted above");
        let file = match &mut self.target {
            Target::Mp4(file) => file,
            Target::Png { .. } => {
                if progress.file.is_none() {
                    let path = self.path.join(name);
                    progress.file = Some(
                        File::create(&path)
                            .with_context(|| format!("cannot write {}", path.display()))?,
                    );
                }
                progress.file.as_mut().expect("opened above")
            }
        };
        file.seek(SeekFrom::Start(chunk.offset))
            .and_then(|_| file.write_all(&chunk.data))
            .with_context(|| format!("writing {} into {}", name, self.path.display()))?;
        progress.written += chunk.data.len() as u64;
        Ok(())
    }

    /// A failed job or download leaves no half-written MP4 behind (it would not play), nor an
    /// empty directory it made; frames already downloaded into a directory stay.
    pub fn discard(self) {
        match self.target {
            Target::Mp4(file) => {
                drop(file);
                let _ = std::fs::remove_file(&self.path);
            }
            Target::Png { created: true } => {
                // Fails, as it should, when the directory is not empty.
                let _ = std::fs::remove_dir(&self.path);
            }
            Target::Png { created: false } => {}
        }
    }
}

struct FileProgress {
    size: u64,
    written: u64,
    file: Option<File>,
}

/// A file name from the server goes under `--out`, never above it.
fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\\')
        || name.contains('\0')
    {
        bail!("the coordinator sent an output file with an unusable name {name:?}");
    }
    Ok(())
}

/// The chunks of one download, one at a time (a tonic stream, or a list in tests).
pub trait AsyncChunks {
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<OutputChunk>, tonic::Status>>;
}

impl AsyncChunks for tonic::Streaming<OutputChunk> {
    async fn next_chunk(&mut self) -> Result<Option<OutputChunk>, tonic::Status> {
        self.message().await
    }
}

impl AsyncChunks for std::vec::IntoIter<OutputChunk> {
    async fn next_chunk(&mut self) -> Result<Option<OutputChunk>, tonic::Status> {
        Ok(self.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(file: &str, offset: u64, data: &[u8], size: u64) -> OutputChunk {
        OutputChunk {
            file: file.into(),
            offset,
            data: data.to_vec(),
            file_size: size,
        }
    }

    fn status(s: tonic::Status) -> anyhow::Error {
        anyhow::anyhow!("{}", s.message())
    }

    #[tokio::test]
    async fn an_mp4_arrives_in_order_into_the_out_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.mp4");
        let mut dest = Destination::prepare(&path, OutputFormat::Mp4).unwrap();
        assert!(path.exists(), "created before any render");
        let chunks = vec![
            chunk("j.mp4", 0, b"hello ", 11),
            chunk("j.mp4", 6, b"world", 11),
        ];
        let got = dest.receive(chunks.into_iter(), status).await.unwrap();
        assert_eq!(
            got,
            Received {
                files: 1,
                bytes: 11
            }
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn png_frames_land_in_the_directory_and_short_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("frames");
        let mut dest = Destination::prepare(&out, OutputFormat::Png).unwrap();
        let chunks = vec![
            chunk("frame_00000.png", 0, b"a", 1),
            chunk("frame_00001.png", 0, b"b", 1),
        ];
        let got = dest.receive(chunks.into_iter(), status).await.unwrap();
        assert_eq!(got.files, 2);
        assert_eq!(std::fs::read(out.join("frame_00001.png")).unwrap(), b"b");
        let err = dest
            .receive(vec![chunk("f.png", 0, b"ab", 3)].into_iter(), status)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("2 of 3 bytes"), "{err}");
    }

    #[tokio::test]
    async fn names_that_climb_out_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut dest = Destination::prepare(dir.path(), OutputFormat::Png).unwrap();
        for name in ["../x.png", "/etc/x", "..", ""] {
            let err = dest
                .receive(vec![chunk(name, 0, b"a", 1)].into_iter(), status)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("unusable name"), "{err}");
        }
    }

    #[test]
    fn an_unwritable_out_fails_at_once_and_discard_removes_the_mp4() {
        let err = Destination::prepare(Path::new("/nonexistent/dir/x.mp4"), OutputFormat::Mp4)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("/nonexistent/dir/x.mp4"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.mp4");
        Destination::prepare(&path, OutputFormat::Mp4)
            .unwrap()
            .discard();
        assert!(!path.exists());
        let frames = dir.path().join("frames");
        Destination::prepare(&frames, OutputFormat::Png)
            .unwrap()
            .discard();
        assert!(!frames.exists());
        std::fs::create_dir(&frames).unwrap();
        Destination::prepare(&frames, OutputFormat::Png)
            .unwrap()
            .discard();
        assert!(frames.exists(), "a directory that was there stays");
    }

    #[test]
    fn format_follows_the_out_path() {
        assert_eq!(
            format_for(Path::new("a.mp4"), None).unwrap(),
            OutputFormat::Mp4
        );
        assert_eq!(
            format_for(Path::new("frames"), None).unwrap(),
            OutputFormat::Png
        );
        assert_eq!(
            format_for(Path::new("a.mp4"), Some(OutputFormat::Png)).unwrap(),
            OutputFormat::Png
        );
        assert!(format_for(Path::new("a.avi"), None).is_err());
    }
}
