//! The data plane once QEMU runs, on its own task: link events (a late link stitched and
//! hot-plugged, a vanished one unplugged, a carrier change) and the plumbing check. An unplug
//! waits up to 10 s for the guest to release its NIC, and netlink and QMP round trips take
//! their time; none of it holds the supervision loop, so a stop, QEMU's death and QMP events
//! are seen while it runs. The task owns the [`DataPlane`] and hands it back when it finishes,
//! for the supervisor's teardown.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Profile;
use crate::net::dataplane::DataPlane;
use crate::qmp::Qmp;
use crate::status::{Phase, Status};

/// How often the data plane's kernel objects are checked once the guest is ready.
const PLUMBING_CHECK: Duration = Duration::from_secs(2);

/// How long [`LinkTask::finish`] waits for the step in progress. QEMU is gone by then, so
/// a QMP step fails at once; netlink steps take milliseconds.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The running data plane's task, and the way to give it QMP and take the plane back.
pub(super) struct LinkTask {
    qmp: mpsc::UnboundedSender<Qmp>,
    task: JoinHandle<DataPlane>,
}

impl LinkTask {
    /// Starts following `plane`'s links. Link events wait until [`LinkTask::give_qmp`] (a
    /// link change needs QMP); the plumbing check runs while health says `ready` or `unready`.
    pub(super) fn spawn(plane: DataPlane, status: watch::Sender<Status>, profile: Profile, name: String) -> LinkTask {
        let (qmp, commands) = mpsc::unbounded_channel();
        let task = tokio::spawn(follow(plane, commands, status, profile, name));
        LinkTask { qmp, task }
    }

    /// QMP is negotiated: the VM's NICs get the carrier their links have, and link events
    /// are carried out from now on.
    pub(super) fn give_qmp(&self, handle: Qmp) {
        let _ = self.qmp.send(handle);
    }

    /// Ends the task once the step in progress is done and returns the data plane, or `None`
    /// (logged) when the step did not end in time or the task failed: then what it stitched
    /// is left for the next start's clean-up (`plumb::remove_leftovers`).
    pub(super) async fn finish(self) -> Option<DataPlane> {
        let LinkTask { qmp, mut task } = self;
        drop(qmp);
        match tokio::time::timeout(FINISH_TIMEOUT, &mut task).await {
            Ok(Ok(plane)) => Some(plane),
            Ok(Err(err)) => {
                tracing::error!(%err, "the data plane's task failed; its plumbing is left for the next start to remove");
                None
            }
            Err(_) => {
                task.abort();
                tracing::error!(timeout = ?FINISH_TIMEOUT, "a link change did not end in time; its plumbing is left for the next start to remove");
                None
            }
        }
    }
}

/// The task: one link change or plumbing check at a time, until the supervisor lets go of
/// its sender.
async fn follow(
    mut plane: DataPlane,
    mut commands: mpsc::UnboundedReceiver<Qmp>,
    status: watch::Sender<Status>,
    profile: Profile,
    name: String,
) -> DataPlane {
    let mut phase = status.subscribe();
    let mut qmp: Option<Qmp> = None;
    let mut watching = true;
    let mut check = tokio::time::interval(PLUMBING_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let checking = matches!(phase.borrow_and_update().phase, Phase::Ready | Phase::Unready);
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(handle) => {
                    plane.sync_carrier(&handle).await;
                    qmp = Some(handle);
                }
                None => return plane,
            },
            event = plane.next_event(), if qmp.is_some() && watching => match (event, &qmp) {
                (Ok(event), Some(handle)) => {
                    plane.on_event(event, handle, &profile, &name).await;
                    status.send_modify(|status| status.links = plane.statuses());
                }
                // The running data plane stays as it is; only changes are no longer seen.
                (Err(err), _) => {
                    tracing::warn!(%err, "link events stopped; the links stay stitched, but late links will not be plugged");
                    watching = false;
                    status.send_modify(|status| {
                        status.links_note = Some(format!(
                            "link events stopped ({err}): links that arrive or leave from now on are not seen"
                        ));
                    });
                }
                (Ok(_), None) => {}
            },
            _ = check.tick(), if checking => {
                if plane.check_plumbing().await {
                    status.send_modify(|status| status.links = plane.statuses());
                }
            }
            // A phase change decides whether the check runs.
            Ok(()) = phase.changed() => {}
        }
    }
}
