//! The traffic of a passed-through VF, for the `counters` of a failover pair's fast path.
//! Its frames never pass through Tandem, and PF drivers such as igb report no per-VF
//! counters (no ndo_get_vf_stats, so no IFLA_VF_STATS), but the VF itself counts what it
//! sends and receives in statistics registers in its BAR, which its guest driver only
//! reads (they are not cleared on read). Tandem reads the same registers through VFIO.
//! Models whose layout is listed here get counters; any other device has none.

use std::sync::{Arc, Mutex, Weak};

use pci::PciDevice;
use serde::Serialize;

/// Where one VF model keeps its counters: 32-bit registers that wrap.
struct VfModel {
    vendor: u16,
    device: u16,
    bar: u8,
    /// rx packets, tx packets, rx bytes, tx bytes.
    registers: [u64; 4],
}

/// Intel's 82576 and I350 VFs (igbvf): VFGPRC, VFGPTC, VFGORC, VFGOTC in BAR 0 (both
/// datasheets; QEMU's igb emulates them for its VFs).
const MODELS: &[VfModel] = &[
    VfModel { vendor: 0x8086, device: 0x10ca, bar: 0, registers: [0xf10, 0xf14, 0xf18, 0xf34] },
    VfModel { vendor: 0x8086, device: 0x1520, bar: 0, registers: [0xf10, 0xf14, 0xf18, 0xf34] },
];

/// What went through the VF since Tandem attached it, from the guest's side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VfTrafficCounts {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The counters of one VF: the registers' last values and the totals they add up to.
/// Sampled on the host-device worker, for each `counters` and every few seconds besides,
/// so that a register that wraps (4 GiB of bytes: 34 s at 1 Gb/s) is never missed.
pub struct VfTraffic {
    model: &'static VfModel,
    device: Weak<Mutex<dyn PciDevice>>,
    state: Mutex<([u32; 4], [u64; 4])>,
}

impl VfTraffic {
    /// Counters for `device` if it is a model listed above, starting from now.
    pub fn new(device: &Arc<Mutex<dyn PciDevice>>) -> Option<Arc<Self>> {
        let ids = {
            let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
            let mut b = [0u8; 4];
            d.read_config(0, &mut b);
            u32::from_le_bytes(b)
        };
        let (vendor, id) = (ids as u16, (ids >> 16) as u16);
        let model = MODELS.iter().find(|m| m.vendor == vendor && m.device == id)?;
        let traffic = Self { model, device: Arc::downgrade(device), state: Mutex::new(([0; 4], [0; 4])) };
        let now = traffic.read()?;
        traffic.state.lock().unwrap_or_else(|e| e.into_inner()).0 = now;
        Some(Arc::new(traffic))
    }

    fn read(&self) -> Option<[u32; 4]> {
        let device = self.device.upgrade()?;
        let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = [0u32; 4];
        for (v, &offset) in out.iter_mut().zip(&self.model.registers) {
            let mut b = [0u8; 4];
            d.read_bar(self.model.bar, offset, &mut b);
            *v = u32::from_le_bytes(b);
        }
        Some(out)
    }

    /// Reads the registers (through VFIO: on the host-device worker, whose filter allows
    /// it) and returns the totals now; the last ones once the device has left the bus.
    pub fn sample(&self) -> VfTrafficCounts {
        let now = self.read();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(now) = now {
            let (last, total) = &mut *state;
            for i in 0..4 {
                total[i] += u64::from(now[i].wrapping_sub(last[i]));
            }
            *last = now;
        }
        counts(state.1)
    }

    /// The totals as last sampled, read on any thread.
    pub fn totals(&self) -> VfTrafficCounts {
        counts(self.state.lock().unwrap_or_else(|e| e.into_inner()).1)
    }
}

fn counts(t: [u64; 4]) -> VfTrafficCounts {
    VfTrafficCounts { rx_packets: t[0], tx_packets: t[1], rx_bytes: t[2], tx_bytes: t[3] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::{BarChange, BarSpec, ConfigError};

    /// A VF whose statistics registers are whatever the test sets.
    struct FakeVf {
        ids: u32,
        registers: [u32; 4],
    }

    impl PciDevice for FakeVf {
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0);
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.ids.to_le_bytes());
            }
        }
        fn write_config(&mut self, _: u64, _: &[u8]) -> Vec<BarChange> {
            Vec::new()
        }
        fn bars(&self) -> Vec<BarSpec> {
            Vec::new()
        }
        fn set_bar_address(&mut self, _: u8, _: u64) -> Result<(), ConfigError> {
            Ok(())
        }
        fn bar_address(&self, _: u8) -> Option<u64> {
            None
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            let i = [0xf10, 0xf14, 0xf18, 0xf34].iter().position(|&o| o == offset);
            match (bar, i) {
                (0, Some(i)) => data.copy_from_slice(&self.registers[i].to_le_bytes()),
                _ => data.fill(0xff),
            }
        }
        fn write_bar(&mut self, _: u8, _: u64, _: &[u8]) {}
        fn as_any(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    fn vf(ids: u32, registers: [u32; 4]) -> (Arc<Mutex<FakeVf>>, Arc<Mutex<dyn PciDevice>>) {
        let typed = Arc::new(Mutex::new(FakeVf { ids, registers }));
        let shared: Arc<Mutex<dyn PciDevice>> = typed.clone();
        (typed, shared)
    }

    #[test]
    fn counts_from_the_attach_across_wraps_and_keeps_them_after_removal() {
        let (typed, shared) = vf(0x10ca_8086, [100, 200, 0xffff_ff00, 5]);
        let t = VfTraffic::new(&shared).expect("an 82576 VF has counters");
        assert_eq!(t.sample(), VfTrafficCounts::default(), "what the host did before is not the guest's");
        typed.lock().unwrap().registers = [110, 230, 0x100, 1005];
        let c = t.sample();
        assert_eq!(c, VfTrafficCounts { rx_packets: 10, tx_packets: 30, rx_bytes: 0x200, tx_bytes: 1000 });
        typed.lock().unwrap().registers = [111, 230, 0x100, 1005];
        assert_eq!(t.totals(), c, "totals are the last sample's");
        drop((typed, shared));
        assert_eq!(t.sample(), c, "the device is gone: the last totals stay");
    }

    #[test]
    fn other_devices_have_none() {
        assert!(VfTraffic::new(&vf(0x1234_8086, [0; 4]).1).is_none());
        assert!(VfTraffic::new(&vf(0x11e8_1234, [0; 4]).1).is_none());
    }
}
