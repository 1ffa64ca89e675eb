use super::*;
use crate::testing::S3TestServer;
use crate::{LoaderState, Reader, ReaderConfig};

const G: usize = 12;

fn config(seed: u64, rank: usize, world: usize, micro: usize) -> ReaderConfig {
    // Windows of 2 row groups: sequences from different shards and row groups mix.
    ReaderConfig { shuffle_window: 2, ..ReaderConfig::new(seed, rank, world, G, micro) }
}

/// `batches` global batches read by `world` ranks in lockstep (rank slices concatenated in rank
/// order, which is the global order), optionally after restoring `state`; and the state after.
fn global_order(
    url: &str,
    seed: u64,
    world: usize,
    micro: usize,
    batches: usize,
    state: Option<LoaderState>,
) -> (Vec<u32>, LoaderState) {
    let mut readers: Vec<Reader> =
        (0..world).map(|r| Reader::open(url, config(seed, r, world, micro)).unwrap()).collect();
    if let Some(state) = state {
        readers.iter_mut().for_each(|r| r.restore(state).unwrap());
    }
    let mut order = Vec::new();
    for _ in 0..batches {
        for r in &mut readers {
            for _ in 0..G / world / micro {
                let batch = r.next_batch().unwrap();
                assert_eq!((batch.micro_batch, batch.seq_len, batch.tokens.len()), (micro, 4, micro * 4));
                order.extend(ids(&batch.tokens, 4));
            }
        }
    }
    let state = readers[0].state();
    assert!(readers.iter().all(|r| r.state() == state), "every rank reports the same state");
    (order, state)
}

#[test]
fn every_sequence_exactly_once_per_epoch_on_1_to_4_ranks() {
    let (_dir, url) = local_dataset(60, 5);
    let (reference, state) = global_order(&url, 7, 1, 4, 5, None);
    assert_eq!(state, LoaderState { epoch: 1, consumed: 0, seed: 7 });
    let mut sorted = reference.clone();
    sorted.sort();
    assert_eq!(sorted, (0..60).collect::<Vec<u32>>(), "one epoch is the data set, each sequence once");
    assert_ne!(reference, sorted, "the order is shuffled");
    for (world, micro) in [(2, 3), (2, 6), (3, 2), (4, 3), (4, 1)] {
        let (order, _) = global_order(&url, 7, world, micro, 5, None);
        assert_eq!(order, reference, "world size {world}, micro-batch {micro}: the same global order");
    }
    let (two_epochs, _) = global_order(&url, 7, 1, 4, 10, None);
    assert_eq!(two_epochs[..60], reference[..]);
    assert_ne!(two_epochs[60..], reference[..], "each epoch has its own order");
    let mut second = two_epochs[60..].to_vec();
    second.sort();
    assert_eq!(second, sorted);
    assert_ne!(global_order(&url, 8, 1, 4, 5, None).0, reference, "another seed, another order");
}

#[test]
fn the_tail_that_does_not_fill_a_global_batch_is_dropped() {
    let (_dir, url) = local_dataset(65, 1);
    let reader = Reader::open(&url, config(3, 0, 2, 2)).unwrap();
    assert_eq!((reader.num_sequences(), reader.batches_per_epoch()), (65, 5));
    let (order, state) = global_order(&url, 3, 2, 2, 5, None);
    assert_eq!(state.epoch, 1);
    let mut sorted = order.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 60, "60 distinct sequences, 5 of the 65 left for other epochs");
}

#[test]
fn resume_continues_the_same_order_on_any_world_size() {
    let (_dir, url) = local_dataset(60, 5);
    // 9 global batches cross the end of the first epoch (5 batches).
    let (uninterrupted, _) = global_order(&url, 11, 2, 3, 9, None);
    for (before, after) in [(2, 2), (2, 1), (1, 4), (3, 2)] {
        let (first, state) = global_order(&url, 11, before, 1, 3, None);
        assert_eq!(state, LoaderState { epoch: 0, consumed: 36, seed: 11 });
        let (rest, _) = global_order(&url, 11, after, 1, 6, Some(state));
        assert_eq!([first, rest].concat(), uninterrupted, "resumed from {before} ranks on {after}");
    }
    // A state saved in the second epoch.
    let (_, state) = global_order(&url, 11, 4, 3, 7, None);
    assert_eq!(state, LoaderState { epoch: 1, consumed: 24, seed: 11 });
    let (rest, _) = global_order(&url, 11, 1, 12, 2, Some(state));
    assert_eq!(rest, uninterrupted[84..108]);
}

#[test]
fn each_rank_reads_about_a_w_th_of_the_row_groups() {
    // 8 shards of 48 sequences of 64 tokens in row groups of 5 sequences (the last of a shard
    // 3), shuffled in windows of 8 row groups, so that the ranks' runs end inside row groups.
    let dir = temp_dir("reader-bytes").unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    let valid = numbered(8, 64);
    write_token_dataset(&url, vec![], 64, [&numbered(384, 64), &valid], 48, 5).unwrap();
    const G: usize = 24;
    let epoch_bytes = |world: usize| -> Vec<u64> {
        (0..world)
            .map(|rank| {
                let config = ReaderConfig::new(5, rank, world, G, G / world);
                let mut reader = Reader::open(&url, config).unwrap();
                // Four epochs, so that the windows read ahead of the last batch weigh little.
                for _ in 0..4 * 384 / G {
                    reader.next_batch().unwrap();
                }
                reader.row_group_bytes_read()
            })
            .collect()
    };
    let one = epoch_bytes(1)[0];
    for world in [2, 3] {
        let per_rank = epoch_bytes(world);
        // About 1/W, plus the row groups at the boundaries of the rank slices (one per boundary
        // and window, shared by two ranks): 1/W + (W − 1)/(W·8) on average, 1/W + 1/8 at most
        // for a rank in the middle, with a margin for the spread of the row groups' sizes.
        let bound = 1.0 / world as f64 + 2.0 / 8.0;
        for (rank, bytes) in per_rank.iter().enumerate() {
            let ratio = *bytes as f64 / one as f64;
            assert!(ratio <= bound, "rank {rank} of {world} read {ratio:.3} of one rank's bytes (bound {bound:.3})");
        }
        let total = per_rank.iter().sum::<u64>() as f64 / one as f64;
        let expected = 1.0 + (world - 1) as f64 / 8.0;
        assert!(
            total <= expected + 0.1,
            "{world} ranks read {total:.3}× one rank's bytes, expected about {expected:.3}"
        );
        eprintln!("W = {world}: per rank {per_rank:?} of {one} ({total:.3}× in all)");
    }
}

#[test]
fn resume_inside_a_global_batch_on_the_same_world_size() {
    let (_dir, url) = local_dataset(60, 5);
    let mut a = Reader::open(&url, config(5, 1, 2, 2)).unwrap();
    let first = a.next_batch().unwrap();
    let state = a.state();
    assert_eq!(state.consumed, 4, "two ranks took two sequences each");
    let mut b = Reader::open(&url, config(5, 1, 2, 2)).unwrap();
    b.restore(state).unwrap();
    for _ in 0..40 {
        assert_eq!(a.next_batch().unwrap(), b.next_batch().unwrap());
    }
    assert_ne!(first, b.next_batch().unwrap());
    // 4 sequences into a global batch cannot be split among 3 ranks.
    let mut c = Reader::open(&url, config(5, 0, 3, 2)).unwrap();
    let err = c.restore(state).unwrap_err();
    assert!(format!("{err:#}").contains("3 ranks"), "{err:#}");
}

#[test]
fn validation_is_read_in_stored_order() {
    let (_dir, url) = local_dataset(60, 9);
    let mut ranks: Vec<Reader> =
        (0..2).map(|r| Reader::open(&url, ReaderConfig::validation(r, 2, 4, 1)).unwrap()).collect();
    assert_eq!(ranks[0].batches_per_epoch(), 2);
    let mut order = Vec::new();
    for _ in 0..2 {
        for r in &mut ranks {
            for _ in 0..2 {
                order.extend(ids(&r.next_batch().unwrap().tokens, 4));
            }
        }
    }
    assert_eq!(order, (60..68).collect::<Vec<u32>>());
    // Rewinding for the next evaluation.
    ranks[0].restore(LoaderState { epoch: 0, consumed: 0, seed: 0 }).unwrap();
    assert_eq!(ids(&ranks[0].next_batch().unwrap().tokens, 4), [60]);
}

#[test]
fn streams_from_s3_and_survives_a_server_restart_and_an_outage() {
    let server = S3TestServer::start().unwrap();
    server.create_bucket("data").unwrap();
    let tokens = numbered(60, 4);
    write_token_dataset("s3://data/set", server.options(), 4, [&tokens, &[]], 7, 3).unwrap();
    let (_dir, local) = local_dataset(60, 0);
    let (reference, _) = global_order(&local, 2, 1, 3, 10, None);

    let mut c = ReaderConfig { prefetch_windows: 1, concurrent_reads: 1, ..config(2, 0, 1, 3) };
    c.store_options = server.options();
    let mut reader = Reader::open("s3://data/set/index.json", c).unwrap();
    let mut order = Vec::new();
    let mut server = Some(server);
    let mut outage = None;
    for step in 0..40 {
        if step == 6 {
            server.as_mut().expect("running").restart().unwrap();
        }
        if step == 20 {
            // Down for a while: reads fail with refused connections until it is back.
            let mut down = server.take().expect("running");
            down.kill();
            outage = Some(std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                down.restart().unwrap();
                down
            }));
        }
        order.extend(ids(&reader.next_batch().unwrap().tokens, 4));
    }
    drop(outage.map(|t| t.join().unwrap()));
    assert_eq!(order, reference, "the same sequences as from local shards, through restart and outage");
}

/// Every warning logged in this test process, by any thread.
fn captured_warnings() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    static INSTALL: std::sync::Once = std::sync::Once::new();
    let log = LOG.get_or_init(Default::default);
    INSTALL.call_once(|| {
        struct Sink;
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                captured_warnings().lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // Fails only if another subscriber is installed already; then nothing is captured and
        // the assertion below cannot fail, which the first assertion rules out.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| Sink)
            .try_init();
    });
    log
}

#[test]
fn dropping_readers_mid_read_ahead_logs_no_retries() {
    let log = captured_warnings();
    tracing::warn!(probe = "dropping-readers", "capture works");
    assert!(String::from_utf8_lossy(&log.lock().unwrap()).contains("dropping-readers"), "warnings are captured");
    let (dir, url) = local_dataset(600, 0);
    // Small windows and several reads in flight: each reader is dropped (or restored) while its
    // read-ahead task and row-group reads are still running.
    let c = ReaderConfig { shuffle_window: 1, prefetch_windows: 4, concurrent_reads: 4, ..config(3, 0, 1, 3) };
    for i in 0..40 {
        let mut reader = Reader::open(&url, c.clone()).unwrap();
        reader.next_batch().unwrap();
        if i % 4 == 0 {
            reader.restore(LoaderState { epoch: 1, consumed: 24, seed: 3 }).unwrap();
            reader.next_batch().unwrap();
        }
        drop(reader);
    }
    // Let any task still running after its reader was dropped finish (and log, if it would).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let ours: Vec<&str> = text.lines().filter(|l| l.contains(dir.path().to_str().unwrap())).collect();
    assert!(ours.is_empty(), "warnings while dropping readers: {ours:#?}");
}
