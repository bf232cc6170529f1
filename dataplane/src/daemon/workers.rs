//! One OS thread per packet worker, each with its own single-threaded tokio
//! runtime. A worker's socket and TAP queues are registered with its own
//! reactor, so a packet wakes exactly the thread that handles it: no
//! hand-off between the threads of a work-stealing pool, no extra context
//! switches per wakeup.

use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::Error;

pub(super) struct Workers {
    handles: Vec<Handle>,
    stop: Mutex<Vec<oneshot::Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.handles.len())
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts `n` (at least one) worker threads.
    pub(super) fn start(n: usize) -> Result<Self, Error> {
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("l2dp-worker-{i}"))
                    .spawn(move || {
                        // Runs the worker's tasks until told to stop (or the
                        // daemon is gone); dropping the runtime drops them.
                        let _ = rt.block_on(rx);
                    })?,
            );
        }
        Ok(Self {
            handles,
            stop: Mutex::new(stop),
            threads: Mutex::new(threads),
        })
    }

    pub(super) fn len(&self) -> usize {
        self.handles.len()
    }

    /// The runtime of worker `i` (wrapping around).
    pub(super) fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Stops the threads (their tasks are dropped) and waits for them.
    pub(super) fn shutdown(&self) {
        for tx in super::lock(&self.stop).drain(..) {
            let _ = tx.send(());
        }
        let threads: Vec<_> = super::lock(&self.threads).drain(..).collect();
        for t in threads {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for tx in super::lock(&self.stop).drain(..) {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_own_worker_thread_until_shutdown() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.len(), 2);
        let names: Vec<String> = (0..3)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel();
                w.handle(i).spawn(async move {
                    let _ = tx.send(std::thread::current().name().map(str::to_string));
                });
                rx.recv().unwrap().unwrap()
            })
            .collect();
        assert_eq!(names, ["l2dp-worker-0", "l2dp-worker-1", "l2dp-worker-0"]);
        w.shutdown();
        assert!(w.threads.lock().unwrap().is_empty());
    }
}
