//! What this machine offers, for the worker's record: host memory (from `/proc/meminfo`) and
//! the compute device (the CPU model from `/proc/cpuinfo`, or the CUDA ordinal).

use candle_core::{Device, DeviceLocation};
use longtake_proto::DeviceInfo;

/// Total host memory in bytes; 0 where `/proc/meminfo` cannot be read (not Linux).
pub fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total_bytes(&text))
        .unwrap_or(0)
}

/// The `MemTotal` line of a `/proc/meminfo` text, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    Some(value * scale)
}

/// The CPU model and the number of logical CPUs listed in a `/proc/cpuinfo` text.
pub fn cpu_model(cpuinfo: &str) -> Option<(String, usize)> {
    let model = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_string())?;
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    Some((model, cpus))
}

/// A device's own memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Not free, by any process on the device.
    pub used: u64,
    pub total: u64,
}

/// The memory of `device` where it has its own and reports it (a CUDA device: the driver's
/// free and total); `None` for the CPU, whose memory is the host's.
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(DeviceMemory {
            used: total.saturating_sub(free) as u64,
            total: total as u64,
        });
    }
    let _ = device;
    None
}

/// The record's description of the device tasks run on (`name` as configured: `cpu`, `cuda:N`).
pub fn device_info(device: &Device) -> DeviceInfo {
    match device.location() {
        DeviceLocation::Cpu => {
            let description = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|text| cpu_model(&text))
                .map(|(model, cpus)| format!("{model} ({cpus} logical CPUs)"))
                .unwrap_or_else(|| format!("{} CPU", std::env::consts::ARCH));
            DeviceInfo {
                name: "cpu".into(),
                description,
                memory_bytes: host_memory_bytes(),
            }
        }
        // candle exposes no device name; the ordinal and the memory size are what it can tell.
        DeviceLocation::Cuda { gpu_id } => DeviceInfo {
            name: format!("cuda:{gpu_id}"),
            description: format!("CUDA device {gpu_id}"),
            memory_bytes: device_memory(device).map_or(0, |m| m.total),
        },
        DeviceLocation::Metal { gpu_id } => DeviceInfo {
            name: format!("metal:{gpu_id}"),
            description: format!("Metal device {gpu_id}"),
            memory_bytes: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_cpuinfo_texts() {
        let meminfo = "MemTotal:       16314028 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(16314028 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo), Some(("AMD EPYC 7B13".to_string(), 2)));
    }

    #[test]
    fn this_machine_has_memory_and_a_cpu() {
        assert!(host_memory_bytes() > 0);
        let cpu = device_info(&Device::Cpu);
        assert_eq!(cpu.name, "cpu");
        assert!(!cpu.description.is_empty());
        assert_eq!(cpu.memory_bytes, host_memory_bytes());
        assert_eq!(device_memory(&Device::Cpu), None);
    }
}
