//! A book of rules that several processes follow: a JSON file of rules and a
//! generation counter in a small file every follower maps, which moves on
//! every change. A follower compares one mapped word with the generation it
//! loaded and reloads the file only when it moved. The disk fault book
//! (`crate::faults`) and the link book (`emulator::link::book`) are books.

use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use disk_images::mapping::SharedMapping;
use serde::de::DeserializeOwned;
use serde::Serialize;

const VERSION: u32 = 1;
const GENERATION_BYTES: usize = 4096;
/// Where the generation counter sits in the generation file.
const GENERATION_AT: usize = 16;

/// The files of one kind of book.
#[derive(Debug, Clone, Copy)]
pub struct Files {
    /// The rules (JSON), next to the generation file.
    pub book: &'static str,
    /// The generation file.
    pub generation: &'static str,
    /// The generation file's magic.
    pub magic: [u8; 8],
    /// What the book is, for errors (`fault book`).
    pub what: &'static str,
}

/// Rules a book holds.
pub trait Rules: Serialize + DeserializeOwned {
    /// Where they are kept.
    const FILES: Files;
}

/// Why a book could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// The OS refused.
    #[error("{operation} {path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a book (or a generation file) of this kind and version.
    #[error("{path} is not a {what}: {problem}", path = path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it should be.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The book of rules `R` in a directory.
#[derive(Debug)]
pub struct Book<R> {
    dir: PathBuf,
    /// Kept open: the mapping's file, and the lock of changes.
    file: File,
    map: SharedMapping,
    rules: PhantomData<fn() -> R>,
}

impl<R: Rules> Book<R> {
    /// Opens the book in `dir`, creating its generation file if missing.
    pub fn open(dir: &Path) -> Result<Self, BookError> {
        let files = R::FILES;
        let path = dir.join(files.generation);
        let (file, map) =
            crate::live::open_or_create_mapped(&path, GENERATION_BYTES, &files.magic, VERSION)
                .map_err(|err| match err {
                    crate::live::MappedError::Io(operation, source) => BookError::Io {
                        path: path.clone(),
                        operation,
                        source,
                    },
                    crate::live::MappedError::Corrupt(problem) => BookError::Corrupt {
                        path: path.clone(),
                        what: files.what,
                        problem,
                    },
                })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            map,
            rules: PhantomData,
        })
    }

    /// The generation: moves on every change.
    pub fn generation(&self) -> u64 {
        self.map.load_u64_le(GENERATION_AT)
    }

    /// The rules now (none when there is no book yet).
    pub fn rules(&self) -> Result<Vec<R>, BookError> {
        let path = self.dir.join(R::FILES.book);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(BookError::Io {
                    path,
                    operation: "read",
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes).map_err(|err| BookError::Corrupt {
            path,
            what: R::FILES.what,
            problem: err.to_string(),
        })
    }

    /// Changes the rules: `change` gets them as they are and edits them; the
    /// book is rewritten whole (under a temporary name, then renamed into
    /// place) and the generation moves, so every follower applies the new
    /// rules from its next look. Changes are serialised by a lock on the
    /// generation file.
    pub fn change<T>(&self, change: impl FnOnce(&mut Vec<R>) -> T) -> Result<T, BookError> {
        let path = self.dir.join(R::FILES.book);
        let io = |operation| {
            let path = path.clone();
            move |source| BookError::Io {
                path,
                operation,
                source,
            }
        };
        self.file.lock().map_err(io("lock"))?;
        let result = (|| {
            let mut rules = self.rules()?;
            let out = change(&mut rules);
            let bytes = serde_json::to_vec_pretty(&rules).map_err(|err| BookError::Corrupt {
                path: path.clone(),
                what: R::FILES.what,
                problem: err.to_string(),
            })?;
            let temporary = self
                .dir
                .join(format!(".{}.tmp-{}", R::FILES.book, std::process::id()));
            let mut file = File::create(&temporary).map_err(io("create"))?;
            file.write_all(&bytes).map_err(io("write"))?;
            file.sync_all().map_err(io("sync"))?;
            std::fs::rename(&temporary, &path).map_err(io("rename"))?;
            self.map.fetch_add_u64_le(GENERATION_AT, 1);
            Ok(out)
        })();
        let _ = self.file.unlock();
        result
    }
}
