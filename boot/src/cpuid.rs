//! Per-vCPU CPUID, derived from what KVM supports (KVM_GET_SUPPORTED_CPUID).
//!
//! KVM reports the host's features but not a topology, so each vCPU gets its APIC ID
//! and a consistent topology written in: one socket, `cpu_count` cores, one thread
//! per core, APIC ID = vCPU index. Linux reads topology from different leaves
//! depending on the vendor (Intel: 1, 4, 0xB/0x1F; AMD: 1, 0x8000_0008,
//! 0x8000_001E, 0x8000_001D and 0xB when present), so all of them are made to agree.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1.
const LEAF_FEATURES: u32 = 0x1;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units: 64 bytes.
const DEFAULT_CLFLUSH_SIZE: u32 = 8;

const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
/// Leaf 6 EAX bit 2: the APIC timer keeps running in deep C-states. KVM's emulated
/// timer does, and without it Linux needs a broadcast timer for idle.
const EAX_ARAT: u32 = 1 << 2;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
/// Level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_ECX_PERFCTR_CORE: u32 = 1 << 23;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const LEAF_AMD_PERFMON_V2: u32 = 0x8000_0022;

/// Which vCPU this CPUID is for, out of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// Index of the vCPU, which is also its APIC ID.
    pub cpu_index: u8,
    /// Number of vCPUs in the VM.
    pub cpu_count: u8,
}

impl CpuTopology {
    /// The VMM validates its vCPU count; should it pass nonsense (no vCPUs, or an index
    /// past the count), widen the count instead of writing contradictory CPUID.
    fn normalized(self) -> (u32, u32) {
        let count = self.cpu_count.max(self.cpu_index.saturating_add(1)).max(1);
        (u32::from(self.cpu_index), u32::from(count))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    /// AMD and Hygon, which share AMD's topology leaves.
    Amd,
    Other,
}

/// The vendor named by leaf 0, or `Other` if it is missing.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Patches KVM's supported CPUID for vCPU `cpu`: APIC IDs, topology, the hypervisor
/// bit, and no PMU. Leaves not present are not added (the slice cannot grow).
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], cpu: CpuTopology) {
    let vendor = vendor(entries);
    let (index, count) = cpu.normalized();
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => patch_features(e, index, count),
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => patch_cache_sharing(e, count, true),
            LEAF_THERMAL_POWER => {
                // No thermal sensors, HWP or energy-bias MSRs exist in the guest.
                e.eax &= EAX_ARAT;
                (e.ebx, e.ecx, e.edx) = (0, 0, 0);
            }
            LEAF_PERFMON => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => patch_ext_topology(e, index, count),
            LEAF_AMD_FEATURES if vendor == Vendor::Amd => {
                set_bit(&mut e.ecx, AMD_ECX_CMP_LEGACY, count > 1);
                e.ecx &= !AMD_ECX_PERFCTR_CORE;
            }
            LEAF_AMD_SIZES if vendor == Vendor::Amd => {
                // NC (cores - 1) in [7:0], ApicIdSize (core ID bits) in [15:12].
                e.ecx = (e.ecx & !0xf0ff) | (core_id_bits(count) << 12) | (count - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY if vendor == Vendor::Amd => patch_cache_sharing(e, count, false),
            LEAF_AMD_TOPOLOGY if vendor == Vendor::Amd => {
                // Extended APIC ID; core ID with one thread per core; one node.
                e.eax = index;
                e.ebx = (e.ebx & !0xffff) | index;
                (e.ecx, e.edx) = (0, 0);
            }
            LEAF_AMD_PERFMON_V2 if vendor == Vendor::Amd => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
    }
}

/// Advertises the LAPIC TSC-deadline timer. KVM_GET_SUPPORTED_CPUID leaves the bit
/// clear because the in-kernel LAPIC emulates it; call this when KVM has
/// KVM_CAP_TSC_DEADLINE_TIMER. Linux then needs no LAPIC timer calibration.
pub fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        e.ecx |= ECX_TSC_DEADLINE;
    }
}

fn patch_features(e: &mut kvm_cpuid_entry2, index: u32, count: u32) {
    // EBX: [31:24] initial APIC ID, [23:16] logical processors in the package,
    // [15:8] CLFLUSH line size, [7:0] brand index (kept).
    let clflush = match (e.ebx >> 8) & 0xff {
        0 => DEFAULT_CLFLUSH_SIZE,
        size => size,
    };
    e.ebx = (index << 24) | (count << 16) | (clflush << 8) | (e.ebx & 0xff);
    e.ecx |= ECX_HYPERVISOR;
    // HTT means "EBX[23:16] is valid": more than one logical processor per package.
    set_bit(&mut e.edx, EDX_HTT, count > 1);
}

/// Leaf 4 (Intel) and 0x8000_001D (AMD) share the cache-sharing field: EAX[25:14] is
/// logical processors sharing the cache, minus 1. With one thread per core, L1 and
/// L2 are private and L3 is shared by all. Leaf 4 also has EAX[31:26], cores in the
/// package minus 1.
fn patch_cache_sharing(e: &mut kvm_cpuid_entry2, count: u32, has_core_count: bool) {
    let cache_type = e.eax & 0x1f;
    if cache_type == 0 {
        return; // No cache at this subleaf: the list ends here.
    }
    let level = (e.eax >> 5) & 0x7;
    let sharing = if level >= 3 { count - 1 } else { 0 };
    e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
    if has_core_count {
        e.eax = (e.eax & !(0x3f << 26)) | ((count - 1).min(0x3f) << 26);
    }
}

/// Leaf 0xB/0x1F: subleaf 0 is the SMT level (1 thread), subleaf 1 the core level
/// (`count` logical processors), anything higher is invalid. EDX is the x2APIC ID
/// on every subleaf, ECX[7:0] echoes the subleaf.
fn patch_ext_topology(e: &mut kvm_cpuid_entry2, index: u32, count: u32) {
    let subleaf = e.index;
    (e.eax, e.ebx, e.ecx) = match subleaf {
        0 => (0, 1, (LEVEL_SMT << 8)),
        1 => (core_id_bits(count), count, (LEVEL_CORE << 8) | 1),
        n => (0, 0, n & 0xff),
    };
    e.edx = index;
}

/// Bits of the APIC ID that number the cores: ceil(log2(count)).
fn core_id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

fn set_bit(reg: &mut u32, bit: u32, on: bool) {
    if on {
        *reg |= bit;
    } else {
        *reg &= !bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn leaf0(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
        entry(0, 0, [0x1f, word(0), word(8), word(4)])
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    /// Roughly what KVM reports on an Intel host.
    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf0(b"GenuineIntel"),
            entry(1, 0, [0x906ea, 0x0010_0800 | 0x7, 0x7efa_3203, 0x1789_fbff]),
            entry(4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),   // L1d
            entry(4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),   // L1i
            entry(4, 2, [0x1c00_4143, 0x00c0_003f, 0x3ff, 0]),  // L2
            entry(4, 3, [0x1c03_c163, 0x03c0_003f, 0x2fff, 6]), // L3
            entry(4, 4, [0, 0, 0, 0]),
            entry(6, 0, [0x77, 0x2, 0x9, 0]),
            entry(0xa, 0, [0x0750_4802, 0, 0, 0x603]),
            entry(0xb, 0, [1, 2, 0x100, 5]),
            entry(0xb, 1, [4, 8, 0x201, 5]),
            entry(0xb, 2, [0, 0, 2, 5]),
            entry(0x8000_0008, 0, [0x3027, 0, 0, 0]),
        ]
    }

    /// Roughly what KVM reports inside QEMU TCG `-cpu max` (AMD vendor).
    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf0(b"AuthenticAMD"),
            entry(1, 0, [0x00a0_0f11, 0x0000_0800, 0xf6fa_3203, 0x178b_fbff]),
            entry(0xb, 0, [0, 1, 0x100, 0]),
            entry(0xb, 1, [0, 1, 0x201, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x0080_0003, 0x2fd3_fbff]),
            entry(0x8000_0008, 0, [0x3028, 0, 0x0001_0000, 0]),
            entry(0x8000_001d, 0, [0x121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 3, [0x163, 0x03c0_003f, 0x3fff, 1]),
            entry(0x8000_001e, 0, [0, 0x100, 0, 0]),
            entry(0x8000_0022, 0, [1, 0x6, 0, 0]),
        ]
    }

    #[test]
    fn detects_vendors() {
        assert_eq!(vendor(&intel()), Vendor::Intel);
        assert_eq!(vendor(&amd()), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"HygonGenuine")]), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"CentaurHauls")]), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor() {
        let mut e = intel();
        patch_cpuid(&mut e, CpuTopology { cpu_index: 2, cpu_count: 4 });
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH size kept");
        assert_eq!(l1.ebx & 0xff, 7, "brand index kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0, "left as KVM reported it");
        assert_ne!(l1.edx & EDX_HTT, 0);

        let mut one = amd();
        one[1].ebx = 0;
        patch_cpuid(&mut one, CpuTopology { cpu_index: 0, cpu_count: 1 });
        let l1 = find(&one, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0, "no HTT with a single vCPU");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH size filled in");
    }

    #[test]
    fn intel_cache_and_topology_leaves() {
        let mut e = intel();
        patch_cpuid(&mut e, CpuTopology { cpu_index: 3, cpu_count: 6 });
        for sub in 0..3 {
            let c = find(&e, 4, sub);
            assert_eq!(c.eax >> 26, 5, "cores per package - 1");
            assert_eq!((c.eax >> 14) & 0xfff, 0, "L1/L2 private");
            assert_eq!(c.eax & 0x3fff, find(&intel(), 4, sub).eax & 0x3fff, "type/level kept");
        }
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, 5, "L3 shared by all");
        assert_eq!(find(&e, 4, 4).eax, 0, "terminator untouched");

        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 3));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 3));
        assert_eq!(find(&e, 0x8000_0008, 0).ecx, 0, "AMD-only field left alone on Intel");
    }

    #[test]
    fn power_and_pmu_leaves_are_cleared() {
        let mut e = intel();
        patch_cpuid(&mut e, CpuTopology { cpu_index: 0, cpu_count: 1 });
        let l6 = find(&e, 6, 0);
        assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (EAX_ARAT, 0, 0, 0));
        let la = find(&e, 0xa, 0);
        assert_eq!((la.eax, la.ebx, la.ecx, la.edx), (0, 0, 0, 0));
    }

    #[test]
    fn amd_topology_leaves() {
        let mut e = amd();
        patch_cpuid(&mut e, CpuTopology { cpu_index: 1, cpu_count: 3 });
        let f = find(&e, 0x8000_0001, 0);
        assert_ne!(f.ecx & AMD_ECX_CMP_LEGACY, 0);
        assert_eq!(f.ecx & AMD_ECX_PERFCTR_CORE, 0);
        let sizes = find(&e, 0x8000_0008, 0);
        assert_eq!(sizes.ecx, 0x0001_2002, "NC 2, ApicIdSize 2, PerfTscSize kept");
        assert_eq!(sizes.eax, 0x3028, "address sizes kept");
        let topo = find(&e, 0x8000_001e, 0);
        assert_eq!((topo.eax, topo.ebx, topo.ecx), (1, 1, 0), "ext APIC ID, core ID, 1 thread, 1 node");
        assert_eq!((find(&e, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 0x8000_001d, 3).eax >> 14) & 0xfff, 2);
        assert_eq!(find(&e, 0x8000_0022, 0).ebx, 0);
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 1), "leaf 0xB patched on AMD too");
    }

    #[test]
    fn nonsense_topology_is_widened() {
        let mut e = intel();
        patch_cpuid(&mut e, CpuTopology { cpu_index: 5, cpu_count: 0 });
        let l1 = find(&e, 1, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (5, 6));
    }

    #[test]
    fn tsc_deadline_on_request() {
        let mut e = amd();
        enable_tsc_deadline(&mut e);
        assert_ne!(find(&e, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn core_id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(core_id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
