#!/usr/bin/env bash
# Rebuilds the vendored Swagger UI of the API's /docs page from the npm registry, reproducibly:
# the exact version and integrity hash come from package-lock.json (`npm ci`), and the work
# happens in a temporary folder so no node_modules is left in the repository. Install scripts
# are not run: swagger-ui-dist depends on @scarf/scarf, whose only script reports the install.
# The API needs none of this at run time: it serves the committed files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null)
m="$work/node_modules/swagger-ui-dist"
# The self-contained bundle (it carries the standalone preset FastAPI's page uses), its
# stylesheet and icon, copied as published; the licence, notice and the bundled libraries' licences.
cp "$m/swagger-ui-bundle.js" "$m/swagger-ui.css" "$m/favicon-32x32.png" "$here/"
cp "$m/swagger-ui-bundle.js.LICENSE.txt" "$here/"
cp "$m/LICENSE" "$here/LICENSE.swagger-ui"
cp "$m/NOTICE" "$here/NOTICE.swagger-ui"
(cd "$here" && sha256sum swagger-ui-bundle.js swagger-ui.css favicon-32x32.png >SHA256SUMS)
