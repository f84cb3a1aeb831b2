//! Writes that readers polling a directory can rely on.
use std::{fs, io, path::Path};

/// Writes `contents` to `path` through a temporary file in the same directory and a rename,
/// so a reader sees the old file or the new one, never half of one. The temporary name
/// starts with `.`, which the agent's directory source ignores.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Like [`write_atomic`] but leaves the file alone when it already holds `contents`, so
/// pollers that watch mtimes see no change. Returns whether it wrote.
pub fn write_if_changed(path: &Path, contents: &[u8]) -> io::Result<bool> {
    match fs::read(path) {
        Ok(old) if old == contents => Ok(false),
        Ok(_) => write_atomic(path, contents).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write_atomic(path, contents).map(|()| true)
        }
        Err(e) => Err(e),
    }
}

/// `remove_file` that treats "already gone" as success, for idempotent teardown.
pub fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `remove_dir_all` that treats "already gone" as success.
pub fn remove_dir_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_changes_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.yaml");
        assert!(write_if_changed(&path, b"a: 1\n").expect("first write"));
        assert!(!write_if_changed(&path, b"a: 1\n").expect("same content"));
        assert!(write_if_changed(&path, b"a: 2\n").expect("new content"));
        assert_eq!(fs::read(&path).expect("read"), b"a: 2\n");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["cluster.yaml"]);
    }

    #[test]
    fn removals_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        remove_file_if_exists(&dir.path().join("nope")).expect("missing file is fine");
        remove_dir_if_exists(&dir.path().join("nope")).expect("missing dir is fine");
    }
}
