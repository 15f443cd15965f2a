//! Local demo: starts two engines on 127.0.0.1 (P2P handshake, no metadata service), registers a
//! buffer in each, moves data both ways over the chosen transport and prints what happened.

use std::time::Instant;

use clap::Parser;
use mooncake::{EngineConfig, HostBuffer, Notification, Opcode, TransferEngine};

#[derive(Parser)]
#[command(about = "Two local engines move data to each other and say what happened")]
struct Args {
    /// Transport to use.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Bytes per engine buffer.
    #[arg(long, default_value_t = 64 << 20)]
    size: u64,
}

fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> mooncake::Result<()> {
    mooncake::link_all();
    let len = args.size as usize;
    println!("linked backends:");
    for b in mooncake::backends() {
        println!("  {:<9} {:<10} {:?}", b.kind, b.name, b.availability);
    }
    let config = || EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([args.protocol.as_str()]);
    let alice = TransferEngine::new(config())?;
    let bob = TransferEngine::new(config())?;
    println!("engine A: segment {} (protocols {:?})", alice.local_segment_name(), alice.protocols());
    println!("engine B: segment {} (protocols {:?})", bob.local_segment_name(), bob.protocols());

    // Memory the program owns, registered without `unsafe`: the engines hold it while it is registered, and the
    // program reads it by copy.
    let src = HostBuffer::from_vec((0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect());
    let back = HostBuffer::zeroed(len);
    let dst = HostBuffer::zeroed(len);
    alice.register_owned(src.owned(), "*")?;
    alice.register_owned(back.owned(), "*")?;
    bob.register_owned(dst.owned(), "*")?;
    let peer = bob.local_segment_name().to_string();
    let remote = alice.first_buffer_address(&peer)?;
    println!("A opened segment {peer}: first buffer at {remote:#x}, {} bytes", len);

    let t = Instant::now();
    alice.transfer_sync(&peer, Opcode::Write, src.addr(), remote, len as u64)?;
    let w = t.elapsed();
    println!("A wrote {} MiB into B in {:.1} ms ({:.2} GB/s)", len >> 20, ms(w), gbps(len, w));
    let t = Instant::now();
    alice.transfer_sync(&peer, Opcode::Read, back.addr(), remote, len as u64)?;
    let r = t.elapsed();
    println!("A read {} MiB back from B in {:.1} ms ({:.2} GB/s)", len >> 20, ms(r), gbps(len, r));
    let ok = back.to_vec() == src.to_vec() && dst.to_vec() == src.to_vec();
    println!("byte-for-byte check: {}", if ok { "identical" } else { "MISMATCH" });

    let small: Vec<u64> = (0..128).map(|i| i * 4096).collect();
    let t = Instant::now();
    let locals: Vec<u64> = small.iter().map(|o| src.addr() + o).collect();
    let remotes: Vec<u64> = small.iter().map(|o| remote + o).collect();
    alice.batch_transfer_sync(&peer, Opcode::Write, &locals, &remotes, &[4096; 128])?;
    println!("A wrote a batch of 128 x 4 KiB in {:.1} us", t.elapsed().as_secs_f64() * 1e6);

    alice.send_notify(&peer, Notification { name: alice.local_segment_name().into(), message: "done".into() })?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    for n in bob.drain_notifications() {
        println!("B received notification from {}: {:?}", n.name, n.message);
    }
    alice.probe_peer(&peer)?;
    println!("A probed B: reachable");
    let bad = alice.transfer_sync(&peer, Opcode::Read, back.addr(), remote + len as u64 - 8, 16);
    println!("A reading past B's buffer is refused: {}", bad.err().map(|e| e.to_string()).unwrap_or_default());
    alice.shutdown();
    bob.shutdown();
    if !ok {
        return Err(mooncake::Error::Protocol("data mismatch".into()));
    }
    println!("demo finished");
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn gbps(bytes: usize, d: std::time::Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}
