//! Names of compute devices and precisions as users type them (`cpu`, `cuda:1`, `bf16`), turned
//! into candle's [`Device`] and [`DType`]; shared by the CLI and the worker daemon.

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
}
