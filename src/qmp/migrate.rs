//! Saving and loading a RAM snapshot over QMP: migration to and from a descriptor that vial
//! passes (`getfd`, then `migrate fd:` or `migrate-incoming fd:`), polled until it completes;
//! and QEMU's version, which a snapshot records because a migration stream loads only into
//! the QEMU that wrote it.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use serde::Deserialize;

use super::{Qmp, QmpError};

/// The name the migration stream's descriptor has in QEMU's table while it is in use.
const STREAM_FD: &str = "vmstate";

/// How a migration ended, from `query-migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationDone {
    /// How long QEMU says it took (`total-time`, ms), when it says.
    pub total_ms: Option<u64>,
}

/// The part of `query-migrate`'s reply vial reads. Decoded by hand rather than as
/// `qapi::qmp::MigrationInfo`, whose nested statistics carry fields newer than QEMU 7.2 as
/// required ones.
#[derive(Deserialize)]
struct MigrateReply {
    #[serde(default)]
    status: Option<String>,
    #[serde(rename = "error-desc", default)]
    error_desc: Option<String>,
    #[serde(rename = "total-time", default)]
    total_time: Option<u64>,
}

impl Qmp {
    /// QEMU's version as `query-version` gives it, the way a snapshot records it:
    /// `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub async fn qemu_version(&self) -> Result<String, QmpError> {
        let version = self.execute(qapi::qmp::query_version {}).await?;
        let q = version.qemu;
        let number = format!("{}.{}.{}", q.major, q.minor, q.micro);
        let package = version.package.trim();
        Ok(if package.is_empty() { number } else { format!("{number} ({package})") })
    }

    /// Saves the guest into `stream` (`migrate fd:`) and waits until the migration
    /// completes, polling every `poll` for up to `timeout`. The guest stays stopped afterwards.
    pub async fn migrate_to(
        &self,
        stream: BorrowedFd<'_>,
        poll: Duration,
        timeout: Duration,
    ) -> Result<MigrationDone, QmpError> {
        let uri = Some(self.pass_stream(stream).await?);
        self.execute(qapi::qmp::migrate { uri, channels: None, detach: None, resume: None }).await?;
        self.wait_migration(poll, timeout).await
    }

    /// Loads a guest saved by [`Qmp::migrate_to`] from `stream` into a QEMU started with
    /// `-incoming defer` (`migrate-incoming fd:`), and waits until it is loaded. The guest
    /// stays paused until `cont`.
    pub async fn migrate_from(
        &self,
        stream: BorrowedFd<'_>,
        poll: Duration,
        timeout: Duration,
    ) -> Result<MigrationDone, QmpError> {
        let uri = Some(self.pass_stream(stream).await?);
        self.execute(qapi::qmp::migrate_incoming { uri, channels: None, exit_on_error: None }).await?;
        self.wait_migration(poll, timeout).await
    }

    /// Passes the migration stream to QEMU; its `fd:` URI.
    async fn pass_stream(&self, stream: BorrowedFd<'_>) -> Result<String, QmpError> {
        self.getfd(STREAM_FD, stream).await?;
        Ok(format!("fd:{STREAM_FD}"))
    }

    /// Resumes the vCPUs (`cont`).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute(qapi::qmp::cont {}).await.map(drop)
    }

    /// Waits until the current migration (outgoing `migrate` or incoming `migrate-incoming`)
    /// completes, polling `query-migrate` every `poll`. `failed` or `cancelled` is an error
    /// with QEMU's description; a QEMU that exits instead (an incoming migration that fails to
    /// load ends QEMU 7.2) gives `Closed`.
    async fn wait_migration(&self, poll: Duration, timeout: Duration) -> Result<MigrationDone, QmpError> {
        const NAME: &str = "query-migrate";
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.execute_raw(NAME, serde_json::Value::Null).await?;
            let info: MigrateReply = serde_json::from_value(value)
                .map_err(|source| QmpError::Decode { command: NAME.to_string(), source })?;
            let status = info.status.unwrap_or_else(|| "none".into());
            match status.as_str() {
                "completed" => return Ok(MigrationDone { total_ms: info.total_time }),
                "failed" | "cancelled" => {
                    let desc = info.error_desc.unwrap_or_else(|| "no description".into());
                    return Err(QmpError::Migration { status, desc });
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::MigrationTimeout { timeout, status })
                }
                _ => tokio::time::sleep(poll).await,
            }
        }
    }
}
