//! CMOS RTC at ports 0x70 (index) / 0x71 (data): the wall clock from the host,
//! status registers that say "no update in progress, valid RAM", and plain storage
//! for the rest. Without it Linux's rtc_cmos probe waits for seconds on a missing chip.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Seconds since the Unix epoch; replaceable so tests read a fixed time.
    clock: fn() -> u64,
}

fn host_clock() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(host_clock)
    }
}

impl Cmos {
    pub const PORT_BASE: u64 = 0x70;
    pub const PORT_LEN: u64 = 2;

    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_clock(clock: fn() -> u64) -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A as usize] = 0x26; // 32.768 kHz base, 1024 Hz rate, UIP clear
        ram[STATUS_B as usize] = B_24H; // BCD, 24-hour, no interrupts enabled
        ram[STATUS_D as usize] = 0x80; // valid RAM and time
        Self { index: 0, ram, clock }
    }

    fn encode(&self, value: u8) -> u8 {
        if self.ram[STATUS_B as usize] & B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let t = civil_time((self.clock)());
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS if self.ram[STATUS_B as usize] & B_24H != 0 => self.encode(t.hour),
            HOURS => {
                let pm = if t.hour >= 12 { 0x80 } else { 0 };
                let h12 = match t.hour % 12 {
                    0 => 12,
                    h => h,
                };
                self.encode(h12) | pm
            }
            WEEKDAY => self.encode(t.weekday + 1),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode((t.year % 100) as u8),
            CENTURY => self.encode((t.year / 100) as u8),
            STATUS_C => std::mem::take(&mut self.ram[STATUS_C as usize]), // read clears flags
            r => self.ram[r as usize & 0x7f],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            // The clock follows the host: a guest setting it (hwclock -w) is ignored.
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {}
            STATUS_A => self.ram[STATUS_A as usize] = value & 0x7f, // UIP is read-only
            STATUS_C | STATUS_D => {}                               // read-only
            r => self.ram[r as usize & 0x7f] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else { return };
        *first = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask on real chipsets; only the index is kept.
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

struct CivilTime {
    year: u32,
    month: u8,
    day: u8,
    weekday: u8, // 0 = Sunday
    hour: u8,
    minute: u8,
    second: u8,
}

/// Unix seconds to a UTC calendar date (proleptic Gregorian, days-from-civil inverted).
fn civil_time(secs: u64) -> CivilTime {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
    CivilTime {
        year,
        month,
        day,
        weekday: ((days + 4) % 7) as u8, // 1970-01-01 was a Thursday
        hour: (rem / 3600) as u8,
        minute: (rem % 3600 / 60) as u8,
        second: (rem % 60) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29 13:45:07 UTC, a Thursday.
    fn fixed() -> u64 {
        1_709_214_307
    }

    fn reg(c: &mut Cmos, r: u8) -> u8 {
        c.write(0, &[r]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reads_bcd_time_by_default() {
        let mut c = Cmos::with_clock(fixed);
        assert_eq!(reg(&mut c, SECONDS), 0x07);
        assert_eq!(reg(&mut c, MINUTES), 0x45);
        assert_eq!(reg(&mut c, HOURS), 0x13);
        assert_eq!(reg(&mut c, DAY), 0x29);
        assert_eq!(reg(&mut c, MONTH), 0x02);
        assert_eq!(reg(&mut c, YEAR), 0x24);
        assert_eq!(reg(&mut c, CENTURY), 0x20);
        assert_eq!(reg(&mut c, WEEKDAY), 0x05);
        assert_eq!(reg(&mut c, STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(reg(&mut c, STATUS_D), 0x80);
    }

    #[test]
    fn honours_binary_and_12_hour_modes() {
        let mut c = Cmos::with_clock(fixed);
        c.write(0, &[STATUS_B]);
        c.write(1, &[B_BINARY]);
        assert_eq!(reg(&mut c, MINUTES), 45);
        assert_eq!(reg(&mut c, HOURS), 0x80 | 1, "1 PM");
    }

    #[test]
    fn ram_is_storage_and_time_writes_are_ignored() {
        let mut c = Cmos::with_clock(fixed);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(reg(&mut c, 0x40), 0x5a);
        c.write(0, &[SECONDS | 0x80]); // NMI-disable bit on the index
        c.write(1, &[0x59]);
        assert_eq!(reg(&mut c, SECONDS), 0x07);
    }

    #[test]
    fn epoch_and_far_future_dates() {
        let t = civil_time(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 4));
        let t = civil_time(4_102_444_800); // 2100-01-01
        assert_eq!((t.year, t.month, t.day), (2100, 1, 1));
    }
}
