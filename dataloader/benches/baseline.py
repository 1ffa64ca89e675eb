"""Python baselines for the data-loader benchmark (data_throughput.rs runs this with .venv/bin/python).

  baseline.py tiktoken JSONL R50K_FILE THREADS   GPT-2 BPE (r50k_base) of every document's text
  baseline.py read EPOCHS DIR [S3_ENDPOINT KEY SECRET]  every row group of every shard, EPOCHS times

Each prints one JSON line. tiktoken's r50k_base is built from the BPE file that tiktoken-rs
embeds (the machine cannot download tiktoken's own copy), with the split pattern of tiktoken's own r50k_base (the one tiktoken-rs uses too).
"""
import json
import sys
import time


def tiktoken_bench(path, r50k, threads):
    import base64

    import tiktoken

    with open(r50k, "rb") as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    enc = tiktoken.Encoding(
        name="r50k_base",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    start = time.perf_counter()
    ids = enc.encode_ordinary_batch(docs, num_threads=threads)
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in ids)
    print(json.dumps({"text_bytes": text_bytes, "tokens": tokens, "seconds": seconds, "first": ids[0][:8]}))


def read_bench(epochs, directory, endpoint=None, key=None, secret=None):
    import pyarrow.parquet as pq

    if endpoint:
        from pyarrow import fs

        filesystem = fs.S3FileSystem(
            access_key=key, secret_key=secret, endpoint_override=endpoint, scheme="http", region="us-east-1"
        )
        prefix = directory  # bucket/prefix
    else:
        filesystem = None
        prefix = directory
    start = time.perf_counter()
    if filesystem:
        with filesystem.open_input_stream(prefix + "/index.json") as f:
            manifest = json.loads(f.read())
    else:
        with open(prefix + "/index.json") as f:
            manifest = json.load(f)
    tokens = 0
    checksum = 0
    for _ in range(int(epochs)):
        for shard in manifest["train"]["shards"]:
            pf = pq.ParquetFile(prefix + "/" + shard["path"], filesystem=filesystem)
            for g in range(pf.num_row_groups):
                array = pf.read_row_group(g, columns=["tokens"]).column(0).to_numpy()
                tokens += len(array)
                checksum ^= int(array[0])
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": tokens, "seconds": seconds, "checksum": checksum}))


if __name__ == "__main__":
    if sys.argv[1] == "tiktoken":
        tiktoken_bench(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "read":
        read_bench(*sys.argv[2:])
    else:
        sys.exit(f"unknown benchmark {sys.argv[1]}")
