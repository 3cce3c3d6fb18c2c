//! A rank's view of one communication group of a layout (its tp, Ulysses, ring, sequence or CFG
//! group). A group of one rank needs no communicator: every collective on it is the identity, so
//! the model code calls collectives unconditionally and a degree of 1 costs nothing.

use candle_core::{Device, Result, Tensor};

use super::comm::Communicator;

/// One communication group; ranks are numbered `0..size()` in global-rank order.
pub struct Group {
    comm: Option<Box<dyn Communicator>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank(), self.size())
    }
}

impl Group {
    /// The group of `ranks` (global ranks of `world`, sorted, including this rank). Every member
    /// must create its groups in the same order (see [`Communicator::subgroup`]); a group of one
    /// rank is created without talking to anyone.
    pub fn create(world: &dyn Communicator, ranks: &[usize]) -> Result<Self> {
        if ranks.len() <= 1 {
            return Ok(Self::solo());
        }
        Ok(Self {
            comm: Some(world.subgroup(ranks)?),
        })
    }

    /// A group with this rank alone.
    pub fn solo() -> Self {
        Self { comm: None }
    }

    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// The element-wise sum over the group, added in rank order (bit-identical on every member).
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        match &self.comm {
            Some(c) => Ok(c.all_reduce_sum(tensor)?),
            None => Ok(tensor.clone()),
        }
    }

    /// The members' tensors concatenated in rank order along `dim`.
    pub fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        match &self.comm {
            Some(c) => Ok(c.all_gather(tensor, dim)?),
            None => Ok(tensor.clone()),
        }
    }

    /// `tensors[i]` goes to member `i`; output `j` came from member `j`.
    pub fn all_to_all(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match &self.comm {
            Some(c) => Ok(c.all_to_all(tensors)?),
            None => Ok(tensors),
        }
    }

    pub fn send(&self, tensor: &Tensor, to: usize) -> Result<()> {
        match &self.comm {
            Some(c) => Ok(c.send(tensor, to)?),
            None => candle_core::bail!("send to rank {to} in a group of one rank"),
        }
    }

    pub fn recv(&self, from: usize, device: &Device) -> Result<Tensor> {
        match &self.comm {
            Some(c) => Ok(c.recv(from, device)?),
            None => candle_core::bail!("recv from rank {from} in a group of one rank"),
        }
    }
}
