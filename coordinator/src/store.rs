//! The coordinator's durable state: one redb database holding the latest [`State`] as JSON,
//! replaced in a single transaction so a crash leaves either the old or the new state.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, TableDefinition};

use crate::State;

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("coordinator");
const KEY: &str = "state";

#[derive(Debug, thiserror::Error)]
#[error("coordinator state {path}: {message}")]
pub struct StoreError {
    path: PathBuf,
    message: String,
}

pub struct StateStore {
    db: Database,
    path: PathBuf,
}

impl StateStore {
    /// Opens (or creates) `dir/coordinator.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("coordinator.redb");
        let err = |e: &dyn std::fmt::Display| StoreError {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let db = Database::create(&path).map_err(|e| err(&e))?;
        Ok(Self { db, path })
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// The last saved state, if any.
    pub fn load(&self) -> Result<Option<State>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        let Some(value) = table.get(KEY).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| {
                self.error(format!(
                    "unreadable saved state ({e}); move the file away to start a new job"
                ))
            })
    }

    /// Replaces the saved state; durable when this returns.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state).map_err(|e| self.error(e))?;
        let tx = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| self.error(e))?;
            table
                .insert(KEY, bytes.as_slice())
                .map_err(|e| self.error(e))?;
        }
        tx.commit().map_err(|e| self.error(e))
    }
}
