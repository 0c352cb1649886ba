//! An array on disk: a directory holding member images (`disk0.img`, …, each with
//! its checksum sidecar), hot spares (`spare0.img`, …) and `array.json`, the
//! array's metadata. This module owns that directory's layout and the metadata
//! format; the I/O itself is [`crate::raid::RaidEngine`]'s.
//!
//! `array.json` is versioned JSON wrapped with its own checksum, written
//! atomically (temporary file, fsync, rename):
//!
//! ```json
//! { "metadata": { "format": "emulator-array", "version": 1,
//!                 "geometry": { "level": "raid5", "disks": 4, "chunk_bytes": 65536, "disk_bytes": 268435456 },
//!                 "members": [ { "file": "disk0.img", "state": "active" }, … ],
//!                 "spares": [ "spare0.img" ],
//!                 "volumes": [ { "name": "vol0", "offset": 0, "size": 805306368 } ] },
//!   "crc32": 1234567890 }
//! ```
//!
//! `crc32` is the CRC32 of the exact bytes of the `metadata` value as written
//! (compact JSON), so any edit by hand or by a stray write is detected.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk_images::{Access, DiskImage};
use serde::{Deserialize, Serialize};

use crate::live::{Live, LiveError};
use crate::raid::{ArrayState, Geometry, Level, MemberState, RaidEngine, RaidError, ViewSource};

/// The metadata file in an array directory.
pub const METADATA_FILE: &str = "array.json";
const FORMAT: &str = "emulator-array";
const VERSION: u32 = 1;

/// One member disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Image file, relative to the array directory.
    pub file: String,
    /// Its state: `active`, `failed`, or `rebuilding` (a replacement that is
    /// written but not read until its rebuild completes).
    pub state: MemberState,
}

/// A volume carved from the array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name (the NBD export name).
    pub name: String,
    /// First byte in the array's data space.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// Distinguishes this volume from any other that had, or will have, the
    /// same name and place: a volume deleted and created again is a new
    /// volume, whose clients must never meet the old one's. Numbered from 1
    /// in creation order (0 in arrays made before it existed).
    #[serde(default)]
    pub id: u64,
    /// The controller that owns the volume while both run (its home, see
    /// [`crate::ownership`]): it serves the volume at its host-facing address.
    #[serde(default)]
    pub owner: u8,
}

/// Everything `array.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayMetadata {
    /// Always `emulator-array`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// Level, disks, chunk and disk size.
    pub geometry: Geometry,
    /// Members, in RAID order.
    pub members: Vec<MemberRecord>,
    /// Hot spare image files.
    pub spares: Vec<String>,
    /// Volumes.
    pub volumes: Vec<VolumeRecord>,
    /// Volumes ever created: the last volume id given out.
    #[serde(default)]
    pub volumes_created: u64,
    /// Changes made since the array was created; `array.live` records the
    /// count it last announced to running processes.
    #[serde(default)]
    pub changes: u64,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    metadata: Box<serde_json::value::RawValue>,
    crc32: u32,
}

/// Errors of array administration.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    /// The directory is not an array.
    #[error("{dir} is not an array: {problem}", dir = dir.display())]
    NotAnArray {
        /// Directory.
        dir: PathBuf,
        /// What is missing or wrong.
        problem: String,
    },
    /// Creating would overwrite an existing array.
    #[error("{dir} already holds an array or disk images; refusing to overwrite", dir = dir.display())]
    Exists {
        /// Directory.
        dir: PathBuf,
    },
    /// A request that does not fit this array.
    #[error("{0}")]
    Invalid(String),
    /// A member image could not be created or opened.
    #[error(transparent)]
    Image(#[from] disk_images::ImageError),
    /// RAID I/O.
    #[error(transparent)]
    Raid(#[from] RaidError),
    /// The live state shared by the processes using the array.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// The OS refused.
    #[error("{operation} {path}: {source}", path = path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What `array status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ArrayStatus {
    /// Directory.
    pub dir: PathBuf,
    /// Overall state.
    pub state: ArrayState,
    /// Geometry.
    pub geometry: Geometry,
    /// Usable bytes.
    pub data_bytes: u64,
    /// Members and their states.
    pub members: Vec<MemberRecord>,
    /// Hot spares.
    pub spares: Vec<String>,
    /// Volumes.
    pub volumes: Vec<VolumeRecord>,
    /// Processes that have the array open now (pids).
    pub processes: Vec<u32>,
}

/// An opened array. Opening registers this process in the array's live state
/// (`array.live`, see [`crate::live`]): its engine shares stripe locks and sees
/// configuration changes made by every other process that has the array open.
#[derive(Debug)]
pub struct Array {
    dir: PathBuf,
    metadata: ArrayMetadata,
    engine: Arc<RaidEngine>,
}

fn io<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(std::io::Error) -> ArrayError + 'a {
    move |source| ArrayError::Io {
        path: path.to_path_buf(),
        operation,
        source,
    }
}

impl Array {
    /// Creates an array in `dir` (created if missing; must hold no array or
    /// images yet): `disks` members and `spares` hot spares of `disk_bytes` each,
    /// and `volumes` equal volumes `vol0`, `vol1`, … filling it (0: none; carve
    /// them later with [`Array::create_volume`]).
    pub fn create(
        dir: &Path,
        geometry: Geometry,
        spares: usize,
        volumes: usize,
    ) -> Result<Self, ArrayError> {
        geometry.validate()?;
        if spares > 16 {
            return Err(ArrayError::Invalid(format!("{spares} spares; at most 16")));
        }
        if volumes > MAX_VOLUMES {
            return Err(ArrayError::Invalid(format!(
                "{volumes} volumes; at most {MAX_VOLUMES}"
            )));
        }
        let align = volume_alignment(&geometry);
        let each = geometry.data_bytes() / align / (volumes.max(1) as u64) * align;
        if each == 0 {
            return Err(ArrayError::Invalid(format!(
                "{volumes} volumes do not fit: the array holds {} bytes and volumes start on {align}-byte boundaries",
                geometry.data_bytes()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let member_files: Vec<String> = (0..geometry.disks)
            .map(|i| format!("disk{i}.img"))
            .collect();
        let spare_files: Vec<String> = (0..spares).map(|i| format!("spare{i}.img")).collect();
        let taken = std::iter::once(METADATA_FILE.to_string())
            .chain(member_files.iter().cloned())
            .chain(spare_files.iter().cloned())
            .any(|name| {
                dir.join(&name).exists() || disk_images::sidecar_path(&dir.join(&name)).exists()
            });
        if taken {
            return Err(ArrayError::Exists {
                dir: dir.to_path_buf(),
            });
        }
        for name in member_files.iter().chain(&spare_files) {
            DiskImage::create(&dir.join(name), geometry.disk_bytes, false)?;
        }
        // Live state left behind by an array that used to be here: without its
        // array.json nobody can have it open.
        match std::fs::remove_file(dir.join(crate::live::LIVE_FILE)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(ArrayError::Io {
                    path: dir.join(crate::live::LIVE_FILE),
                    operation: "remove",
                    source: err,
                })
            }
            _ => {}
        }
        let metadata = ArrayMetadata {
            format: FORMAT.into(),
            version: VERSION,
            geometry,
            members: member_files
                .into_iter()
                .map(|file| MemberRecord {
                    file,
                    state: MemberState::Active,
                })
                .collect(),
            spares: spare_files,
            volumes: (0..volumes)
                .map(|i| VolumeRecord {
                    name: format!("vol{i}"),
                    offset: i as u64 * each,
                    // One volume fills the array exactly.
                    size: if volumes == 1 {
                        geometry.data_bytes()
                    } else {
                        each
                    },
                    id: i as u64 + 1,
                    // Alternate, so both controllers serve some.
                    owner: (i % 2) as u8,
                })
                .collect(),
            volumes_created: volumes as u64,
            changes: 0,
        };
        write_metadata(dir, &metadata)?;
        Self::open(dir)
    }

    /// Opens the array in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ArrayError> {
        let metadata = read_metadata(dir)?;
        let live = Live::open(dir, metadata.geometry.disks)?;
        // A change whose process died after writing array.json, before
        // telling the running processes: tell them now.
        live.announce_if_missed(metadata.changes);
        // Every member is read and written through the fault layer, which
        // applies the faults `faults.json` describes (none: one atomic load
        // an I/O).
        let faults = crate::faults::FaultLayer::open(dir).map_err(|err| {
            ArrayError::Invalid(format!("the fault book of {}: {err}", dir.display()))
        })?;
        let mut engine = RaidEngine::shared(
            metadata.geometry,
            live,
            view_source(dir, Arc::clone(&faults)),
        )?;
        engine.journal_faults(faults);
        engine.fail_members_with(member_failer(dir));
        Ok(Self {
            dir: dir.to_path_buf(),
            metadata,
            engine: Arc::new(engine),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata, as of the last change this process made or saw.
    pub fn metadata(&self) -> &ArrayMetadata {
        &self.metadata
    }

    /// The I/O engine, shared with whoever serves the array.
    pub fn engine(&self) -> &Arc<RaidEngine> {
        &self.engine
    }

    /// The member being rebuilt, if any.
    pub fn rebuilding(&self) -> Option<usize> {
        self.metadata
            .members
            .iter()
            .position(|m| m.state == MemberState::Rebuilding)
    }

    /// Changes the metadata for every process: under the cross-process metadata
    /// lock, re-reads `array.json` (another process may have changed it), lets
    /// `change` check and edit it (an error changes nothing), writes it, and
    /// announces the new configuration.
    fn change<T>(
        &mut self,
        change: impl FnOnce(&mut ArrayMetadata, &Self) -> Result<T, ArrayError>,
    ) -> Result<T, ArrayError> {
        let (out, metadata) =
            change_metadata(&self.dir, &self.engine, |metadata| change(metadata, self))?;
        self.metadata = metadata;
        Ok(out)
    }

    /// Replaces failed member `index` with the first hot spare (or, with none
    /// left, a new empty image), which becomes `rebuilding`: written by every
    /// host write from now on, filled by `array rebuild`. Its whole size is
    /// allocated first ([`DiskImage::allocate`]), so a host file system without
    /// room fails here rather than half-way through the rebuild.
    pub fn replace(&mut self, index: usize) -> Result<String, ArrayError> {
        self.change(|metadata, array| {
            check_index(metadata, index)?;
            if metadata.members[index].state != MemberState::Failed {
                return Err(ArrayError::Invalid(format!(
                    "disk {index} is not a failed disk (fail it first)"
                )));
            }
            if let Some(other) = metadata
                .members
                .iter()
                .position(|m| m.state == MemberState::Rebuilding)
            {
                return Err(ArrayError::Invalid(format!(
                    "disk {other} is already being rebuilt"
                )));
            }
            if state_of(metadata) == ArrayState::Failed {
                return Err(ArrayError::Invalid(
                    "the array has FAILED: there is nothing to rebuild from".into(),
                ));
            }
            let file = if metadata.spares.is_empty() {
                let mut n = 1;
                let name = loop {
                    let name = format!("disk{index}-replacement{n}.img");
                    if !array.dir.join(&name).exists() {
                        break name;
                    }
                    n += 1;
                };
                let path = array.dir.join(&name);
                let image = DiskImage::create(&path, metadata.geometry.disk_bytes, false)?;
                if let Err(err) = image.allocate() {
                    drop(image);
                    let _ = std::fs::remove_file(disk_images::sidecar_path(&path));
                    let _ = std::fs::remove_file(&path);
                    return Err(err.into());
                }
                name
            } else {
                // The spare is about to be written end to end: reserve its space
                // now (see `DiskImage::allocate`), before it joins the array.
                DiskImage::open(&array.dir.join(&metadata.spares[0]), Access::ReadWrite)?
                    .allocate()?;
                metadata.spares.remove(0)
            };
            metadata.members[index] = MemberRecord {
                file: file.clone(),
                state: MemberState::Rebuilding,
            };
            Ok(file)
        })
    }

    /// Completion action of a rebuild: the rebuilt member becomes active.
    /// Refused when the array has FAILED meanwhile (another member failed: what
    /// was rebuilt cannot be trusted).
    pub fn finish_rebuild(&mut self, index: usize) -> Result<(), ArrayError> {
        self.finish_rebuild_checked(index, None)
    }

    /// [`Self::finish_rebuild`] of the rebuild onto image `file`: refused when
    /// disk `index` is another image by now (it failed and was replaced while
    /// the rebuild ran, so the new image was not rebuilt).
    pub fn finish_rebuild_onto(&mut self, index: usize, file: &str) -> Result<(), ArrayError> {
        self.finish_rebuild_checked(index, Some(file))
    }

    fn finish_rebuild_checked(
        &mut self,
        index: usize,
        file: Option<&str>,
    ) -> Result<(), ArrayError> {
        self.change(|metadata, _| {
            let member = metadata
                .members
                .get_mut(index)
                .ok_or_else(|| ArrayError::Invalid(format!("disk {index} is out of range")))?;
            if member.state == MemberState::Active && file == Some(member.file.as_str()) {
                // Done already, by a completion that did not get to record it.
                return Ok(());
            }
            if member.state != MemberState::Rebuilding {
                return Err(ArrayError::Invalid(format!(
                    "disk {index} is not being rebuilt"
                )));
            }
            if let Some(file) = file.filter(|file| *file != member.file) {
                return Err(ArrayError::Invalid(format!(
                    "disk {index} is {} now, not {file}, which this rebuild was writing: \
                     run the rebuild again",
                    member.file
                )));
            }
            if state_of(metadata) == ArrayState::Failed {
                return Err(ArrayError::Invalid(format!(
                    "the array has FAILED while disk {index} was rebuilt: it stays rebuilding"
                )));
            }
            metadata.members[index].state = MemberState::Active;
            Ok(())
        })
    }

    /// Carves volume `name` of `size` bytes (a multiple of 4 KiB) from the
    /// first free space big enough, starting on a stripe boundary (RAID-5: a
    /// whole row of data chunks; RAID-1: a chunk) so two volumes never share a
    /// stripe. Controller `owner` owns it (see [`crate::ownership`]). Running
    /// servers offer it to their next client.
    pub fn create_volume(
        &mut self,
        name: &str,
        size: u64,
        owner: u8,
    ) -> Result<VolumeRecord, ArrayError> {
        check_volume_name(name).map_err(ArrayError::Invalid)?;
        if owner >= crate::ownership::CONTROLLERS {
            return Err(ArrayError::Invalid(format!(
                "owner {owner}: a server system has controllers 0 and 1"
            )));
        }
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(ArrayError::Invalid(format!(
                "volume size {size} must be a positive multiple of 4096 bytes"
            )));
        }
        self.change(|metadata, _| {
            if metadata.volumes.iter().any(|v| v.name == name) {
                return Err(ArrayError::Invalid(format!("a volume named {name:?} already exists")));
            }
            if metadata.volumes.len() >= MAX_VOLUMES {
                return Err(ArrayError::Invalid(format!("the array already has {MAX_VOLUMES} volumes")));
            }
            let align = volume_alignment(&metadata.geometry);
            let mut taken: Vec<(u64, u64)> = metadata
                .volumes
                .iter()
                .map(|v| (v.offset, v.offset + v.size))
                .collect();
            taken.sort_unstable();
            let end = metadata.geometry.data_bytes();
            let mut candidate = 0u64;
            for (start, stop) in taken.iter().copied().chain(std::iter::once((end, end))) {
                if candidate.checked_add(size).is_some_and(|last| last <= start) {
                    metadata.volumes_created += 1;
                    let volume = VolumeRecord {
                        name: name.to_string(),
                        offset: candidate,
                        size,
                        id: metadata.volumes_created,
                        owner,
                    };
                    metadata.volumes.push(volume.clone());
                    return Ok(volume);
                }
                candidate = candidate.max(stop.next_multiple_of(align));
            }
            let free: u64 = end - taken.iter().map(|(a, b)| b - a).sum::<u64>();
            Err(ArrayError::Invalid(format!(
                "no free space for {size} bytes: the array holds {end} bytes, {free} of them in no volume (volumes start on {align}-byte boundaries)"
            )))
        })
    }

    /// Removes volume `name` (its data stays on the disks until overwritten).
    pub fn delete_volume(&mut self, name: &str) -> Result<(), ArrayError> {
        self.change(|metadata, _| {
            let before = metadata.volumes.len();
            metadata.volumes.retain(|v| v.name != name);
            if metadata.volumes.len() == before {
                return Err(ArrayError::Invalid(format!("no volume named {name:?}")));
            }
            Ok(())
        })
    }

    /// Current status (re-reading the metadata if another process changed it).
    pub fn status(&mut self) -> Result<ArrayStatus, ArrayError> {
        self.metadata = read_metadata(&self.dir)?;
        // A disk that does not answer (pulled: see `crate::faults`) counts as
        // failed, whether or not the metadata recorded it.
        let mut members = self.metadata.members.clone();
        let effective = self.engine.member_states();
        for (member, state) in members.iter_mut().zip(effective) {
            if state == MemberState::Failed {
                member.state = MemberState::Failed;
            }
        }
        let states: Vec<MemberState> = members.iter().map(|m| m.state).collect();
        Ok(ArrayStatus {
            dir: self.dir.clone(),
            state: crate::raid::array_state(self.metadata.geometry, &states),
            geometry: self.metadata.geometry,
            data_bytes: self.metadata.geometry.data_bytes(),
            members,
            spares: self.metadata.spares.clone(),
            volumes: self.metadata.volumes.clone(),
            processes: self.engine.live().map(Live::processes).unwrap_or_default(),
        })
    }

    /// Marks member `index` failed, for every process that has the array open
    /// (a server stops using it before its next I/O). Refused (nothing changed)
    /// when the index is out of range, the member is already failed, or the
    /// array has already FAILED.
    pub fn fail(&mut self, index: usize) -> Result<(), ArrayError> {
        self.change(|metadata, _| mark_failed(metadata, index))
    }
}

/// Marks member `index` failed in `metadata`. Refused when the index is out of
/// range, the member is already failed, or the array has already FAILED.
fn mark_failed(metadata: &mut ArrayMetadata, index: usize) -> Result<(), ArrayError> {
    check_index(metadata, index)?;
    if state_of(metadata) == ArrayState::Failed {
        return Err(ArrayError::Invalid(
            "the array has already FAILED; failing more disks changes nothing".into(),
        ));
    }
    if metadata.members[index].state == MemberState::Failed {
        return Err(ArrayError::Invalid(format!(
            "disk {index} is already failed"
        )));
    }
    metadata.members[index].state = MemberState::Failed;
    Ok(())
}

/// Changes the array metadata in `dir` for every process that has it open:
/// under the metadata lock, after recovering the stripes of dead processes,
/// with every stripe of `engine` quiesced while it is written and announced.
/// Returns `change`'s result and the new metadata.
fn change_metadata<T>(
    dir: &Path,
    engine: &RaidEngine,
    change: impl FnOnce(&mut ArrayMetadata) -> Result<T, ArrayError>,
) -> Result<(T, ArrayMetadata), ArrayError> {
    let live = engine
        .live()
        .ok_or_else(|| ArrayError::Invalid("the array is not open for changes".into()))?;
    let _guard = live.lock_metadata()?;
    // Stripes a dead process left half-written are resynced under the
    // configuration they were written with, not the new one.
    live.recover_all_dead(&|stripe| engine.resync_stripe(stripe));
    let mut metadata = read_metadata(dir)?;
    let out = change(&mut metadata)?;
    metadata.changes += 1;
    // No write in flight anywhere from here until the change is announced:
    // each write runs whole under the configuration before or the one
    // after (a degraded one journals what the failed disk held). Taken
    // only now, so that the change's own work (allocating a disk) does
    // not hold up the hosts.
    let _quiet = engine.quiesce();
    write_metadata(dir, &metadata)?;
    live.announce(metadata.changes);
    Ok((out, metadata))
}

/// How an open array's engine records a member that failed a write: failed in
/// `dir`'s metadata for every process, as `array fail` does (see
/// [`RaidEngine::fail_members_with`]).
fn member_failer(dir: &Path) -> crate::raid::MemberFailer {
    let dir = dir.to_path_buf();
    Box::new(move |engine, index| {
        change_metadata(&dir, engine, |metadata| mark_failed(metadata, index))
            .map(|_| ())
            .map_err(|err| RaidError::Config(err.to_string()))
    })
}

/// Refuses a member index the array does not have.
fn check_index(metadata: &ArrayMetadata, index: usize) -> Result<(), ArrayError> {
    let disks = metadata.members.len();
    if index >= disks {
        return Err(ArrayError::Invalid(format!(
            "disk {index} is out of range: the array has disks 0..{}",
            disks - 1
        )));
    }
    Ok(())
}

/// Most volumes an array carries.
pub const MAX_VOLUMES: usize = 64;

/// Where volumes may start: RAID-5/6 on a whole row of data chunks, RAID-1 on a
/// chunk, so no stripe (and no stripe lock) is shared by two volumes.
fn volume_alignment(geometry: &Geometry) -> u64 {
    match geometry.level {
        Level::Raid1 => geometry.chunk_bytes,
        Level::Raid5 | Level::Raid6 => geometry.row_bytes(),
    }
}

/// Volume names are NBD export names: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn check_volume_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "volume name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// The array state the metadata describes.
fn state_of(metadata: &ArrayMetadata) -> ArrayState {
    let states: Vec<MemberState> = metadata.members.iter().map(|m| m.state).collect();
    crate::raid::array_state(metadata.geometry, &states)
}

/// Where a shared engine reloads its members from: `array.json`, opening the
/// images of members whose file changed (a replacement) and reusing the rest.
fn view_source(dir: &Path, faults: Arc<crate::faults::FaultLayer>) -> ViewSource {
    let dir = dir.to_path_buf();
    let opened: parking_lot::Mutex<Vec<(String, Arc<dyn crate::member::Member>)>> =
        Default::default();
    Box::new(move || {
        let metadata = read_metadata(&dir).map_err(|err| RaidError::Config(err.to_string()))?;
        let mut opened = opened.lock();
        let mut images = Vec::with_capacity(metadata.members.len());
        for member in &metadata.members {
            let image = match opened.iter().find(|(file, _)| *file == member.file) {
                Some((_, image)) => image.clone(),
                None => {
                    let image = faults.wrap(
                        &member.file,
                        Arc::new(
                            DiskImage::open_member(&dir.join(&member.file))
                                .map_err(|err| RaidError::Config(err.to_string()))?,
                        ),
                    );
                    opened.push((member.file.clone(), image.clone()));
                    image
                }
            };
            images.push(image);
        }
        opened.retain(|(file, _)| metadata.members.iter().any(|m| m.file == *file));
        Ok((images, metadata.members.iter().map(|m| m.state).collect()))
    })
}

/// Reads and validates `dir/array.json`.
pub fn read_metadata(dir: &Path) -> Result<ArrayMetadata, ArrayError> {
    let not_an_array = |problem: String| ArrayError::NotAnArray {
        dir: dir.to_path_buf(),
        problem,
    };
    if !dir.is_dir() {
        return Err(not_an_array("no such directory".into()));
    }
    let path = dir.join(METADATA_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_an_array(format!("{METADATA_FILE} is missing")))
        }
        Err(source) => {
            return Err(ArrayError::Io {
                path,
                operation: "read",
                source,
            })
        }
    };
    let envelope: Envelope = serde_json::from_slice(&bytes)
        .map_err(|err| not_an_array(format!("{METADATA_FILE} is not valid: {err}")))?;
    let computed = crc32fast::hash(envelope.metadata.get().as_bytes());
    if computed != envelope.crc32 {
        return Err(not_an_array(format!(
            "{METADATA_FILE} checksum {:#010x} does not match its contents ({computed:#010x}): corrupt or edited",
            envelope.crc32
        )));
    }
    let metadata: ArrayMetadata = serde_json::from_str(envelope.metadata.get())
        .map_err(|err| not_an_array(format!("{METADATA_FILE} metadata is not valid: {err}")))?;
    if metadata.format != FORMAT || metadata.version != VERSION {
        return Err(not_an_array(format!(
            "format {:?} version {} is not {FORMAT} {VERSION}",
            metadata.format, metadata.version
        )));
    }
    metadata
        .geometry
        .validate()
        .map_err(|err| not_an_array(err.to_string()))?;
    if metadata.members.len() != metadata.geometry.disks {
        return Err(not_an_array(
            "member count does not match the geometry".into(),
        ));
    }
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for volume in &metadata.volumes {
        check_volume_name(&volume.name).map_err(not_an_array)?;
        let end = volume.offset.checked_add(volume.size);
        if volume.size == 0 || end.is_none_or(|end| end > metadata.geometry.data_bytes()) {
            return Err(not_an_array(format!(
                "volume {:?} does not fit in the array",
                volume.name
            )));
        }
        spans.push((volume.offset, volume.offset + volume.size));
    }
    spans.sort_unstable();
    if spans.windows(2).any(|pair| pair[0].1 > pair[1].0)
        || metadata
            .volumes
            .iter()
            .enumerate()
            .any(|(i, v)| metadata.volumes[..i].iter().any(|w| w.name == v.name))
    {
        return Err(not_an_array("volumes overlap or share a name".into()));
    }
    let safe_name =
        |name: &str| !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    if !metadata
        .members
        .iter()
        .map(|m| m.file.as_str())
        .chain(metadata.spares.iter().map(String::as_str))
        .all(safe_name)
    {
        return Err(not_an_array(
            "member file names must be plain names inside the array directory".into(),
        ));
    }
    Ok(metadata)
}

fn write_metadata(dir: &Path, metadata: &ArrayMetadata) -> Result<(), ArrayError> {
    let path = dir.join(METADATA_FILE);
    let inner =
        serde_json::to_string(metadata).map_err(|err| ArrayError::Invalid(err.to_string()))?;
    let raw = serde_json::value::RawValue::from_string(inner)
        .map_err(|err| ArrayError::Invalid(err.to_string()))?;
    let envelope = Envelope {
        crc32: crc32fast::hash(raw.get().as_bytes()),
        metadata: raw,
    };
    let mut text = serde_json::to_string_pretty(&envelope)
        .map_err(|err| ArrayError::Invalid(err.to_string()))?;
    text.push('\n');
    let temporary = dir.join(format!(".{METADATA_FILE}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&temporary);
        ArrayError::Io {
            path: path.clone(),
            operation: "write",
            source,
        }
    })
}

/// Convenience for the CLI: the geometry for `level` with `disks` members.
pub fn geometry(level: Level, disks: usize, chunk_bytes: u64, disk_bytes: u64) -> Geometry {
    Geometry {
        level,
        disks,
        chunk_bytes,
        disk_bytes,
    }
}
