//! Checkpoint store behaviour on the local file system and on a real S3-compatible server:
//! round trip, resharding across processes, a writer killed mid-save, a corrupt shard, retention,
//! and the asynchronous saver.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use checkpoint::manifest::CheckpointMeta;
use checkpoint::store::{LocalTensor, Retention, WriteOptions};
use checkpoint::{AsyncSaver, CheckpointStore, DType, SaveJob, Slice, TensorBuffer};
use storage::testing::{temp_dir, S3TestServer, TempDir};

/// Deterministic test tensors: global shapes with odd row counts, a scalar, several dtypes, all
/// values finite.
fn global_tensors(seed: u8) -> Vec<TensorBuffer> {
    let specs: [(&str, DType, &[usize]); 5] = [
        ("model.blocks.0.attn_qkv.weight", DType::F32, &[7, 5]),
        ("model.vocab_embed.embedding", DType::BF16, &[11, 3]),
        ("optim.exp_avg.bias", DType::F32, &[5]),
        ("model.sampling_eps_min", DType::F64, &[]),
        ("ema.norm.weight", DType::F16, &[2, 3, 4]),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(i, (name, dtype, shape))| {
            let n = shape.iter().product::<usize>() * dtype.size_bytes();
            let mut data: Vec<u8> =
                (0..n).map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add(i as u8)).collect();
            // Finite floats (a checkpoint refuses NaN and ±Inf): clear the top exponent bit, which
            // sits in each value's last (most significant) byte.
            for value in data.chunks_mut(dtype.size_bytes()) {
                value[value.len() - 1] &= 0xbf;
            }
            TensorBuffer::new(*name, *dtype, shape.to_vec(), data).unwrap()
        })
        .collect()
}

/// Rank `rank` of `world`'s row slices of the tensors.
fn rank_part(tensors: &[TensorBuffer], rank: usize, world: usize) -> Vec<LocalTensor> {
    tensors.iter().filter_map(|t| slice_of(t, rank, world)).collect()
}

fn slice_of(t: &TensorBuffer, rank: usize, world: usize) -> Option<LocalTensor> {
    let s = Slice::rows_part(&t.shape, rank, world)?;
    let row_bytes = t.data.len() / t.shape.first().copied().unwrap_or(1).max(1);
    let (start, len) = match t.shape.first() {
        Some(_) => (s.offsets[0] * row_bytes, s.shape[0] * row_bytes),
        None => (0, t.data.len()),
    };
    let buffer = TensorBuffer::new(&t.name, t.dtype, s.shape.clone(), t.data[start..start + len].to_vec()).unwrap();
    Some(LocalTensor { buffer, global_shape: t.shape.clone(), offsets: s.offsets })
}

fn meta(tokens_seen: u64) -> CheckpointMeta {
    CheckpointMeta { tokens_seen, config_hash: "test".into(), ..Default::default() }
}

fn save_whole(store: &CheckpointStore, step: u64, seed: u8) {
    let tensors = global_tensors(seed).into_iter().map(LocalTensor::whole).collect();
    store.save(step, 0, 1, tensors, Some(meta(step * 100)), WriteOptions::default()).unwrap();
}

/// Every tensor read back whole equals what was written.
fn assert_round_trip(store: &CheckpointStore, step: u64, seed: u8) {
    let manifest = store.manifest(step).unwrap();
    store.verify(&manifest).unwrap();
    for t in global_tensors(seed) {
        let got = store.read(&manifest, &t.name, &Slice::whole(&t.shape)).unwrap();
        assert_eq!(got, t, "tensor {}", t.name);
    }
}

#[test]
fn round_trip_on_local_disk_with_small_files() {
    let dir = temp_dir("ckpt-rt").unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let tensors = global_tensors(1).into_iter().map(LocalTensor::whole).collect();
    // Tiny files force one tensor per file: the manifest must still find each.
    let opts = WriteOptions { max_file_bytes: 16, ..Default::default() };
    let manifest = store.save(3, 0, 1, tensors, Some(meta(300)), opts).unwrap().unwrap();
    assert!(manifest.files.len() >= 4, "{:?}", manifest.files.keys());
    assert_eq!(manifest.meta.tokens_seen, 300);
    assert_round_trip(&store, 3, 1);
    assert_eq!(store.committed_steps().unwrap(), vec![3]);
    // A sub-box of a tensor.
    let t = &global_tensors(1)[0];
    let want = Slice { offsets: vec![2, 1], shape: vec![3, 2] };
    let got = store.read(&manifest, &t.name, &want).unwrap();
    let expected: Vec<u8> = (2..5).flat_map(|r| t.data[(r * 5 + 1) * 4..(r * 5 + 3) * 4].to_vec()).collect();
    assert_eq!(got.data, expected);
}

/// Entry point of the writer processes the tests below start (re-running this test binary);
/// without the environment variables it does nothing.
#[test]
fn rank_writer_process() {
    let (Ok(dir), Ok(rank), Ok(world)) =
        (std::env::var("BD3_TEST_CKPT_DIR"), std::env::var("BD3_TEST_RANK"), std::env::var("BD3_TEST_WORLD"))
    else {
        return;
    };
    let (rank, world): (usize, usize) = (rank.parse().unwrap(), world.parse().unwrap());
    let store = match std::env::var("BD3_TEST_S3_OPTIONS") {
        Ok(opts) => CheckpointStore::open_with_options(&dir, serde_json::from_str(&opts).unwrap()).unwrap(),
        Err(_) => CheckpointStore::open(&dir).unwrap(),
    };
    let step: u64 = std::env::var("BD3_TEST_STEP").unwrap().parse().unwrap();
    let meta = (rank == 0).then(|| meta(step));
    store.save(step, rank, world, rank_part(&global_tensors(7), rank, world), meta, WriteOptions::default()).unwrap();
}

fn writer_process(dir: &str, rank: usize, world: usize, step: u64, s3: Option<&S3TestServer>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "rank_writer_process", "--nocapture", "--test-threads=1"])
        .env("BD3_TEST_CKPT_DIR", dir)
        .env("BD3_TEST_RANK", rank.to_string())
        .env("BD3_TEST_WORLD", world.to_string())
        .env("BD3_TEST_STEP", step.to_string());
    if let Some(s3) = s3 {
        cmd.env("BD3_TEST_S3_OPTIONS", serde_json::to_string(&s3.options()).unwrap());
    }
    cmd
}

/// Two writer processes, then readers as 1 and as 3 ranks: the same bytes.
fn reshard(store: &CheckpointStore, url: &str, s3: Option<&S3TestServer>) {
    let mut children: Vec<_> =
        (0..2).map(|rank| writer_process(url, rank, 2, 5, s3).spawn().expect("starting a writer process")).collect();
    for c in &mut children {
        assert!(c.wait().unwrap().success());
    }
    let manifest = store.manifest(5).unwrap();
    assert_eq!(manifest.world_size, 2);
    store.verify(&manifest).unwrap();
    for world in [1usize, 3] {
        for t in global_tensors(7) {
            let mut assembled = vec![];
            for rank in 0..world {
                if let Some(expected) = slice_of(&t, rank, world) {
                    let got = store.read(&manifest, &t.name, &expected.slice()).unwrap();
                    assert_eq!(got, expected.buffer, "{} for rank {rank} of {world}", t.name);
                    assembled.extend(got.data);
                }
            }
            assert_eq!(assembled, t.data, "{} reassembled from {world} readers", t.name);
        }
    }
}

#[test]
fn written_by_two_processes_loads_on_one_and_three() {
    let dir = temp_dir("ckpt-reshard").unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    reshard(&CheckpointStore::open(&url).unwrap(), &url, None);
}

#[test]
fn a_writer_killed_mid_save_leaves_the_previous_checkpoint_loadable() {
    let dir = temp_dir("ckpt-kill").unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    let store = CheckpointStore::open(&url).unwrap();
    save_whole(&store, 1, 1);
    // Rank 0 of 2 writes its part of step 2, then waits for rank 1, which never comes: kill it there.
    kill_once_written(writer_process(&url, 0, 2, 2, None), &dir.path().join("step-0000000002/rank-00000.json"));

    let steps = store.steps().unwrap();
    assert_eq!(steps.iter().map(|s| (s.step, s.committed)).collect::<Vec<_>>(), vec![(1, true), (2, false)]);
    assert!(store.manifest(2).unwrap_err().to_string().contains("not committed"));
    let resume = store.latest_valid().unwrap();
    assert_eq!(resume.manifest.map(|m| m.step), Some(1));
    assert_round_trip(&store, 1, 1);
    // A file that is not ours stays, and so does its directory.
    std::fs::write(dir.path().join("step-0000000002/notes.txt"), "mine").unwrap();
    assert_eq!(store.clean_partial().unwrap(), vec![2]);
    let left: Vec<_> = std::fs::read_dir(dir.path().join("step-0000000002")).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "only the foreign file is left");
    std::fs::remove_file(dir.path().join("step-0000000002/notes.txt")).unwrap();
    store.clean_partial().unwrap();
    assert!(!dir.path().join("step-0000000002").exists());
    assert_eq!(store.committed_steps().unwrap(), vec![1]);
}

#[test]
fn a_flipped_byte_is_detected_and_resume_falls_back_naming_the_shard() {
    let dir = temp_dir("ckpt-flip").unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    save_whole(&store, 1, 1);
    save_whole(&store, 2, 2);
    let shard = dir.path().join("step-0000000002/rank-00000-000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();

    let err = store.verify(&store.manifest(2).unwrap()).unwrap_err().to_string();
    assert!(err.contains("step-0000000002/rank-00000-000.safetensors") && err.contains("checksum"), "{err}");
    let resume = store.latest_valid().unwrap();
    assert_eq!(resume.manifest.as_ref().map(|m| m.step), Some(1));
    assert_eq!(resume.skipped.len(), 1);
    assert_eq!(resume.skipped[0].0, 2);
    assert!(resume.skipped[0].1.contains("rank-00000-000.safetensors"), "{:?}", resume.skipped);
}

#[test]
fn retention_keeps_the_latest_and_every_nth_and_only_deletes_its_own() {
    let dir = temp_dir("ckpt-keep").unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    for step in 1..=6 {
        save_whole(&store, step, step as u8);
    }
    // Step 1 looks like someone else's checkpoint: never deleted.
    let manifest = dir.path().join("step-0000000001/manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("\"writer\": \"bd3\"", "\"writer\": \"other\"");
    std::fs::write(&manifest, &text).unwrap();
    let marker = format!("{{\"manifest_crc32c\": {}}}\n", crc32c::crc32c(text.as_bytes()));
    std::fs::write(dir.path().join("step-0000000001/COMMITTED"), marker).unwrap();
    std::fs::write(dir.path().join("step-0000000003/notes.txt"), "mine").unwrap();

    let deleted = store.apply_retention(Retention { keep_latest: 2, keep_every: 4 }).unwrap();
    assert_eq!(deleted, vec![2, 3]);
    assert_eq!(store.committed_steps().unwrap(), vec![1, 4, 5, 6]);
    assert!(dir.path().join("step-0000000003/notes.txt").exists());
    assert!(!dir.path().join("step-0000000002").exists());
    assert!(store.apply_retention(Retention { keep_latest: 1, keep_every: 0 }).is_err());
    for step in [4, 5, 6] {
        assert_round_trip(&store, step, step as u8);
    }
}

#[test]
fn async_save_errors_surface_later_and_leave_the_previous_checkpoint() {
    let dir = temp_dir("ckpt-async").unwrap();
    let store = std::sync::Arc::new(CheckpointStore::open(dir.path().to_str().unwrap()).unwrap());
    let mut saver = AsyncSaver::new(store.clone());
    let job = |step: u64, seed: u8| SaveJob {
        step,
        rank: 0,
        world_size: 1,
        tensors: global_tensors(seed).into_iter().map(LocalTensor::whole).collect(),
        meta: Some(meta(step)),
        options: WriteOptions::default(),
        retention: Some(Retention { keep_latest: 2, keep_every: 0 }),
    };
    saver.save(job(1, 1)).unwrap();
    let report = saver.wait().unwrap().expect("a save was in flight");
    let bytes: usize = global_tensors(1).iter().map(|t| t.data.len()).sum();
    assert_eq!((report.step, report.bytes), (1, bytes as u64), "the report counts the tensor bytes written");
    // A file where step 2's directory should be makes the upload fail.
    std::fs::write(dir.path().join("step-0000000002"), "in the way").unwrap();
    saver.save(job(2, 2)).unwrap();
    let started = Instant::now();
    let err = loop {
        match saver.poll() {
            Err(e) => break e,
            Ok(Some(report)) => panic!("step {} should have failed", report.step),
            Ok(None) => {
                assert!(started.elapsed() < Duration::from_secs(60));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert!(format!("{err:#}").contains("step 2"), "{err:#}");
    assert_eq!(store.committed_steps().unwrap(), vec![1]);
    assert_round_trip(&store, 1, 1);
    std::fs::remove_file(dir.path().join("step-0000000002")).unwrap();
    saver.save(job(3, 3)).unwrap();
    saver.save(job(4, 4)).unwrap(); // waits for 3 first: at most one in flight
    saver.wait().unwrap();
    assert_eq!(store.committed_steps().unwrap(), vec![3, 4]);
}

fn s3_store(server: &S3TestServer, url: &str) -> CheckpointStore {
    CheckpointStore::open_with_options(url, server.options()).unwrap()
}

#[test]
fn the_same_behaviour_on_an_s3_server() {
    let server = S3TestServer::start().unwrap();
    server.create_bucket("ckpt").unwrap();
    let url = "s3://ckpt/runs/a";
    let store = s3_store(&server, url);
    for step in 1..=3 {
        save_whole(&store, step, step as u8);
    }
    assert_round_trip(&store, 3, 3);
    reshard(&store, url, Some(&server));

    // Corrupt step 5's shard of rank 1 in the server's data directory: fallback to step 3.
    let shard = server.root().join("ckpt/runs/a/step-0000000005/rank-00001-000.safetensors");
    flip_last_byte(&shard);
    let resume = store.latest_valid().unwrap();
    assert_eq!(resume.manifest.map(|m| m.step), Some(3));
    assert!(resume.skipped[0].1.contains("rank-00001-000.safetensors"), "{:?}", resume.skipped);

    assert_eq!(store.apply_retention(Retention { keep_latest: 2, keep_every: 0 }).unwrap(), vec![1, 2]);
    assert_eq!(store.committed_steps().unwrap(), vec![3, 5]);

    // An uncommitted step on S3 is ignored, then cleaned.
    let index = server.root().join("ckpt/runs/a/step-0000000009/rank-00000.json");
    kill_once_written(writer_process(url, 0, 2, 9, Some(&server)), &index);
    assert_eq!(store.committed_steps().unwrap(), vec![3, 5]);
    assert_eq!(store.clean_partial().unwrap(), vec![9]);
    assert!(store.steps().unwrap().iter().all(|s| s.step != 9));
}

/// Starts a rank-0 writer of a 2-rank save and kills it once its part (`index`) exists: it is
/// then waiting for rank 1, mid-save.
fn kill_once_written(mut writer: Command, index: &Path) {
    let mut child = writer.spawn().expect("starting a writer process");
    let started = Instant::now();
    while !index.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "the writer never wrote its part");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(path, bytes).unwrap();
}

/// A flat range of a tensor (what a ZeRO rank holds of an optimizer moment) is written as several
/// boxes of one tensor by one rank, and reads back whole and as any other box.
#[test]
fn flat_ranges_written_as_several_boxes_per_rank_read_back_whole() {
    let dir = temp_dir("ckpt-flat").unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let t = &global_tensors(4)[4]; // [2, 3, 4] f16
    let elem = t.dtype.size_bytes();
    // Two ranks split the 24 elements at 7: neither part starts or ends on a row.
    let ranges = [0..7, 7..24];
    let part = |range: std::ops::Range<usize>| -> Vec<LocalTensor> {
        let mut at = range.start;
        Slice::boxes_of_flat_range(&t.shape, range)
            .into_iter()
            .map(|s| {
                let data = t.data[at * elem..(at + s.numel()) * elem].to_vec();
                at += s.numel();
                let buffer = TensorBuffer::new(&t.name, t.dtype, s.shape.clone(), data).unwrap();
                LocalTensor { buffer, global_shape: t.shape.clone(), offsets: s.offsets }
            })
            .collect()
    };
    assert!(part(ranges[1].clone()).len() > 1);
    store.write_rank(5, 1, 2, part(ranges[1].clone()), WriteOptions::default()).unwrap();
    let manifest = store.save(5, 0, 2, part(ranges[0].clone()), Some(meta(1)), WriteOptions::default()).unwrap();
    let manifest = manifest.expect("rank 0 commits");
    store.verify(&manifest).unwrap();
    assert!(manifest.tensors[&t.name].pieces.len() > 2);
    assert_eq!(&store.read(&manifest, &t.name, &Slice::whole(&t.shape)).unwrap(), t);
}

/// A step written again by a later job (a run resumed from an earlier step) still holds rank 1's
/// index from the first job while rank 0 commits: rank 0 waits for the index of its own attempt
/// instead of merging the leftover, and names the leftover if it times out.
#[test]
fn rank_zero_commits_only_indices_of_its_own_attempt() {
    let dir = temp_dir("ckpt-attempt").unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let (old, new) = (global_tensors(1), global_tensors(2));
    let first = WriteOptions { attempt: 11, ..Default::default() };
    store.write_rank(7, 1, 2, rank_part(&old, 1, 2), first).unwrap();
    store.save(7, 0, 2, rank_part(&old, 0, 2), Some(meta(1)), first).unwrap();

    // The second job's rank 1 is late: rank 0 gives up rather than commit the first job's part.
    let hurried = WriteOptions { attempt: 22, commit_timeout: Duration::from_millis(300), ..Default::default() };
    let err = store.save(7, 0, 2, rank_part(&new, 0, 2), Some(meta(2)), hurried).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("rank 1 did not finish writing attempt 22") && msg.contains("attempt 11"), "{msg}");
    assert!(store.committed_steps().unwrap().is_empty(), "the step stays uncommitted");

    // Rank 1 writes while rank 0 waits: the commit holds the second job's data only.
    let second = WriteOptions { attempt: 22, ..Default::default() };
    let late = {
        let (store, part) = (CheckpointStore::open(dir.path().to_str().unwrap()).unwrap(), rank_part(&new, 1, 2));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            store.write_rank(7, 1, 2, part, second).unwrap();
        })
    };
    let manifest = store.save(7, 0, 2, rank_part(&new, 0, 2), Some(meta(2)), second).unwrap().unwrap();
    late.join().unwrap();
    store.verify(&manifest).unwrap();
    for t in &new {
        assert_eq!(&store.read(&manifest, &t.name, &Slice::whole(&t.shape)).unwrap(), t);
    }
}

// ---- Names in manifests and indices never leave the step directory. ----------------------------

const EVIL: &str = "../../victim.txt";

/// The victim: a file outside the checkpoint directory holding exactly the bytes of step
/// `step`'s first tensor file, so that a manifest naming it by a traversal path has a matching
/// size and checksum.
fn plant_victim(tmp: &Path, ckpt: &Path, step: u64) -> (std::path::PathBuf, Vec<u8>) {
    let bytes = std::fs::read(ckpt.join(format!("step-{step:010}/rank-00000-000.safetensors"))).unwrap();
    let victim = tmp.join("victim.txt");
    std::fs::write(&victim, &bytes).unwrap();
    assert_eq!(
        ckpt.join(format!("step-{step:010}")).join(EVIL).canonicalize().unwrap(),
        victim.canonicalize().unwrap()
    );
    (victim, bytes)
}

/// Renames `old` to `new` in a manifest or index (its `files` and every piece), as JSON.
fn rename_file_in(json: &mut serde_json::Value, old: &str, new: &str) {
    let files = json["files"].as_object_mut().unwrap();
    let entry = files.remove(old).unwrap();
    files.insert(new.to_string(), entry);
    for tensor in json["tensors"].as_object_mut().unwrap().values_mut() {
        for piece in tensor["pieces"].as_array_mut().unwrap() {
            if piece["file"] == old {
                piece["file"] = new.into();
            }
        }
    }
}

/// Rewrites committed step `step`'s manifest to name its first file `new`, with `COMMITTED`
/// updated to match: everything but the name is still consistent.
fn craft_manifest(ckpt: &Path, step: u64, new: &str) {
    let dir = ckpt.join(format!("step-{step:010}"));
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    rename_file_in(&mut json, "rank-00000-000.safetensors", new);
    let text = serde_json::to_vec_pretty(&json).unwrap();
    std::fs::write(dir.join("manifest.json"), &text).unwrap();
    std::fs::write(dir.join("COMMITTED"), format!("{{\"manifest_crc32c\": {}}}\n", crc32c::crc32c(&text))).unwrap();
}

/// A local checkpoint location (inside a temporary directory, where the victim goes) with step 1.
fn evil_setup() -> (TempDir, std::path::PathBuf, CheckpointStore) {
    let tmp = temp_dir("ckpt-evil").unwrap();
    let ckpt = tmp.path().join("ckpt");
    let store = CheckpointStore::open(ckpt.to_str().unwrap()).unwrap();
    save_whole(&store, 1, 1);
    (tmp, ckpt, store)
}

fn assert_untouched(victim: &Path, bytes: &[u8]) {
    assert_eq!(std::fs::read(victim).expect("the victim still exists"), bytes, "the victim's bytes changed");
}

fn assert_names_the_traversal(msg: &str) {
    assert!(
        msg.contains("manifest.json") && msg.contains("field `files`") && msg.contains(EVIL),
        "the error names the manifest, the field and the value: {msg}"
    );
}

#[test]
fn a_traversal_name_in_a_manifest_is_refused_by_verify_and_readers() {
    let (tmp, ckpt, store) = evil_setup();
    let (victim, bytes) = plant_victim(tmp.path(), &ckpt, 1);
    let good = store.manifest(1).unwrap();
    // A manifest handed to verify or a reader directly (as `bd3 ckpt` does after loading one).
    let mut json = serde_json::to_value(&good).unwrap();
    rename_file_in(&mut json, "rank-00000-000.safetensors", EVIL);
    let evil: checkpoint::Manifest = serde_json::from_value(json).unwrap();
    assert_names_the_traversal(&format!("{:#}", store.verify(&evil).unwrap_err()));
    let (name, shape) =
        evil.tensors.iter().find(|(_, t)| t.pieces[0].file == EVIL).map(|(n, t)| (n, &t.shape)).unwrap();
    let err = store.read(&evil, name, &Slice::whole(shape)).unwrap_err();
    assert_names_the_traversal(&format!("{err:#}"));
    // The same manifest on disk, committed: loading it is refused.
    craft_manifest(&ckpt, 1, EVIL);
    assert_names_the_traversal(&format!("{:#}", store.manifest(1).unwrap_err()));
    for other in ["rank-00000-000.safetensors/../x", "/etc/passwd", "", "rank-0-0.safetensors", "rank-00000-000.json"] {
        let mut json = serde_json::to_value(&good).unwrap();
        rename_file_in(&mut json, "rank-00000-000.safetensors", other);
        let m: checkpoint::Manifest = serde_json::from_value(json).unwrap();
        let msg = format!("{:#}", store.verify(&m).unwrap_err());
        assert!(msg.contains("not a checkpoint file name"), "{other:?}: {msg}");
    }
    assert_untouched(&victim, &bytes);
}

#[test]
fn resume_and_retention_skip_a_manifest_with_a_traversal_name() {
    let tmp = temp_dir("ckpt-evil").unwrap();
    let ckpt = tmp.path().join("ckpt");
    let store = CheckpointStore::open(ckpt.to_str().unwrap()).unwrap();
    for step in 1..=4 {
        save_whole(&store, step, step as u8);
    }
    // Resume: the newest step is the crafted one; it is skipped, naming why.
    let (victim, bytes) = plant_victim(tmp.path(), &ckpt, 4);
    craft_manifest(&ckpt, 4, EVIL);
    let resume = store.latest_valid().unwrap();
    assert_eq!(resume.manifest.unwrap().step, 3);
    assert_eq!(resume.skipped.len(), 1);
    assert_names_the_traversal(&resume.skipped[0].1);
    assert_untouched(&victim, &bytes);
    // Retention: the crafted step is one to delete, but bd3 cannot vouch for it: kept, victim too.
    let (victim, bytes) = plant_victim(tmp.path(), &ckpt, 1);
    craft_manifest(&ckpt, 1, EVIL);
    let deleted = store.apply_retention(Retention { keep_latest: 2, keep_every: 0 }).unwrap();
    assert_eq!(deleted, vec![2]);
    assert_untouched(&victim, &bytes);
    assert!(ckpt.join("step-0000000001/manifest.json").exists());
}

#[test]
fn clean_partial_and_commit_touch_only_names_of_their_own() {
    let (tmp, ckpt, store) = evil_setup();
    let (victim, bytes) = plant_victim(tmp.path(), &ckpt, 1);
    // Rank 0 wrote its part of step 2; its index is then rewritten to name the victim.
    let tensors = global_tensors(2).into_iter().map(LocalTensor::whole).collect();
    store.write_rank(2, 0, 1, tensors, WriteOptions::default()).unwrap();
    let index = ckpt.join("step-0000000002/rank-00000.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    rename_file_in(&mut json, "rank-00000-000.safetensors", EVIL);
    std::fs::write(&index, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let err = store.commit(2, 1, meta(200), 0, Duration::from_secs(5)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("rank-00000.json") && msg.contains("field `files`") && msg.contains(EVIL), "{msg}");
    assert_eq!(store.committed_steps().unwrap(), vec![1]);
    // clean_partial removes the uncommitted step's own files (a staging file too), nothing else.
    let step2 = ckpt.join("step-0000000002");
    std::fs::write(step2.join("rank-00000-001.safetensors#123.0"), "staged").unwrap();
    std::fs::write(step2.join("notes.txt"), "foreign").unwrap();
    std::fs::write(step2.join("rank-00000-000.safetensors.bak"), "foreign").unwrap();
    assert_eq!(store.clean_partial().unwrap(), vec![2]);
    let mut left: Vec<String> =
        std::fs::read_dir(&step2).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["notes.txt", "rank-00000-000.safetensors.bak"]);
    assert_untouched(&victim, &bytes);
    assert_round_trip(&store, 1, 1);
}

// ---- Non-finite values never reach a checkpoint. ------------------------------------------------

#[test]
fn a_state_with_nan_is_refused_and_the_previous_step_stays_the_latest() {
    let dir = temp_dir("ckpt-nan").unwrap();
    let store = std::sync::Arc::new(CheckpointStore::open(dir.path().to_str().unwrap()).unwrap());
    save_whole(&store, 1, 1);
    let mut tensors = global_tensors(2);
    // One NaN in a bf16 tensor (an f32 NaN's top half) and one in an f32 tensor.
    let bf16 = tensors.iter_mut().find(|t| t.dtype == DType::BF16).unwrap();
    bf16.data[4..6].copy_from_slice(&((f32::NAN.to_bits() >> 16) as u16).to_le_bytes());
    let bf16_name = bf16.name.clone();
    let f32 = tensors.iter_mut().find(|t| t.name == "optim.exp_avg.bias").unwrap();
    f32.data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let with_nan: Vec<LocalTensor> = tensors.into_iter().map(LocalTensor::whole).collect();

    let err = store.save(2, 0, 1, with_nan.clone(), Some(meta(200)), WriteOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("`{bf16_name}` (1 of 33 BF16 values)"))
            && msg.contains("`optim.exp_avg.bias` (1 of 5 F32 values)")
            && msg.contains("step 2"),
        "{msg}"
    );
    assert_eq!(store.committed_steps().unwrap(), vec![1]);
    assert!(!dir.path().join("step-0000000002/rank-00000-000.safetensors").exists(), "nothing was written");
    assert_eq!(store.latest_valid().unwrap().manifest.unwrap().step, 1);

    // The same through the asynchronous saver, rewriting a step that exists: it stays committed.
    let mut saver = AsyncSaver::new(store.clone());
    let job = SaveJob {
        step: 1,
        rank: 0,
        world_size: 1,
        tensors: with_nan,
        meta: Some(meta(100)),
        options: WriteOptions::default(),
        retention: None,
    };
    saver.save(job).unwrap();
    let msg = format!("{:#}", saver.wait().unwrap_err());
    assert!(msg.contains("non-finite") && msg.contains("step 1"), "{msg}");
    assert_eq!(store.committed_steps().unwrap(), vec![1]);
    assert_round_trip(&store, 1, 1);
}
