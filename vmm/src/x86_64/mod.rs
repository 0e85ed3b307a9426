//! What is specific to booting Linux on x86-64: memory layout, CPUID, MSRs,
//! vCPU registers, the MP table, the ACPI tables and kernel loading.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod kernel;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
