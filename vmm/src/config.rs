//! `VmConfig`: the one description of a VM that the CLI, the library and (later) the
//! control socket all build.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("memory size {0:?} is not a size: use a number with an optional K, M, G or T suffix, e.g. 512M or 5G")]
    BadSize(String),
    #[error("memory size 0: give the guest memory, e.g. --memory 512M")]
    ZeroMemory,
    #[error("0 vCPUs: a guest needs at least one, e.g. --cpus 1")]
    ZeroCpus,
    #[error("{cpus} vCPUs is more than Tandem supports ({max}); use --cpus {max} or fewer")]
    TooManyCpus { cpus: u32, max: u32 },
    #[error("--serial {0:?} is not understood: use stdio, off or file=PATH")]
    BadSerial(String),
}

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Output to stdout, input from stdin (raw mode when stdin is a terminal).
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// The UART exists but its output is discarded.
    Off,
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub serial: SerialConfig,
}

impl VmConfig {
    /// The kernel command line used when none is given: the console on COM1, and a
    /// panic that reboots at once so a dead guest ends the VMM instead of hanging.
    pub const DEFAULT_CMDLINE: &'static str = "console=ttyS0 panic=-1";
    /// The MP table and MADT describe APIC ids in one byte, 0xff being broadcast.
    pub const MAX_CPUS: u32 = 254;

    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: Self::DEFAULT_CMDLINE.to_string(),
            cpus: 1,
            memory: 512 << 20,
            serial: SerialConfig::default(),
        }
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::ZeroCpus);
        }
        if self.cpus > Self::MAX_CPUS {
            return Err(ConfigError::TooManyCpus { cpus: self.cpus, max: Self::MAX_CPUS });
        }
        if self.memory == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        Ok(())
    }
}

/// Parses `512M`, `5G`, `1048576`, `64k` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("5g"), Ok(5 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "M", "12Q", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!("file=/tmp/x".parse(), Ok(SerialConfig::File("/tmp/x".into())));
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        assert_eq!(c.validate(), Ok(()));
        c.cpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroCpus));
        c.cpus = 255;
        assert!(matches!(c.validate(), Err(ConfigError::TooManyCpus { .. })));
        c.cpus = 2;
        c.memory = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroMemory));
    }
}
