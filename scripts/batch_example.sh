#!/usr/bin/env bash
# Batch example: compare every method on every matrix in a folder, one JSON file per matrix,
# a CSV of all results, and a summary of which method wins where.
#
#   bash scripts/batch_example.sh ../shared/data/real results/
#
# A bad file gets its one-line error (on stderr) and the loop goes on; the script exits 1
# at the end if any file failed. Needs `sfa` on PATH (e.g. `make install; source .venv/bin/activate`)
# and jq for the summary (optional).
set -u
src=${1:-data}
out=${2:-batch_results}
mkdir -p "$out"
failed=0
for f in "$src"/*.mtx "$src"/*.npz "$src"/*.h5 "$src"/*.mat; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    echo "== $name" >&2
    if ! sfa compare "$f" --json --quiet --time-limit 60 > "$out/$name.json"; then
        failed=1
        rm -f "$out/$name.json"
    fi
done
# One CSV over all matrices in a single call (the same results, other format):
sfa compare "$src"/*.mtx --csv "$out/all.csv" --time-limit 60 --quiet --force > /dev/null || failed=1
if command -v jq > /dev/null; then
    for j in "$out"/*.json; do
        jq -r '[.path, .n, .best, .verdict] | @tsv' "$j"
    done
fi
exit $failed
