//! `mooncake_p2p_store`: register, list, fetch and drop checkpoints of the P2P store from the command line.
//!
//! A checkpoint is a file read into memory or a synthetic buffer of a given size with a pattern derived from a
//! seed (`--synthetic`, checked by `get --verify-seed`). `register` and `get` keep serving the checkpoint for
//! `--hold-secs` (0: until killed), then leave the catalogue.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mooncake::{EngineConfig, HostBuffer, TransferEngine};
use mooncake_p2p_store::P2PStore;

#[derive(Parser)]
#[command(name = "mooncake_p2p_store", version, about = "P2P store: checkpoint distribution over the transfer engine")]
struct Cli {
    /// etcd endpoints of the catalogue, comma separated (host:port).
    #[arg(long, env = "MC_P2P_ETCD", default_value = "127.0.0.1:2379", value_delimiter = ',')]
    etcd: Vec<String>,
    /// This engine's server name (host or host:port).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The engine's metadata service (P2PHANDSHAKE, etcd://..., http://...).
    #[arg(long, default_value = "P2PHANDSHAKE")]
    metadata: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register a checkpoint with this process as its source and serve it.
    Register {
        /// Checkpoint name.
        name: String,
        /// File whose bytes are the checkpoint.
        #[arg(long, conflicts_with = "synthetic")]
        file: Option<std::path::PathBuf>,
        /// Synthetic checkpoint of this many bytes (suffixes K, M, G, KiB, MiB, GiB).
        #[arg(long, value_parser = parse_size)]
        synthetic: Option<u64>,
        /// Seed of the synthetic pattern.
        #[arg(long, default_value_t = 1)]
        seed: u8,
        /// Largest shard.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        shard_size: u64,
        /// Overwrite an existing catalogue entry of this name.
        #[arg(long)]
        force: bool,
        /// Seconds to serve before unregistering (0: until killed).
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
    },
    /// List checkpoints whose name starts with a prefix.
    List {
        /// Name prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Print the catalogue JSON of each.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a replica, become a holder, serve it, then delete the replica.
    Get {
        /// Checkpoint name.
        name: String,
        /// Write the bytes to this file.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Check the bytes against the synthetic pattern of this seed.
        #[arg(long)]
        verify_seed: Option<u8>,
        /// Seconds to serve as a holder before deleting the replica.
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
    },
    /// Remove a holder's replica locations from a checkpoint (clean-up after a reader that died).
    Delete {
        /// Checkpoint name.
        name: String,
        /// Segment name of the holder.
        #[arg(long)]
        segment: String,
    },
    /// Remove a source's (gold) locations from a checkpoint (clean-up after a source that died).
    Unregister {
        /// Checkpoint name.
        name: String,
        /// Segment name of the source.
        #[arg(long)]
        segment: String,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mul = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("size {s:?} overflows"))
}

/// The synthetic pattern repeats every `PERIOD` bytes.
const PERIOD: usize = 4096 * 256;

/// The synthetic checkpoint's byte at `i`.
fn synthetic_byte(i: usize, seed: u8) -> u8 {
    ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ seed
}

/// One period of the synthetic pattern.
fn period(seed: u8) -> Vec<u8> {
    (0..PERIOD).map(|i| synthetic_byte(i, seed)).collect()
}

/// `len` bytes of the synthetic pattern.
fn synthetic_bytes(len: usize, seed: u8) -> Vec<u8> {
    let p = period(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(PERIOD);
        out.extend_from_slice(&p[..n]);
    }
    out
}

/// The first byte of `bytes` that differs from the synthetic pattern.
fn first_difference(bytes: &[u8], seed: u8) -> Option<usize> {
    let p = period(seed);
    bytes.chunks(PERIOD).enumerate().find_map(|(k, chunk)| {
        (chunk != &p[..chunk.len()]).then(|| k * PERIOD + chunk.iter().zip(&p).position(|(a, b)| a != b).unwrap_or(0))
    })
}

fn hold(secs: u64) {
    if secs == 0 {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::thread::sleep(Duration::from_secs(secs));
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("mooncake_p2p_store: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    mooncake::link_all();
    let engine = || TransferEngine::new(EngineConfig::new(cli.host.clone(), cli.metadata.clone()));
    match cli.command {
        Command::Register { name, file, synthetic, seed, shard_size, force, hold_secs } => {
            let bytes = match (file, synthetic) {
                (Some(path), _) => std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                (None, Some(n)) => synthetic_bytes(n as usize, seed),
                (None, None) => return Err("give --file or --synthetic".into()),
            };
            let store = P2PStore::new(engine()?, &cli.etcd)?;
            let buf = HostBuffer::from_vec(bytes);
            store.register_buffers(&name, &[&buf], shard_size, force)?;
            println!("registered {name}: {} bytes from {}", buf.len(), store.engine().local_segment_name());
            hold(hold_secs);
            store.unregister(&name)?;
            println!("unregistered {name}");
        }
        Command::List { prefix, json } => {
            let store = P2PStore::new(engine()?, &cli.etcd)?;
            for p in store.list(&prefix)? {
                if json {
                    println!("{}", serde_json::to_string(&p)?);
                } else {
                    let replicas = p.shards.iter().map(|s| s.replica_list.len()).min().unwrap_or(0);
                    println!(
                        "{}\t{} bytes\t{} buffers\t{} shards of <= {}\t>= {replicas} replicas per shard",
                        p.name,
                        p.size,
                        p.size_list.len(),
                        p.shards.len(),
                        p.max_shard_size
                    );
                }
            }
        }
        Command::Get { name, out, verify_seed, hold_secs } => {
            let store = P2PStore::new(engine()?, &cli.etcd)?;
            let Some(p) = store.list(&name)?.into_iter().find(|p| p.name == name) else {
                return Err(mooncake_p2p_store::Error::NotFound(name).into());
            };
            let bufs: Vec<HostBuffer> = p.size_list.iter().map(|&n| HostBuffer::zeroed(n as usize)).collect();
            let refs: Vec<&HostBuffer> = bufs.iter().collect();
            let t = Instant::now();
            let report = store.get_replica_buffers(&name, &refs)?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "fetched {name}: {} bytes in {secs:.3} s ({:.2} GB/s), {} of {} shards from replicas, {} failed reads",
                p.size,
                p.size as f64 / secs / 1e9,
                report.shards_from_replicas(&p),
                p.shards.len(),
                report.failed_reads
            );
            let bytes: Vec<u8> = bufs.iter().map(HostBuffer::to_vec).collect::<Vec<_>>().concat();
            if let Some(seed) = verify_seed {
                if let Some(i) = first_difference(&bytes, seed) {
                    return Err(format!("byte {i} differs from the synthetic pattern of seed {seed}").into());
                }
                println!("verified {} bytes", bytes.len());
            }
            if let Some(path) = out {
                std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if hold_secs > 0 {
                hold(hold_secs);
            }
            store.delete_replica(&name)?;
        }
        Command::Delete { name, segment } => {
            P2PStore::new(engine()?, &cli.etcd)?.remove_holder(&name, &segment, false)?;
        }
        Command::Unregister { name, segment } => {
            P2PStore::new(engine()?, &cli.etcd)?.remove_holder(&name, &segment, true)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_pattern() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("3k"), Ok(3 << 10));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("1T").is_err() && parse_size("x").is_err());
        let mut b = synthetic_bytes(3 * PERIOD + 5, 2);
        assert_eq!(first_difference(&b, 2), None);
        b[2 * PERIOD + 7] ^= 1;
        assert_eq!(first_difference(&b, 2), Some(2 * PERIOD + 7));
    }
}
