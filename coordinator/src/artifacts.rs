//! Where finished outputs live: `<artifact_dir>/<job id>/<name>.mp4`, or `<name>/` holding
//! `frame_00000.png`, ... for a PNG sequence (`<name>` is the job's name made file-safe, or
//! `output`), and how `FetchOutput` reads them back in 1 MiB chunks. Beside the output: the
//! job's checkpoints, and the input file it was submitted with (`.input.png` or `.input.mp4`),
//! staged under `.incoming/` while the submission is checked and moved in before the job is
//! stored.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use longtake_proto::spec::InputKind;
use longtake_proto::{OutputChunk, OutputFormat};

use crate::record::{is_job_id, JobRecord};

/// Creates `dir` (and its parents) if needed and makes it 0700.
fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Checkpoint files inside a job's directory are `.checkpoint-g<group>-s<step>.safetensors`
/// (names no output takes: outputs are `<name>.mp4` or `<name>/`, and names are file-safe
/// without a leading dot).
const CHECKPOINT_PREFIX: &str = ".checkpoint-g";
const CHECKPOINT_SUFFIX: &str = ".safetensors";

/// The group and step of a checkpoint file's name; `None` for any other name.
fn checkpoint_of(name: &str) -> Option<(u32, u32)> {
    let rest = name
        .strip_prefix(CHECKPOINT_PREFIX)?
        .strip_suffix(CHECKPOINT_SUFFIX)?;
    let (group, step) = rest.split_once("-s")?;
    Some((group.parse().ok()?, step.parse().ok()?))
}

/// The input file's name in its job's directory, before its extension (a name no output takes).
const INPUT_NAME: &str = ".input";

/// Where uploads wait, under the artifact directory, until their job is stored.
const INCOMING: &str = ".incoming";

/// An uploaded input file not yet any job's: removed when dropped unless
/// [`Artifacts::place_input`] moved it into its job's directory.
#[derive(Debug)]
pub struct StagedInput {
    path: PathBuf,
    placed: bool,
}

impl Drop for StagedInput {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Size of the `data` of one `OutputChunk`.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The artifact directory.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    /// Uses `dir`, creating it if needed, readable by this user only (studios' unreleased
    /// material), and checks that files can be written there: an unwritable directory is an
    /// error now, not after a render.
    pub fn open(dir: &Path) -> io::Result<Self> {
        private_dir(dir)?;
        let probe = dir.join(".longtake-write-check");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot write files in it: {e}")))?;
        // uploads of submissions a stopped coordinator never finished checking
        match std::fs::remove_dir_all(dir.join(INCOMING)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Where `job_id`'s input file of `kind` is kept.
    pub fn input_path(&self, job_id: &str, kind: InputKind) -> io::Result<PathBuf> {
        let extension = match kind {
            InputKind::Image => "png",
            InputKind::Clip => "mp4",
        };
        Ok(self
            .job_dir(job_id)?
            .join(format!("{INPUT_NAME}.{extension}")))
    }

    /// Writes an uploaded input file where it waits for its job (readable by this user only).
    pub fn stage_input(&self, bytes: &[u8]) -> io::Result<StagedInput> {
        let incoming = self.dir.join(INCOMING);
        private_dir(&incoming)?;
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| io::Error::other(e.to_string()))?;
        let name: String = name.iter().map(|b| format!("{b:02x}")).collect();
        let staged = StagedInput {
            path: incoming.join(name),
            placed: false,
        };
        {
            let mut file = File::create(&staged.path)?;
            set_mode(&staged.path, 0o600)?;
            std::io::Write::write_all(&mut file, bytes)?;
            file.sync_all()?;
        }
        Ok(staged)
    }

    /// Moves a staged input into `job_id`'s directory as its input of `kind`.
    pub fn place_input(
        &self,
        mut staged: StagedInput,
        job_id: &str,
        kind: InputKind,
    ) -> io::Result<PathBuf> {
        let path = self.input_path(job_id, kind)?;
        self.create_job_dir(job_id)?;
        std::fs::rename(&staged.path, &path)?;
        staged.placed = true;
        Ok(path)
    }

    /// Makes the directory a job's output goes in (0700, like the artifact directory).
    pub fn create_job_dir(&self, job_id: &str) -> io::Result<PathBuf> {
        let dir = self.job_dir(job_id)?;
        private_dir(&dir)?;
        Ok(dir)
    }

    /// Makes a finished output readable by this user only: the clip, or every frame of a PNG
    /// sequence, 0600.
    pub fn seal(path: &Path) -> io::Result<()> {
        let files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)?
                .map(|e| e.map(|e| e.path()))
                .collect::<io::Result<_>>()?
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            set_mode(&file, 0o600)?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The job's directory; an id that is not a job id (`..`, `a/b`) is refused, so no job
    /// reaches outside the artifact directory.
    fn job_dir(&self, job_id: &str) -> io::Result<PathBuf> {
        if !is_job_id(job_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{job_id:?} is not a job id; it has no artifact directory"),
            ));
        }
        Ok(self.dir.join(job_id))
    }

    /// Where `job`'s output is written: an `.mp4` file or a PNG sequence directory.
    pub fn output_path(&self, job: &JobRecord) -> io::Result<PathBuf> {
        let name = file_safe(&job.name);
        let png = job.spec.format() == OutputFormat::Png;
        let job_dir = self.job_dir(&job.id)?;
        Ok(if png {
            job_dir.join(name)
        } else {
            job_dir.join(format!("{name}.mp4"))
        })
    }

    /// Where worker group `group`'s checkpoint of step `step` (a denoiser state file from the
    /// group's first rank) is kept, beside the job's output.
    pub fn checkpoint_path(&self, job_id: &str, group: u32, step: u32) -> io::Result<PathBuf> {
        Ok(self.job_dir(job_id)?.join(format!(
            "{CHECKPOINT_PREFIX}{group}-s{step}{CHECKPOINT_SUFFIX}"
        )))
    }

    /// Writes group `group`'s checkpoint of step `step` atomically (a crash leaves no half
    /// file under its name), readable by this user only; returns its path.
    pub fn write_checkpoint(
        &self,
        job_id: &str,
        group: u32,
        step: u32,
        state: &[u8],
    ) -> io::Result<PathBuf> {
        let path = self.checkpoint_path(job_id, group, step)?;
        private_dir(self.job_dir(job_id)?.as_path())?;
        let tmp = path.with_extension("tmp");
        {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, state)?;
            file.sync_all()?;
        }
        set_mode(&tmp, 0o600)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Group `group`'s checkpoint of step `step`, if the job has it.
    pub fn read_checkpoint(
        &self,
        job_id: &str,
        group: u32,
        step: u32,
    ) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.checkpoint_path(job_id, group, step)?) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the job's checkpoints of steps before `before` (every one when `None`: the job
    /// finished), and any half-written one.
    pub fn remove_checkpoints(&self, job_id: &str, before: Option<u32>) -> io::Result<()> {
        let dir = self.job_dir(job_id)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = match checkpoint_of(&name) {
                Some((_, step)) => before.is_none_or(|before| step < before),
                None => name.starts_with(CHECKPOINT_PREFIX) && name.ends_with(".tmp"),
            };
            if stale {
                match std::fs::remove_file(entry.path()) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Removes what an attempt of the job wrote of its output (a partial clip, stray frames),
    /// keeping its checkpoints.
    pub fn clear_output(&self, job: &JobRecord) -> io::Result<()> {
        let path = self.output_path(job)?;
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes whatever the job left (a partial clip, stray frames, its checkpoints).
    pub fn clear(&self, job_id: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.job_dir(job_id)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The files of `job`'s finished output, in order, each with the name it is fetched under
    /// (the clip's file name, or a frame's within the sequence).
    pub fn files(&self, job: &JobRecord) -> io::Result<Vec<(String, PathBuf)>> {
        let path = self.output_path(job)?;
        if path.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&path)? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    files.push((
                        entry.file_name().to_string_lossy().into_owned(),
                        entry.path(),
                    ));
                }
            }
            files.sort();
            Ok(files)
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::metadata(&path)?;
            Ok(vec![(name, path)])
        }
    }

    /// Total bytes of `job`'s output.
    pub fn output_bytes(&self, job: &JobRecord) -> io::Result<u64> {
        let mut total = 0;
        for (_, path) in self.files(job)? {
            total += std::fs::metadata(path)?.len();
        }
        Ok(total)
    }
}

/// Reads `files` as chunks of at most [`CHUNK_BYTES`], handing each to `send` (which returns
/// false when the receiver is gone, ending the read). Blocking: run it off the async threads.
pub fn read_chunks(
    files: &[(String, PathBuf)],
    mut send: impl FnMut(OutputChunk) -> bool,
) -> io::Result<()> {
    for (name, path) in files {
        let mut file = File::open(path)?;
        let file_size = file.metadata()?.len();
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < CHUNK_BYTES {
                let n = file.read(&mut data[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            data.truncate(filled);
            // an empty file is still sent once, so the client creates it
            if filled == 0 && offset > 0 {
                break;
            }
            let chunk = OutputChunk {
                file: name.clone(),
                offset,
                data,
                file_size,
            };
            if !send(chunk) {
                return Ok(());
            }
            offset += filled as u64;
            if filled < CHUNK_BYTES {
                break;
            }
        }
    }
    Ok(())
}

/// `name` with everything but letters, digits, `-`, `_` and `.` replaced, or `output`.
fn file_safe(name: &str) -> String {
    let safe: String = name
        .trim()
        .chars()
        .take(100)
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() || safe.chars().all(|c| c == '.') {
        "output".to_string()
    } else {
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::spec::SpecRequest;
    use longtake_proto::RenderSpec;

    fn job(name: &str, format: OutputFormat) -> JobRecord {
        let request = SpecRequest::try_from(&RenderSpec {
            prompt: "a wolf".into(),
            frames: 9,
            fps: 16,
            format: format as i32,
            ..Default::default()
        })
        .unwrap();
        JobRecord::queued("j-1".into(), request, 0, name.into(), 10)
    }

    #[test]
    fn paths_are_under_the_job_and_file_safe() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(dir.path()).unwrap();
        assert_eq!(
            a.output_path(&job("wolf at night", OutputFormat::Mp4))
                .unwrap(),
            dir.path().join("j-1/wolf_at_night.mp4")
        );
        assert_eq!(
            a.output_path(&job("../..", OutputFormat::Png)).unwrap(),
            dir.path().join("j-1/.._..")
        );
        assert_eq!(
            a.output_path(&job("", OutputFormat::Png)).unwrap(),
            dir.path().join("j-1/output")
        );
    }

    /// The artifact directory, a job's directory and a finished output are this user's only
    /// (they were world-readable), and a directory that cannot take files is an error when the
    /// coordinator starts, not after a render.
    #[cfg(unix)]
    #[test]
    fn outputs_are_private_and_an_unusable_directory_is_refused_at_open() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = root.path().join("artifacts");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = Artifacts::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let j = job("clip", OutputFormat::Mp4);
        let job_dir = a.create_job_dir(&j.id).unwrap();
        assert_eq!(mode(&job_dir), 0o700);
        let clip = a.output_path(&j).unwrap();
        std::fs::write(&clip, b"frames").unwrap();
        Artifacts::seal(&clip).unwrap();
        assert_eq!(mode(&clip), 0o600);
        let seq = job_dir.join("seq");
        std::fs::create_dir(&seq).unwrap();
        std::fs::write(seq.join("frame_00000.png"), b"").unwrap();
        Artifacts::seal(&seq).unwrap();
        assert_eq!(mode(&seq.join("frame_00000.png")), 0o600);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "the write check leaves nothing behind"
        );

        let file = root.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        assert!(Artifacts::open(&file.join("artifacts")).is_err());
        assert!(Artifacts::open(&file).is_err());
    }

    /// Each group's checkpoint of each step is its own private file; removing those before a
    /// step keeps that step's and later ones (and the output), and a finished job's removal
    /// takes every checkpoint and half-written file.
    #[cfg(unix)]
    #[test]
    fn checkpoints_are_kept_per_group_and_step_and_removed_by_age() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(dir.path()).unwrap();
        let j = job("clip", OutputFormat::Mp4);
        let clip = a.output_path(&j).unwrap();
        for step in [3, 4, 5] {
            for group in [0, 1] {
                let path = a.write_checkpoint(&j.id, group, step, &[group as u8, step as u8]);
                let mode = std::fs::metadata(path.unwrap())
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
        std::fs::write(&clip, b"frames").unwrap();
        std::fs::write(
            a.checkpoint_path(&j.id, 0, 6)
                .unwrap()
                .with_extension("tmp"),
            b"",
        )
        .unwrap();
        assert_eq!(a.read_checkpoint(&j.id, 1, 4).unwrap(), Some(vec![1, 4]));
        assert_eq!(a.read_checkpoint(&j.id, 2, 4).unwrap(), None);
        a.remove_checkpoints(&j.id, Some(4)).unwrap();
        assert_eq!(a.read_checkpoint(&j.id, 0, 3).unwrap(), None);
        assert_eq!(a.read_checkpoint(&j.id, 1, 3).unwrap(), None);
        assert_eq!(a.read_checkpoint(&j.id, 0, 4).unwrap(), Some(vec![0, 4]));
        assert_eq!(a.read_checkpoint(&j.id, 1, 5).unwrap(), Some(vec![1, 5]));
        a.remove_checkpoints(&j.id, None).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path().join(&j.id))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["clip.mp4"]);
        assert_eq!(
            checkpoint_of(".checkpoint-g12-s340.safetensors"),
            Some((12, 340))
        );
        assert_eq!(checkpoint_of(".checkpoint-g1-s.safetensors"), None);
        assert_eq!(checkpoint_of("clip.mp4"), None);
    }

    /// A job whose id is not an id (a record someone wrote into the store by hand) reaches
    /// nothing: no output path, no file listing, and clearing it removes nothing, however the
    /// id points outside the artifact directory.
    #[test]
    fn an_id_that_is_not_a_job_id_reaches_nothing() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("output.mp4"), b"a studio's clip").unwrap();
        let a = Artifacts::open(&root.path().join("artifacts")).unwrap();
        for id in ["..", "../victim", "a/b", "", ".hidden", "-rf"] {
            let mut j = job("output", OutputFormat::Mp4);
            j.id = id.to_string();
            let refused = |r: io::Result<()>| {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{id:?}: {e}");
            };
            refused(a.output_path(&j).map(drop));
            refused(a.files(&j).map(drop));
            refused(a.clear(id));
            refused(a.remove_checkpoints(id, None));
            refused(a.read_checkpoint(id, 0, 1).map(drop));
        }
        assert!(
            victim.join("output.mp4").exists(),
            "nothing outside was touched"
        );
    }

    #[test]
    fn chunks_cover_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(dir.path()).unwrap();
        let j = job("clip", OutputFormat::Png);
        let seq = a.output_path(&j).unwrap();
        std::fs::create_dir_all(&seq).unwrap();
        let big: Vec<u8> = (0..CHUNK_BYTES * 2 + 7).map(|i| (i % 251) as u8).collect();
        std::fs::write(seq.join("frame_00001.png"), b"").unwrap();
        std::fs::write(seq.join("frame_00000.png"), &big).unwrap();
        let files = a.files(&j).unwrap();
        assert_eq!(a.output_bytes(&j).unwrap(), big.len() as u64);
        let mut chunks = Vec::new();
        read_chunks(&files, |c| {
            chunks.push(c);
            true
        })
        .unwrap();
        let shape: Vec<(&str, u64, usize, u64)> = chunks
            .iter()
            .map(|c| (c.file.as_str(), c.offset, c.data.len(), c.file_size))
            .collect();
        let size = big.len() as u64;
        assert_eq!(
            shape,
            [
                ("frame_00000.png", 0, CHUNK_BYTES, size),
                ("frame_00000.png", CHUNK_BYTES as u64, CHUNK_BYTES, size),
                ("frame_00000.png", 2 * CHUNK_BYTES as u64, 7, size),
                ("frame_00001.png", 0, 0, 0),
            ]
        );
        let joined: Vec<u8> = chunks[..3].iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, big);
        a.clear("j-1").unwrap();
        assert!(a.files(&j).is_err());
        a.clear("j-1").unwrap();
    }
}
