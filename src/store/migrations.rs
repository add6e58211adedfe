//! The schema's version: applying the migrations (as a role with DDL rights), and, for
//! a role without them, reading which migrations the database has and which this
//! binary expects, so `run` can refuse to start on a schema it was not built for
//! (contract §4) instead of failing later on a missing table or column.
//!
//! The migration table is sqlx's `_sqlx_migrations` (version, success, checksum); the
//! comparison follows sqlx's own rules, so the check and `migrate` agree on what is
//! pending, modified or unknown.

use std::collections::BTreeMap;

use super::{Store, StoreError};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A migration, by version and description (its file name without the version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationName {
    pub version: i64,
    pub description: String,
}

impl std::fmt::Display for MigrationName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}_{}",
            self.version,
            self.description.replace(' ', "_")
        )
    }
}

/// How the database's applied migrations compare with this binary's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationStatus {
    /// This binary's migrations the database has not applied, oldest first.
    pub pending: Vec<MigrationName>,
    /// Migrations applied but left failed (`success = false`).
    pub failed: Vec<i64>,
    /// Migrations applied from a different file than this binary's (checksum).
    pub modified: Vec<MigrationName>,
    /// Migrations applied that this binary does not know (a newer binary ran).
    pub unknown: Vec<i64>,
}

impl MigrationStatus {
    /// Whether the schema is exactly the one this binary was built for.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
            && self.failed.is_empty()
            && self.modified.is_empty()
            && self.unknown.is_empty()
    }
}

impl Store {
    /// Applies the pending migrations (needs DDL rights).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether this connection's role may create objects in the schema migrations
    /// create theirs in (the first schema of its `search_path`): the DDL right that
    /// tells the owner role from the runtime role. No such schema: no right.
    pub async fn may_migrate(&self) -> Result<bool, StoreError> {
        let may: bool = sqlx::query_scalar(
            "SELECT COALESCE(has_schema_privilege(current_schema(), 'CREATE'), false)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(may)
    }

    /// The role and schema this connection works as, for messages.
    pub async fn role_and_schema(&self) -> Result<(String, Option<String>), StoreError> {
        Ok(
            sqlx::query_as("SELECT current_user::text, current_schema()::text")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Compares the database's migration table with this binary's migrations, reading
    /// only (a role without DDL rights may do this). No migration table: every
    /// migration is pending.
    pub async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        let mut connection = self.connection().await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *connection)
            .await?;
        let applied: Vec<(i64, bool, Vec<u8>)> = if exists {
            sqlx::query_as(
                "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
            )
            .fetch_all(&mut *connection)
            .await?
        } else {
            Vec::new()
        };
        Ok(compare(&applied))
    }
}

/// What [`Store::migration_status`] reports for these applied rows
/// (version, success, checksum).
fn compare(applied: &[(i64, bool, Vec<u8>)]) -> MigrationStatus {
    let applied: BTreeMap<i64, (bool, &[u8])> = applied
        .iter()
        .map(|(version, success, checksum)| (*version, (*success, checksum.as_slice())))
        .collect();
    let mut status = MigrationStatus::default();
    for migration in MIGRATOR.iter() {
        if migration.migration_type.is_down_migration() {
            continue;
        }
        let name = MigrationName {
            version: migration.version,
            description: migration.description.to_string(),
        };
        match applied.get(&migration.version) {
            None => status.pending.push(name),
            Some((false, _)) => status.failed.push(migration.version),
            Some((true, checksum)) if *checksum != &*migration.checksum => {
                status.modified.push(name);
            }
            Some(_) => {}
        }
    }
    status.unknown = applied
        .keys()
        .filter(|version| !MIGRATOR.version_exists(**version))
        .copied()
        .collect();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied_all() -> Vec<(i64, bool, Vec<u8>)> {
        MIGRATOR
            .iter()
            .map(|m| (m.version, true, m.checksum.to_vec()))
            .collect()
    }

    #[test]
    fn every_migration_applied_is_current() {
        assert!(compare(&applied_all()).is_current());
    }

    #[test]
    fn a_fresh_database_has_every_migration_pending() {
        let status = compare(&[]);
        assert_eq!(status.pending.len(), MIGRATOR.iter().count());
        assert_eq!(status.pending[0].to_string(), "0001_initial");
    }

    #[test]
    fn missing_failed_modified_and_unknown_migrations_are_told_apart() {
        let mut applied = applied_all();
        let last = applied.pop().expect("migrations");
        applied[0].2 = vec![0; 48];
        applied[1].1 = false;
        applied.push((9_999, true, vec![1]));
        let status = compare(&applied);
        assert_eq!(
            status.pending,
            vec![MigrationName {
                version: last.0,
                description: MIGRATOR
                    .iter()
                    .last()
                    .expect("last")
                    .description
                    .to_string(),
            }]
        );
        assert_eq!(status.modified[0].version, applied[0].0);
        assert_eq!(status.failed, vec![applied[1].0]);
        assert_eq!(status.unknown, vec![9_999]);
        assert!(!status.is_current());
    }
}
