//! What a VM has to say while it runs — a device that stopped working, a VF that moved —
//! handed to whoever embeds it instead of printed. The `tandem` binary prints them on
//! stderr; a runtime can log them per VM, or drop them.

use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something happened that the VM's owner may want to know (a device came or went).
    Info,
    /// Something went wrong and the VM carries on without it.
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub level: Level,
    pub text: String,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level {
            Level::Info => f.write_str(&self.text),
            Level::Warning => write!(f, "warning: {}", self.text),
        }
    }
}

type Sink = dyn Fn(&Notice) + Send + Sync;

/// Where one VM's notices go. Cheap to clone; every part of the VM holds one.
#[derive(Clone, Default)]
pub struct Notices(Option<Arc<Sink>>);

impl Notices {
    /// Notices go to `sink`, called on whichever VMM thread has something to say: it
    /// should not block for long.
    pub fn new(sink: impl Fn(&Notice) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(sink)))
    }

    /// Notices are dropped.
    pub fn discard() -> Self {
        Self(None)
    }

    pub fn info(&self, text: impl fmt::Display) {
        self.send(Level::Info, text);
    }

    pub fn warn(&self, text: impl fmt::Display) {
        self.send(Level::Warning, text);
    }

    fn send(&self, level: Level, text: impl fmt::Display) {
        if let Some(sink) = &self.0 {
            sink(&Notice { level, text: text.to_string() });
        }
    }
}

/// A device's notices, each prefixed with the device's name.
#[derive(Clone, Debug, Default)]
pub struct DeviceNotices {
    name: String,
    notices: Notices,
}

impl DeviceNotices {
    pub fn new(name: impl Into<String>, notices: Notices) -> Self {
        Self { name: name.into(), notices }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn warn(&self, what: impl fmt::Display) {
        self.notices.warn(format_args!("{}: {what}", self.name));
    }

    /// The `n`th occurrence of a recurring guest- or host-caused problem: the first few,
    /// then only every power of two, so that a misbehaving guest cannot flood the VM's
    /// owner (the device's counters have the exact numbers).
    pub fn recurring(&self, n: u64, what: impl fmt::Display) {
        if n <= 8 || n.is_power_of_two() {
            self.warn(format_args!("{what} (occurrence {n})"));
        }
    }
}

impl fmt::Debug for Notices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Notices(sink)" } else { "Notices(discard)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_sink_gets_each_notice_with_its_level_and_discard_drops_them() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let notices = Notices::new({
            let seen = seen.clone();
            move |n| seen.lock().unwrap().push(n.to_string())
        });
        notices.info("vf0: added");
        notices.clone().warn(format_args!("queue {} is unusable", 1));
        Notices::discard().warn("never seen");
        assert_eq!(*seen.lock().unwrap(), ["vf0: added", "warning: queue 1 is unusable"]);
    }

    #[test]
    fn a_recurring_problem_is_told_8_times_then_at_powers_of_two() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = DeviceNotices::new("virtio-net tap0", {
            let seen = seen.clone();
            Notices::new(move |n| seen.lock().unwrap().push(n.text.clone()))
        });
        for n in 1..=40 {
            log.recurring(n, "chain rejected");
        }
        let seen = seen.lock().unwrap();
        let told: Vec<&str> = seen.iter().map(|t| t.rsplit("occurrence ").next().unwrap()).collect();
        assert_eq!(told, ["1)", "2)", "3)", "4)", "5)", "6)", "7)", "8)", "16)", "32)"]);
        assert_eq!(seen[0], "virtio-net tap0: chain rejected (occurrence 1)");
    }
}
