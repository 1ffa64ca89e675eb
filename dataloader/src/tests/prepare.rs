use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};

use super::*;
use crate::manifest::SplitName;
use crate::testing::S3TestServer;
use crate::tokenizer::{Gpt2Tokenizer, EOS_ID};
use crate::{prepare, Framing, PackedCorpus, PrepareConfig, Reader, ReaderConfig};

const L: usize = 32;
const VALID_DOCS: u64 = 3;

/// 30 documents of 5 to 300 pseudo-random words, with the odd non-ASCII character.
fn documents() -> Vec<String> {
    let words = [
        "the",
        "block",
        "diffusion",
        "model",
        "writes",
        "text",
        "in",
        "parallel",
        "café",
        "and",
        "so",
        "on",
        "—",
        "quickly",
        "\n",
    ];
    let mut state = 12345u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..30)
        .map(|_| {
            let n = 5 + next() % 296;
            (0..n).map(|_| words[next() % words.len()]).collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// What `prepare` must produce: the in-memory corpus's tokenize-and-pack, the slow obvious path.
fn reference(docs: &[String], seq_len: usize) -> PackedCorpus {
    let tok = Gpt2Tokenizer::new().unwrap();
    let ids: Vec<Vec<u32>> = docs.iter().map(|d| [tok.encode(d), vec![EOS_ID]].concat()).collect();
    PackedCorpus::pack(&ids, seq_len, VALID_DOCS as usize).unwrap()
}

fn write_txt_dir(dir: &Path, docs: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, d) in docs.iter().enumerate() {
        std::fs::write(dir.join(format!("doc-{i:03}.txt")), d).unwrap();
    }
    std::fs::write(dir.join("README.md"), "not a document").unwrap();
}

fn jsonl(docs: &[String]) -> String {
    docs.iter().map(|d| serde_json::json!({"id": 1, "text": d}).to_string() + "\n\n").collect()
}

fn parquet_text(docs: &[String]) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema.clone(), None).unwrap();
    for part in docs.chunks(11) {
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(part.to_vec()))]).unwrap();
        w.write(&batch).unwrap();
        w.flush().unwrap();
    }
    w.into_inner().unwrap()
}

fn config(input: &str, output: &str) -> PrepareConfig {
    PrepareConfig {
        valid_documents: VALID_DOCS,
        shard_sequences: 8,
        row_group_sequences: 4,
        threads: 2,
        command: "bd3 prepare (test)".to_string(),
        progress: false,
        ..PrepareConfig::new(input, output, L)
    }
}

/// Both splits in stored order.
fn read_back(url: &str, options: Vec<(String, String)>) -> [Vec<u32>; 2] {
    [SplitName::Train, SplitName::Valid].map(|split| {
        let c =
            ReaderConfig { split, shuffle: false, store_options: options.clone(), ..ReaderConfig::new(0, 0, 1, 1, 1) };
        let mut r = Reader::open(url, c).unwrap();
        (0..r.batches_per_epoch()).flat_map(|_| r.next_batch().unwrap().tokens).collect()
    })
}

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn text_jsonl_and_parquet_inputs_give_the_reference_packing() {
    let docs = documents();
    let expected = reference(&docs, L);
    assert!(expected.num_train() > 16 && expected.num_valid() > 1, "the test spans several shards");
    let tmp = temp_dir("prepare").unwrap();
    write_txt_dir(&tmp.path().join("txt"), &docs);
    let (a, b) = docs.split_at(17);
    std::fs::create_dir_all(tmp.path().join("jsonl")).unwrap();
    std::fs::write(tmp.path().join("jsonl/part-0.jsonl"), jsonl(a)).unwrap();
    std::fs::write(tmp.path().join("jsonl/part-1.jsonl"), jsonl(b)).unwrap();
    std::fs::write(tmp.path().join("docs.parquet"), parquet_text(&docs)).unwrap();
    let mut manifests = Vec::new();
    for input in ["txt", "jsonl", "docs.parquet"] {
        let out = tmp.path().join(format!("out-{input}"));
        let out = out.to_str().unwrap();
        let summary = prepare(&config(tmp.path().join(input).to_str().unwrap(), out)).unwrap();
        let m = &summary.manifest;
        assert_eq!((m.train.documents, m.valid.documents), (27, 3), "{input}");
        assert_eq!(m.train.sequences as usize, expected.num_train(), "{input}");
        assert_eq!(m.train.shards.len(), expected.num_train().div_ceil(8), "{input}");
        let [train, valid] = read_back(out, vec![]);
        assert_eq!(train, expected.train, "{input}: training tokens");
        assert_eq!(valid, expected.valid, "{input}: validation tokens");
        crate::prepare::verify(out, vec![]).unwrap();
        manifests.push(summary.manifest);
    }
    assert!(manifests.iter().all(|m| m.train == manifests[0].train), "the same shards from every format");
}

/// A temporary directory holding the test documents as `docs.jsonl`, and that file's path.
fn jsonl_input() -> (TempDir, String) {
    let tmp = temp_dir("prepare").unwrap();
    let input = tmp.path().join("docs.jsonl");
    std::fs::write(&input, jsonl(&documents())).unwrap();
    let input = input.to_str().unwrap().to_string();
    (tmp, input)
}

#[test]
fn prepare_is_deterministic_and_continues_after_a_crash() {
    let (tmp, input) = jsonl_input();
    let input = input.as_str();
    let out = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    prepare(&config(input, &out("a"))).unwrap();
    prepare(&config(input, &out("b"))).unwrap();
    let a = files(Path::new(&out("a")));
    assert!(a.contains_key("index.json") && a.contains_key("train-00000.parquet"));
    assert_eq!(a, files(Path::new(&out("b"))), "byte-identical shards and manifest");

    // A crash after three shards, and a half-written fourth left behind by some other writer.
    let crashed = PrepareConfig { fail_after_shards: Some(3), ..config(input, &out("c")) };
    let err = prepare(&crashed).unwrap_err();
    assert!(format!("{err:#}").contains("after 3 shards"), "{err:#}");
    assert!(!Path::new(&out("c")).join("index.json").exists());
    std::fs::write(Path::new(&out("c")).join("train-00003.parquet"), b"PAR1 half a shard").unwrap();
    let summary = prepare(&config(input, &out("c"))).unwrap();
    assert_eq!(summary.resumed_shards, 3);
    assert_eq!(files(Path::new(&out("c"))), a, "the continued run wrote the same bytes");
    // Running again has nothing to do; other settings on the same output are refused.
    assert_eq!(prepare(&config(input, &out("c"))).unwrap().resumed_shards, a.len() - 2);
    let err = prepare(&PrepareConfig { seq_len: 16, ..config(input, &out("c")) }).unwrap_err();
    assert!(format!("{err:#}").contains("other input or settings"), "{err:#}");
}

#[test]
fn a_rerun_over_a_damaged_output_names_the_bad_shard_instead_of_doing_nothing() {
    let (tmp, input) = jsonl_input();
    let out = tmp.path().join("out");
    let c = config(&input, out.to_str().unwrap());
    prepare(&c).unwrap();
    assert!(prepare(&c).is_ok(), "an intact output: nothing to do");
    // The same size, one byte flipped: only the SHA-256 can tell.
    let shard = out.join("train-00001.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    let msg = format!("{:#}", prepare(&c).unwrap_err());
    assert!(
        msg.contains("train-00001.parquet") && msg.contains("SHA-256") && msg.contains("remove the output"),
        "{msg}"
    );
    // A truncated shard is named by its size.
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let msg = format!("{:#}", prepare(&c).unwrap_err());
    assert!(msg.contains("train-00001.parquet") && msg.contains("the manifest says"), "{msg}");
    std::fs::remove_file(&shard).unwrap();
    let msg = format!("{:#}", prepare(&c).unwrap_err());
    assert!(msg.contains("train-00001.parquet is missing"), "{msg}");
}

#[test]
fn a_crash_in_the_validation_split_continues_too() {
    let docs = documents();
    let tmp = temp_dir("prepare").unwrap();
    write_txt_dir(&tmp.path().join("txt"), &docs);
    let input = tmp.path().join("txt");
    let input = input.to_str().unwrap();
    let base = PrepareConfig { valid_documents: 12, ..config(input, "") };
    let clean = tmp.path().join("clean");
    prepare(&PrepareConfig { output: clean.to_str().unwrap().into(), ..base.clone() }).unwrap();
    let expected = files(&clean);
    let shards = expected.keys().filter(|k| k.ends_with(".parquet")).count();
    let train_shards = expected.keys().filter(|k| k.starts_with("train-")).count();
    assert!(shards > train_shards + 1, "several validation shards");
    let out = tmp.path().join("crashed");
    let crashed = PrepareConfig {
        output: out.to_str().unwrap().into(),
        fail_after_shards: Some(train_shards + 1),
        ..base.clone()
    };
    assert!(prepare(&crashed).is_err());
    let summary = prepare(&PrepareConfig { fail_after_shards: None, ..crashed }).unwrap();
    assert_eq!(summary.resumed_shards, train_shards + 1);
    assert_eq!(files(&out), expected);
}

#[test]
fn bos_eos_framing_wraps_pieces_of_l_minus_2() {
    let docs = documents();
    let tmp = temp_dir("prepare").unwrap();
    write_txt_dir(&tmp.path().join("txt"), &docs);
    let out = tmp.path().join("out");
    let c = PrepareConfig {
        framing: Framing::BosEos,
        ..config(tmp.path().join("txt").to_str().unwrap(), out.to_str().unwrap())
    };
    assert_eq!(prepare(&c).unwrap().manifest.framing, "bos_eos");
    let expected = reference(&docs, L - 2);
    let [train, _] = read_back(out.to_str().unwrap(), vec![]);
    let framed: Vec<u32> = expected.train.chunks(L - 2).flat_map(|p| [&[EOS_ID][..], p, &[EOS_ID]].concat()).collect();
    assert_eq!(train, framed);
}

#[test]
fn prepare_reads_from_and_writes_to_s3() {
    let server = S3TestServer::start().unwrap();
    server.create_bucket("corpus").unwrap();
    server.create_bucket("tokens").unwrap();
    let docs = documents();
    let (a, b) = docs.split_at(20);
    let input = crate::store::open_with_options("s3://corpus/owt", server.options()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use object_store::ObjectStoreExt;
        input.store.put(&input.child("0.parquet"), parquet_text(a).into()).await.unwrap();
        input.store.put(&input.child("1.parquet"), parquet_text(b).into()).await.unwrap();
    });
    let c = PrepareConfig { store_options: server.options(), ..config("s3://corpus/owt", "s3://tokens/owt-gpt2") };
    prepare(&c).unwrap();
    let expected = reference(&docs, L);
    let [train, valid] = read_back("s3://tokens/owt-gpt2", server.options());
    assert_eq!((train, valid), (expected.train, expected.valid));
    assert!(server.root().join("tokens/owt-gpt2/index.json").is_file());
}

#[test]
fn bad_text_input_names_the_file_and_line() {
    let tmp = temp_dir("prepare").unwrap();
    let config = |input: &str, output: &str| PrepareConfig { valid_documents: 0, ..config(input, output) };
    std::fs::write(tmp.path().join("a.jsonl"), "{\"text\": \"fine\"}\n{\"body\": \"no text\"}\n").unwrap();
    let err = prepare(&config(tmp.path().join("a.jsonl").to_str().unwrap(), tmp.path().join("o").to_str().unwrap()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("a.jsonl, line 2: expected an object with a string field `text`"), "{err:#}");
    std::fs::write(tmp.path().join("b.jsonl"), "{\"text\": \"fine\"}\nnot json\n").unwrap();
    let err = prepare(&config(tmp.path().join("b.jsonl").to_str().unwrap(), tmp.path().join("o").to_str().unwrap()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("b.jsonl, line 2: not valid JSON"), "{err:#}");
    let c = PrepareConfig { text_field: "content".into(), ..config("", tmp.path().join("o").to_str().unwrap()) };
    std::fs::write(tmp.path().join("c.parquet"), parquet_text(&documents())).unwrap();
    let err =
        prepare(&PrepareConfig { input: tmp.path().join("c.parquet").to_str().unwrap().into(), ..c }).unwrap_err();
    assert!(format!("{err:#}").contains("c.parquet: no column `content`"), "{err:#}");
    let err = prepare(&config(tmp.path().join("missing").to_str().unwrap(), "unused")).unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}
