//! The fuzz input read front to back. Reads past its end give zeros, so every input is
//! a valid program; targets loop until [`Input::is_empty`], and each step consumes at
//! least one byte, which bounds the work one input can ask for.

pub struct Input<'a> {
    data: &'a [u8],
}

/// Access widths: mostly what a CPU makes, sometimes what it does not.
const WIDTHS: [usize; 10] = [1, 2, 4, 8, 4, 2, 4, 0, 3, 16];

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A number below `n` (`n` > 0), from as few bytes as `n` needs.
    pub fn below(&mut self, n: u64) -> u64 {
        let raw = match n {
            0..=0x100 => u64::from(self.u8()),
            0x101..=0x1_0000 => u64::from(self.u16()),
            0x1_0001..=0x1_0000_0000 => u64::from(self.u32()),
            _ => self.u64(),
        };
        raw % n.max(1)
    }

    /// The width of a register access.
    pub fn width(&mut self) -> usize {
        WIDTHS[self.below(WIDTHS.len() as u64) as usize]
    }

    /// `len` bytes of a written value: a little-endian number, repeated past 8 bytes.
    pub fn value(&mut self, len: usize) -> Vec<u8> {
        let v = self.u64().to_le_bytes();
        (0..len).map(|i| v[i % 8]).collect()
    }
}
