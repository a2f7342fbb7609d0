#!/usr/bin/env bash
# CI: the drop-in library works from a plain `pip install trajguard` (no extras) and that
# install brings none of the server/training dependencies. Builds an EMPTY venv in a temp
# dir, installs the pinned CPU torch, then the repo without extras, and runs
# .ci/check_core_install.py there (outside the repo, so `import guard` is the installed copy).
# The source is copied first (the files git tracks or does not ignore), so the build
# writes nothing into the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
    | tar --null --files-from=- -cf - | tar -xf - -C "$tmp/src"
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q torch==2.13.0
"$tmp/venv/bin/pip" install -q "$tmp/src"
echo "core install: venv + torch + trajguard in $((SECONDS - start)) s"
(cd "$tmp" && "$tmp/venv/bin/python" "$repo/.ci/check_core_install.py")
echo "core install check passed in $((SECONDS - start)) s"
