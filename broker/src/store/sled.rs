//! The embedded store on sled: one tree, one JSON record per key. A
//! mutation's keys go in one atomic batch and are flushed before the caller
//! acknowledges.

use super::{Records, encode_record, key_name};
use crate::error::{Error, Result};
use crate::state::{Key, State};
use std::collections::BTreeSet;
use std::path::Path;

/// The sled database in the data directory.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: ::sled::Db,
}

impl SledStore {
    /// Open (or create) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        match ::sled::open(path) {
            Ok(db) => Ok(Self { db }),
            // sled reports the lock conflict as an `Other` I/O error whose
            // text embeds a Debug dump; name the situation instead.
            Err(::sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                Err(Error::StoreInUse(path.display().to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Read everything into a [`State`].
    pub fn load(&self) -> Result<State> {
        let mut records = Records::default();
        for item in self.db.iter() {
            let (k, v) = item?;
            records.add(&String::from_utf8_lossy(&k), &v)?;
        }
        Ok(records.into_state())
    }

    /// Write the `dirty` keys of `state` in one atomic batch (absent records
    /// are deleted) and flush to disk.
    pub async fn persist(&self, state: &State, dirty: &BTreeSet<Key>) -> Result<()> {
        if dirty.is_empty() {
            return Ok(());
        }
        let mut batch = ::sled::Batch::default();
        for key in dirty {
            let k = key_name(key);
            match encode_record(state, key)? {
                Some(v) => batch.insert(k.as_bytes(), v),
                None => batch.remove(k.as_bytes()),
            }
        }
        self.db.apply_batch(batch)?;
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_of_one_store_is_told_it_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = SledStore::open(&path).unwrap();
        let err = SledStore::open(&path).unwrap_err();
        assert!(matches!(err, Error::StoreInUse(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("locked by another l2mesh-broker"), "{text}");
        assert!(!text.contains("Os {"), "no Debug dump: {text}");
    }

    #[tokio::test]
    async fn state_round_trips_and_deletes_are_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db")).unwrap();
        let mut s = State::default();
        s.create_token("edge", "t1".into(), "sec", 60, 2, 0)
            .unwrap();
        s.join("t1", "sec", "edge", [3; 32], 1).unwrap();
        s.create_network("blue", 0, 0, "10.0.0.0/16", vec![], true, 0)
            .unwrap();
        s.create_network("red", 0, 0, "", vec![], true, 0).unwrap();
        s.request_networks("edge", vec!["blue".into()]).unwrap();
        let dirty = s.take_dirty();
        store.persist(&s, &dirty).await.unwrap();
        s.delete_network("red").unwrap();
        let dirty = s.take_dirty();
        store.persist(&s, &dirty).await.unwrap();
        drop(store);

        let store = SledStore::open(&dir.path().join("db")).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.tokens, s.tokens);
        assert_eq!(loaded.clusters, s.clusters);
        assert_eq!(loaded.networks, s.networks);
        assert_eq!(loaded.meta, s.meta);
        assert_eq!(loaded.tokens["t1"].uses_left, 1);
        assert_eq!(loaded.cluster_for_cert(&[3; 32]), Some("edge"));
        assert!(!loaded.networks.contains_key("red"));
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test -p l2mesh-broker --lib -- --ignored --nocapture flush_timing`
    #[tokio::test]
    #[ignore = "timing probe, not a test"]
    async fn flush_timing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db")).unwrap();
        let mut s = State::default();
        let t = std::time::Instant::now();
        for i in 0..50 {
            s.create_token("edge", format!("t{i}"), "sec", 60, 1, 0)
                .unwrap();
            let dirty = s.take_dirty();
            store.persist(&s, &dirty).await.unwrap();
        }
        println!("persist+flush: {:?} each", t.elapsed() / 50);
    }
}
