//! A QEMU device as its driver and ordered properties: the one form that a `-device` argument
//! and a QMP `device_add` are both made from, so a device hot-plugged after a snapshot loads
//! (or a link arrives late) is exactly the device a cold boot gets. Plain data.

/// One device: `driver,key=value,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The device model (`virtio-net-pci`, `virtio-9p-pci`).
    pub driver: String,
    /// Its properties, in command-line order (`netdev`, `id`, `mac`, `bus`, `addr`, ...).
    pub props: Vec<(&'static str, Value)>,
}

/// A property's value. QMP's `device_add` checks JSON types (an integer property given as a
/// string is refused), so numbers stay numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A string (`virtio-net-pci`, `0x8`, `02:00:...`).
    Text(String),
    /// An integer (`host_mtu`).
    Number(u64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(text) => f.write_str(text),
            Value::Number(number) => write!(f, "{number}"),
        }
    }
}

impl From<String> for Value {
    fn from(text: String) -> Value {
        Value::Text(text)
    }
}

impl From<&str> for Value {
    fn from(text: &str) -> Value {
        Value::Text(text.to_string())
    }
}

impl From<u32> for Value {
    fn from(number: u32) -> Value {
        Value::Number(number.into())
    }
}

impl Device {
    /// A device of `driver` with no properties yet.
    pub fn new(driver: impl Into<String>) -> Device {
        Device { driver: driver.into(), props: Vec::new() }
    }

    /// Adds a property.
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Device {
        self.props.push((key, value.into()));
        self
    }

    /// The value of property `key`.
    pub fn prop(&self, key: &str) -> Option<&Value> {
        self.props.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The device's `id`, which `device_del` and `DEVICE_DELETED` name.
    pub fn id(&self) -> String {
        self.prop("id").map(Value::to_string).unwrap_or_default()
    }

    /// The `-device` argument: `driver,key=value,...`.
    pub fn to_arg(&self) -> String {
        let mut arg = self.driver.clone();
        for (key, value) in &self.props {
            arg.push_str(&format!(",{key}={value}"));
        }
        arg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_as_a_device_argument() {
        let device = Device::new("virtio-net-pci").with("netdev", "data1").with("id", "nic1");
        assert_eq!(device.to_arg(), "virtio-net-pci,netdev=data1,id=nic1");
        assert_eq!(device.id(), "nic1");
        assert_eq!(device.prop("netdev"), Some(&Value::from("data1")));
        assert_eq!(Device::new("e1000").with("host_mtu", 9000u32).to_arg(), "e1000,host_mtu=9000");
    }
}
