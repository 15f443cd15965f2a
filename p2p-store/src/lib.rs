//! P2P store: distributes a checkpoint (model weights, any set of large buffers) from one process to many over
//! the transfer engine, readers serving each other.
//!
//! A source registers its buffers under a name ([`P2PStore::register_buffers`], or [`P2PStore::register`] over
//! raw addresses): they are registered with the engine and cut into shards of at most `max_shard_size` bytes, and
//! the catalogue in etcd records each shard's location (`mooncake/checkpoint/<name>`, the JSON layout of upstream
//! Mooncake's Go `p2pstore`, so both read and write the same catalogue). A reader's
//! [`P2PStore::get_replica_buffers`] (or the raw-address [`P2PStore::get_replica`]) reads every shard from some
//! holder, preferring readers that already hold it over the source, skips holders that fail, and then adds itself
//! to every shard's holders with a compare-and-swap, so later readers can read from it. See `docs/p2p-store.md`.
//!
//! ```no_run
//! use mooncake::{EngineConfig, HostBuffer, TransferEngine};
//! use mooncake_p2p_store::P2PStore;
//! # fn main() -> mooncake_p2p_store::Result<()> {
//! mooncake::link_all();
//! let engine = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE"))?;
//! let store = P2PStore::new(engine, &["127.0.0.1:2379".to_string()])?;
//! let weights = HostBuffer::from_vec(vec![7u8; 64 << 20]);
//! store.register_buffers("model/step-100", &[&weights], 16 << 20, false)?;
//! for p in store.list("model/")? {
//!     println!("{} {} bytes in {} shards", p.name, p.size, p.shards.len());
//! }
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

pub mod catalogue;
mod error;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mooncake::{HostBuffer, Opcode, TransferEngine};

pub use catalogue::{Catalogue, KEY_PREFIX, Location, Payload, Shard, shard_layout};
pub use error::{Error, Result};

/// Where memory is registered (host memory).
const LOCATION: &str = "cpu:0";

/// Settings of a store.
#[derive(Debug, Clone)]
pub struct Options {
    /// Shards fetched at once by one `get_replica`.
    pub fetch_threads: usize,
    /// Compare-and-swap attempts before [`Error::CasConflict`].
    pub cas_attempts: u32,
    /// Times `get_replica` re-reads shards whose holder left the catalogue while it read them.
    pub recheck_rounds: u32,
    /// Spread reads over every holder, the source included (rotated per shard), instead of reading from readers
    /// first and the source last.
    pub include_source: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { fetch_threads: 4, cas_attempts: 32, recheck_rounds: 3, include_source: false }
    }
}

/// What this process holds of a checkpoint (upstream's local catalog).
#[derive(Debug, Clone)]
struct Held {
    gold: bool,
    addrs: Vec<u64>,
}

/// How one `get_replica` went.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Segment each shard was read from, by shard index.
    pub shard_sources: Vec<String>,
    /// Reads that failed and were retried at another holder.
    pub failed_reads: usize,
    /// Compare-and-swap attempts that lost to another writer.
    pub cas_retries: u32,
}

impl FetchReport {
    /// Shards read from a holder other than the checkpoint's gold (source) locations in `payload`.
    pub fn shards_from_replicas(&self, payload: &Payload) -> usize {
        self.shard_sources
            .iter()
            .zip(&payload.shards)
            .filter(|(src, shard)| !shard.gold.iter().any(|l| &l.segment_name == *src))
            .count()
    }
}

/// The P2P store of one process: its engine, the etcd catalogue and what it holds.
pub struct P2PStore {
    engine: TransferEngine,
    catalogue: Catalogue,
    runtime: tokio::runtime::Runtime,
    held: Mutex<HashMap<String, Held>>,
    options: Options,
}

/// The buffers of one call: raw ranges (registered by the caller's promise) or host buffers.
enum Buffers<'a> {
    Host(&'a [&'a HostBuffer]),
    /// Ranges the caller of an `unsafe` entry point vouched for.
    Raw(&'a [(u64, u64)]),
}

impl Buffers<'_> {
    fn ranges(&self) -> Vec<(u64, u64)> {
        match self {
            Buffers::Host(b) => b.iter().map(|b| (b.addr(), b.len())).collect(),
            Buffers::Raw(r) => r.to_vec(),
        }
    }

    fn register(&self, engine: &TransferEngine) -> Result<()> {
        match self {
            Buffers::Host(bufs) => {
                let mut done = Vec::new();
                for b in bufs.iter() {
                    if let Err(e) = engine.register_owned(b.owned(), LOCATION) {
                        let _ = engine.unregister_memory_batch(&done);
                        return Err(e.into());
                    }
                    done.push(b.addr());
                }
                Ok(())
            }
            #[allow(unsafe_code)]
            // SAFETY: `Raw` is built only by `P2PStore::register` and `P2PStore::get_replica`, whose callers promise
            // what `register_memory_batch` requires (their `# Safety`).
            Buffers::Raw(r) => unsafe { engine.register_memory_batch(r, LOCATION) }.map_err(Error::from),
        }
    }
}

impl P2PStore {
    /// A store over `engine` with its catalogue in etcd at `endpoints` (`host:port`).
    pub fn new(engine: TransferEngine, endpoints: &[String]) -> Result<Self> {
        Self::with_options(engine, endpoints, Options::default())
    }

    /// [`P2PStore::new`] with settings.
    pub fn with_options(engine: TransferEngine, endpoints: &[String], options: Options) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument("no etcd endpoint".into()));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::InvalidArgument(format!("runtime: {e}")))?;
        let catalogue = runtime.block_on(Catalogue::connect(endpoints))?;
        Ok(P2PStore { engine, catalogue, runtime, held: Mutex::new(HashMap::new()), options })
    }

    /// The engine (its segment name is what the catalogue records).
    pub fn engine(&self) -> &TransferEngine {
        &self.engine
    }

    /// The catalogue, for direct reads.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    fn segment(&self) -> String {
        self.engine.local_segment_name().to_string()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `buffers` as checkpoint `name` cut into shards of at most `max_shard_size` bytes, with this
    /// process as their source (`gold`). Without `force` an existing name fails with [`Error::AlreadyExists`];
    /// with it the entry is overwritten (upstream's `forceCreate`). The buffers stay registered with the engine
    /// (held by it) until [`P2PStore::unregister`].
    pub fn register_buffers(
        &self,
        name: &str,
        buffers: &[&HostBuffer],
        max_shard_size: u64,
        force: bool,
    ) -> Result<()> {
        self.register_impl(name, Buffers::Host(buffers), max_shard_size, force)
    }

    /// [`P2PStore::register_buffers`] over raw `(address, length)` ranges of host memory (upstream's
    /// `Register(ctx, name, addrList, sizeList, maxShardSize, location, forceCreate)` for `cpu` memory).
    ///
    /// # Safety
    /// Each range must be host memory of this process, mapped readable and writable, that stays mapped until
    /// [`P2PStore::unregister`] for `name` returns `Ok` (or this call fails); peers read it at any time meanwhile.
    #[allow(unsafe_code)]
    pub unsafe fn register(&self, name: &str, buffers: &[(u64, u64)], max_shard_size: u64, force: bool) -> Result<()> {
        self.register_impl(name, Buffers::Raw(buffers), max_shard_size, force)
    }

    fn register_impl(&self, name: &str, buffers: Buffers<'_>, max_shard_size: u64, force: bool) -> Result<()> {
        let ranges = buffers.ranges();
        check_args(name, &ranges)?;
        if max_shard_size == 0 {
            return Err(Error::InvalidArgument("max_shard_size is 0".into()));
        }
        if self.held().contains_key(name) {
            return Err(Error::AlreadyOpened(name.into()));
        }
        let sizes: Vec<u64> = ranges.iter().map(|r| r.1).collect();
        let segment = self.segment();
        let shards = shard_layout(&sizes, max_shard_size)
            .into_iter()
            .map(|(i, off, len)| Shard {
                size: len,
                gold: vec![Location { segment_name: segment.clone(), offset: ranges[i].0 + off }],
                replica_list: Vec::new(),
            })
            .collect();
        let payload = Payload { name: name.into(), size: sizes.iter().sum(), size_list: sizes, max_shard_size, shards };
        buffers.register(&self.engine)?;
        let addrs: Vec<u64> = ranges.iter().map(|r| r.0).collect();
        let published = if force {
            self.runtime.block_on(self.catalogue.put(&payload)).map(|_| true)
        } else {
            self.runtime.block_on(self.catalogue.create(&payload))
        };
        match published {
            Ok(true) => {
                self.held().insert(name.into(), Held { gold: true, addrs });
                Ok(())
            }
            Ok(false) => {
                let _ = self.engine.unregister_memory_batch(&addrs);
                Err(Error::AlreadyExists(name.into()))
            }
            Err(e) => {
                let _ = self.engine.unregister_memory_batch(&addrs);
                Err(e)
            }
        }
    }

    /// Removes this process as the source of `name` (its gold locations; the key goes when no holder is left)
    /// and unregisters its buffers.
    pub fn unregister(&self, name: &str) -> Result<()> {
        self.leave(name, true)
    }

    /// Removes this process's replica of `name` from the catalogue and unregisters its buffers.
    pub fn delete_replica(&self, name: &str) -> Result<()> {
        self.leave(name, false)
    }

    fn leave(&self, name: &str, gold: bool) -> Result<()> {
        let held = match self.held().get(name) {
            Some(h) if h.gold == gold => h.clone(),
            _ => return Err(Error::NotOpened(name.into())),
        };
        let segment = self.segment();
        let result = self.cas_loop(name, |p| {
            for s in &mut p.shards {
                let list = if gold { &mut s.gold } else { &mut s.replica_list };
                list.retain(|l| l.segment_name != segment);
            }
        });
        // Gone from the catalogue (or never there any more): either way this process stops holding it.
        if result.is_ok() || matches!(result, Err(Error::NotFound(_))) {
            self.held().remove(name);
            self.engine.unregister_memory_batch(&held.addrs)?;
        }
        result.map(|_| ())
    }

    /// Reads `name`, applies `edit` and writes it back if nobody wrote in between; retries with the fresh
    /// value up to `cas_attempts` times. Returns the retries spent.
    fn cas_loop(&self, name: &str, mut edit: impl FnMut(&mut Payload)) -> Result<u32> {
        for attempt in 0..self.options.cas_attempts {
            let Some((mut payload, rev)) = self.runtime.block_on(self.catalogue.get(name))? else {
                return Err(Error::NotFound(name.into()));
            };
            edit(&mut payload);
            if self.runtime.block_on(self.catalogue.update(&payload, rev))? {
                return Ok(attempt);
            }
            std::thread::sleep(Duration::from_millis(1 + u64::from(attempt) * 2));
        }
        Err(Error::CasConflict { name: name.into(), attempts: self.options.cas_attempts })
    }

    /// Removes another process's locations from `name` (its `gold` ones, or its replicas): clean-up after a
    /// holder that died without leaving the catalogue. The key goes when no holder is left.
    pub fn remove_holder(&self, name: &str, segment: &str, gold: bool) -> Result<()> {
        self.cas_loop(name, |p| {
            for s in &mut p.shards {
                let list = if gold { &mut s.gold } else { &mut s.replica_list };
                list.retain(|l| l.segment_name != segment);
            }
        })
        .map(|_| ())
    }

    /// Checkpoints whose name starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<Payload>> {
        self.runtime.block_on(self.catalogue.list(prefix))
    }

    /// Fetches checkpoint `name` into `buffers` (the same sizes as the source registered, in order), reading
    /// every shard from some holder: readers that hold it first (rotated per shard to spread load), the source
    /// last. A holder that fails is skipped and the shard read from the next. Then this process becomes a
    /// holder of every shard (compare-and-swap) and keeps the buffers registered until
    /// [`P2PStore::delete_replica`].
    pub fn get_replica_buffers(&self, name: &str, buffers: &[&HostBuffer]) -> Result<FetchReport> {
        self.get_replica_impl(name, Buffers::Host(buffers))
    }

    /// [`P2PStore::get_replica_buffers`] into raw `(address, length)` ranges of host memory (upstream's
    /// `GetReplica(ctx, name, addrList, sizeList)`).
    ///
    /// # Safety
    /// Each range must be host memory of this process, mapped readable and writable, that stays mapped until
    /// [`P2PStore::delete_replica`] for `name` returns `Ok` (or this call fails); it is written by the engine
    /// during the call and read by peers afterwards, so the caller keeps no Rust reference to it meanwhile.
    #[allow(unsafe_code)]
    pub unsafe fn get_replica(&self, name: &str, buffers: &[(u64, u64)]) -> Result<FetchReport> {
        self.get_replica_impl(name, Buffers::Raw(buffers))
    }

    fn get_replica_impl(&self, name: &str, buffers: Buffers<'_>) -> Result<FetchReport> {
        let ranges = buffers.ranges();
        check_args(name, &ranges)?;
        if self.held().contains_key(name) {
            return Err(Error::AlreadyOpened(name.into()));
        }
        let Some((payload, _)) = self.runtime.block_on(self.catalogue.get(name))? else {
            return Err(Error::NotFound(name.into()));
        };
        let sizes: Vec<u64> = ranges.iter().map(|r| r.1).collect();
        if sizes != payload.size_list {
            return Err(Error::SizeMismatch {
                name: name.into(),
                what: format!("buffer sizes {sizes:?}, the checkpoint has {:?}", payload.size_list),
            });
        }
        let layout = shard_layout(&sizes, payload.max_shard_size);
        if layout.len() != payload.shards.len() || layout.iter().zip(&payload.shards).any(|(l, s)| l.2 != s.size) {
            return Err(Error::SizeMismatch {
                name: name.into(),
                what: format!("{} shards here, {} in the catalogue", layout.len(), payload.shards.len()),
            });
        }
        let locals: Vec<u64> = layout.iter().map(|&(i, off, _)| ranges[i].0 + off).collect();
        buffers.register(&self.engine)?;
        let addrs: Vec<u64> = ranges.iter().map(|r| r.0).collect();
        let result = self.fetch_and_publish(name, payload, &locals);
        match result {
            Ok(report) => {
                self.held().insert(name.into(), Held { gold: false, addrs });
                Ok(report)
            }
            Err(e) => {
                let _ = self.engine.unregister_memory_batch(&addrs);
                Err(e)
            }
        }
    }

    fn fetch_and_publish(&self, name: &str, mut payload: Payload, locals: &[u64]) -> Result<FetchReport> {
        let me = self.segment();
        let mut report =
            FetchReport { shard_sources: vec![String::new(); payload.shards.len()], ..FetchReport::default() };
        let mut todo: Vec<usize> = (0..payload.shards.len()).collect();
        for round in 0..=self.options.recheck_rounds {
            self.fetch_shards(name, &payload, locals, &todo, &me, &mut report)?;
            // A holder that left the catalogue while we read may have freed the memory: read those shards again.
            let Some((fresh, _)) = self.runtime.block_on(self.catalogue.get(name))? else {
                return Err(Error::NotFound(name.into()));
            };
            if fresh.shards.len() != payload.shards.len() {
                return Err(Error::SizeMismatch { name: name.into(), what: "re-registered while reading".into() });
            }
            todo = (0..fresh.shards.len())
                .filter(|&i| {
                    let s = &fresh.shards[i];
                    !s.gold.iter().chain(&s.replica_list).any(|l| l.segment_name == report.shard_sources[i])
                })
                .collect();
            payload = fresh;
            if todo.is_empty() {
                break;
            }
            if round == self.options.recheck_rounds {
                return Err(Error::NoHolder {
                    name: name.into(),
                    shard: todo[0],
                    holders: payload.shards[todo[0]].holders(),
                    last: "holders kept leaving the catalogue while it was read".into(),
                });
            }
        }
        report.cas_retries = self.cas_loop(name, |p| {
            for (shard, &local) in p.shards.iter_mut().zip(locals) {
                let loc = Location { segment_name: me.clone(), offset: local };
                if !shard.replica_list.contains(&loc) {
                    shard.replica_list.push(loc);
                }
            }
        })?;
        Ok(report)
    }

    fn fetch_shards(
        &self,
        name: &str,
        payload: &Payload,
        locals: &[u64],
        todo: &[usize],
        me: &str,
        report: &mut FetchReport,
    ) -> Result<()> {
        let next = AtomicUsize::new(0);
        let seed = random_seed();
        let results: Mutex<Vec<(usize, Result<String>)>> = Mutex::new(Vec::new());
        let failed = AtomicUsize::new(0);
        let workers = self.options.fetch_threads.clamp(1, todo.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = todo.get(k) else { break };
                        let shard = &payload.shards[i];
                        let r = self.fetch_one(name, i, shard, locals[i], me, seed, &failed);
                        results.lock().unwrap_or_else(|p| p.into_inner()).push((i, r));
                    }
                });
            }
        });
        report.failed_reads += failed.into_inner();
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|r| r.0);
        for (i, r) in results {
            report.shard_sources[i] = r?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch_one(
        &self,
        name: &str,
        index: usize,
        shard: &Shard,
        local: u64,
        me: &str,
        seed: usize,
        failed: &AtomicUsize,
    ) -> Result<String> {
        let candidates = holder_order(shard, me, seed.wrapping_add(index), self.options.include_source);
        let mut last = String::from("no holder listed");
        for loc in &candidates {
            match self.engine.transfer_sync(&loc.segment_name, Opcode::Read, local, loc.offset, shard.size) {
                Ok(()) => return Ok(loc.segment_name.clone()),
                Err(e) => {
                    tracing::warn!(checkpoint = name, shard = index, holder = %loc.segment_name, error = %e,
                        "reading a shard failed; trying the next holder");
                    failed.fetch_add(1, Ordering::Relaxed);
                    last = format!("{}: {e}", loc.segment_name);
                }
            }
        }
        Err(Error::NoHolder { name: name.into(), shard: index, holders: candidates.len(), last })
    }
}

/// The order in which to try a shard's holders: replicas other than `me`, rotated by `turn` so that readers and
/// shards spread over them, then the gold locations (also rotated). With `include_source` the rotation runs over
/// all holders together, so the source takes its share of first choices.
pub fn holder_order(shard: &Shard, me: &str, turn: usize, include_source: bool) -> Vec<Location> {
    let rotate = |list: &[Location]| -> Vec<Location> {
        let list: Vec<Location> = list.iter().filter(|l| l.segment_name != me).cloned().collect();
        if list.is_empty() {
            return list;
        }
        let k = turn % list.len();
        list[k..].iter().chain(&list[..k]).cloned().collect()
    };
    if include_source {
        let all: Vec<Location> = shard.replica_list.iter().chain(&shard.gold).cloned().collect();
        return rotate(&all);
    }
    let mut order = rotate(&shard.replica_list);
    order.extend(rotate(&shard.gold));
    order
}

fn check_args(name: &str, ranges: &[(u64, u64)]) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("empty checkpoint name".into()));
    }
    if ranges.is_empty() {
        return Err(Error::InvalidArgument("no buffer".into()));
    }
    if let Some(i) = ranges.iter().position(|r| r.1 == 0) {
        return Err(Error::InvalidArgument(format!("buffer {i} has length 0")));
    }
    Ok(())
}

fn random_seed() -> usize {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now()) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Location {
        Location { segment_name: s.into(), offset: 0 }
    }

    #[test]
    fn replicas_first_without_self() {
        let shard = Shard { size: 1, gold: vec![loc("src")], replica_list: vec![loc("a"), loc("me"), loc("b")] };
        let names = |t| holder_order(&shard, "me", t, false).into_iter().map(|l| l.segment_name).collect::<Vec<_>>();
        assert_eq!(names(0), ["a", "b", "src"]);
        assert_eq!(names(1), ["b", "a", "src"]);
        let lone = Shard { size: 1, gold: vec![loc("src")], replica_list: vec![] };
        assert_eq!(holder_order(&lone, "me", 5, false)[0].segment_name, "src");
        let all = holder_order(&shard, "me", 2, true).into_iter().map(|l| l.segment_name).collect::<Vec<_>>();
        assert_eq!(all, ["src", "a", "b"]);
    }
}
