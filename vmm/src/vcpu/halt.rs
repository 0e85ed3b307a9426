//! Telling a halted machine from an idle one.
//!
//! Without ACPI (or any power-off device), Linux's `poweroff` and `halt` end
//! in `stop_this_cpu()`: every CPU disables interrupts and executes HLT in a
//! loop. With the in-kernel interrupt controller that HLT never reaches
//! userspace; KVM keeps the vCPU blocked in `KVM_RUN`. So the VMM kicks every
//! vCPU now and then ([`PROBE_PERIOD`]); a kicked vCPU asks KVM for its state
//! (`KVM_GET_MP_STATE`) and flags (RFLAGS.IF) and reports whether it is
//! *parked*: halted with interrupts disabled, which only an NMI, INIT or SMI
//! could end and nothing in this machine sends, or never started (waiting for
//! INIT/SIPI). An idle Linux halts with interrupts enabled (`sti; hlt`) and
//! so is never parked. When every vCPU reported itself parked in two
//! consecutive rounds, the guest has powered off.
//!
//! A vCPU thread that used CPU time since the last round is running the
//! guest: while one does, no vCPU is kicked, so that a busy guest is not
//! disturbed. This needs nothing but KVM's generic vCPU state, so it works on VT-x,
//! AMD-V and on KVM's PVM backend alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};

/// How often the vCPUs are asked: a power-off is seen 2-3 periods after the
/// last vCPU halts.
pub const PROBE_PERIOD: Duration = Duration::from_millis(200);

/// Consecutive rounds in which every vCPU must be parked.
const ROUNDS_NEEDED: u32 = 2;

/// RFLAGS.IF, the interrupt flag.
const RFLAGS_IF: u64 = 1 << 9;

/// Whether a vCPU in `mp_state` with `rflags` can never run again by itself.
pub fn is_parked(mp_state: u32, rflags: u64) -> bool {
    match mp_state {
        KVM_MP_STATE_HALTED => rflags & RFLAGS_IF == 0,
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => true,
        _ => false,
    }
}

/// Rounds of probes, shared by the VMM's main thread and the vCPU threads.
#[derive(Debug)]
pub struct HaltProbe {
    /// The current round; 0 before the first.
    round: AtomicU64,
    /// Per vCPU: the last round in which it reported itself parked, or 0
    /// once it reported itself running.
    parked_in: Vec<AtomicU64>,
}

impl HaltProbe {
    /// Probes for `vcpus` vCPUs.
    pub fn new(vcpus: u8) -> Self {
        HaltProbe {
            round: AtomicU64::new(0),
            parked_in: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A vCPU's answer to the current round (called on the vCPU's thread
    /// after a kick).
    pub fn report(&self, vcpu: u8, parked: bool) {
        let round = if parked {
            self.round.load(Ordering::SeqCst)
        } else {
            0
        };
        if let Some(slot) = self.parked_in.get(usize::from(vcpu)) {
            slot.store(round, Ordering::SeqCst);
        }
    }

    /// Ends the current round and starts the next one (the caller then
    /// kicks every vCPU): true when every vCPU answered "parked" to it.
    fn next_round(&self) -> bool {
        let round = self.round.fetch_add(1, Ordering::SeqCst);
        round > 0
            && self
                .parked_in
                .iter()
                .all(|slot| slot.load(Ordering::SeqCst) == round)
    }
}

/// The main thread's side: counts consecutive all-parked rounds.
#[derive(Debug, Default)]
pub struct HaltWatch {
    streak: u32,
}

impl HaltWatch {
    /// Ends a round of `probe` and starts the next; true when the machine
    /// has been halted for long enough to call it powered off.
    pub fn tick(&mut self, probe: &HaltProbe) -> bool {
        if probe.next_round() {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        self.streak >= ROUNDS_NEEDED
    }

    /// Ends a round of `probe` in which the guest was seen running without
    /// asking the vCPUs: the count starts over, and answers to that round
    /// no longer count.
    pub fn reset(&mut self, probe: &HaltProbe) {
        probe.next_round();
        self.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_halt_with_interrupts_off_or_a_cpu_never_started_is_parked() {
        assert!(is_parked(KVM_MP_STATE_HALTED, 0x2));
        assert!(!is_parked(KVM_MP_STATE_HALTED, 0x202), "idle: sti; hlt");
        assert!(is_parked(KVM_MP_STATE_UNINITIALIZED, 0x202));
        assert!(is_parked(KVM_MP_STATE_INIT_RECEIVED, 0x2));
        assert!(!is_parked(kvm_bindings::KVM_MP_STATE_RUNNABLE, 0x2));
        assert!(!is_parked(kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED, 0x2));
    }

    #[test]
    fn every_vcpu_parked_for_two_rounds_is_a_power_off() {
        let probe = HaltProbe::new(2);
        let mut watch = HaltWatch::default();
        assert!(!watch.tick(&probe), "no round answered yet");
        probe.report(0, true);
        probe.report(1, true);
        assert!(!watch.tick(&probe), "one round is not enough");
        probe.report(0, true);
        probe.report(1, true);
        assert!(watch.tick(&probe));
    }

    #[test]
    fn a_running_or_silent_vcpu_resets_the_count() {
        let probe = HaltProbe::new(2);
        let mut watch = HaltWatch::default();
        watch.tick(&probe);
        probe.report(0, true);
        probe.report(1, true);
        assert!(!watch.tick(&probe));
        // vCPU 1 does not answer this round: its old answer does not count.
        probe.report(0, true);
        assert!(!watch.tick(&probe));
        probe.report(0, true);
        probe.report(1, true);
        assert!(!watch.tick(&probe), "the count started over");
        probe.report(0, true);
        probe.report(1, false);
        assert!(!watch.tick(&probe));
        probe.report(0, true);
        probe.report(1, true);
        assert!(!watch.tick(&probe));
        probe.report(0, true);
        probe.report(1, true);
        assert!(watch.tick(&probe));
    }

    #[test]
    fn answers_from_before_a_busy_round_do_not_count() {
        let probe = HaltProbe::new(1);
        let mut watch = HaltWatch::default();
        watch.tick(&probe);
        probe.report(0, true);
        assert!(!watch.tick(&probe));
        probe.report(0, true);
        watch.reset(&probe);
        assert!(!watch.tick(&probe), "the answer was to the skipped round");
        probe.report(0, true);
        assert!(!watch.tick(&probe));
        probe.report(0, true);
        assert!(watch.tick(&probe));
    }
}
