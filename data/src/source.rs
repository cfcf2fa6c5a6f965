//! Input sources: a folder of images (recursively), `.tar` shards of images (img2dataset /
//! webdataset layout), or a single image or tar file.
//!
//! [`list_inputs`] produces a deterministic, sorted list of [`InputItem`]s; [`read_bytes`]
//! fetches one item's bytes; [`fingerprint`] summarises the list for the manifest, so a resumed
//! run can tell whether its inputs changed.
//!
//! Every regular file under a folder is an input, whatever its name (a `.tar` file stands for
//! its members): the decoder looks at the content and either decodes it or gives the reason it
//! cannot (not an image, an unsupported format, truncated, ...), so that every file ends as rows
//! or as a reported error, never dropped while listing. Inside tar files only members named like
//! images ([`is_image_name`]) are inputs: the others are the samples' captions and metadata
//! (webdataset's `.txt`, `.json`, ...).

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Whether a file name has an image extension (`jpg`, `png`, `gif`, `bmp`, `tif`, `tga`, `avif`,
/// `heic`, ..., any case: what the `image` crate knows and [`crate::decode::OTHER_IMAGE_EXTENSIONS`]):
/// tar members named so are inputs, other members are not.
pub fn is_image_name(name: &str) -> bool {
    Path::new(name).extension().is_some_and(|e| {
        image::ImageFormat::from_extension(e).is_some()
            || e.to_str()
                .is_some_and(|e| crate::decode::OTHER_IMAGE_EXTENSIONS.iter().any(|(x, _)| x.eq_ignore_ascii_case(e)))
    })
}

/// Separator between a tar file's path and a member name in [`InputItem::source`].
pub const TAR_MEMBER_SEPARATOR: char = ':';

/// Largest input read into memory, in bytes. No training image comes close; anything over it is
/// refused by [`read_bytes`] instead of exhausting memory.
pub const MAX_INPUT_BYTES: u64 = 1 << 30;

/// Where an input's bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceLoc {
    /// A plain file.
    File(PathBuf),
    /// A member of an uncompressed tar: `size` bytes at byte `offset` of `tar`.
    TarMember { tar: PathBuf, offset: u64, size: u64 },
}

/// One input image.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InputItem {
    /// Path relative to the input root with `/` separators; for tar members
    /// `rel/path/shard.tar:member/name.jpg`. For a single-file root, the file name.
    pub source: String,
    /// The sample id: `source` without the extension for files; the member name without the
    /// extension for tar members (img2dataset's key, shared with its `.txt` / `.json` members).
    pub key: String,
    pub loc: SourceLoc,
    /// Size in bytes when listed.
    pub size: u64,
}

/// The result of listing an input root: the inputs, and what could not be listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Sorted by `source`.
    pub items: Vec<InputItem>,
    /// `(source, reason)` for each unreadable folder, unlistable tar or unusable tar member,
    /// sorted by source. These are not fatal: the run goes on with `items`.
    pub errors: Vec<(String, String)>,
}

/// The input root itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("input {} does not exist", .0.display())]
    NotFound(PathBuf),
    /// (The message includes the cause, which is therefore not also the `source()`: a chain
    /// printed with `{:#}` would say it twice.)
    #[error("cannot read input {}: {cause}", path.display())]
    Unreadable { path: PathBuf, cause: std::io::Error },
    #[error("input {} is neither a folder, an image file (a name the image decoders know: jpg, png, gif, bmp, tiff, ...) nor a .tar file", .0.display())]
    NotAnInput(PathBuf),
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_image_path(path: &Path) -> bool {
    path.to_str().is_some_and(is_image_name)
}

fn is_tar_path(path: &Path) -> bool {
    has_extension(path, &["tar"])
}

/// `rel` with `/` separators, whatever the platform.
fn slash_path(rel: &Path) -> String {
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// A name without its final extension (`a/b.c.jpg` -> `a/b.c`); unchanged if it has none.
fn strip_extension(name: &str) -> &str {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[file_start..].rfind('.') {
        Some(dot) if dot > 0 => &name[..file_start + dot],
        _ => name,
    }
}

/// List the inputs under `root`: a folder (recursive; symbolic links are followed, loops are
/// detected and reported), a single image file, or a single `.tar` file.
///
/// Every regular file of a folder becomes an item, except `.tar` files: those are opened and
/// their regular members with an image extension become items; other members (`.txt`,
/// `.json`, ...) are ignored. A tar that cannot be read completely keeps the members listed
/// before the problem and adds an error entry. A single file given as the root must be named
/// like an image or a tar.
pub fn list_inputs(root: &Path) -> Result<Listing, SourceError> {
    let meta = std::fs::metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SourceError::NotFound(root.to_path_buf()),
        _ => SourceError::Unreadable { path: root.to_path_buf(), cause: e },
    })?;
    let mut listing = Listing::default();
    if meta.is_dir() {
        // Fail early with a clear message if the root folder itself cannot be read.
        std::fs::read_dir(root).map_err(|e| SourceError::Unreadable { path: root.to_path_buf(), cause: e })?;
        for entry in walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let where_ = e.path().map(|p| slash_path(p.strip_prefix(root).unwrap_or(p))).unwrap_or_default();
                    let reason = match e.loop_ancestor() {
                        Some(a) => format!("symbolic link loop back to {}; not followed", a.display()),
                        None => format!("cannot read: {e}"),
                    };
                    listing.errors.push((where_, reason));
                    continue;
                }
            };
            let path = entry.path();
            let rel = slash_path(path.strip_prefix(root).unwrap_or(path));
            if entry.file_type().is_dir() {
                continue;
            }
            if !entry.file_type().is_file() {
                listing.errors.push((rel, "not a regular file (a socket, FIFO or device): not read".into()));
                continue;
            }
            add_file(&mut listing, path, rel, entry.metadata().map(|m| m.len()));
        }
    } else if meta.is_file() {
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !is_image_path(root) && !is_tar_path(root) {
            return Err(SourceError::NotAnInput(root.to_path_buf()));
        }
        add_file(&mut listing, root, name, Ok(meta.len()));
    } else {
        return Err(SourceError::NotAnInput(root.to_path_buf()));
    }
    listing.items.sort_by(|a, b| a.source.cmp(&b.source));
    listing.errors.sort();
    Ok(listing)
}

fn add_file(listing: &mut Listing, path: &Path, rel: String, len: Result<u64, walkdir::Error>) {
    if !is_tar_path(path) {
        match len {
            Ok(size) => listing.items.push(InputItem {
                key: strip_extension(&rel).to_string(),
                source: rel,
                loc: SourceLoc::File(path.to_path_buf()),
                size,
            }),
            Err(e) => listing.errors.push((rel, format!("cannot read file metadata: {e}"))),
        }
    } else {
        list_tar(listing, path, &rel);
    }
}

/// Add the image members of one tar file.
fn list_tar(listing: &mut Listing, path: &Path, rel: &str) {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            listing.errors.push((rel.to_string(), format!("cannot open tar file: {e}")));
            return;
        }
    };
    let file_len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            listing.errors.push((rel.to_string(), format!("cannot read tar file metadata: {e}")));
            return;
        }
    };
    let mut archive = tar::Archive::new(file);
    let entries = match archive.entries_with_seek() {
        Ok(e) => e,
        Err(e) => {
            listing.errors.push((rel.to_string(), format!("cannot read tar file: {e}")));
            return;
        }
    };
    // Members by name; a later member of the same name replaces an earlier one, as `tar -x` does.
    let mut found: Vec<InputItem> = Vec::new();
    let mut index_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                listing
                    .errors
                    .push((rel.to_string(), format!("tar file unreadable after {} image member(s): {e}", found.len())));
                break;
            }
        };
        let name = match entry.path() {
            Ok(p) => slash_path(&p),
            Err(e) => {
                let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                listing
                    .errors
                    .push((format!("{rel}{TAR_MEMBER_SEPARATOR}{raw}"), format!("unusable member name: {e}")));
                continue;
            }
        };
        if !is_image_path(Path::new(&name)) {
            continue;
        }
        let source = format!("{rel}{TAR_MEMBER_SEPARATOR}{name}");
        let kind = entry.header().entry_type();
        if kind.is_gnu_sparse() {
            listing.errors.push((source, "sparse tar member; not supported".into()));
            continue;
        }
        if !kind.is_file() {
            continue; // directories, links, ... named like images
        }
        let (offset, size) = (entry.raw_file_position(), entry.size());
        if offset.saturating_add(size) > file_len {
            listing.errors.push((
                source,
                format!("member data ({size} bytes at offset {offset}) extends past the end of the tar ({file_len} bytes): truncated tar"),
            ));
            continue;
        }
        let item = InputItem {
            key: strip_extension(&name).to_string(),
            source: source.clone(),
            loc: SourceLoc::TarMember { tar: path.to_path_buf(), offset, size },
            size,
        };
        match index_of.get(&name) {
            Some(&i) => found[i] = item,
            None => {
                index_of.insert(name, found.len());
                found.push(item);
            }
        }
    }
    listing.items.extend(found);
}

/// Read one input's bytes (for a tar member: `size` bytes at `offset` of the tar).
/// Inputs larger than [`MAX_INPUT_BYTES`] are refused with `InvalidData`.
pub fn read_bytes(item: &InputItem) -> std::io::Result<Vec<u8>> {
    let too_big = |n: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("input is {n} bytes, more than the {MAX_INPUT_BYTES}-byte limit"),
        )
    };
    match &item.loc {
        SourceLoc::File(path) => {
            let mut f = File::open(path)?;
            let len = f.metadata()?.len();
            if len > MAX_INPUT_BYTES {
                return Err(too_big(len));
            }
            let mut buf = Vec::with_capacity(len as usize);
            f.read_to_end(&mut buf)?;
            Ok(buf)
        }
        SourceLoc::TarMember { tar, offset, size } => {
            if *size > MAX_INPUT_BYTES {
                return Err(too_big(*size));
            }
            let mut f = File::open(tar)?;
            f.seek(SeekFrom::Start(*offset))?;
            let mut buf = vec![0u8; *size as usize];
            f.read_exact(&mut buf).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("reading {size} bytes at offset {offset} of {}: {e}", tar.display()),
                )
            })?;
            Ok(buf)
        }
    }
}

/// SHA-256 (hex) of the ordered `(source, size)` list: equal fingerprints mean the same inputs
/// in the same order (up to in-place edits that keep sizes).
pub fn fingerprint(items: &[InputItem]) -> String {
    let mut h = Sha256::new();
    for it in items {
        // Sources never contain NUL, so `source NUL size` is unambiguous.
        h.update(it.source.as_bytes());
        h.update([0u8]);
        h.update(it.size.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// SHA-256 (hex) of a byte string, for the `source_sha256` column.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pool")
    }

    fn pool_files(n: usize) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(pool_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        v.sort();
        v.truncate(n);
        v
    }

    /// A tar with the given `(member name, bytes)`, plus a caption member per image.
    fn build_tar(path: &Path, members: &[(String, Vec<u8>)]) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
            let caption = format!("caption of {name}");
            let mut h = tar::Header::new_gnu();
            h.set_size(caption.len() as u64);
            h.set_cksum();
            b.append_data(&mut h, format!("{}.txt", strip_extension(name)), caption.as_bytes()).unwrap();
        }
        b.finish().unwrap();
    }

    #[test]
    fn strip_extension_handles_dots_and_folders() {
        assert_eq!(strip_extension("a/b.c.jpg"), "a/b.c");
        assert_eq!(strip_extension("a.d/b"), "a.d/b");
        assert_eq!(strip_extension(".hidden"), ".hidden");
        assert_eq!(strip_extension("000001.JPG"), "000001");
    }

    #[test]
    fn folder_with_images_tars_and_junk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let pool = pool_files(5);
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::copy(&pool[0], root.join("b.jpg")).unwrap();
        std::fs::copy(&pool[1], root.join("sub/A.JPEG")).unwrap();
        std::fs::copy(&pool[2], root.join("sub/deeper/c.PnG")).unwrap();
        std::fs::write(root.join("notes.txt"), "x").unwrap();
        std::fs::write(root.join("sub/photo.gif"), "x").unwrap();
        let members: Vec<(String, Vec<u8>)> = vec![
            ("000001.jpg".into(), std::fs::read(&pool[3]).unwrap()),
            ("dir/000002.webp".into(), std::fs::read(&pool[4]).unwrap()),
        ];
        build_tar(&root.join("sub/shard.tar"), &members);

        let l = list_inputs(root).unwrap();
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        // Every file is an input, whatever its name (the decoder judges the content); tar members
        // only when named like images (the caption members are not inputs).
        let sources: Vec<&str> = l.items.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(
            sources,
            [
                "b.jpg",
                "notes.txt",
                "sub/A.JPEG",
                "sub/deeper/c.PnG",
                "sub/photo.gif",
                "sub/shard.tar:000001.jpg",
                "sub/shard.tar:dir/000002.webp"
            ]
        );
        let keys: Vec<&str> = l.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["b", "notes", "sub/A", "sub/deeper/c", "sub/photo", "000001", "dir/000002"]);
        let images: Vec<&InputItem> =
            l.items.iter().filter(|i| !i.source.ends_with(".txt") && !i.source.ends_with(".gif")).collect();

        // Bytes come back exactly, from files and from tar members.
        for (item, expect) in images.into_iter().zip([&pool[0], &pool[1], &pool[2], &pool[3], &pool[4]]) {
            let want = std::fs::read(expect).unwrap();
            assert_eq!(read_bytes(item).unwrap(), want, "{}", item.source);
            assert_eq!(item.size, want.len() as u64);
            // And they decode.
            crate::decode::decode_rgb8(&read_bytes(item).unwrap(), &Default::default()).unwrap();
        }
        assert!(matches!(l.items[5].loc, SourceLoc::TarMember { .. }));
        assert!(
            is_image_name("x.TIF")
                && is_image_name("a/b.qoi")
                && is_image_name("c.avif")
                && is_image_name("h.HEIC")
                && !is_image_name("d.txt")
                && !is_image_name("e")
        );

        // Deterministic: the same listing and fingerprint again.
        let again = list_inputs(root).unwrap();
        assert_eq!(again, l);
        assert_eq!(fingerprint(&again.items), fingerprint(&l.items));
        assert_eq!(fingerprint(&l.items).len(), 64);
    }

    #[test]
    fn fingerprint_changes_with_list() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_files(2);
        std::fs::copy(&pool[0], dir.path().join("a.jpg")).unwrap();
        let one = fingerprint(&list_inputs(dir.path()).unwrap().items);
        std::fs::copy(&pool[1], dir.path().join("b.jpg")).unwrap();
        let two = fingerprint(&list_inputs(dir.path()).unwrap().items);
        assert_ne!(one, two);
        std::fs::write(dir.path().join("b.jpg"), b"shorter").unwrap();
        assert_ne!(fingerprint(&list_inputs(dir.path()).unwrap().items), two);
        assert_eq!(fingerprint(&[]), sha256_hex(b""));
    }

    #[test]
    fn single_file_roots() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_files(2);
        let img = dir.path().join("one.jpg");
        std::fs::copy(&pool[0], &img).unwrap();
        let l = list_inputs(&img).unwrap();
        assert_eq!(l.items.len(), 1);
        assert_eq!((l.items[0].source.as_str(), l.items[0].key.as_str()), ("one.jpg", "one"));

        let tar = dir.path().join("s.tar");
        build_tar(&tar, &[("k1.jpg".into(), std::fs::read(&pool[1]).unwrap())]);
        let l = list_inputs(&tar).unwrap();
        assert_eq!(l.items.len(), 1);
        assert_eq!((l.items[0].source.as_str(), l.items[0].key.as_str()), ("s.tar:k1.jpg", "k1"));
        assert_eq!(read_bytes(&l.items[0]).unwrap(), std::fs::read(&pool[1]).unwrap());

        let txt = dir.path().join("x.txt");
        std::fs::write(&txt, "x").unwrap();
        let e = list_inputs(&txt).unwrap_err();
        assert!(matches!(e, SourceError::NotAnInput(_)), "{e}");
        assert!(e.to_string().contains("x.txt"));
        let e = list_inputs(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, SourceError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn broken_tars_are_listed_as_errors_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_files(3);
        std::fs::copy(&pool[0], dir.path().join("ok.jpg")).unwrap();
        // Garbage named .tar.
        std::fs::write(dir.path().join("garbage.tar"), vec![0x5au8; 1500]).unwrap();
        // A tar cut in the middle of its second image.
        let members: Vec<(String, Vec<u8>)> = vec![
            ("m1.jpg".into(), std::fs::read(&pool[1]).unwrap()),
            ("m2.jpg".into(), std::fs::read(&pool[2]).unwrap()),
        ];
        let full = dir.path().join("full.tar");
        build_tar(&full, &members);
        let bytes = std::fs::read(&full).unwrap();
        std::fs::remove_file(&full).unwrap();
        let m2_len = members[1].1.len();
        std::fs::write(dir.path().join("cut.tar"), &bytes[..bytes.len() - 1024 - 1024 - m2_len / 2]).unwrap();

        let l = list_inputs(dir.path()).unwrap();
        let sources: Vec<&str> = l.items.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(sources, ["cut.tar:m1.jpg", "ok.jpg"]);
        assert_eq!(read_bytes(&l.items[0]).unwrap(), members[0].1);
        let err_sources: Vec<&str> = l.errors.iter().map(|(s, _)| s.as_str()).collect();
        assert!(err_sources.contains(&"garbage.tar"), "{:?}", l.errors);
        assert!(l.errors.iter().any(|(s, r)| s.starts_with("cut.tar") && r.contains("truncated")), "{:?}", l.errors);
    }

    #[test]
    fn duplicate_tar_members_last_wins() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_files(2);
        let tar = dir.path().join("d.tar");
        build_tar(
            &tar,
            &[("x.jpg".into(), std::fs::read(&pool[0]).unwrap()), ("x.jpg".into(), std::fs::read(&pool[1]).unwrap())],
        );
        let l = list_inputs(&tar).unwrap();
        assert_eq!(l.items.len(), 1);
        assert_eq!(read_bytes(&l.items[0]).unwrap(), std::fs::read(&pool[1]).unwrap());
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_reported_not_followed_forever() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_files(1);
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::copy(&pool[0], dir.path().join("a/img.jpg")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("a/loop")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a/img.jpg"), dir.path().join("link.jpg")).unwrap();
        let l = list_inputs(dir.path()).unwrap();
        let sources: Vec<&str> = l.items.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(sources, ["a/img.jpg", "link.jpg"]);
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert!(l.errors[0].1.contains("loop"), "{:?}", l.errors);
    }
}
