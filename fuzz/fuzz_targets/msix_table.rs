#![no_main]
//! The MSI-X table and PBA as the guest reaches them (any offset and width), the
//! capability's control word (enable, function mask), device triggers and function
//! resets, against a model of what the spec and `pci::msix` say.
//!
//! Checked: every table and PBA read returns what the model holds (undefined accesses
//! all-ones); the routes the VMM is told follow the protocol (`ModelVectors`, strict)
//! and match the model's after every step; a trigger of a masked vector sets its pending
//! bit and is delivered exactly once when it becomes live; vectors beyond the table are
//! refused.

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pci::msix::{Msix, MAX_MSIX_VECTORS, MSIX_TABLE_ENTRY_SIZE};
use pci::MsiMessage;
use tandem_fuzz::vectors::{ModelVectors, Route};
use tandem_fuzz::Input;

const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;

/// The registers and routes as the spec describes them.
struct Model {
    /// addr_lo, addr_hi, data, vector control.
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    routes: Vec<Route>,
    delivered: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl Model {
    fn new(n: usize) -> Self {
        Self {
            entries: vec![[0, 0, 0, 1]; n],
            pending: vec![false; n],
            routes: vec![Route::Disabled; n],
            delivered: vec![0; n],
            enabled: false,
            function_masked: false,
        }
    }

    /// The entry and field of a defined access: DWORD to a field, QWORD to the address
    /// or to data and control.
    fn access(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let field = (offset % MSIX_TABLE_ENTRY_SIZE) as usize;
        let ok = match len {
            4 => field % 4 == 0,
            8 => field % 8 == 0,
            _ => false,
        };
        let index = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        (ok && index < self.entries.len()).then_some((index, field / 4))
    }

    fn sync(&mut self, v: usize) {
        let e = self.entries[v];
        let msg = MsiMessage { addr: u64::from(e[1]) << 32 | u64::from(e[0]), data: e[2] };
        let masked = self.function_masked || e[3] & 1 != 0;
        self.routes[v] = match (self.routes[v], self.enabled, masked) {
            (_, false, _) => Route::Disabled,
            (Route::Disabled, true, true) => Route::Disabled,
            (Route::Live(m) | Route::Masked(m), true, true) => Route::Masked(m),
            (_, true, false) => Route::Live(msg),
        };
        if matches!(self.routes[v], Route::Live(_)) && self.pending[v] {
            self.pending[v] = false;
            self.delivered[v] += 1;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.access(offset, data.len()) else { return };
        for (i, word) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            let f = field + i;
            self.entries[index][f] = match f {
                0 => value & !0x3,
                3 => value & 1,
                _ => value,
            };
        }
        self.sync(index);
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let Some((index, field)) = self.access(offset, len) else { return vec![0xff; len] };
        (0..len / 4).flat_map(|i| self.entries[index][field + i].to_le_bytes()).collect()
    }

    fn read_pba(&self, offset: u64, len: usize) -> Vec<u8> {
        let words = self.pending.len().div_ceil(64);
        let aligned = matches!(len, 4 | 8) && offset % len as u64 == 0;
        if !aligned || offset / 8 >= words as u64 {
            return vec![0xff; len];
        }
        let word: u64 = (0..64)
            .filter(|b| self.pending.get((offset / 8 * 64 + b) as usize).copied().unwrap_or(false))
            .map(|b| 1 << b)
            .sum();
        let start = (offset % 8) as usize;
        word.to_le_bytes()[start..start + len].to_vec()
    }

    fn set_control(&mut self, control: u16) {
        let state = (control & ENABLE != 0, control & FUNCTION_MASK != 0);
        if state == (self.enabled, self.function_masked) {
            return;
        }
        (self.enabled, self.function_masked) = state;
        for v in 0..self.entries.len() {
            self.sync(v);
        }
    }

    fn trigger(&mut self, v: usize) {
        if !self.enabled {
            return;
        }
        match self.routes[v] {
            Route::Live(_) => self.delivered[v] += 1,
            _ => self.pending[v] = true,
        }
    }

    fn reset(&mut self) {
        self.entries.fill([0, 0, 0, 1]);
        self.pending.fill(false);
        self.set_control(0);
    }
}

/// An offset in or around the table (and sometimes anywhere).
fn offset(input: &mut Input, table_len: u64) -> u64 {
    match input.u8() % 8 {
        0..=5 => input.below(table_len + 32),
        6 => u64::MAX - u64::from(input.u8()),
        _ => input.u64(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let size = if input.u8() < 0xe0 { 1 + u16::from(input.u8() % 64) } else { 1 + input.u16() % MAX_MSIX_VECTORS };
    let vectors = Arc::new(ModelVectors::new(size, false, true));
    let mut msix = Msix::new(size, vectors.clone()).expect("a valid table size");
    let mut model = Model::new(usize::from(size));
    let table_len = u64::from(size) * MSIX_TABLE_ENTRY_SIZE;

    while !input.is_empty() {
        match input.u8() % 8 {
            0 | 1 => {
                let at = offset(&mut input, table_len);
                let width = input.width();
                let value = input.value(width);
                msix.write_table(at, &value);
                model.write(at, &value);
            }
            2 => {
                let at = offset(&mut input, table_len);
                let mut buf = vec![0u8; input.width()];
                msix.read_table(at, &mut buf);
                assert_eq!(buf, model.read(at, buf.len()), "table read at {at:#x}");
            }
            3 => {
                let at = offset(&mut input, table_len.div_ceil(128) * 8 + 8);
                let mut buf = vec![0u8; input.width()];
                if input.bool() {
                    msix.write_pba(at, &buf.clone());
                }
                msix.read_pba(at, &mut buf);
                assert_eq!(buf, model.read_pba(at, buf.len()), "PBA read at {at:#x}");
            }
            4 => {
                let control = input.u16();
                msix.set_control(control);
                model.set_control(control);
            }
            5 | 6 => {
                let v = input.below(u64::from(size) + 2) as u16;
                let result = msix.trigger(v);
                assert_eq!(result.is_ok(), v < size, "trigger({v}) of a table of {size}");
                if v < size {
                    model.trigger(usize::from(v));
                }
            }
            _ => {
                msix.reset();
                model.reset();
            }
        }
        assert_eq!((msix.is_enabled(), msix.is_function_masked()), (model.enabled, model.function_masked));
        for v in 0..size {
            let i = usize::from(v);
            assert_eq!(vectors.route(v), Some(model.routes[i]), "route of vector {v}");
            assert_eq!(vectors.triggers(v), model.delivered[i], "interrupts delivered on vector {v}");
            assert_eq!(msix.is_pending(v), model.pending[i], "pending bit of vector {v}");
        }
    }
});
