//! One OS thread per packet worker, each with its own single-threaded tokio
//! runtime. A worker's socket and TAP queues are registered with its own
//! reactor, so a packet wakes exactly the thread that handles it: no
//! hand-off between the threads of a work-stealing pool, no extra context
//! switches per wakeup.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::libc;

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
    /// Starts `n` (at least one) worker threads, each with scheduler slice
    /// `slice` if given (see [`set_sched_slice`]).
    pub(super) fn start(n: usize, slice: Option<Duration>) -> Result<Self, Error> {
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
                        if let Some(slice) = slice
                            && let Err(e) = set_sched_slice(slice)
                        {
                            tracing::warn!(
                                error = %e,
                                worker = i,
                                "could not set the worker's scheduler slice (needs Linux 6.12 \
                                 or later); running with the kernel's default"
                            );
                        }
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

/// `struct sched_attr` of `sched_setattr(2)` (the 56-byte version 1).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// The calling thread's scheduling attributes.
fn sched_attr() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a live, writable `sched_attr` of the size passed;
    // tid 0 is the calling thread.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<SchedAttr>() as libc::c_uint,
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// Gives the calling thread a scheduler slice of `slice` (EEVDF's custom
/// slice, Linux 6.12+: 100 us to 100 ms), keeping its policy and nice
/// value. A thread with a shorter slice gets an earlier deadline when it
/// wakes, so it preempts a CPU-bound neighbour sooner: packets wait less
/// for a busy core, at the price of more context switches.
fn set_sched_slice(slice: Duration) -> std::io::Result<()> {
    let mut attr = sched_attr()?;
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid `sched_attr` whose size field matches;
    // tid 0 is the calling thread; the kernel only reads it.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if sched_attr()?.runtime != attr.runtime {
        // Kernels before 6.12 accept the call but keep no custom slice.
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this kernel has no custom scheduler slices",
        ));
    }
    Ok(())
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
        let w = Workers::start(2, None).unwrap();
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

    #[test]
    fn workers_take_the_scheduler_slice_they_are_given() {
        let kernel_has_slices = std::thread::spawn(|| set_sched_slice(Duration::from_micros(300)))
            .join()
            .unwrap()
            .is_ok();
        let w = Workers::start(1, Some(Duration::from_micros(200))).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        w.handle(0).spawn(async move {
            let _ = tx.send(sched_attr().map(|a| a.runtime));
        });
        let runtime = rx.recv().unwrap().unwrap();
        if kernel_has_slices {
            assert_eq!(runtime, 200_000);
        } else {
            eprintln!("kernel without custom slices: the worker runs with the default");
        }
        w.shutdown();
    }
}
