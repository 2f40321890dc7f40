#!/usr/bin/env bash
# Says hello to each name in a file: one name a line, blank lines and # comments skipped.
# Usage: bash greet.sh [FILE]   (default: names.txt in your home directory)
set -euo pipefail

file=${1:-"$HOME/names.txt"}
if [[ ! -r $file ]]; then
    echo "greet.sh: cannot read $file" >&2
    exit 1
fi

count=0
while IFS= read -r name; do
    if [[ -z $name || $name == \#* ]]; then
        continue
    fi
    echo "Hello, $name, from $(uname -n)!"
    count=$((count + 1))
done <"$file"
echo "$count greetings"
