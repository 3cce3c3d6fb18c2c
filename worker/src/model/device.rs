//! Names of compute devices and precisions as users type them (`cpu`, `cuda:1`, `bf16`), turned
//! into candle's [`Device`] and [`DType`]; shared by the CLI and the worker daemon. Also what a
//! GPU says about its memory (capacity, and the high-water mark of what the model stack
//! allocated), for sizing work to it and for benchmarks.

use candle_core::{DType, Device};

/// A device or dtype name that cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {name}: the GPU ordinal is not a number")]
    Ordinal { name: String },
    #[error("--device {name}: no usable CUDA device (is this a CUDA build?): {source}")]
    NoCuda {
        name: String,
        source: candle_core::Error,
    },
    #[error("--device {name}: expected cpu, cuda or cuda:N")]
    UnknownDevice { name: String },
    #[error("--dtype {name}: expected f32, bf16 or f16")]
    UnknownDtype { name: String },
}

/// `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().map_err(|_| DeviceError::Ordinal {
                    name: cuda.to_string(),
                })?,
            };
            Device::new_cuda(ordinal).map_err(|source| DeviceError::NoCuda {
                name: cuda.to_string(),
                source,
            })
        }
        other => Err(DeviceError::UnknownDevice {
            name: other.to_string(),
        }),
    }
}

/// `f32`, `bf16` or `f16`; `None` picks f32 on a CPU and bf16 on a GPU (CPU kernels for half
/// precision are slow, GPU memory is scarce).
pub fn parse_dtype(name: Option<&str>, device: &Device) -> Result<DType, DeviceError> {
    Ok(match name {
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => {
            return Err(DeviceError::UnknownDtype {
                name: other.to_string(),
            })
        }
    })
}

/// A GPU's `(free, total)` memory in bytes as its driver reports it; `None` on the CPU.
pub fn memory_info(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        return gpu.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

/// The high-water mark, in bytes, of the GPU memory in use in the device's default memory pool
/// (where candle allocates, stream-ordered) since the last [`reset_peak_memory`]: the peak of the
/// model stack's own tensors, without the driver's and libraries' fixed overheads. `None` on the
/// CPU and on GPUs without memory pools.
pub fn peak_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        return pool_used_high(gpu, false);
    }
    let _ = device;
    None
}

/// Starts a new [`peak_memory`] window at what is in use now.
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        pool_used_high(gpu, true);
    }
    let _ = device;
}

/// The used-memory high-water mark of the default memory pool of `gpu`, reset to what is in use
/// now first when `reset`.
#[cfg(feature = "cuda")]
fn pool_used_high(gpu: &candle_core::CudaDevice, reset: bool) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let context = gpu.cuda_stream().context().clone();
    if !context.has_async_alloc() || context.bind_to_thread().is_err() {
        return None;
    }
    let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // the driver takes 0 as "reset to the current use"
    let mut value: u64 = 0;
    // SAFETY: the context is current on this thread; the pool handle and the value are plain
    // out-parameters of the sizes the driver writes (a handle, a cuuint64_t).
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        if reset
            && sys::cuMemPoolSetAttribute(pool, attribute, (&mut value as *mut u64).cast())
                != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        if sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast())
            != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_say_what_is_expected() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(
            parse_device("gpu").unwrap_err().to_string(),
            "--device gpu: expected cpu, cuda or cuda:N"
        );
        assert_eq!(
            parse_device("cuda:x").unwrap_err().to_string(),
            "--device cuda:x: the GPU ordinal is not a number"
        );
        let cpu = Device::Cpu;
        assert_eq!(parse_dtype(None, &cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype(Some("bf16"), &cpu).unwrap(), DType::BF16);
        assert_eq!(parse_dtype(Some("f16"), &cpu).unwrap(), DType::F16);
        assert_eq!(
            parse_dtype(Some("f64"), &cpu).unwrap_err().to_string(),
            "--dtype f64: expected f32, bf16 or f16"
        );
    }

    #[test]
    fn the_cpu_reports_no_device_memory() {
        assert_eq!(memory_info(&Device::Cpu), None);
        reset_peak_memory(&Device::Cpu);
        assert_eq!(peak_memory(&Device::Cpu), None);
    }
}
