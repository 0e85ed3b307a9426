//! The VMM's main thread while the guest runs: one epoll loop over console
//! input, stop signals and the exit signal, and the halt probe every
//! [`PROBE_PERIOD`], until a reason to stop is set. The disks have threads
//! of their own ([`crate::io_thread`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::exit::{ExitSignal, VmExit};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::vcpu::{Vcpus, PROBE_PERIOD};

/// A subscriber of the loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop failed.
#[derive(Debug, Error)]
#[error("event loop: {0}")]
pub struct EventLoopError(String);

/// The loop and what it serves.
pub struct EventLoop {
    events: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
}

impl EventLoop {
    /// A loop that ends once `exit` has a reason.
    pub fn new(exit: Arc<ExitSignal>) -> Result<EventLoop, EventLoopError> {
        let mut events =
            EventManager::<Subscriber>::new().map_err(|e| EventLoopError(e.to_string()))?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatch(exit.clone()))));
        Ok(EventLoop { events, exit })
    }

    /// Serves `subscriber` from now on.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.events.add_subscriber(subscriber);
    }

    /// Runs until the VM has a reason to stop; a guest that halted every
    /// vCPU for good is a power-off.
    pub fn run(&mut self, vcpus: &mut Vcpus) -> Result<(), EventLoopError> {
        let mut next_probe = Instant::now() + PROBE_PERIOD;
        while !self.exit.is_set() {
            let wait = next_probe.saturating_duration_since(Instant::now());
            self.events
                .run_with_timeout(i32::try_from(wait.as_millis()).unwrap_or(i32::MAX))
                .map_err(|e| EventLoopError(e.to_string()))?;
            if Instant::now() >= next_probe {
                if vcpus.probe_halt() {
                    self.exit.signal(VmExit::PowerOff);
                }
                next_probe = Instant::now() + PROBE_PERIOD;
            }
        }
        Ok(())
    }
}

/// Wakes the event loop as soon as the VM should stop.
struct ExitWatch(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.0.event(), EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Only clears the counter; the loop checks the reason itself.
        let _ = self.0.event().read();
    }
}
