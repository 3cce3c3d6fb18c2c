//! The model families this worker runs, one folder each: its configuration and modules, its
//! distributed form under a parallel layout, and its pipelines. Here the worker picks a family's
//! pipeline by the checkpoint's `model_index.json` ([`ModelFamily`]); a new family is a new
//! folder and a match arm in each function below. Wan2.1's text-to-video and image-to-video
//! checkpoints share one pipeline, which loads the image encoder where the checkpoint has one.

pub mod wan;

use candle_core::{DType, Device};

use crate::model::family::{ModelFamily, PipelineSource};
use crate::model::render::{ModelFacts, Result, VideoPipeline};
use crate::parallel::layout::Layout;
use crate::parallel::Communicator;

/// Checks a model without loading its weights (its components are there, its configurations
/// parse) and says what a worker advertises about it.
pub fn describe(source: PipelineSource<'_>) -> Result<ModelFacts> {
    match ModelFamily::of_source(source)? {
        ModelFamily::Wan21TextToVideo | ModelFamily::Wan21ImageToVideo => {
            wan::pipeline::describe(source)
        }
    }
}

/// Loads the single-process pipeline of `source`'s family, its transformer and VAE in `dtype`
/// on `device`.
pub fn load_pipeline(
    source: PipelineSource<'_>,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn VideoPipeline>> {
    match ModelFamily::of_source(source)? {
        ModelFamily::Wan21TextToVideo | ModelFamily::Wan21ImageToVideo => Ok(Box::new(
            wan::pipeline::WanPipeline::from_source(source, device, dtype)?,
        )),
    }
}

/// Loads this rank's share of `source`'s pipeline for a job of `groups` worker groups, each
/// under `layout`; `world` spans every rank of the job and its rank is this rank.
pub fn load_distributed_pipeline(
    source: PipelineSource<'_>,
    device: &Device,
    dtype: DType,
    layout: Layout,
    groups: usize,
    world: Box<dyn Communicator>,
) -> Result<Box<dyn VideoPipeline>> {
    match ModelFamily::of_source(source)? {
        ModelFamily::Wan21TextToVideo | ModelFamily::Wan21ImageToVideo => Ok(Box::new(
            wan::distributed_pipeline::DistributedPipeline::for_job(
                source, device, dtype, layout, world, groups,
            )?,
        )),
    }
}
