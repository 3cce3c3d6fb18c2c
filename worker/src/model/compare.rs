//! Numerical comparison against reference outputs.

use candle_core::{DType, Result, Tensor};

/// `‖ours − reference‖₂ / ‖reference‖₂`, computed in f64 so that the metric itself adds no error.
/// Shapes must match exactly.
pub fn relative_l2(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    if ours.dims() != reference.dims() {
        candle_core::bail!(
            "shape mismatch: ours {:?}, reference {:?}",
            ours.dims(),
            reference.dims()
        );
    }
    let ours = ours.to_dtype(DType::F64)?;
    let reference = reference.to_dtype(DType::F64)?;
    let err = (ours - &reference)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?;
    let norm = reference.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(if norm == 0.0 { err } else { err / norm })
}
