//! The communicator of a job that runs on one rank: every collective is the identity, so the
//! parallel code paths run unchanged (and cost nothing) in a single process.

use candle_core::{Device, Tensor};

use super::comm::{check_subgroup, CommError, Communicator, Op, Result};

/// World size 1. Point-to-point operations have no peer and fail with a usage error.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl SingleRank {
    pub fn new() -> Self {
        Self
    }

    fn no_peer(op: Op, peer: usize) -> CommError {
        CommError::Usage {
            rank: 0,
            op,
            reason: format!("rank {peer} does not exist: this communicator has a single rank"),
        }
    }
}

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        // A sum of one term: the f32 round trip of half-precision inputs is exact, so the
        // identity is what a multi-rank fold would give.
        Ok(tensor.clone())
    }

    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        if dim >= tensor.rank() {
            return Err(CommError::Usage {
                rank: 0,
                op: Op::AllGather,
                reason: format!(
                    "dimension {dim} does not exist in a tensor of shape {:?}",
                    tensor.dims()
                ),
            });
        }
        Ok(tensor.clone())
    }

    fn all_to_all(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if tensors.len() != 1 {
            return Err(CommError::Usage {
                rank: 0,
                op: Op::AllToAll,
                reason: format!("got {} tensors for 1 rank", tensors.len()),
            });
        }
        Ok(tensors)
    }

    fn send(&self, _tensor: &Tensor, to: usize) -> Result<()> {
        Err(Self::no_peer(Op::Send, to))
    }

    fn recv(&self, from: usize, _device: &Device) -> Result<Tensor> {
        Err(Self::no_peer(Op::Recv, from))
    }

    fn broadcast(&self, tensor: Option<&Tensor>, root: usize, _device: &Device) -> Result<Tensor> {
        match (root, tensor) {
            (0, Some(tensor)) => Ok(tensor.clone()),
            (0, None) => Err(CommError::Usage {
                rank: 0,
                op: Op::Broadcast,
                reason: "the root must pass its tensor".into(),
            }),
            (root, _) => Err(Self::no_peer(Op::Broadcast, root)),
        }
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn subgroup(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>> {
        check_subgroup(0, 0, 1, ranks)?;
        Ok(Box::new(SingleRank))
    }

    fn bytes_sent(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    }

    #[test]
    fn collectives_are_identities() -> TestResult {
        let dev = Device::Cpu;
        let comm = SingleRank::new();
        let t = Tensor::arange(0f32, 6., &dev)?
            .reshape((2, 3))?
            .to_dtype(DType::BF16)?;
        let want = values(&t)?;
        for got in [
            comm.all_reduce_sum(&t)?,
            comm.all_gather(&t, 1)?,
            comm.all_to_all(vec![t.clone()])?.remove(0),
            comm.broadcast(Some(&t), 0, &dev)?,
        ] {
            assert_eq!((got.dims(), got.dtype()), (t.dims(), t.dtype()));
            assert_eq!(values(&got)?, want);
        }
        comm.barrier()?;
        let sub = comm.subgroup(&[0])?;
        assert_eq!((sub.rank(), sub.world_size()), (0, 1));
        assert_eq!(values(&sub.all_reduce_sum(&t)?)?, want);
        assert_eq!(comm.bytes_sent(), 0);
        Ok(())
    }

    #[test]
    fn misuse_is_an_error() {
        let dev = Device::Cpu;
        let comm = SingleRank::new();
        let t = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(comm.send(&t, 1).is_err());
        assert!(comm.recv(0, &dev).is_err());
        assert!(comm.all_gather(&t, 2).is_err());
        assert!(comm.all_to_all(vec![t.clone(), t.clone()]).is_err());
        assert!(comm.broadcast(None, 0, &dev).is_err());
        assert!(comm.subgroup(&[0, 1]).is_err());
        assert!(comm.subgroup(&[]).is_err());
    }
}
