//! The vCPU threads: started named `vcpu0`, `vcpu1`, ..., kicked for the
//! halt probe and to stop, joined before the VMM's final flush.
//!
//! A vCPU thread that panics (in device code, say) ends the VM with status 1
//! and the panic's message ([`crate::thread`]) instead of leaving the VMM
//! waiting.

use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use devices::exit::{ExitSignal, VmExit};
use vmm_sys_util::signal::Killable;

use super::halt::{HaltProbe, HaltWatch};
use super::{kick, Vcpu, VcpuError};
use crate::thread;

/// How long stopping waits for vCPU threads before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a vCPU that has not stopped yet is kicked again.
const REKICK_PERIOD: Duration = Duration::from_millis(10);

/// A vCPU thread that used more CPU time than this since the last probe is
/// running the guest, not halted: it is not kicked.
const BUSY_CPU_TIME: Duration = Duration::from_millis(10);

/// One vCPU's thread.
struct VcpuThread {
    id: u8,
    handle: JoinHandle<()>,
    /// The thread's CPU-time clock, and its reading at the last probe.
    clock: Option<libc::clockid_t>,
    cpu_time: Duration,
}

impl VcpuThread {
    /// Whether the thread used more than [`BUSY_CPU_TIME`] since the last
    /// call: a halted vCPU sleeps in the kernel and uses none.
    fn was_busy(&mut self) -> bool {
        let Some(now) = self.clock.and_then(cpu_time) else {
            return false;
        };
        let used = now.saturating_sub(self.cpu_time);
        self.cpu_time = now;
        used > BUSY_CPU_TIME
    }
}

/// The CPU time `clock` has counted.
fn cpu_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is writable; a clock of a thread that ended fails.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// The CPU-time clock of `handle`'s thread.
fn cpu_clock(handle: &JoinHandle<()>) -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is alive or joinable (not joined: we hold its
    // handle), so its pthread_t is valid; `clock` is writable.
    let ret = unsafe { libc::pthread_getcpuclockid(handle.pthread_handle(), &mut clock) };
    (ret == 0).then_some(clock)
}

/// The running vCPUs.
pub struct Vcpus {
    threads: Vec<VcpuThread>,
    exit: Arc<ExitSignal>,
    halt: Arc<HaltProbe>,
    watch: HaltWatch,
}

impl Vcpus {
    /// Starts one thread per vCPU. Each reports through `exit`; `halt` is
    /// the probe the vCPUs answer.
    pub fn start(
        vcpus: Vec<Vcpu>,
        exit: Arc<ExitSignal>,
        halt: Arc<HaltProbe>,
    ) -> Result<Vcpus, VcpuError> {
        kick::install().map_err(VcpuError::KickHandler)?;
        let mut started = Vcpus {
            threads: Vec::new(),
            exit,
            halt,
            watch: HaltWatch::default(),
        };
        for vcpu in vcpus {
            let id = vcpu.id();
            let handle = thread::spawn(
                format!("vcpu{id}"),
                format!("vCPU {id}"),
                started.exit.clone(),
                move || vcpu.run(),
            )
            .map_err(|source| VcpuError::Spawn { id, source });
            match handle {
                Ok(handle) => started.threads.push(VcpuThread {
                    id,
                    clock: cpu_clock(&handle),
                    cpu_time: Duration::ZERO,
                    handle,
                }),
                Err(e) => {
                    started.exit.signal(VmExit::Failed(e.to_string()));
                    let _ = started.stop();
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    /// Kicks every vCPU to answer the halt probe; true when the guest has
    /// halted every vCPU for good (a power-off without a power-off device).
    ///
    /// While any vCPU thread is busy the guest is running: then none is
    /// kicked, so that a busy guest is not disturbed.
    pub fn probe_halt(&mut self) -> bool {
        // Every thread's clock is read, so that each measures one round.
        let mut busy = false;
        for thread in &mut self.threads {
            busy |= thread.was_busy();
        }
        if busy {
            self.watch.reset(&self.halt);
            return false;
        }
        let halted = self.watch.tick(&self.halt);
        self.kick_all();
        halted
    }

    fn kick_all(&self) {
        for VcpuThread { handle, .. } in &self.threads {
            if !handle.is_finished() {
                // A thread that ends meanwhile is still joinable: the signal
                // reaches a thread that no longer runs a vCPU and is ignored.
                let _ = handle.kill(kick::kick_signal());
            }
        }
    }

    /// Stops every vCPU and joins its thread (with a reason of its own if
    /// none is set yet); a thread that does not stop within [`STOP_TIMEOUT`]
    /// is reported and left behind. Returns how many were.
    pub fn stop(mut self) -> usize {
        if !self.exit.is_set() {
            self.exit
                .signal(VmExit::Failed("the VMM stopped the vCPUs".into()));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.threads.iter().any(|t| !t.handle.is_finished()) && Instant::now() < deadline {
            self.kick_all();
            sleep(REKICK_PERIOD);
        }
        let mut left = 0;
        for VcpuThread { id, handle, .. } in self.threads.drain(..) {
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                eprintln!("vmm: vCPU {id} did not stop within {STOP_TIMEOUT:?}");
                left += 1;
            }
        }
        left
    }
}
