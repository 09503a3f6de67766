//! Running long Rust work off the GIL while still honouring Ctrl-C: the work runs on a
//! scoped thread; the calling thread waits without the GIL and polls Python's signal handlers
//! between short waits, setting the work's cancel flag on KeyboardInterrupt.
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

pub fn run<T: Send>(py: Python<'_>, work: impl FnOnce(&AtomicBool) -> T + Send) -> PyResult<T> {
    let cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        // A Mutex makes the receiver Sync, so a reference to it may cross `detach`.
        let rx = std::sync::Mutex::new(rx);
        let cancel_ref = &cancel;
        s.spawn(move || {
            let _ = tx.send(work(cancel_ref));
        });
        loop {
            // recv_timeout returns as soon as the result arrives: no added latency.
            let got = py.detach(|| {
                rx.lock()
                    .expect("receiver lock")
                    .recv_timeout(Duration::from_millis(50))
            });
            match got {
                Ok(v) => return Ok(v),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        cancel.store(true, Ordering::Relaxed);
                        // The worker sees the flag and returns soon; the scope joins it.
                        return Err(e);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(
                        "exl2rs worker thread panicked",
                    ))
                }
            }
        }
    })
}
