//! What is specific to booting Linux on x86-64: memory layout, CPUID, vCPU
//! registers, the MP table and kernel loading.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
