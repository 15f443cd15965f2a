//! One request against the core.

use crate::master::MasterCore;
use crate::protocol::{Request, Response};

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
        Request::GetAllSegments => Response::Segments(core.segments()),
        Request::QueryKey { key } => Response::Key(core.query_key(&key)),
        Request::Stats => Response::Stats(core.stats()),
    }
}
