#![no_main]
//! The parsers behind the command line, the `--config` file and the control socket's
//! `device-add`: `--memory`, `--serial`, `--net`, `--disk`, `--vf`, `--device` values
//! from the input's lines, a `VmConfig` assembled from what parsed and validated, and
//! the whole input as a JSON config document.
//!
//! Checked: no panic; a refusal is an `Err` whose message says what to do; what parses
//! keeps the promises its type documents (1 to 16 queues, a tap name, a unicast VF MAC,
//! huge-page sizes in whole 2 MiB pages, a PCI address for a device); a config that
//! validates survives the trip through its JSON document (and its JSON text) unchanged.

use libfuzzer_sys::fuzz_target;
use vmm::config::{parse_memory, DiskConfig, NetConfig};
use vmm::sriov::{DeviceSpec, VfSpec};
use vmm::{ConfigDocument, SerialConfig, VmConfig};

fn refused<T>(what: &str, value: &str, r: Result<T, vmm::config::ConfigError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(!e.to_string().is_empty(), "{what} {value:?}: an error without a message");
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(doc) = refused("document", &text, ConfigDocument::from_json(&text)) {
        let _ = refused("document", &text, VmConfig::try_from(doc));
    }

    let mut config = VmConfig::new("/boot/vmlinuz");
    for (i, line) in text.split('\n').enumerate() {
        let (kind, value) = line.split_at(line.char_indices().nth(1).map_or(line.len(), |(at, _)| at));
        match kind {
            "m" => {
                if let Some((size, huge)) = refused("memory", value, parse_memory(value)) {
                    assert!(!huge || size % (2 << 20) == 0, "{value:?} gave {size} bytes of huge pages");
                    (config.memory, config.hugepages) = (size, huge);
                }
            }
            "s" => {
                if let Some(serial) = refused("serial", value, value.parse::<SerialConfig>()) {
                    config.serial = serial;
                }
            }
            "n" => {
                if let Some(net) = refused("net", value, NetConfig::parse(value, i)) {
                    assert!((1..=16).contains(&net.queues) && !net.tap.is_empty() && !net.id.is_empty(), "{net:?}");
                    config.nets.push(net);
                }
            }
            "d" => {
                if let Some(disk) = refused("disk", value, DiskConfig::parse(value, i)) {
                    assert!(!disk.path.as_os_str().is_empty() && !disk.id.is_empty(), "{disk:?}");
                    config.disks.push(disk);
                }
            }
            "v" => {
                if let Some(vf) = refused("vf", value, VfSpec::parse(value, i)) {
                    assert!(vf.mac.is_none_or(|m| m[0] & 1 == 0 && m != [0; 6]), "{vf:?}");
                    assert!(vf.vlan.is_none_or(|v| v <= 4094) && !vf.pf.is_empty() && vf.pf.len() <= 15, "{vf:?}");
                    config.vfs.push(vf);
                }
            }
            "D" => {
                if let Some(dev) = refused("device", value, DeviceSpec::parse(value, i)) {
                    assert!(dev.path.starts_with("/sys") && dev.path.ends_with(&dev.bdf), "{dev:?}");
                    config.devices.push(dev);
                }
            }
            "c" => config.cpus = value.len() as u32 * 17 % 300,
            _ => {}
        }
    }
    if refused("config", "", config.validate()).is_none() {
        return;
    }
    let doc = ConfigDocument::from(&config);
    let back = VmConfig::try_from(doc.clone()).unwrap_or_else(|e| panic!("{doc:?} does not parse back: {e}"));
    assert_eq!(back, config, "the config changed on its way through {doc:?}");
    let json = doc.to_json();
    let reparsed = ConfigDocument::from_json(&json).unwrap_or_else(|e| panic!("{json} does not parse back: {e}"));
    assert_eq!(reparsed, doc);
});
