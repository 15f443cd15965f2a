//! Copy threads: pieces too large to copy inside `submit` run here, striped over the threads when large.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use mooncake_core::{Error, sync};

use crate::copy::{Ctx, Piece};

struct Queue {
    jobs: Mutex<VecDeque<Piece>>,
    ready: Condvar,
    stop: AtomicBool,
}

/// A fixed set of copy threads and their queue.
pub(crate) struct Pool {
    queue: Arc<Queue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `n` threads copying with `ctx`.
    pub(crate) fn spawn(n: usize, ctx: Arc<Ctx>) -> std::io::Result<Pool> {
        let queue =
            Arc::new(Queue { jobs: Mutex::new(VecDeque::new()), ready: Condvar::new(), stop: AtomicBool::new(false) });
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (q, ctx) = (queue.clone(), ctx.clone());
            let spawned = std::thread::Builder::new().name(format!("mooncake-cxl-{i}")).spawn(move || run(&q, &ctx));
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    let pool = Pool { queue, threads: Mutex::new(threads) };
                    pool.stop();
                    return Err(e);
                }
            }
        }
        Ok(Pool { queue, threads: Mutex::new(threads) })
    }

    /// Queues pieces; each finishes through its own completion.
    pub(crate) fn push(&self, pieces: Vec<Piece>) {
        if pieces.is_empty() {
            return;
        }
        if self.queue.stop.load(Ordering::Acquire) {
            for p in pieces {
                p.done.finish(Err(stopped()));
            }
            return;
        }
        let n = pieces.len();
        sync::lock(&self.queue.jobs).extend(pieces);
        if n == 1 {
            self.queue.ready.notify_one();
        } else {
            self.queue.ready.notify_all();
        }
    }

    /// Stops the threads after the piece each is copying; queued pieces fail.
    pub(crate) fn stop(&self) {
        self.queue.stop.store(true, Ordering::Release);
        self.queue.ready.notify_all();
        let threads = std::mem::take(&mut *sync::lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
        let left: Vec<Piece> = sync::lock(&self.queue.jobs).drain(..).collect();
        for p in left {
            p.done.finish(Err(stopped()));
        }
    }
}

fn stopped() -> Error {
    Error::NotInitialized("the cxl transport was shut down".into())
}

fn run(q: &Queue, ctx: &Ctx) {
    loop {
        let piece = {
            let mut jobs = sync::lock(&q.jobs);
            loop {
                if q.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(p) = jobs.pop_front() {
                    break p;
                }
                jobs = sync::wait(&q.ready, jobs);
            }
        };
        piece.run(ctx);
    }
}
