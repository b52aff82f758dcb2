use std::fs;
use std::path::{Path, PathBuf};

use super::super::rotate::tests::{rec, rotating};
use super::super::{rotated_files, verify, AuditLog};
use super::*;

/// A log of `n` records over several files; returns the files oldest first (active last).
fn rotated_set(dir: &Path, n: u64) -> (PathBuf, Vec<PathBuf>) {
    let path = dir.join("audit.log");
    let mut log = rotating(&path, 100);
    for i in 1..=n {
        log.append(&rec(i)).unwrap();
    }
    let mut files: Vec<PathBuf> = rotated_files(&path)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(path.clone());
    (path, files)
}

/// Replaces `from` with `to` in line `line` (1-based) of `file`.
fn edit(file: &Path, line: usize, from: &str, to: &str) {
    let text = fs::read_to_string(file).unwrap();
    let mut ls: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(ls[line - 1].contains(from));
    ls[line - 1] = ls[line - 1].replacen(from, to, 1);
    fs::write(file, ls.join("\n") + "\n").unwrap();
}

#[test]
fn a_set_of_several_files_verifies_as_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = rotated_set(dir.path(), 12);
    assert!(files.len() >= 4, "{files:?}");
    let r = verify_set(&path).unwrap();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.files.len(), files.len());
    assert_eq!(
        r.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
        files
    );
    assert_eq!(r.lines, 12);
    assert_eq!(r.anchor, None);
    assert_eq!(r.head.as_ref().map(|h| h.seq), Some(12));
    assert_eq!(
        r.files[1].first_seq,
        r.files[0].head.as_ref().map(|h| h.seq + 1)
    );
    let text = r.to_string();
    assert!(
        text.starts_with(&format!("ok: {} files, 12 records", files.len())),
        "{text}"
    );
    // The active file alone is not a chain from seq 1: the single-file check says so.
    assert!(!verify(&path).unwrap().is_ok());
}

#[test]
fn an_edited_record_in_a_middle_file_is_found_there() {
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = rotated_set(dir.path(), 12);
    edit(&files[1], 1, "connected", "refused!!");
    let r = verify_set(&path).unwrap();
    let b = r.broken.clone().unwrap();
    assert_eq!(b.file, files[1]);
    assert_eq!(b.line, 1);
    assert_eq!(b.kind, SetBreakKind::Chain(BreakKind::Edited), "{r}");
    assert!(r.to_string().contains(&files[1].display().to_string()));
}

#[test]
fn an_edited_last_line_of_a_middle_file_breaks_the_link_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = rotated_set(dir.path(), 12);
    let last = fs::read_to_string(&files[1]).unwrap().lines().count();
    edit(&files[1], last, "connected", "refused!!");
    let r = verify_set(&path).unwrap();
    let b = r.broken.clone().unwrap();
    assert_eq!(b.file, files[2], "{r}");
    assert_eq!(b.line, 1);
    assert_eq!(
        b.kind,
        SetBreakKind::NotLinked {
            prev_file: files[1].clone(),
            prev_line: last as u64
        }
    );
    assert!(
        r.to_string()
            .contains("is not the hash of the last line of"),
        "{r}"
    );
}

#[test]
fn a_removed_middle_file_is_missing_records() {
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = rotated_set(dir.path(), 12);
    fs::remove_file(&files[1]).unwrap();
    let r = verify_set(&path).unwrap();
    let b = r.broken.clone().unwrap();
    assert_eq!(b.file, files[2], "{r}");
    assert_eq!(b.line, 1);
    assert!(matches!(b.kind, SetBreakKind::MissingFile { .. }), "{r}");
}

#[test]
fn swapped_files_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = rotated_set(dir.path(), 12);
    let tmp = dir.path().join("swap");
    fs::rename(&files[1], &tmp).unwrap();
    fs::rename(&files[2], &files[1]).unwrap();
    fs::rename(&tmp, &files[2]).unwrap();
    let r = verify_set(&path).unwrap();
    let b = r.broken.clone().unwrap();
    assert_eq!(b.file, files[1], "{r}");
    assert!(matches!(b.kind, SetBreakKind::NameMismatch { .. }), "{r}");
    // Renamed to match their content as well: the chain itself no longer follows.
    let (path, files) = rotated_set(&dir.path().join("b").tap_mkdir(), 12);
    let a = fs::read(&files[1]).unwrap();
    let c = fs::read(&files[2]).unwrap();
    fs::write(&files[1], &c).unwrap();
    fs::write(&files[2], &a).unwrap();
    assert!(!verify_set(&path).unwrap().is_ok());
}

#[test]
fn an_empty_rotated_file_is_a_break() {
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = rotated_set(dir.path(), 12);
    fs::write(&files[1], "").unwrap();
    let r = verify_set(&path).unwrap();
    assert_eq!(r.broken.unwrap().kind, SetBreakKind::EmptyRotated);
}

#[test]
fn a_single_file_reads_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 1..=3 {
        log.append(&rec(i)).unwrap();
    }
    let set = verify_set(&path).unwrap();
    let one = verify(&path).unwrap();
    assert_eq!(set.to_string(), one.to_string());
    assert_eq!(set.files.len(), 1);
    assert_eq!(set.head, one.head);
    edit(&path, 2, "connected", "refused!!");
    let set = verify_set(&path).unwrap();
    let one = verify(&path).unwrap();
    assert_eq!(
        set.to_string(),
        format!("{}: {one}", path.display()),
        "the broken text names the file"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope/audit.log");
    let e = verify_set(&path).unwrap_err();
    assert!(e.to_string().contains("nope/audit.log"), "{e}");
}
