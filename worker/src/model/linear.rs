//! A linear layer (`y = x Wᵀ + b`, weights in the checkpoint's `(out, in)` layout), with the bias
//! taken into the matrix product on the CPU.
//!
//! candle's `Linear` multiplies, then adds the bias as a second operation: a fresh output of the
//! whole size, read again and written again (the mid model's FFN input projection is 22 MB per
//! call), and candle's matmul splits one product over both threads, each streaming the same
//! packed weights. Here (CPU, f32) the output rows start as copies of the bias, the `gemm` crate
//! accumulates the product into them, and each thread takes a contiguous run of rows whole: at the
//! mid model's shapes 217-335 GFLOP/s became what the README's benchmark section states. Where
//! the CPU has AMX the product runs on its tiles (`cpu_amx`: f32 accuracy from bf16 parts, the
//! layer's weights split and laid out once, on first use). Other devices and dtypes run candle's
//! own `Linear`, and the two agree within f32 rounding (AMX: relative L2 about 4e-6).

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::model::cpu_amx::{self, PackedWeights};
use crate::model::cpu_math::{contiguous_f32, product, written};

/// Rows below which a product is not split between threads.
const MIN_ROWS_PER_THREAD: usize = 64;

/// `y = x Wᵀ + b` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The weights laid out for AMX tiles, made on the first CPU forward that uses them; shared
    /// by clones (the weights are immutable).
    amx: Arc<OnceLock<PackedWeights>>,
}

impl Linear {
    /// `weight` is `(out, in)`, `bias` `(out,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
            amx: Arc::default(),
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

/// A layer with a bias, its tensors at `vb`'s `weight` and `bias` (what `candle_nn::linear` reads).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.inner.weight();
        let fused = x.device().is_cpu()
            && x.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && self.inner.bias().is_none_or(|b| b.dtype() == DType::F32);
        if !fused {
            return self.inner.forward(x);
        }
        let (out_dim, in_dim) = weight.dims2()?;
        let dims = x.dims();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!(
                "linear: input {:?} does not end in the layer's {in_dim} input features",
                dims
            );
        }
        let rows = x.elem_count() / in_dim;
        let x2 = x.contiguous()?.reshape((rows, in_dim))?;
        // a layer without a bias adds zeros: the same kernel, one `(out,)` row of them
        let bias = match self.inner.bias() {
            Some(b) => b.clone(),
            None => Tensor::zeros(out_dim, DType::F32, x.device())?,
        };
        let packed = if cpu_amx::available() && cpu_amx::fits(in_dim, out_dim) {
            if self.amx.get().is_none() {
                let w = weight.flatten_all()?.to_vec1::<f32>()?;
                // two threads packing at once: one wins, both results are the same
                let _ = self.amx.set(PackedWeights::pack(&w, out_dim, in_dim));
            }
            self.amx.get()
        } else {
            None
        };
        let y = x2.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &BiasedProduct { packed },
        )?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = out_dim;
        y.reshape(shape)
    }
}

/// `x (rows × in) · Wᵀ + b` into a new `rows × out` f32 matrix; on AMX tiles when `packed`
/// holds the weights laid out for them.
struct BiasedProduct<'a> {
    packed: Option<&'a PackedWeights>,
}

impl CustomOp3 for BiasedProduct<'_> {
    fn name(&self) -> &'static str {
        "biased-product"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            contiguous_f32(x, x_layout, "linear")?,
            contiguous_f32(w, w_layout, "linear")?,
            contiguous_f32(b, b_layout, "linear")?,
        );
        let (rows, in_dim) = x_layout.shape().dims2()?;
        let out_dim = b.len();
        if w.len() != out_dim * in_dim {
            candle_core::bail!("biased product: weight is not {out_dim} × {in_dim}");
        }
        let threads = rayon::current_num_threads()
            .min(rows / MIN_ROWS_PER_THREAD)
            .max(1);
        let rows_per_thread = rows.div_ceil(threads).max(1);
        if let Some(packed) = self.packed {
            // the tiles start from the bias and write every output value
            let fill = |out: &mut [MaybeUninit<f32>]| {
                out.par_chunks_mut(rows_per_thread * out_dim)
                    .zip(x.par_chunks(rows_per_thread * in_dim))
                    .for_each(|(out, x)| cpu_amx::biased(out, x, packed, b));
            };
            // SAFETY: the chunks cover the output and `biased` writes each of theirs whole.
            let out = unsafe { written(rows * out_dim, fill) };
            return Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))));
        }
        let mut out = vec![0f32; rows * out_dim];
        out.par_chunks_mut(rows_per_thread * out_dim)
            .zip(x.par_chunks(rows_per_thread * in_dim))
            .for_each(|(out, x)| {
                for row in out.chunks_exact_mut(out_dim) {
                    row.copy_from_slice(b);
                }
                let m = out.len() / out_dim;
                // SAFETY: `out` is `m × out_dim` row-major and this thread's own; `x` is
                // `m × in_dim` row-major; `w` is `out_dim × in_dim` row-major, read as its
                // transpose (`in_dim × out_dim`, column stride `in_dim`).
                unsafe {
                    product(
                        (m, out_dim, in_dim),
                        out.as_mut_ptr(),
                        out_dim,
                        true,
                        x.as_ptr(),
                        in_dim,
                        w.as_ptr(),
                        (1, in_dim),
                    );
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;
    use candle_core::Device;

    /// Against candle's `Linear` (matmul, then the bias), on 2D and 3D inputs, with and without
    /// a bias, with few rows (one thread) and many (split), and on a transposed input.
    #[test]
    fn the_fused_layer_equals_candles() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, in_dim, out_dim, with_bias) in [
            (vec![3usize, 5], 5usize, 7usize, true),
            (vec![2, 301, 40], 40, 72, true),
            (vec![1000, 33], 33, 17, false),
        ] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let w = Tensor::randn(0f32, 0.2, (out_dim, in_dim), &dev)?;
            let b = with_bias
                .then(|| Tensor::randn(0f32, 1.0, out_dim, &dev))
                .transpose()?;
            let ours = Linear::new(w.clone(), b.clone()).forward(&x)?;
            let candles = candle_nn::Linear::new(w, b).forward(&x)?;
            assert_eq!(ours.dims(), candles.dims());
            assert!(relative_l2(&ours, &candles)? < 1e-6, "{shape:?}");
        }
        // a shape the AMX tiles take where the CPU has them (f32 accuracy from bf16 parts)
        let x = Tensor::randn(0f32, 1.0, (2, 301, 128), &dev)?;
        let w = Tensor::randn(0f32, 0.2, (96, 128), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 96, &dev)?;
        let layer = Linear::new(w.clone(), Some(b.clone()));
        let want = candle_nn::Linear::new(w, Some(b)).forward(&x)?;
        assert!(relative_l2(&layer.forward(&x)?, &want)? < 2e-5);
        assert!(
            relative_l2(&layer.forward(&x)?, &want)? < 2e-5,
            "the packed weights, reused"
        );
        let x = Tensor::randn(0f32, 1.0, (16, 200), &dev)?.t()?;
        let w = Tensor::randn(0f32, 0.2, (8, 16), &dev)?;
        let layer = Linear::new(w.clone(), None);
        let want = candle_nn::Linear::new(w, None).forward(&x)?;
        assert!(relative_l2(&layer.forward(&x)?, &want)? < 1e-6);
        Ok(())
    }
}
