//! Where a run starts: the checkpoint `checkpoint.resume` names (cleaning what killed writers left
//! behind), and the attempt id that keeps a job's checkpoint writes apart from earlier jobs'.

use anyhow::{bail, Result};
use checkpoint::{CheckpointStore, Manifest};
use tch::Tensor;

use crate::config::ResumeFrom;
use crate::dist::Communicator;

/// An id shared by every rank of this job and (with overwhelming probability) by no other job:
/// rank 0's clock and process id, broadcast. Checkpoint rank indices carry it, so that rank 0
/// never commits an index an earlier job left at a step this job writes again.
pub fn job_attempt(comm: &dyn Communicator) -> Result<u64> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let local = (nanos as u64 ^ (u64::from(std::process::id()) << 32)) & (i64::MAX as u64);
    let id = Tensor::from_slice(&[local as i64]);
    comm.broadcast(&id, 0)?;
    Ok(id.int64_value(&[0]) as u64)
}

/// The checkpoint to start from, per `checkpoint.resume`. Starting fresh where committed
/// checkpoints already exist is refused: their steps would be overwritten.
pub fn resume_point(resume: ResumeFrom, store: &CheckpointStore) -> Result<Option<Manifest>> {
    let committed = store.committed_steps()?;
    match resume {
        ResumeFrom::None => {
            if let Some(last) = committed.last() {
                bail!(
                    "{} already holds checkpoints up to step {last}: resume with `--resume auto` \
                     (checkpoint.resume), or choose another run.name or checkpoint.url",
                    store.url()
                );
            }
            Ok(None)
        }
        ResumeFrom::Auto => {
            // Steps a killed writer left half-written are not checkpoints; remove what we wrote.
            store.clean_partial()?;
            let point = store.latest_valid()?;
            if point.manifest.is_none() && !point.skipped.is_empty() {
                bail!("no checkpoint in {} verifies: {:?}", store.url(), point.skipped);
            }
            // The run goes on from an earlier step and will write these steps again: they stop
            // existing, and their files go (all written by bd3, none usable), so that no stale
            // rank index can be mistaken for a new one.
            for (step, _) in &point.skipped {
                store.uncommit(*step)?;
            }
            if !point.skipped.is_empty() {
                store.clean_partial()?;
            }
            Ok(point.manifest)
        }
        ResumeFrom::Step(step) => {
            let steps = store.steps()?;
            let committed: Vec<u64> = steps.iter().filter(|s| s.committed).map(|s| s.step).collect();
            let listed = if committed.is_empty() { "none".to_string() } else { format!("{committed:?}") };
            match steps.iter().find(|s| s.step == step) {
                None => bail!(
                    "checkpoint.resume = {step}: {} holds no step {step} (committed steps: {listed})",
                    store.url()
                ),
                Some(s) if !s.committed => bail!(
                    "checkpoint.resume = {step}: step {step} in {} was never committed (a save that did \
                     not finish); committed steps: {listed}",
                    store.url()
                ),
                Some(_) => {}
            }
            let manifest = store.manifest(step)?;
            store.verify(&manifest)?;
            Ok(Some(manifest))
        }
    }
}

#[cfg(test)]
mod tests {
    use checkpoint::{CheckpointMeta, DType, LocalTensor, TensorBuffer};

    use super::*;

    /// `--resume N` says whether step N does not exist or was never committed, and lists the
    /// committed steps.
    #[test]
    fn resume_from_a_step_names_what_is_wrong_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
        let tensor =
            || vec![LocalTensor::whole(TensorBuffer::new("model.w", DType::F32, vec![1], vec![0; 4]).unwrap())];
        store.save(3, 0, 1, tensor(), Some(CheckpointMeta::default()), Default::default()).unwrap();
        // Step 5: this rank's part written, never committed (a save that was killed).
        store.save(5, 0, 1, tensor(), None, Default::default()).unwrap();

        let err = resume_point(ResumeFrom::Step(7), &store).unwrap_err().to_string();
        assert!(err.contains("holds no step 7") && err.contains("committed steps: [3]"), "{err}");
        let err = resume_point(ResumeFrom::Step(5), &store).unwrap_err().to_string();
        assert!(err.contains("step 5") && err.contains("never committed") && err.contains("[3]"), "{err}");
        assert_eq!(resume_point(ResumeFrom::Step(3), &store).unwrap().unwrap().step, 3);
    }
}
