//! `bd3 prepare --tokenizer tokenizer.json`: a BERT-style WordPiece tokenizer written here, the
//! ids round-trip, the special ids land in index.json and reach training and the sampler.

use std::path::Path;
use std::process::{Command, Output};

use dataloader::{Reader, ReaderConfig, SpecialTokens, TextTokenizer};
use test_support::{assert_refused, bd3_binary, data_parallel_tolerance, repo_root, scratch_dir, tiny_command, FP64};

/// The words of the test vocabulary, after BERT's five special tokens.
const WORDS: [&str; 18] = [
    "the", "a", "cat", "dog", "bird", "sat", "ran", "on", "under", "mat", "tree", "and", "then", "slept", "##s", ".",
    ",", "big",
];
const PAD: u32 = 0;
const CLS: u32 = 2;
const SEP: u32 = 3;
const MASK: u32 = 4;
const VOCAB: u32 = 5 + WORDS.len() as u32;

/// A WordPiece tokenizer.json in the layout of bert-base-uncased's: lower-casing BERT
/// normalizer, BERT pre-tokenizer, `##` continuation, the five special tokens at ids 0-4.
fn write_tokenizer(path: &Path) {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let mut vocab = serde_json::Map::new();
    for (id, token) in specials.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(token.to_string(), id.into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            serde_json::json!({
                "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true,
            })
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {
            "type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true,
        },
        "pre_tokenizer": { "type": "BertPreTokenizer" },
        "post_processor": null,
        "decoder": { "type": "WordPiece", "prefix": "##", "cleanup": true },
        "model": {
            "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab,
        },
    });
    std::fs::write(path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

/// `n` sentences of the vocabulary's words, one JSON object per line.
fn sentences(n: usize) -> Vec<String> {
    let (subjects, verbs, places) =
        (["The cat", "A dog", "The big bird", "The cats", "A big dog"], ["sat", "ran", "slept"], ["the mat", "a tree"]);
    (0..n)
        .map(|i| {
            let s = format!("{} {} on {}", subjects[i % 5], verbs[i % 3], places[i % 2]);
            if i % 4 == 0 {
                format!(
                    "{s}, and then {} {} under {}.",
                    subjects[(i + 1) % 5].to_lowercase(),
                    verbs[(i + 2) % 3],
                    places[(i + 1) % 2]
                )
            } else {
                format!("{s}.")
            }
        })
        .collect()
}

fn write_corpus(path: &Path, n: usize) -> Vec<String> {
    let docs = sentences(n);
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    docs
}

fn bd3(args: &[&str]) -> Output {
    Command::new(bd3_binary()).current_dir(repo_root()).args(args).output().expect("running bd3")
}

fn ok(out: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

/// All tokens of a split, in stored order.
fn split_tokens(url: &str, split: dataloader::SplitName) -> Vec<u32> {
    let mut reader = Reader::open(url, ReaderConfig { split, ..ReaderConfig::validation(0, 1, 1, 1) }).unwrap();
    let mut tokens = vec![];
    for _ in 0..reader.num_sequences() {
        tokens.extend(reader.next_batch().unwrap().tokens);
    }
    tokens
}

#[test]
fn prepare_with_a_tokenizer_json_round_trips_and_its_special_ids_reach_the_sampler() {
    let scratch = scratch_dir("tokenizer");
    let dir = scratch.path();
    let tokenizer = dir.join("tokenizer.json");
    write_tokenizer(&tokenizer);
    let docs = write_corpus(&dir.join("corpus.jsonl"), 200);

    // The tokenizer on its own: decode(encode(text)) is the text, lower-cased (its normalizer).
    let tok = TextTokenizer::load(Some(&tokenizer), &SpecialTokens::default()).unwrap();
    for doc in &docs[..10] {
        let ids = tok.encode(doc).unwrap();
        assert!(!ids.contains(&1), "{doc}: no [UNK] in {ids:?}");
        assert_eq!(tok.decode(&ids), doc.to_lowercase(), "{ids:?}");
    }
    assert_eq!(tok.vocab_size(), VOCAB);

    // Packed (bos-eos framing) at L = 16: [CLS] 14 tokens [SEP], [SEP] after every sentence.
    let data = dir.join("data").display().to_string();
    let input = dir.join("corpus.jsonl").display().to_string();
    let tokenizer_arg = tokenizer.display().to_string();
    let args = ["prepare", "--input", &input, "--output", &data, "--seq-len", "16", "--framing", "bos-eos"];
    let stdout = ok(bd3(&[&args[..], &["--valid-documents", "20", "--tokenizer", &tokenizer_arg]].concat()));
    assert!(stdout.contains("BOS 2 EOS 3 mask 4 padding 0"), "{stdout}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("data/index.json")).unwrap()).unwrap();
    assert_eq!(index["special_ids"], serde_json::json!({ "bos": CLS, "eos": SEP, "mask": MASK, "pad": PAD }));
    assert_eq!(index["vocab_size"], VOCAB);
    assert_eq!(index["tokenizer_file"], "tokenizer.json");
    assert!(index["tokenizer"].as_str().unwrap().contains("tokenizer.json"), "{index}");
    assert_eq!(std::fs::read(dir.join("data/tokenizer.json")).unwrap(), std::fs::read(&tokenizer).unwrap());

    // The stored ids decode to the documents: every sequence is [CLS] … [SEP], and the pieces
    // between the frames, joined, are the training documents each followed by [SEP].
    let train = split_tokens(&data, dataloader::SplitName::Train);
    let mut stream = vec![];
    for seq in train.chunks(16) {
        assert_eq!((seq[0], seq[15]), (CLS, SEP), "{seq:?}");
        stream.extend_from_slice(&seq[1..15]);
    }
    let from_data = TextTokenizer::of_data_set(&data).unwrap();
    let decoded = from_data.decode(&stream);
    let expected: Vec<String> = docs[..180].iter().map(|d| format!("{} [SEP]", d.to_lowercase())).collect();
    let expected = expected.join(" ");
    assert!(expected.starts_with(&decoded[..decoded.len() - 20]), "decoded:\n{decoded}\nexpected:\n{expected}");

    // Train a tiny model on it: the model's vocabulary is the tokenizer's, [MASK] its own.
    let runs = dir.join("runs");
    let dataset = format!("data.dataset={data:?}");
    let vocab = format!("model.vocab_size={VOCAB}");
    let mask = format!("diffusion.mask_id={MASK}");
    let sets = ["train.steps=2", "model.seq_len=16", "diffusion.block_size=4", &dataset, &vocab, &mask];
    ok(tiny_command("train", &runs, "bert", &sets).output().unwrap());

    // The sampler starts every sequence with the recorded BOS ([CLS]) and decodes with the
    // data set's tokenizer, both recorded by the run: the data set may be gone meanwhile.
    let moved = dir.join("data-moved");
    std::fs::rename(dir.join("data"), &moved).unwrap();
    let run = runs.join("bert");
    let (config, weights) = (run.join("config.toml"), run.join("model.safetensors"));
    let stdout = ok(bd3(&[
        "sample",
        "--config",
        config.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--tokens",
        "16",
        "--format",
        "jsonl",
        "--set",
        "sample.batch=2",
    ]));
    let samples: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(samples.len(), 2, "{stdout}");
    for s in &samples {
        let tokens: Vec<u64> = s["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        assert_eq!(tokens[0], CLS as u64, "{s}");
        assert!(tokens.iter().all(|&t| t < VOCAB as u64 && t != MASK as u64), "{s}");
        assert!(s["text"].as_str().unwrap().starts_with("[CLS]"), "{s}");
    }
    std::fs::rename(&moved, dir.join("data")).unwrap();

    // A model whose vocabulary cannot hold the tokenizer's ids is refused before training.
    let small = format!("model.vocab_size={}", VOCAB - 3);
    let sets = ["train.steps=1", "model.seq_len=16", "diffusion.block_size=4", &dataset, &small, &mask];
    let mut cmd = tiny_command("train", &runs, "small-vocab", &sets);
    let out = cmd.output().unwrap();
    assert_refused(
        &out,
        &cmd,
        &[&format!("model.vocab_size ({})", VOCAB - 3), "tokenizer.json", &format!("{VOCAB} ids")],
    );
    // A model whose [MASK] is not the tokenizer's is refused, naming the id to use.
    let sets = ["train.steps=1", "model.seq_len=16", "diffusion.block_size=4", &dataset];
    let mut cmd = tiny_command("train", &runs, "gpt2-mask", &sets);
    let out = cmd.output().unwrap();
    assert_refused(&out, &cmd, &["records the mask id 4", "diffusion.mask_id = 4"]);
}

/// `n` sentences in `dir`, prepared one per sequence of 12 tokens (`--framing pad`) with the
/// test tokenizer, the last `valid` held out: (data set, corpus file, the sentences).
fn prepare_padded(dir: &Path, n: usize, valid: usize) -> (String, String, Vec<String>) {
    let tokenizer = dir.join("tokenizer.json");
    write_tokenizer(&tokenizer);
    let docs = write_corpus(&dir.join("corpus.jsonl"), n);
    let (data, input) = (dir.join("data").display().to_string(), dir.join("corpus.jsonl").display().to_string());
    let tokenizer_arg = tokenizer.display().to_string();
    let args = [
        "prepare",
        "--input",
        &input,
        "--output",
        &data,
        "--seq-len",
        "12",
        "--framing",
        "pad",
        "--tokenizer",
        &tokenizer_arg,
        "--valid-documents",
        &valid.to_string(),
    ];
    ok(bd3(&args));
    (data, input, docs)
}

#[test]
fn unpacked_framing_pads_one_sentence_per_sequence() {
    let scratch = scratch_dir("tokenizer-pad");
    let dir = scratch.path();
    let (data, input, docs) = prepare_padded(dir, 30, 5);
    let tok = TextTokenizer::of_data_set(&data).unwrap();
    let train = split_tokens(&data, dataloader::SplitName::Train);
    assert_eq!(train.len(), 25 * 12, "one sequence per training sentence");
    for (seq, doc) in train.chunks(12).zip(&docs) {
        let mut ids = tok.encode(doc).unwrap();
        ids.push(SEP);
        if ids.len() > 11 {
            ids.truncate(10);
            ids.push(SEP);
        }
        let mut expected = vec![CLS];
        expected.extend(&ids);
        expected.resize(12, PAD);
        assert_eq!(seq, &expected[..], "{doc}");
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("data/index.json")).unwrap()).unwrap();
    assert_eq!(index["framing"], "pad");

    // GPT-2 has no padding token: refused, naming what is missing.
    let args =
        ["prepare", "--input", &input, "--output", &format!("{data}-gpt2"), "--seq-len", "12", "--framing", "pad"];
    assert_refused(&bd3(&args), &args, &["framing `pad` needs a tokenizer with a padding token"]);
}

/// The losses logged to a run's metrics.jsonl, one per step.
fn losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

/// Without sentence packing the loss is the mean over the global batch's non-padding
/// positions: the same on 1 rank with 8 rows, 1 rank with 2 micro-batches of 4 and 2 ranks of 4,
/// although the micro-batches hold different numbers of padding positions; evaluation counts
/// only the non-padding tokens.
#[test]
fn unpacked_training_leaves_padding_out_of_the_loss_on_any_number_of_ranks() {
    let scratch = scratch_dir("tokenizer-pad-loss");
    let dir = scratch.path();
    let (data, _, _) = prepare_padded(dir, 40, 10);
    let train = split_tokens(&data, dataloader::SplitName::Train);
    let pads: Vec<usize> = train.chunks(12).map(|s| s.iter().filter(|&&t| t == PAD).count()).collect();
    assert!(pads[..4].iter().sum::<usize>() != pads[4..8].iter().sum::<usize>(), "{pads:?}");

    let runs = dir.join("runs");
    let dataset = format!("data.dataset={data:?}");
    let vocab = format!("model.vocab_size={VOCAB}");
    let mask = format!("diffusion.mask_id={MASK}");
    // In fp64, so that the split of the batch changes the losses only within a stated bound.
    let common = ["train.steps=3", "model.seq_len=12", "diffusion.block_size=4", &dataset, &vocab, &mask, FP64];
    let run = |name: &str, nproc: usize, extra: &[&str]| {
        let mut cmd = tiny_command("train", &runs, name, &[&common[..], extra].concat());
        if nproc > 1 {
            // `bd3 launch local --nproc N train …`: the same arguments under mpirun.
            let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
            cmd = Command::new(bd3_binary());
            cmd.current_dir(repo_root()).args(["launch", "local", "--nproc", &nproc.to_string()]).args(args);
        }
        ok(cmd.output().unwrap());
        losses(&runs.join(name))
    };
    let whole = run("whole", 1, &["train.micro_batch=8"]);
    let accumulated = run("accumulated", 1, &["train.micro_batch=4", "train.grad_accum=2"]);
    let two_ranks = run("two-ranks", 2, &["train.micro_batch=4"]);
    assert_eq!(whole.len(), 3, "{whole:?}");
    // 3 steps at tiny.toml's lr of 3e-3 at most, sums over 8 sequences × 2 streams × 12 positions.
    let rel = data_parallel_tolerance(3, 3e-3, 8 * 2 * 12);
    for (what, other) in [("2 micro-batches", &accumulated), ("2 ranks", &two_ranks)] {
        for (a, b) in whole.iter().zip(other.iter()) {
            assert!((a - b).abs() <= rel * a.abs(), "{what}: {other:?} against one batch of 8: {whole:?} ({rel:e})");
        }
        assert_eq!(other.len(), whole.len());
    }

    // Evaluation counts the non-padding tokens after position 0 of the held-out sentences (all
    // 10 of them: a data set's split is evaluated in whole micro-batches).
    let run_dir = runs.join("whole");
    let (config, weights) = (run_dir.join("config.toml"), run_dir.join("model.safetensors"));
    let (config, weights) = (config.to_str().unwrap(), weights.to_str().unwrap());
    let args = ["eval", "ppl", "--config", config, "--weights", weights, "--json", "--set", "train.micro_batch=5"];
    let report: serde_json::Value = serde_json::from_str(ok(bd3(&args)).trim()).unwrap();
    let valid = split_tokens(&data, dataloader::SplitName::Valid);
    let counted: usize = valid.chunks(12).map(|s| s[1..].iter().filter(|&&t| t != PAD).count()).sum();
    assert_eq!(report["tokens"], counted, "{report}");
    assert!(counted < valid.len() / 12 * 11, "the held-out sentences have padding");
}
