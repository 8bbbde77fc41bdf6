//! The outbox on disk (`<P>_MQTT_OUTBOX_DIR`): every QoS 1/2 message the
//! service publishes is kept in a file there until the broker acknowledges
//! it, so that a process killed (SIGKILL, OOM killer, power loss) before the
//! broker had its messages sends them after it starts again.
//!
//! # Layout
//!
//! - `<seq>.msg`: one message, `seq` its sequence number in 20 digits, so
//!   that names sort in publishing order. The format is [`super::record`]'s:
//!   topic, QoS, payload, lengths and a CRC-32.
//! - `<seq>.tmp`: a message being written. One found at start was never
//!   renamed, so its `publish` never returned: it is removed.
//! - `<seq>.msg.corrupt`, `<seq>.msg.too-large`: a message found truncated
//!   or damaged, or over `<P>_MQTT_MAX_PACKET_SIZE`, set aside with a
//!   warning that names it. Never deleted, never sent; look at it, then
//!   delete it.
//! - `outbox.lock`: held with `flock(LOCK_EX)` while a process uses the
//!   directory, so a second process on it is refused at startup. The kernel
//!   releases it when the process dies, however it dies. The file itself
//!   stays.
//!
//! # fsync policy
//!
//! `publish` returns only once its message is durable, that is, it survives
//! SIGKILL *and* power loss (on a disk that honours flushes):
//!
//! 1. the message is written to `<seq>.tmp`, and `fdatasync`ed;
//! 2. renamed to `<seq>.msg`;
//! 3. the directory is `fsync`ed, making the new name durable.
//!
//! Steps 1 and 2 are per message; step 3 is per batch: the writer thread
//! takes every message queued while it was busy (up to [`BATCH`]), writes
//! all their files, `fdatasync`s each, renames each, then does one
//! directory `fsync` for all, and only then lets their `publish` calls
//! return. One publisher awaiting each `publish` in turn pays two syncs per
//! message; concurrent publishers share the directory's, and their file
//! syncs cost less when they follow the writes of the whole batch (measured
//! in BENCHMARKS.md, "Disk outbox"). A batch holds at most [`BATCH`] files
//! open. Removals queued meanwhile are done after the batch's syncs, so
//! that they do not delay a `publish`.
//!
//! Removal after the broker's acknowledgement (PUBACK, PUBCOMP) is an
//! `unlink` without `fsync`: after a power loss an acknowledged message may
//! be back on disk, and is sent again. That is a duplicate, which QoS 1 (at
//! least once) allows; never a loss. The next batch's directory `fsync`
//! makes earlier removals durable too.
//!
//! SIGKILL alone loses nothing even between the steps: what was written
//! is in the kernel's page cache, which outlives the process. A crash
//! between 1 and 2 leaves a `.tmp`, removed at the next start (its
//! `publish` had not returned).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::record::{self, Record, HEADER, TRAILER};
use crate::connection::session::publish_size;
use crate::ConfigError;

/// The lock file's name.
pub(crate) const LOCK_FILE: &str = "outbox.lock";
/// Written and removed at startup to prove the directory is writable.
const PROBE_FILE: &str = "outbox.probe";
/// The most messages the writer takes for one directory `fsync`.
pub(crate) const BATCH: usize = 64;

/// The outbox directory, locked by this process until dropped.
#[derive(Debug)]
pub(crate) struct Directory {
    path: PathBuf,
    var: String,
    /// Holds the `flock`: open for as long as the directory is ours.
    _lock: File,
    /// The directory itself, to `fsync` new names into it.
    handle: File,
}

/// What [`Directory::open`] found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Messages to send, oldest first; at most the outbox limit.
    pub records: Vec<Record>,
    /// The sequence number of the next message: above every one on disk.
    pub next_seq: u64,
    /// Good messages beyond the outbox limit, left on disk for a later start.
    pub left: usize,
    /// Damaged or oversized messages, set aside.
    pub set_aside: usize,
}

/// A file of the directory, by what its name says.
enum Name {
    Message(u64),
    Partial(u64),
    /// Anything else with a sequence number: a set-aside message, or a
    /// name we did not write; never read, but never reused.
    Numbered(u64),
    Other,
}

/// Digits in a sequence number as we write it.
const SEQ_DIGITS: usize = 20;

fn classify(name: &str) -> Name {
    let digits = name.bytes().take_while(u8::is_ascii_digit).count();
    let Ok(seq) = name[..digits].parse::<u64>() else {
        return Name::Other;
    };
    match (digits, &name[digits..]) {
        (SEQ_DIGITS, ".msg") => Name::Message(seq),
        (SEQ_DIGITS, ".tmp") => Name::Partial(seq),
        _ => Name::Numbered(seq),
    }
}

fn message_name(seq: u64) -> String {
    format!("{seq:0SEQ_DIGITS$}.msg")
}

impl Directory {
    /// Creates the directory if missing, locks it, removes interrupted
    /// writes, and reads the messages left by the last process: the oldest
    /// `limit`, each checked; damaged ones are set aside with a warning.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `var` and the path: not a directory, not
    /// writable, or locked by another process.
    pub fn open(
        path: &Path,
        var: &str,
        limit: usize,
        max_packet: usize,
    ) -> Result<(Directory, Loaded), ConfigError> {
        let problem = |problem: &str, source: Option<io::Error>| ConfigError::OutboxDir {
            var: var.to_owned(),
            path: path.to_owned(),
            problem: problem.to_owned(),
            source,
        };
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(problem(
                    "is not a directory: point it at a directory (it is created when missing)",
                    None,
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| {
                        problem(
                            "cannot create the directory: check the path and that this user may write in its parent",
                            Some(e),
                        )
                    })?;
                info!(dir = %path.display(), var, "created the outbox directory");
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(problem(
                    "a part of the path is a file, not a directory: point it at a directory (it is created when missing)",
                    None,
                ))
            }
            Err(e) => {
                return Err(problem(
                    "cannot use the directory: check the path and its permissions",
                    Some(e),
                ))
            }
        }
        let not_writable = |e| {
            problem(
                "cannot write in the directory: make it writable by this process's user, or choose another",
                Some(e),
            )
        };
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.join(LOCK_FILE))
            .map_err(not_writable)?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(ConfigError::OutboxInUse {
                    var: var.to_owned(),
                    path: path.to_owned(),
                })
            }
            Err(errno) => {
                return Err(problem(
                    "cannot lock outbox.lock in the directory (a file system without flock?): choose a directory on a local file system",
                    Some(errno.into()),
                ))
            }
        }
        let probe = path.join(PROBE_FILE);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)
            .and_then(|mut file| file.write_all(b"probe"))
            .and_then(|()| fs::remove_file(&probe))
            .map_err(not_writable)?;
        let handle = File::open(path).map_err(not_writable)?;
        let directory = Directory {
            path: path.to_owned(),
            var: var.to_owned(),
            _lock: lock,
            handle,
        };
        let loaded = directory
            .load(limit, max_packet)
            .map_err(|e| problem("cannot list the directory", Some(e)))?;
        Ok((directory, loaded))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The variable that names it.
    pub fn var(&self) -> &str {
        &self.var
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn load(&self, limit: usize, max_packet: usize) -> io::Result<Loaded> {
        let mut messages = Vec::new();
        let mut next_seq = 0u64;
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            match classify(&name) {
                Name::Message(seq) => messages.push(seq),
                Name::Partial(seq) => {
                    // Its `publish` never returned: not a message of ours yet.
                    match fs::remove_file(entry.path()) {
                        Ok(()) => {
                            debug!(file = %entry.path().display(), "removed an interrupted write")
                        }
                        Err(e) => {
                            warn!(file = %entry.path().display(), error = %e, "cannot remove an interrupted write")
                        }
                    }
                    next_seq = next_seq.max(seq.saturating_add(1));
                    continue;
                }
                Name::Numbered(seq) => {
                    next_seq = next_seq.max(seq.saturating_add(1));
                    continue;
                }
                Name::Other => continue,
            }
        }
        messages.sort_unstable();
        if let Some(last) = messages.last() {
            next_seq = next_seq.max(last.saturating_add(1));
        }
        let mut loaded = Loaded {
            next_seq,
            ..Loaded::default()
        };
        let largest_file = HEADER.saturating_add(max_packet).saturating_add(TRAILER);
        for (index, seq) in messages.iter().copied().enumerate() {
            if loaded.records.len() >= limit {
                loaded.left = messages.len() - index;
                break;
            }
            let path = self.file(&message_name(seq));
            match read(&path, largest_file) {
                Err(e) => {
                    // Not ours to judge: left where it is, tried at the next start.
                    warn!(file = %path.display(), error = %e, "cannot read a message of the outbox directory: it is not sent this time");
                }
                Ok(None) => {
                    self.set_aside(
                        &path,
                        "too-large",
                        "larger than any message the packet size limit allows",
                    );
                    loaded.set_aside += 1;
                }
                Ok(Some(bytes)) => match record::decode(&bytes) {
                    Ok(record) if record.seq != seq => {
                        self.set_aside(&path, "corrupt", "its sequence number is not its name's");
                        loaded.set_aside += 1;
                    }
                    Ok(record)
                        if publish_size(record.topic.len(), record.payload.len(), record.qos)
                            > max_packet =>
                    {
                        self.set_aside(&path, "too-large", "over the packet size limit");
                        loaded.set_aside += 1;
                    }
                    Ok(record) => loaded.records.push(record),
                    Err(problem) => {
                        self.set_aside(&path, "corrupt", problem);
                        loaded.set_aside += 1;
                    }
                },
            }
        }
        Ok(loaded)
    }

    /// Moves a message that must not be sent to `<name>.<suffix>`, saying so.
    fn set_aside(&self, path: &Path, suffix: &str, problem: &str) {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".");
        aside.push(suffix);
        let aside = PathBuf::from(aside);
        match fs::rename(path, &aside) {
            Ok(()) => warn!(
                file = %path.display(),
                problem,
                moved_to = %aside.display(),
                "a message in the outbox directory cannot be sent: it was moved aside, not deleted; look at it, then delete it"
            ),
            Err(e) => warn!(
                file = %path.display(),
                problem,
                error = %e,
                "a message in the outbox directory cannot be sent, nor moved aside: it is skipped"
            ),
        }
    }

    /// Writes message `seq` (`bytes` from [`record::encode`]) to its
    /// temporary file, not synced yet: step 1 of the policy, without its
    /// `fdatasync`, which [`Partial::sync`] does.
    pub fn create(&self, seq: u64, bytes: &[u8]) -> io::Result<Partial> {
        let path = self.file(&format!("{seq:0SEQ_DIGITS$}.tmp"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path);
        let partial = Partial {
            seq,
            path,
            file: file?,
        };
        match (&partial.file).write_all(bytes) {
            Ok(()) => Ok(partial),
            Err(e) => {
                partial.abandon();
                Err(e)
            }
        }
    }

    /// Writes message `seq` and gives it its name: steps 1 and 2 of the
    /// policy. Durable once [`Directory::sync`] returns.
    #[cfg(test)]
    pub fn write(&self, seq: u64, bytes: &[u8]) -> io::Result<()> {
        self.create(seq, bytes)?.sync()?.name(self)
    }

    /// Makes the names of the messages written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.handle.sync_all()
    }

    /// Removes message `seq`: acknowledged, or never confirmed written.
    pub fn remove(&self, seq: u64) -> io::Result<()> {
        match fs::remove_file(self.file(&message_name(seq))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// A message being written: its temporary file.
#[derive(Debug)]
pub(crate) struct Partial {
    seq: u64,
    path: PathBuf,
    file: File,
}

impl Partial {
    /// `fdatasync`s the file (step 1); on failure nothing of it is left.
    pub fn sync(self) -> io::Result<Partial> {
        match self.file.sync_data() {
            Ok(()) => Ok(self),
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    /// Renames the synced file to `<seq>.msg` (step 2); on failure nothing
    /// of it is left.
    pub fn name(self, directory: &Directory) -> io::Result<()> {
        let named = fs::rename(&self.path, directory.file(&message_name(self.seq)));
        if named.is_err() {
            self.abandon();
        }
        named
    }

    /// Removes the temporary file: the message is not stored.
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The bytes of the file at `path`, or `None` if it is over `largest` bytes
/// (not read: memory stays bounded whatever is on disk).
fn read(path: &Path, largest: usize) -> io::Result<Option<Vec<u8>>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size > largest as u64 {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(largest as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > largest {
        return Ok(None);
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QoS;

    const VAR: &str = "TEST_MQTT_OUTBOX_DIR";
    const MAX: usize = 1 << 20;

    fn open(path: &Path, limit: usize) -> Result<(Directory, Loaded), ConfigError> {
        Directory::open(path, VAR, limit, MAX)
    }

    fn store(directory: &Directory, seq: u64, payload: &str) {
        let bytes = record::encode(seq, "t/numbers", payload.as_bytes(), QoS::AtLeastOnce);
        directory.write(seq, &bytes).unwrap();
        directory.sync().unwrap();
    }

    fn payloads(loaded: &Loaded) -> Vec<String> {
        loaded
            .records
            .iter()
            .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
            .collect()
    }

    fn names(path: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn messages_round_trip_in_order_and_removed_ones_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        {
            let (directory, loaded) = open(&path, 100).unwrap();
            assert!(loaded.records.is_empty() && loaded.next_seq == 0);
            for (seq, payload) in [(0, "a"), (1, "b"), (2, "c"), (10, "d")] {
                store(&directory, seq, payload);
            }
            directory.remove(1).unwrap();
            directory.remove(1).unwrap(); // twice is fine
        }
        let (_directory, loaded) = open(&path, 100).unwrap();
        assert_eq!(payloads(&loaded), ["a", "c", "d"]);
        let seqs: Vec<u64> = loaded.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 2, 10]);
        assert_eq!(loaded.records[0].topic, "t/numbers");
        assert_eq!(loaded.records[0].qos, QoS::AtLeastOnce);
        assert_eq!(loaded.next_seq, 11);
        assert_eq!((loaded.left, loaded.set_aside), (0, 0));
    }

    #[test]
    fn a_corrupt_message_is_skipped_and_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (directory, _) = open(dir.path(), 100).unwrap();
            for (seq, payload) in [(0, "a"), (1, "b"), (2, "c")] {
                store(&directory, seq, payload);
            }
        }
        let victim = dir.path().join(message_name(1));
        let mut bytes = fs::read(&victim).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 0xff;
        fs::write(&victim, bytes).unwrap();

        let (_directory, loaded) = open(dir.path(), 100).unwrap();
        assert_eq!(payloads(&loaded), ["a", "c"]);
        assert_eq!(loaded.set_aside, 1);
        assert!(!victim.exists());
        assert!(dir
            .path()
            .join(format!("{}.corrupt", message_name(1)))
            .exists());
        // The set-aside message keeps its number: a new one never takes it.
        assert_eq!(loaded.next_seq, 3);
    }

    #[test]
    fn a_truncated_message_is_skipped_and_an_interrupted_write_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (directory, _) = open(dir.path(), 100).unwrap();
            store(&directory, 0, "kept");
            store(&directory, 1, "cut short");
        }
        let victim = dir.path().join(message_name(1));
        let bytes = fs::read(&victim).unwrap();
        fs::write(&victim, &bytes[..bytes.len() - 3]).unwrap();
        // A crash mid-write leaves a temporary file, never renamed.
        fs::write(dir.path().join(format!("{:020}.tmp", 5)), b"PMQO\x01").unwrap();
        // Something that is not ours is left alone.
        fs::write(dir.path().join("notes.txt"), b"hello").unwrap();

        let (_directory, loaded) = open(dir.path(), 100).unwrap();
        assert_eq!(payloads(&loaded), ["kept"]);
        assert_eq!(loaded.set_aside, 1);
        assert_eq!(loaded.next_seq, 6);
        assert_eq!(
            names(dir.path()),
            [
                message_name(0),
                format!("{}.corrupt", message_name(1)),
                "notes.txt".to_owned(),
                LOCK_FILE.to_owned(),
            ]
        );
    }

    #[test]
    fn a_second_outbox_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = open(dir.path(), 100).unwrap();
        let error = open(dir.path(), 100).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "another process uses {} ({VAR}): give each process its own directory",
                dir.path().display()
            )
        );
        assert_eq!(error.var(), VAR);
        drop(first);
        // Released with the first: the next start takes it.
        open(dir.path(), 100).unwrap();
    }

    #[test]
    fn the_limit_loads_the_oldest_and_leaves_the_rest_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (directory, _) = open(dir.path(), 100).unwrap();
            for seq in 0..5 {
                store(&directory, seq, &seq.to_string());
            }
        }
        let (_directory, loaded) = open(dir.path(), 3).unwrap();
        assert_eq!(payloads(&loaded), ["0", "1", "2"]);
        assert_eq!(loaded.left, 2);
        assert_eq!(loaded.next_seq, 5);
        // Nothing was deleted: the rest waits for a start with room.
        assert_eq!(
            names(dir.path())
                .iter()
                .filter(|n| n.ends_with(".msg"))
                .count(),
            5
        );
    }

    #[test]
    fn a_message_over_the_packet_limit_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (directory, _) = open(dir.path(), 100).unwrap();
            store(&directory, 0, &"x".repeat(1000));
            store(&directory, 1, "small");
        }
        let (_directory, loaded) = Directory::open(dir.path(), VAR, 100, 512).unwrap();
        assert_eq!(payloads(&loaded), ["small"]);
        assert!(dir
            .path()
            .join(format!("{}.too-large", message_name(0)))
            .exists());
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("outbox");
        fs::write(&file, b"").unwrap();
        let error = open(&file, 10).unwrap_err();
        assert_eq!(
            crate::one_line(&error),
            format!(
                "{VAR}={}: is not a directory: point it at a directory (it is created when missing)",
                file.display()
            )
        );
        let below = open(&file.join("sub"), 10).unwrap_err();
        assert_eq!(
            crate::one_line(&below),
            format!(
                "{VAR}={}/sub: a part of the path is a file, not a directory: point it at a directory (it is created when missing)",
                file.display()
            )
        );
    }

    #[test]
    fn a_directory_that_is_not_writable_is_a_clear_error() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o500)).unwrap();
        // Root writes anywhere: then a directory where the probe file goes
        // stands in for the permission.
        if fs::write(dir.path().join("x"), b"").is_ok() {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
            fs::create_dir(dir.path().join(PROBE_FILE)).unwrap();
        }
        let result = open(dir.path(), 10);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let error = result.unwrap_err();
        let line = crate::one_line(&error);
        assert!(
            line.starts_with(&format!(
                "{VAR}={}: cannot write in the directory: make it writable by this process's user, or choose another: ",
                dir.path().display()
            )),
            "{line}"
        );
    }
}
