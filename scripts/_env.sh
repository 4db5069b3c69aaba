# Shared by scripts/demo and scripts/test: make the project's virtualenv and install into it.
# Sourced, not run. Needs Python >= 3.11 as python3 (or $PYTHON).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
"$python" - <<'PY' || { echo "dicom-cloud needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i "warning" || true
fi
install() {  # install the project with the given extras, quietly unless it fails
    # Pinned to the versions the test suite was last run with (constraints/test.txt).
    local log
    log="$(mktemp)"
    if ! .venv/bin/python -m pip install -q -c constraints/test.txt -e ".[$1]" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "pip install failed" >&2
        exit 1
    fi
    rm -f "$log"
}
