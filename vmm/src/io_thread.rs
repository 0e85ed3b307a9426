//! One I/O thread per disk (`disk0`, `disk1`, ...): each runs an event loop
//! of its own over the disk's queue notification, so that a disk busy with
//! a long `fsync` or a slow copy-on-write delays neither the other disks nor
//! the main loop (console input, stop signals, the halt probe).
//!
//! A disk's thread is stopped only after the vCPUs, so that no notification
//! comes after it; it finishes the requests it is serving, and the VMM's
//! final flush comes after every thread has been joined.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::exit::{ExitSignal, VmExit};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::event_loop::Subscriber;
use crate::thread;

/// An I/O thread cannot be started.
#[derive(Debug, Error)]
pub enum IoThreadError {
    /// Its stop event cannot be created.
    #[error("{name}: stop event: {source}")]
    StopEvent {
        /// The thread's name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The thread cannot be spawned.
    #[error("{name}: cannot start the I/O thread: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Tells an I/O thread's loop to end.
struct Stop {
    event: EventFd,
    requested: AtomicBool,
}

impl Stop {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // A full counter is still readable: the wake-up is not lost.
        let _ = self.event.write(1);
    }
}

/// The stop event as a subscriber of the thread's loop.
struct StopWatch(Arc<Stop>);

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.0.event, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Only wakes the loop; the flag says whether to end.
        let _ = self.0.event.read();
    }
}

/// A running I/O thread.
struct IoThread {
    stop: Arc<Stop>,
    handle: JoinHandle<()>,
}

/// The running I/O threads, one per subscriber given to [`IoThreads::start`].
pub struct IoThreads {
    threads: Vec<IoThread>,
}

impl IoThreads {
    /// Starts thread `disk<i>` serving the `i`-th of `disks`; a failure of a
    /// thread's loop, or a panic in it, ends the VM through `exit`.
    pub fn start(
        disks: impl IntoIterator<Item = Subscriber>,
        exit: &Arc<ExitSignal>,
    ) -> Result<IoThreads, IoThreadError> {
        let mut started = IoThreads {
            threads: Vec::new(),
        };
        for (index, disk) in disks.into_iter().enumerate() {
            let name = format!("disk{index}");
            match start_one(name, disk, exit) {
                Ok(thread) => started.threads.push(thread),
                Err(e) => {
                    started.stop();
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    /// Ends every thread's loop once it has served what it is serving, and
    /// joins the threads.
    pub fn stop(self) {
        for thread in &self.threads {
            thread.stop.request();
        }
        for thread in self.threads {
            // A panic was caught and reported by the thread itself.
            let _ = thread.handle.join();
        }
    }
}

fn start_one(
    name: String,
    disk: Subscriber,
    exit: &Arc<ExitSignal>,
) -> Result<IoThread, IoThreadError> {
    let event = EventFd::new(EFD_NONBLOCK).map_err(|source| IoThreadError::StopEvent {
        name: name.clone(),
        source,
    })?;
    let stop = Arc::new(Stop {
        event,
        requested: AtomicBool::new(false),
    });
    let body_stop = stop.clone();
    let what = format!("I/O thread {name}");
    let handle = thread::spawn(name.clone(), what, exit.clone(), move || {
        serve(disk, body_stop)
    })
    .map_err(|source| IoThreadError::Spawn { name, source })?;
    Ok(IoThread { stop, handle })
}

/// The thread's body: serves `disk` until `stop` is requested.
fn serve(disk: Subscriber, stop: Arc<Stop>) -> Option<VmExit> {
    let mut events = match EventManager::<Subscriber>::new() {
        Ok(events) => events,
        Err(e) => return Some(VmExit::Failed(format!("I/O thread event loop: {e}"))),
    };
    events.add_subscriber(disk);
    events.add_subscriber(Arc::new(std::sync::Mutex::new(StopWatch(stop.clone()))));
    while !stop.requested.load(Ordering::SeqCst) {
        if let Err(e) = events.run() {
            return Some(VmExit::Failed(format!("I/O thread event loop: {e}")));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A disk stand-in: when its event fires it reports its name on
    /// `served`; one with `release` first reports "busy" and waits for it
    /// (a long fsync).
    struct FakeDisk {
        event: Arc<EventFd>,
        served: Sender<&'static str>,
        name: &'static str,
        release: Option<Receiver<()>>,
        panics: bool,
    }

    impl MutEventSubscriber for FakeDisk {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(self.event.as_ref(), EventSet::IN))
                .expect("watch");
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.event.read();
            assert!(!self.panics, "queue exploded");
            if let Some(release) = &self.release {
                let _ = self.served.send("busy");
                let _ = release.recv();
            }
            let _ = self.served.send(self.name);
        }
    }

    fn disk(
        name: &'static str,
        served: &Sender<&'static str>,
        release: Option<Receiver<()>>,
    ) -> (Arc<EventFd>, Subscriber) {
        let event = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let disk = FakeDisk {
            event: event.clone(),
            served: served.clone(),
            name,
            release,
            panics: false,
        };
        (event, Arc::new(Mutex::new(disk)))
    }

    #[test]
    fn a_busy_disk_does_not_hold_up_another() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let (served, done) = mpsc::channel();
        let (release_slow, slow_released) = mpsc::channel();
        let (slow, slow_disk) = disk("slow", &served, Some(slow_released));
        let (fast, fast_disk) = disk("fast", &served, None);
        let threads = IoThreads::start([slow_disk, fast_disk], &exit).expect("start");

        slow.write(1)?;
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok("busy"));
        // The slow disk is now stuck in its "fsync"; the other still serves.
        for _ in 0..3 {
            fast.write(1)?;
            assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok("fast"));
        }
        assert!(done.try_recv().is_err(), "the slow disk is still busy");
        release_slow.send(()).expect("release");
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok("slow"));

        threads.stop();
        assert_eq!(exit.reason(), None, "stopping is no reason to end the VM");
        Ok(())
    }

    #[test]
    fn stop_waits_for_the_request_being_served() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let (served, done) = mpsc::channel();
        let (release, released) = mpsc::channel();
        let (slow, slow_disk) = disk("slow", &served, Some(released));
        let threads = IoThreads::start([slow_disk], &exit).expect("start");
        slow.write(1)?;
        // Stopped while the thread is serving the request.
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok("busy"));
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            release.send(())
        });
        threads.stop();
        // Joined only once the request in flight had completed.
        assert_eq!(done.try_recv(), Ok("slow"));
        assert!(releaser.join().is_ok());
        Ok(())
    }

    #[test]
    fn a_panicking_disk_thread_ends_the_vm_with_its_message() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let (served, _done) = mpsc::channel();
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let bad: Subscriber = Arc::new(Mutex::new(FakeDisk {
            event: event.clone(),
            served,
            name: "bad",
            release: None,
            panics: true,
        }));
        let (_fine, fine_disk) = disk("fine", &mpsc::channel().0, None);
        let threads = IoThreads::start([fine_disk, bad], &exit).expect("start");
        event.write(1)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !exit.is_set() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        match exit.reason() {
            Some(VmExit::Failed(message)) => {
                assert!(
                    message.starts_with("I/O thread disk1 panicked: queue exploded"),
                    "{message}"
                );
            }
            other => panic!("unexpected reason {other:?}"),
        }
        threads.stop();
        Ok(())
    }
}
