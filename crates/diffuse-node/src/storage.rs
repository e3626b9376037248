//! Durable storage of whatever a protocol persists, in a redb database.
//!
//! Why redb: a pure-Rust embedded store with ACID transactions whose commits are
//! checksummed and fsynced (`Durability::Immediate`), built in seconds on two cores.
//! The driver commits the [`WriteOp`]s of a group of inputs in one transaction before
//! it sends any message that follows them (see [`crate::replica`]), so nothing that a
//! message depends on can be lost by a crash after the message leaves.
//!
//! A durable commit is redb's default one-phase commit: checksummed, one fsync.
//! After a crash the next open verifies the checksums and rebuilds the allocator
//! state by a full scan, which takes longer the larger the database. Quick repair
//! ([`Store::set_quick_repair`], `quick_repair = true` in a node's configuration)
//! opens at once after a crash, at the price of a two-phase commit: two fsyncs per
//! commit. `docs/runtime.md`, "Storage", has the trade-off and its measurement.
//!
//! The database also remembers whose it is (member id and cluster digest), so a node
//! pointed at another node's directory refuses to start instead of mixing states.

use diffuse_core::protocol::{Recovered, WriteOp};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const PROTOCOL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("protocol");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const OWNER_KEY: &str = "owner";

/// Why storage failed. Any failure stops the replica: continuing would risk voting
/// for something it could later forget.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database reported an error.
    #[error("database: {0}")]
    Database(#[from] redb::Error),
    /// The directory belongs to another member or cluster.
    #[error("the data directory belongs to another member or cluster ({0})")]
    WrongOwner(String),
    /// The data directory cannot be created.
    #[error("cannot create the data directory: {0}")]
    Directory(std::io::Error),
}

fn db<E: Into<redb::Error>>(error: E) -> StorageError {
    StorageError::Database(error.into())
}

/// A replica's durable store.
pub struct Store {
    db: Database,
    /// Whether durable commits use redb's quick repair (and so two phases).
    quick_repair: bool,
}

impl Store {
    /// Opens (or creates) the store in `dir`, owned by `owner` (e.g. the member id
    /// and cluster digest): a store created for another owner is refused.
    pub fn open(dir: &Path, owner: &[u8]) -> Result<Store, StorageError> {
        std::fs::create_dir_all(dir).map_err(StorageError::Directory)?;
        let path = dir.join("replica.redb");
        if !path.exists() {
            Store::create_atomically(dir, &path, owner)?;
        }
        let store = Store {
            db: Database::create(&path).map_err(db)?,
            quick_repair: false,
        };
        store.claim(owner)?;
        Ok(store)
    }

    /// Makes later durable commits save redb's allocator state with a two-phase
    /// commit (two fsyncs), so that the database opens without a full repair scan
    /// after a crash.
    pub fn set_quick_repair(&mut self, enabled: bool) {
        self.quick_repair = enabled;
    }

    /// Creates the database under a temporary name and renames it into place, so
    /// that a crash during creation (a SIGKILL between creating the file and writing
    /// its header) leaves no half-made database that would refuse to open.
    fn create_atomically(dir: &Path, path: &Path, owner: &[u8]) -> Result<(), StorageError> {
        let fresh = dir.join("replica.redb.creating");
        match std::fs::remove_file(&fresh) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StorageError::Directory(error)),
        }
        let store = Store {
            db: Database::create(&fresh).map_err(db)?,
            quick_repair: false,
        };
        store.claim(owner)?;
        drop(store);
        std::fs::rename(&fresh, path).map_err(StorageError::Directory)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(StorageError::Directory)
    }

    fn claim(&self, owner: &[u8]) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        {
            let mut meta = txn.open_table(META).map_err(db)?;
            let existing = meta.get(OWNER_KEY).map_err(db)?.map(|v| v.value().to_vec());
            match existing {
                Some(existing) if existing != owner => {
                    return Err(StorageError::WrongOwner(format!(
                        "created for {}, opened by {}",
                        String::from_utf8_lossy(&existing),
                        String::from_utf8_lossy(owner)
                    )));
                }
                Some(_) => {}
                None => {
                    meta.insert(OWNER_KEY, owner).map_err(db)?;
                }
            }
            txn.open_table(PROTOCOL).map_err(db)?;
        }
        txn.commit().map_err(db)
    }

    /// Everything persisted so far, in key order.
    pub fn load(&self) -> Result<Recovered, StorageError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(PROTOCOL).map_err(db)?;
        let mut entries = Vec::new();
        for entry in table.range::<&[u8]>(..).map_err(db)? {
            let (key, value) = entry.map_err(db)?;
            entries.push((key.value().to_vec(), value.value().to_vec()));
        }
        Ok(Recovered { entries })
    }

    /// Applies `writes` atomically and durably: when this returns, they survive a
    /// crash or power loss.
    pub fn apply<'a>(
        &self,
        writes: impl IntoIterator<Item = &'a WriteOp>,
    ) -> Result<(), StorageError> {
        self.commit(writes, true)
    }

    /// Applies `writes` atomically; durably only if `durable`. A commit that is not
    /// durable is lost by a crash unless a durable one follows it (redb's
    /// `Durability::None`; redb frees pages only at durable commits, so the caller
    /// must commit durably now and then).
    pub fn commit<'a>(
        &self,
        writes: impl IntoIterator<Item = &'a WriteOp>,
        durable: bool,
    ) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        if durable {
            txn.set_durability(Durability::Immediate).map_err(db)?;
            txn.set_quick_repair(self.quick_repair);
        } else {
            txn.set_durability(Durability::None).map_err(db)?;
        }
        {
            let mut table = txn.open_table(PROTOCOL).map_err(db)?;
            for write in writes {
                match write {
                    WriteOp::Put { key, value } => {
                        table.insert(key.as_slice(), value.as_slice()).map_err(db)?;
                    }
                    WriteOp::Delete { key } => {
                        table.remove(key.as_slice()).map_err(db)?;
                    }
                    WriteOp::DeleteRange { start, end } => {
                        table
                            .retain_in::<&[u8], _>(start.as_slice()..end.as_slice(), |_, _| false)
                            .map_err(db)?;
                    }
                }
            }
        }
        txn.commit().map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> WriteOp {
        WriteOp::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn writes_survive_reopening_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), b"replica 0").unwrap();
            store
                .apply(&[
                    put("b", "2"),
                    put("a", "1"),
                    put("c/1", "x"),
                    put("c/2", "y"),
                ])
                .unwrap();
            store
                .apply(&[
                    WriteOp::Delete { key: b"a".to_vec() },
                    WriteOp::DeleteRange {
                        start: b"c/".to_vec(),
                        end: b"c/2".to_vec(),
                    },
                    put("b", "3"),
                ])
                .unwrap();
        }
        let store = Store::open(dir.path(), b"replica 0").unwrap();
        let recovered = store.load().unwrap();
        assert_eq!(
            recovered.entries,
            vec![
                (b"b".to_vec(), b"3".to_vec()),
                (b"c/2".to_vec(), b"y".to_vec())
            ]
        );
    }

    #[test]
    fn commits_of_either_kind_survive_reopening_with_the_other() {
        let dir = tempfile::tempdir().unwrap();
        for (round, quick_repair) in [true, false, true].into_iter().enumerate() {
            let mut store = Store::open(dir.path(), b"replica 0").unwrap();
            store.set_quick_repair(quick_repair);
            let value = round.to_string();
            store.apply(&[put(&format!("k{round}"), &value)]).unwrap();
            assert_eq!(store.load().unwrap().entries.len(), round + 1);
        }
        let store = Store::open(dir.path(), b"replica 0").unwrap();
        assert_eq!(store.load().unwrap().entries.len(), 3);
    }

    #[test]
    fn a_durable_commit_makes_the_earlier_ones_durable_too() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), b"replica 0").unwrap();
            store.commit(&[put("a", "1")], false).unwrap();
            store.commit(&[put("b", "2")], false).unwrap();
            store.commit(std::iter::empty(), true).unwrap();
        }
        let store = Store::open(dir.path(), b"replica 0").unwrap();
        assert_eq!(store.load().unwrap().entries.len(), 2);
    }

    #[test]
    fn a_half_created_database_does_not_block_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        // What a SIGKILL during the first creation leaves behind.
        std::fs::write(dir.path().join("replica.redb.creating"), b"").unwrap();
        let store = Store::open(dir.path(), b"replica 0").unwrap();
        store.apply(&[put("k", "v")]).unwrap();
        drop(store);
        let store = Store::open(dir.path(), b"replica 0").unwrap();
        assert_eq!(store.load().unwrap().entries.len(), 1);
        assert!(!dir.path().join("replica.redb.creating").exists());
    }

    /// This thread's CPU time so far (user and system), from the scheduler.
    fn thread_cpu() -> std::time::Duration {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        let nanos = text.split_whitespace().next().unwrap().parse().unwrap();
        std::time::Duration::from_nanos(nanos)
    }

    /// What one durable commit costs on this machine, against the floor of a plain
    /// append and `fdatasync` of the same bytes (`docs/performance.md`, "Where the
    /// CPU goes, per operation"). A measurement, not a test:
    /// `cargo test --release -p diffuse-node commit_costs -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn commit_costs() {
        const COMMITS: u32 = 2000;
        let dir = tempfile::tempdir().unwrap();
        let value = vec![7u8; 4000];
        let store = Store::open(dir.path(), b"replica 0").unwrap();
        let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
        for i in 0..COMMITS {
            // A slot record per commit, the oldest of a window of 256 deleted.
            let mut writes = vec![WriteOp::Put {
                key: i.to_be_bytes().to_vec(),
                value: value.clone(),
            }];
            if let Some(old) = i.checked_sub(256) {
                writes.push(WriteOp::Delete {
                    key: old.to_be_bytes().to_vec(),
                });
            }
            store.apply(&writes).unwrap();
        }
        let per = |d: std::time::Duration| d.as_micros() / u128::from(COMMITS);
        println!(
            "redb durable commit of 4 KB: {} µs wall, {} µs CPU",
            per(wall.elapsed()),
            per(thread_cpu() - cpu)
        );
        let mut file = std::fs::File::create(dir.path().join("append")).unwrap();
        let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
        for _ in 0..COMMITS {
            std::io::Write::write_all(&mut file, &value).unwrap();
            file.sync_data().unwrap();
        }
        println!(
            "append of 4 KB and fdatasync: {} µs wall, {} µs CPU",
            per(wall.elapsed()),
            per(thread_cpu() - cpu)
        );
    }

    #[test]
    fn another_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), b"replica 0").unwrap());
        assert!(matches!(
            Store::open(dir.path(), b"replica 1"),
            Err(StorageError::WrongOwner(_))
        ));
    }
}
