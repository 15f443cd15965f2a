//! One request against the core.

use std::time::{SystemTime, UNIX_EPOCH};

use mooncake_store_core::master::{MasterCore, TaskInfo};
use mooncake_store_core::protocol::{Request, Response};

/// Runs `request` on `core`.
pub(crate) fn dispatch(core: &mut MasterCore, request: Request) -> Response {
    match request {
        Request::Ping { client } => Response::Ping(core.ping(client)),
        Request::MountSegment { client, segment } => Response::Done(core.mount_segment(client, segment)),
        Request::UnmountSegment { client, name } => Response::Done(core.unmount_segment(client, &name)),
        Request::ReportUnreachable { target } => Response::Done(core.report_unreachable(&target)),
        Request::Exist { keys } => Response::Exist(core.batch_exist(&keys)),
        Request::GetReplicaList { keys } => Response::Replicas(core.batch_get_replica_list(&keys)),
        Request::GetSize { keys } => Response::Sizes(keys.iter().map(|k| core.get_size(k)).collect()),
        Request::PutStart { client, items, config, upsert: false } => {
            Response::Placed(core.batch_put_start(client, &items, &config))
        }
        Request::PutStart { client, items, config, upsert: true } => {
            Response::Placed(core.batch_upsert_start(client, &items, &config))
        }
        Request::PutEnd { client, keys } => Response::PerKey(core.batch_put_end(client, &keys)),
        Request::PutRevoke { client, keys } => Response::PerKey(core.batch_put_revoke(client, &keys)),
        Request::Remove { keys, force } => Response::PerKey(core.batch_remove(&keys, force)),
        Request::RemoveByRegex { pattern, force } => Response::Count(core.remove_by_regex(&pattern, force)),
        Request::RemoveAll { force } => Response::Count(Ok(core.remove_all(force))),
        Request::ReplicaClear { keys, segment } => Response::Keys(core.replica_clear(&keys, &segment)),
        Request::GetAllSegments => Response::Segments(core.segments()),
        Request::QueryKey { key } => Response::Key(core.query_key(&key)),
        Request::Stats => Response::Stats(core.stats()),
        Request::CreateCopyTask { key, targets } => Response::Task(core.create_copy_task(&key, &targets)),
        Request::CreateMoveTask { key, source, target } => {
            Response::Task(core.create_move_task(&key, &source, &target))
        }
        Request::QueryTask { id } => Response::TaskInfo(core.query_task(id).map(|info| in_epoch_ms(core, info))),
        Request::FetchTasks { client, max } => Response::Tasks(core.fetch_tasks(client, max as usize)),
        Request::CompleteTask { client, id, ok, message } => {
            Response::Done(core.complete_task(client, id, ok, &message))
        }
        Request::CopyStart { client, id } => Response::CopyPlan(core.copy_start(client, id)),
        Request::CopyEnd { client, id } => Response::Done(core.copy_end(client, id)),
        Request::CopyRevoke { client, id } => Response::Done(core.copy_revoke(client, id)),
    }
}

/// `info` with its times (the core's clock) turned into milliseconds since the Unix epoch, as upstream reports.
fn in_epoch_ms(core: &MasterCore, mut info: TaskInfo) -> TaskInfo {
    let epoch_now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let core_now = core.now_ms();
    let to_epoch = |t: u64| epoch_now.saturating_sub(core_now.saturating_sub(t));
    info.created_at_ms = to_epoch(info.created_at_ms);
    info.updated_at_ms = to_epoch(info.updated_at_ms);
    info
}
