//! The VAE decode split by rows across the ranks of a group (xDiT's DistVAE idea for Wan's
//! causal decoder): each rank decodes a band of the latent rows, and the decoder's layers that
//! look beyond a band ask this module for what they need from the other ranks.
//!
//! Every layer of the Wan decoder but two is pointwise in space (the channel RMS norms, the
//! 1×1 convolutions, the time convolutions, nearest upsampling keeps the bands aligned at every
//! scale). A 3×3 convolution needs one row on each side of the band ([`RowSplit::with_halo`]);
//! the mid block's attention lets every pixel of a frame attend to every other, so it gathers
//! the whole frame's keys and values ([`RowSplit::gather_rows`]) and keeps only its own rows of
//! queries. The causal caches hold each rank's own rows only. The frames are equal to the
//! single-rank decode's up to the order of float sums, and each rank's activations are its
//! share of the frame's (the attention's keys and values at the latent scale apart).

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use crate::parallel::Communicator;

/// How the latent rows of a frame are divided among the ranks of a group, and the exchanges
/// between neighbouring bands.
pub struct RowSplit<'a> {
    comm: &'a dyn Communicator,
    /// Every rank's latent rows, in rank order.
    bands: Vec<Range<usize>>,
}

impl<'a> RowSplit<'a> {
    /// `latent_height` rows divided as evenly as they go among the ranks of `comm` (the first
    /// ranks take one more where it does not divide). Every rank needs at least one row.
    pub fn new(comm: &'a dyn Communicator, latent_height: usize) -> Result<Self> {
        let ranks = comm.world_size();
        if ranks == 0 || latent_height < ranks {
            candle_core::bail!(
                "a VAE decode split across {ranks} ranks needs at least one latent row per rank, \
                 the latents have {latent_height}: decode on fewer ranks"
            );
        }
        let (base, extra) = (latent_height / ranks, latent_height % ranks);
        let mut start = 0;
        let bands = (0..ranks)
            .map(|r| {
                let len = base + usize::from(r < extra);
                start += len;
                start - len..start
            })
            .collect();
        Ok(Self { comm, bands })
    }

    /// This rank's latent rows.
    pub fn rows(&self) -> Range<usize> {
        self.bands[self.comm.rank()].clone()
    }

    /// Whether this rank is the one that ends up with the whole frames.
    pub fn is_first(&self) -> bool {
        self.comm.rank() == 0
    }

    /// This rank's band of channels-last frames `x` `(N, H, W, C)` whose H is the latent height
    /// times `scale`.
    pub fn band_of(&self, x: &Tensor, scale: usize) -> Result<Tensor> {
        let rows = self.rows();
        x.narrow(1, rows.start * scale, rows.len() * scale)
    }

    /// This rank's band `(N, h, W, C)` with one row more on each side, `(N, h + 2, W, C)`: the
    /// neighbouring bands' edge rows, zeros above the frame's first row and below its last (the
    /// 3×3 convolutions' zero padding).
    pub(crate) fn with_halo(&self, x: &Tensor) -> Result<Tensor> {
        let (me, ranks) = (self.comm.rank(), self.comm.world_size());
        let h = x.dim(1)?;
        // Every send goes out before any receive: the communicator buffers sends, so no rank
        // waits on one that waits on it.
        if me > 0 {
            self.comm.send(&x.narrow(1, 0, 1)?.contiguous()?, me - 1)?;
        }
        if me + 1 < ranks {
            self.comm
                .send(&x.narrow(1, h - 1, 1)?.contiguous()?, me + 1)?;
        }
        let zeros = || x.narrow(1, 0, 1)?.zeros_like();
        let above = if me > 0 {
            self.receive(me - 1, x.device())?
        } else {
            zeros()?
        };
        let below = if me + 1 < ranks {
            self.receive(me + 1, x.device())?
        } else {
            zeros()?
        };
        Tensor::cat(&[&above, x, &below], 1)
    }

    /// Every rank's band of `x` `(N, h, W, C)`, in order: the whole frames `(N, H, W, C)`.
    pub(crate) fn gather_rows(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.comm.all_gather(&x.contiguous()?, 1)?)
    }

    /// The whole frames on the first rank (`None` elsewhere): every other rank sends its band
    /// of `x` `(N, h, W, C)` there.
    pub fn gather_to_first(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (me, ranks) = (self.comm.rank(), self.comm.world_size());
        if me != 0 {
            self.comm.send(&x.contiguous()?, 0)?;
            return Ok(None);
        }
        let mut bands = vec![x.clone()];
        for r in 1..ranks {
            bands.push(self.receive(r, x.device())?);
        }
        Tensor::cat(&bands, 1).map(Some)
    }

    fn receive(&self, from: usize, device: &Device) -> Result<Tensor> {
        Ok(self.comm.recv(from, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::testing::run_ranks;

    #[test]
    fn rows_are_divided_evenly_in_rank_order() {
        let comm = crate::parallel::SingleRank::new();
        let split = RowSplit::new(&comm, 5).unwrap();
        assert_eq!(split.rows(), 0..5);
        let bands = run_ranks(3, |_, comm| {
            let split = RowSplit::new(comm.as_ref(), 7)?;
            Ok(split.rows())
        })
        .unwrap();
        assert_eq!(bands, vec![0..3, 3..5, 5..7]);
        let err = run_ranks(3, |_, comm| Ok(RowSplit::new(comm.as_ref(), 2).is_err())).unwrap();
        assert_eq!(err, vec![true; 3]);
    }

    #[test]
    fn halos_hold_the_neighbours_rows_and_zeros_at_the_edges() {
        let frame = Tensor::arange(0f32, 2. * 6. * 3., &Device::Cpu)
            .unwrap()
            .reshape((1, 6, 3, 2))
            .unwrap();
        let padded = frame.pad_with_zeros(1, 1, 1).unwrap();
        let frame = &frame;
        let got = run_ranks(3, |_, comm| {
            let split = RowSplit::new(comm.as_ref(), 3)?;
            let band = split.band_of(frame, 2)?;
            let halo = split.with_halo(&band)?;
            let whole = split.gather_rows(&band)?;
            let first = split.gather_to_first(&band)?;
            Ok((split.rows(), halo, whole, first))
        })
        .unwrap();
        for (rows, halo, whole, first) in got {
            let want = padded
                .narrow(1, rows.start * 2, rows.len() * 2 + 2)
                .unwrap();
            let diff = (halo - want).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "rows {rows:?}");
            let diff = (whole - frame).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            assert_eq!(first.is_some(), rows.start == 0);
            if let Some(first) = first {
                let diff = (first - frame).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }
}
