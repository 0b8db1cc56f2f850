#!/usr/bin/env bash
# Rebuilds the vendored browser libraries from the npm registry, reproducibly: exact versions
# and integrity hashes come from package-lock.json (`npm ci`), esbuild is pinned, and the work
# happens in a temporary folder so no node_modules is left in the repository. The dashboard
# itself needs none of this at run time: it serves the committed output files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$work/"
(cd "$work" && npm ci --no-audit --no-fund >/dev/null)
m="$work/node_modules"
# uPlot ships a single-file ES module and its stylesheet: copied as they are.
cp "$m/uplot/dist/uPlot.esm.js" "$here/uplot.esm.js"
cp "$m/uplot/dist/uPlot.min.css" "$here/uplot.min.css"
cp "$m/uplot/LICENSE" "$here/LICENSE.uplot"
# yaml ships ~70 ES module files: bundled into one, so the page loads a single file.
printf 'export { parseDocument, stringify, isMap, isSeq, isScalar, isPair, LineCounter } from "yaml";\n' >"$work/entry.js"
"$m/.bin/esbuild" "$work/entry.js" --bundle --format=esm --minify --legal-comments=none \
  --target=es2020 --outfile="$here/yaml.esm.js" --log-level=warning
cp "$m/yaml/LICENSE" "$here/LICENSE.yaml"
(cd "$here" && sha256sum uplot.esm.js uplot.min.css yaml.esm.js >SHA256SUMS)
