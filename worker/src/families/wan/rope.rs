//! The 3D rotary position embedding of the Wan transformer.
//!
//! Each attention head's channels are split into a frame, a height and a width part (height and
//! width get `2·⌊d/6⌋` channels each, the frame part the rest: 44/42/42 for d = 128), and each part
//! rotates its interleaved channel pairs `(2i, 2i + 1)` by the token's position along its axis
//! with frequencies `θ^(−2i/part)`, as diffusers' `WanRotaryPosEmbed` does.

use candle_core::{Device, Result, Tensor};

/// Which latent axis a rotary channel takes its position from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    Frame,
    Height,
    Width,
}

/// One channel of the concatenated rotary table.
#[derive(Debug, Clone, Copy)]
struct Column {
    axis: Axis,
    freq: f64,
}

/// Rotary tables for a `(frames, height, width)` token grid, in the pair form that
/// [`candle_nn::rotary_emb::rope_i`] takes: `cos` and `sin` are `(tokens, head_dim / 2)` f32, token
/// order frame-major then height then width (the order of the patch embedding).
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// The rows for tokens `start..start + len`, for a rank that holds only part of the sequence.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
        })
    }
}

/// The rotary embedding of one model configuration.
#[derive(Debug, Clone)]
pub struct WanRope {
    head_dim: usize,
    max_seq_len: usize,
    columns: Vec<Column>,
}

impl WanRope {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64) -> Result<Self> {
        if head_dim % 2 == 1 || head_dim < 6 {
            candle_core::bail!(
                "rotary embedding needs an even attention_head_dim of at least 6, got {head_dim}"
            );
        }
        let hw_dim = 2 * (head_dim / 6);
        let parts = [
            (Axis::Frame, head_dim - 2 * hw_dim),
            (Axis::Height, hw_dim),
            (Axis::Width, hw_dim),
        ];
        let mut columns = Vec::with_capacity(head_dim);
        for (axis, dim) in parts {
            for j in 0..dim {
                // Each frequency serves the two channels of a pair.
                let exponent = (2 * (j / 2)) as f64 / dim as f64;
                columns.push(Column {
                    axis,
                    freq: 1.0 / theta.powf(exponent),
                });
            }
        }
        Ok(Self {
            head_dim,
            max_seq_len,
            columns,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    fn check_grid(&self, (f, h, w): (usize, usize, usize)) -> Result<()> {
        if f.max(h).max(w) > self.max_seq_len {
            candle_core::bail!(
                "latent grid {f}x{h}x{w} (after patching) exceeds rope_max_seq_len {}",
                self.max_seq_len
            );
        }
        Ok(())
    }

    /// For each column, its value at every position along its axis.
    fn per_axis(
        &self,
        grid: (usize, usize, usize),
        trig: fn(f64) -> f64,
        cols: impl Iterator<Item = usize>,
    ) -> Vec<(Axis, Vec<f32>)> {
        cols.map(|c| {
            let Column { axis, freq } = self.columns[c];
            let n = match axis {
                Axis::Frame => grid.0,
                Axis::Height => grid.1,
                Axis::Width => grid.2,
            };
            (axis, (0..n).map(|p| trig(p as f64 * freq) as f32).collect())
        })
        .collect()
    }

    fn fill(grid: (usize, usize, usize), per_axis: &[(Axis, Vec<f32>)]) -> Vec<f32> {
        let (nf, nh, nw) = grid;
        let width = per_axis.len();
        let mut out = Vec::with_capacity(nf * nh * nw * width);
        for f in 0..nf {
            for h in 0..nh {
                for w in 0..nw {
                    out.extend(per_axis.iter().map(|(axis, values)| match axis {
                        Axis::Frame => values[f],
                        Axis::Height => values[h],
                        Axis::Width => values[w],
                    }));
                }
            }
        }
        out
    }

    /// The pair tables for a token grid. The rotation of pair `i` uses the cosine of channel `2i`
    /// and the sine of channel `2i + 1`, as diffusers' `apply_rotary_emb` does.
    pub fn tables(&self, grid: (usize, usize, usize), device: &Device) -> Result<RopeTables> {
        self.check_grid(grid)?;
        let half = self.head_dim / 2;
        let tokens = grid.0 * grid.1 * grid.2;
        let cos = Self::fill(
            grid,
            &self.per_axis(grid, f64::cos, (0..half).map(|i| 2 * i)),
        );
        let sin = Self::fill(
            grid,
            &self.per_axis(grid, f64::sin, (0..half).map(|i| 2 * i + 1)),
        );
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (tokens, half), device)?,
            sin: Tensor::from_vec(sin, (tokens, half), device)?,
        })
    }

    /// The full tables in diffusers' layout, `(1, tokens, 1, head_dim)` each, as
    /// `WanRotaryPosEmbed.forward` returns them; for comparing against reference outputs.
    pub fn diffusers_tables(
        &self,
        grid: (usize, usize, usize),
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.check_grid(grid)?;
        let tokens = grid.0 * grid.1 * grid.2;
        let shape = (1, tokens, 1, self.head_dim);
        let cos = Self::fill(grid, &self.per_axis(grid, f64::cos, 0..self.head_dim));
        let sin = Self::fill(grid, &self.per_axis(grid, f64::sin, 0..self.head_dim));
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_tables_are_the_even_cos_and_odd_sin_channels() -> Result<()> {
        let dev = Device::Cpu;
        for head_dim in [16, 24, 128] {
            let rope = WanRope::new(head_dim, 1024, 10000.0)?;
            let grid = (3, 4, 5);
            let (cos, sin) = rope.diffusers_tables(grid, &dev)?;
            let t = rope.tables(grid, &dev)?;
            let cos = cos
                .squeeze(2)?
                .squeeze(0)?
                .reshape((60, head_dim / 2, 2))?
                .narrow(2, 0, 1)?
                .squeeze(2)?;
            let sin = sin
                .squeeze(2)?
                .squeeze(0)?
                .reshape((60, head_dim / 2, 2))?
                .narrow(2, 1, 1)?
                .squeeze(2)?;
            assert_eq!(cos.to_vec2::<f32>()?, t.cos.to_vec2::<f32>()?);
            assert_eq!(sin.to_vec2::<f32>()?, t.sin.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn first_token_is_unrotated_and_grid_is_checked() -> Result<()> {
        let rope = WanRope::new(24, 8, 10000.0)?;
        let t = rope.tables((2, 2, 2), &Device::Cpu)?;
        let row0 = t.cos.get(0)?.to_vec1::<f32>()?;
        assert!(row0.iter().all(|&c| c == 1.0));
        assert!(rope.tables((9, 1, 1), &Device::Cpu).is_err());
        Ok(())
    }
}
