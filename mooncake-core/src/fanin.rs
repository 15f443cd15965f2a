//! Completion fan-in: a request cut into several pieces (stripes over connections, rails or
//! threads; slices; operations no larger than a provider allows) finishes exactly once, when its
//! last piece does.
//!
//! A transport makes one [`FanIn`] per cut request (one allocation when shared through an `Arc`)
//! and hands each piece a [`PieceDone`]; pieces that are whole requests report to their
//! [`Completion`] directly. Reporting a piece costs one atomic decrement, plus one lock when it
//! failed; the last piece takes the lock once more to collect the first error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::completion::Completion;
use crate::error::{Error, Result};
use crate::sync;

/// Finishes one request once all of its pieces have reported: with the request's length when
/// every piece succeeded, else with the first error a piece reported (the others are dropped).
#[derive(Debug)]
pub struct FanIn {
    remaining: AtomicUsize,
    total: u64,
    error: Mutex<Option<Error>>,
    completion: Completion,
}

impl FanIn {
    /// A fan-in for `pieces` pieces of a `total`-byte request. With zero pieces there is nothing
    /// to wait for: the request completes at once with `Ok(total)`.
    pub fn new(pieces: usize, total: u64, completion: Completion) -> FanIn {
        let fan = FanIn { remaining: AtomicUsize::new(pieces), total, error: Mutex::new(None), completion };
        if pieces == 0 {
            fan.completion.finish_shared(Ok(total));
        }
        fan
    }

    /// Records the outcome of one piece (each piece reports exactly once). The last one finishes
    /// the request; returns true for that call.
    pub fn piece_done(&self, result: Result<()>) -> bool {
        if let Err(e) = result {
            sync::lock(&self.error).get_or_insert(e);
        }
        let before = self.remaining.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before != 0, "a piece reported after its request was finished");
        if before != 1 {
            return false;
        }
        let error = sync::lock(&self.error).take();
        self.completion.finish_shared(error.map_or(Ok(self.total), Err));
        true
    }

    /// True when the request is final: finished, or canceled or timed out by the caller (pieces
    /// not started yet can be skipped).
    pub fn is_final(&self) -> bool {
        self.completion.is_final()
    }

    /// Fails the request with `error` unless every piece already reported: for an owner dropped
    /// while pieces are outstanding, so that the request fails instead of hanging. Exclusive
    /// access means no piece can report any more.
    pub fn abandon(&mut self, error: Error) {
        let left = self.remaining.get_mut();
        if *left != 0 {
            *left = 0;
            self.completion.finish_shared(Err(error));
        }
    }
}

/// Where one piece reports: the request itself when it was not cut, or the request's [`FanIn`].
#[derive(Debug)]
pub enum PieceDone {
    /// The piece is the whole request.
    Whole(Completion),
    /// One of several pieces of a request.
    Part(Arc<FanIn>),
}

impl PieceDone {
    /// Reports the piece: `Ok(bytes)` moved or a typed error. A [`PieceDone::Part`] ignores the
    /// byte count: its request completes with its full length when every piece succeeded.
    pub fn finish(self, result: Result<u64>) {
        match self {
            PieceDone::Whole(c) => c.finish(result),
            PieceDone::Part(f) => {
                f.piece_done(result.map(drop));
            }
        }
    }

    /// True when the piece's request is final (canceled, timed out or finished): skip the work.
    pub fn is_final(&self) -> bool {
        match self {
            PieceDone::Whole(c) => c.is_final(),
            PieceDone::Part(f) => f.is_final(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::completion::Batch;
    use crate::types::TransferState;

    fn batch(n: usize) -> Arc<Batch> {
        let b = Batch::new(n);
        b.reserve(n).unwrap();
        b
    }

    #[test]
    fn completes_once_when_the_last_piece_reports() {
        let b = batch(1);
        let f = FanIn::new(3, 300, b.completion(0));
        assert!(!f.is_final());
        assert!(!f.piece_done(Ok(())));
        assert!(!f.piece_done(Ok(())));
        assert_eq!(b.status(0).unwrap().state, TransferState::Pending);
        assert!(f.piece_done(Ok(())));
        let s = b.status(0).unwrap();
        assert_eq!((s.state, s.transferred_bytes), (TransferState::Completed, 300));
        assert!(f.is_final());
        assert!(b.is_done());
    }

    #[test]
    fn pieces_finishing_on_many_threads_complete_exactly_once() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 500;
        for round in 0..20 {
            let b = batch(1);
            let f = Arc::new(FanIn::new(THREADS * PER_THREAD, 1 << 20, b.completion(0)));
            let finishers = Arc::new(AtomicUsize::new(0));
            let start = Arc::new(std::sync::Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (f, finishers, start) = (f.clone(), finishers.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for i in 0..PER_THREAD {
                            // Alternate the two reporting paths.
                            let done = if (t + i) % 2 == 0 {
                                f.piece_done(Ok(()))
                            } else {
                                PieceDone::Part(f.clone()).finish(Ok(7));
                                false
                            };
                            if done {
                                finishers.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let s = b.status(0).unwrap();
            assert_eq!((s.state, s.transferred_bytes), (TransferState::Completed, 1 << 20), "round {round}");
            assert!(finishers.load(Ordering::Relaxed) <= 1, "piece_done reported the finish more than once");
            assert!(b.is_done());
        }
    }

    #[test]
    fn a_failed_piece_fails_the_request_after_the_others_report() {
        let b = batch(1);
        let f = FanIn::new(3, 30, b.completion(0));
        assert!(!f.piece_done(Err(Error::disconnected("p", "first"))));
        assert!(!f.piece_done(Err(Error::Protocol("second".into()))));
        assert_eq!(b.status(0).unwrap().state, TransferState::Pending, "waits for the third piece");
        assert!(!f.is_final());
        assert!(f.piece_done(Ok(())));
        let s = b.status(0).unwrap();
        assert_eq!((s.state, s.transferred_bytes), (TransferState::Failed, 0));
        assert!(s.error.unwrap().is_disconnect(), "the first error wins");
    }

    #[test]
    fn a_timeout_or_cancel_from_a_piece_keeps_its_state() {
        let b = batch(2);
        let f = FanIn::new(1, 8, b.completion(0));
        f.piece_done(Err(Error::Canceled));
        assert_eq!(b.status(0).unwrap().state, TransferState::Canceled);
        let f = FanIn::new(1, 8, b.completion(1));
        f.piece_done(Err(Error::Timeout(std::time::Duration::from_millis(1))));
        assert_eq!(b.status(1).unwrap().state, TransferState::Timeout);
    }

    #[test]
    fn zero_pieces_complete_at_once() {
        let b = batch(1);
        let f = FanIn::new(0, 0, b.completion(0));
        assert!(f.is_final());
        let s = b.status(0).unwrap();
        assert_eq!((s.state, s.transferred_bytes), (TransferState::Completed, 0));
    }

    #[test]
    fn a_canceled_request_is_final_and_late_pieces_change_nothing() {
        let b = batch(1);
        let f = FanIn::new(2, 10, b.completion(0));
        b.abort(TransferState::Canceled, Error::Canceled);
        assert!(f.is_final());
        assert!(!f.piece_done(Ok(())));
        assert!(f.piece_done(Ok(())));
        assert_eq!(b.status(0).unwrap().state, TransferState::Canceled);
    }

    #[test]
    fn abandon_fails_an_unfinished_request_only() {
        let b = batch(2);
        let mut f = FanIn::new(2, 10, b.completion(0));
        f.piece_done(Err(Error::Protocol("recorded".into())));
        f.abandon(Error::NotInitialized("shut down".into()));
        let s = b.status(0).unwrap();
        assert_eq!(s.state, TransferState::Failed);
        assert!(matches!(s.error, Some(Error::NotInitialized(_))));

        let mut f = FanIn::new(1, 10, b.completion(1));
        f.piece_done(Ok(()));
        f.abandon(Error::NotInitialized("shut down".into()));
        assert_eq!(b.status(1).unwrap().state, TransferState::Completed);
    }

    #[test]
    fn whole_pieces_report_their_own_bytes() {
        let b = batch(2);
        let whole = PieceDone::Whole(b.completion(0));
        assert!(!whole.is_final());
        whole.finish(Ok(42));
        assert_eq!(b.status(0).unwrap().transferred_bytes, 42);
        let f = Arc::new(FanIn::new(2, 100, b.completion(1)));
        let (p1, p2) = (PieceDone::Part(f.clone()), PieceDone::Part(f.clone()));
        p1.finish(Ok(1));
        assert!(!p2.is_final());
        p2.finish(Ok(0));
        assert!(f.is_final());
        assert_eq!(b.status(1).unwrap().transferred_bytes, 100, "a cut request reports its full length");
    }
}
